// Argument checks of growdense::negative_elbo and its backward (CPU and CUDA).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>

namespace growdense {

struct ElboSizes {
  int64_t samples, batch, pixels, latent;  // L, B, D, Z
};

// logits (L, B, D) in float64, float32, bfloat16 or float16; target (B, D), mu and
// logvar (B, Z) in the accumulation type of the logits (float64 for float64 logits,
// else float32), all on one device.
inline ElboSizes check_elbo_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                                 const at::Tensor& logvar) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "growdense: negative_elbo needs logits of shape (L, B, D) (L latent samples ",
                    "per image), got ", logits.sizes(), "; for a single sample pass logits.unsqueeze(0)");
  const int64_t L = logits.size(0), B = logits.size(1), D = logits.size(2);
  TORCH_CHECK_VALUE(L >= 1, "growdense: negative_elbo needs at least one latent sample (L >= 1), got logits ",
                    logits.sizes());
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == B && target.size(1) == D,
                    "growdense: negative_elbo's target must have shape (B, D) = (", B, ", ", D,
                    ") to match logits of shape ", logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK_VALUE(mu.dim() == 2 && mu.size(0) == B, "growdense: negative_elbo's mu must have shape (B, Z) with B = ",
                    B, " (the batch of the logits), got ", mu.sizes());
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "growdense: negative_elbo's logvar must have the shape of mu ",
                    mu.sizes(), ", got ", logvar.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "growdense: negative_elbo needs float64, float32, bfloat16 or float16 logits, got ", dtype);
  const auto acc = at::toOpMathType(dtype);
  const std::array<std::pair<const char*, const at::Tensor*>, 3> others{
      {{"target", &target}, {"mu", &mu}, {"logvar", &logvar}}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_TYPE(t->scalar_type() == acc, "growdense: negative_elbo's ", name, " must be ", acc,
                     " (the accumulation type of ", dtype, " logits), got ", t->scalar_type(), "; convert it with .to(",
                     acc, ") or call growdense.ops.negative_elbo, which does");
    TORCH_CHECK(t->device() == logits.device(), "growdense: negative_elbo's ", name, " is on ", t->device(),
                " but the logits are on ", logits.device());
  }
  return {L, B, D, mu.size(1)};
}

// The backward's extra argument: grad of the per-image loss, shape (B,), accumulation type.
inline void check_elbo_grad(const at::Tensor& grad, const at::Tensor& logits, const ElboSizes& s) {
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == s.batch, "growdense: negative_elbo_backward's grad must have ",
                    "shape (B,) = (", s.batch, ",), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == at::toOpMathType(logits.scalar_type()),
                   "growdense: negative_elbo_backward's grad must be ", at::toOpMathType(logits.scalar_type()), ", got ",
                   grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(), "growdense: negative_elbo_backward's grad is on ", grad.device(),
              " but the logits are on ", logits.device());
}

}  // namespace growdense

// CPU kernels of growdense::negative_elbo and growdense::negative_elbo_backward: the
// vectorised loops of vec/elbo_kernel.h, in the compilation for this CPU (capability.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/capability.h"
#include "elbo_args.h"

namespace growdense {
namespace {

cpu::ElboArgs elbo_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                        const at::Tensor& logvar, const ElboSizes& s) {
  return {logits.scalar_type(), logits.const_data_ptr(), target.const_data_ptr(), mu.const_data_ptr(),
          logvar.const_data_ptr(), s.samples, s.batch, s.pixels, s.latent};
}

at::Tensor negative_elbo_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                             const at::Tensor& logvar) {
  const ElboSizes s = check_elbo_args(logits, target, mu, logvar);
  const at::Tensor l = logits.contiguous(), x = target.contiguous(), m = mu.contiguous(), v = logvar.contiguous();
  at::Tensor out = at::empty({s.batch}, target.options());
  cpu::kernels().elbo_forward(elbo_args(l, x, m, v, s), out.mutable_data_ptr());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> negative_elbo_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
    const at::Tensor& logvar, std::array<bool, 4> output_mask) {
  const ElboSizes s = check_elbo_args(logits, target, mu, logvar);
  check_elbo_grad(grad, logits, s);
  const at::Tensor g = grad.contiguous(), l = logits.contiguous(), x = target.contiguous(), m = mu.contiguous(),
                   v = logvar.contiguous();
  const auto made = [](bool wanted, const at::Tensor& like) {
    return wanted ? at::empty(like.sizes(), like.options()) : at::empty({0}, like.options());
  };
  at::Tensor gl = made(output_mask[0], logits), gt = made(output_mask[1], target), gm = made(output_mask[2], mu),
             gv = made(output_mask[3], logvar);
  const auto ptr = [](bool wanted, at::Tensor& t) { return wanted ? t.mutable_data_ptr() : nullptr; };
  const cpu::ElboGrads grads{g.const_data_ptr(), ptr(output_mask[0], gl), ptr(output_mask[1], gt),
                             ptr(output_mask[2], gm), ptr(output_mask[3], gv)};
  cpu::kernels().elbo_backward(elbo_args(l, x, m, v, s), grads);
  return {gl, gt, gm, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) {
  m.impl("negative_elbo", &negative_elbo_cpu);
  m.impl("negative_elbo_backward", &negative_elbo_backward_cpu);
}

}  // namespace growdense

// Argument checks shared by every kernel of the growdense ops (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

#include "activation.h"

namespace growdense {

inline Activation parse_activation(std::string_view name) {
  Activation act = Activation::None;
  if (find_activation(name, act)) return act;
  std::string known;
  for (const ActivationName& entry : kActivationNames) {
    known += (known.empty() ? "'" : ", '") + std::string(entry.name) + "'";
  }
  TORCH_CHECK_VALUE(false, "growdense: unknown activation '", name, "'; expected one of ", known);
}

// Checks x (..., active_in), weight (cap_out, cap_in), bias (cap_out) against the
// active widths, and returns the number of rows of x seen as a matrix.
inline int64_t check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t active_in,
                                 int64_t active_out) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "growdense: weight must be 2-D (capacity_out, capacity_in), got ",
                    weight.dim(), "-D");
  TORCH_CHECK_VALUE(x.dim() >= 1, "growdense: input must have at least one dimension");
  TORCH_CHECK_VALUE(active_in >= 1 && active_in <= weight.size(1), "growdense: active_in=", active_in,
                    " must be in [1, capacity_in=", weight.size(1), "]");
  TORCH_CHECK_VALUE(active_out >= 1 && active_out <= weight.size(0), "growdense: active_out=", active_out,
                    " must be in [1, capacity_out=", weight.size(0), "]");
  TORCH_CHECK_VALUE(x.size(-1) == active_in, "growdense: input has ", x.size(-1),
                    " features in its last dimension but the layer's active in_features is ", active_in);
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "growdense: input dtype ", x.scalar_type(),
                   " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "growdense: input is on ", x.device(), " but weight is on ",
              weight.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "growdense: bias must have shape (",
                      weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "growdense: bias dtype ", bias->scalar_type(),
                     " differs from weight dtype ", weight.scalar_type());
    TORCH_CHECK(bias->device() == weight.device(), "growdense: bias is on ", bias->device(),
                " but weight is on ", weight.device());
  }
  return active_in == 0 ? 0 : x.numel() / active_in;
}

// Checks the extra arguments of the backward op against the forward's. `saved` is
// what the activation's backward reads (backward_needs): the forward's output or its
// pre-activation, of the shape of grad_out.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                const std::optional<at::Tensor>& saved, int64_t active_out,
                                Activation act) {
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(-1) == active_out,
                    "growdense: grad_out must have shape (..., ", active_out, ") matching the input, got ",
                    grad_out.sizes());
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    TORCH_CHECK_VALUE(grad_out.size(d) == x.size(d), "growdense: grad_out shape ", grad_out.sizes(),
                      " does not match input shape ", x.sizes());
  }
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "growdense: grad_out dtype ",
                   grad_out.scalar_type(), " differs from input dtype ", x.scalar_type());
  const ActivationSaves needs = backward_needs(act);
  if (needs != ActivationSaves::Nothing) {
    TORCH_CHECK_VALUE(saved.has_value() && saved->sizes() == grad_out.sizes(), "growdense: the ",
                      activation_name(act), " backward needs the forward's ",
                      needs == ActivationSaves::Output ? "output" : "pre-activation",
                      " as `saved`, of the shape of grad_out ", grad_out.sizes());
    TORCH_CHECK_TYPE(saved->scalar_type() == x.scalar_type(), "growdense: saved dtype ", saved->scalar_type(),
                     " differs from input dtype ", x.scalar_type());
    TORCH_CHECK(saved->device() == x.device(), "growdense: saved is on ", saved->device(), " but the input is on ",
                x.device());
  }
}

// Checks the block [row_start, row_end) x [col_start, col_end) of a 2-D tensor.
inline void check_block(const at::Tensor& self, int64_t row_start, int64_t row_end, int64_t col_start,
                        int64_t col_end, double std) {
  TORCH_CHECK_VALUE(self.dim() == 2, "growdense: normal_block_ needs a 2-D tensor, got ", self.dim(), "-D");
  TORCH_CHECK_VALUE(0 <= row_start && row_start <= row_end && row_end <= self.size(0), "growdense: rows [",
                    row_start, ", ", row_end, ") are not inside [0, ", self.size(0), ")");
  TORCH_CHECK_VALUE(0 <= col_start && col_start <= col_end && col_end <= self.size(1), "growdense: columns [",
                    col_start, ", ", col_end, ") are not inside [0, ", self.size(1), ")");
  TORCH_CHECK_VALUE(std >= 0.0, "growdense: the standard deviation must be >= 0, got ", std);
  TORCH_CHECK_TYPE(at::isFloatingType(self.scalar_type()), "growdense: normal_block_ needs a floating tensor, got ",
                   self.scalar_type());
}

}  // namespace growdense

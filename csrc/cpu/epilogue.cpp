// The linear op's CPU epilogues (epilogue.h).
#include "cpu/epilogue.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include "activation_aten.h"
#include "cpu/capability.h"

namespace growdense::cpu {
namespace {

bool kernel_dtype(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf;
}

// A CPU matrix of a kernel dtype whose rows are contiguous.
bool kernel_rows(const at::Tensor& t) {
  return t.dim() == 2 && t.is_cpu() && kernel_dtype(t) && (t.size(1) <= 1 || t.stride(1) == 1) &&
         t.stride(0) >= t.size(1);
}

}  // namespace

void bias_activation_(at::Tensor& y, const std::optional<at::Tensor>& bias, Activation act) {
  const bool bias_ok = !bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == y.scalar_type());
  if (!kernel_rows(y) || !bias_ok) {
    if (bias.has_value()) y.add_(*bias);
    aten_activation_(act, y);
    return;
  }
  if (y.numel() == 0) return;
  const EpilogueArgs args{y.scalar_type(), act, y.size(0), y.size(1)};
  kernels().bias_activation(args, y.const_data_ptr(), y.stride(0), y.mutable_data_ptr(), y.stride(0),
                            bias.has_value() ? bias->const_data_ptr() : nullptr);
}

at::Tensor activation(const at::Tensor& z, Activation act) {
  if (!kernel_rows(z) || z.numel() == 0) return aten_activation(act, z);
  at::Tensor y = at::empty(z.sizes(), z.options());
  const EpilogueArgs args{z.scalar_type(), act, z.size(0), z.size(1)};
  kernels().bias_activation(args, z.const_data_ptr(), z.stride(0), y.mutable_data_ptr(), y.stride(0), nullptr);
  return y;
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& saved, Activation act,
                               at::Tensor* grad_bias) {
  if (act == Activation::None) {
    if (grad_bias != nullptr) at::sum_out(*grad_bias, grad, {0});
    return grad;
  }
  const bool ok = grad.dim() == 2 && grad.is_cpu() && kernel_dtype(grad) && grad.is_contiguous() &&
                  saved.is_contiguous() && saved.scalar_type() == grad.scalar_type() &&
                  saved.sizes() == grad.sizes() &&
                  (grad_bias == nullptr || (grad_bias->is_contiguous() && grad_bias->numel() == grad.size(1) &&
                                            grad_bias->scalar_type() == grad.scalar_type()));
  if (!ok || grad.numel() == 0) {
    at::Tensor g = aten_activation_backward(act, grad, saved);
    if (grad_bias != nullptr) at::sum_out(*grad_bias, g, {0});
    return g;
  }
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  const EpilogueArgs args{grad.scalar_type(), act, grad.size(0), grad.size(1)};
  kernels().activation_backward(args, grad.const_data_ptr(), saved.const_data_ptr(), out.mutable_data_ptr(),
                                grad_bias != nullptr ? grad_bias->mutable_data_ptr() : nullptr);
  return out;
}

}  // namespace growdense::cpu

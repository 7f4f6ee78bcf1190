// Fast CPU kernels: ATen's GEMM called on the active block as a strided view of the
// capacity buffer (its leading dimension is the capacity, so nothing is copied out),
// with the bias fused into the GEMM (addmm) and the relu applied in place.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "args.h"

namespace growdense {
namespace {

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t active_in, int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, bias, active_in, active_out);
  const at::Tensor x2 = x.reshape({rows, active_in});
  const at::Tensor w = weight.narrow(0, 0, active_out).narrow(1, 0, active_in);
  at::Tensor y = bias.has_value() ? at::addmm(bias->narrow(0, 0, active_out), x2, w.t()) : at::mm(x2, w.t());
  if (act == Activation::Relu) y.relu_();
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = active_out;
  return y.view(sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& out,
    int64_t active_in, int64_t active_out, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, std::nullopt, active_in, active_out);
  check_backward_args(grad_out, x, out, active_out, act);
  at::Tensor g = grad_out.reshape({rows, active_out});
  if (act == Activation::Relu) g = at::threshold_backward(g, out->reshape({rows, active_out}), 0);
  const auto opts = x.options();
  at::Tensor grad_x = at::empty({0}, opts), grad_w = at::empty({0}, opts), grad_b = at::empty({0}, opts);
  if (output_mask[0]) {
    grad_x = at::mm(g, weight.narrow(0, 0, active_out).narrow(1, 0, active_in)).view(x.sizes());
  }
  if (output_mask[1]) {
    grad_w = at::zeros(weight.sizes(), opts);
    at::Tensor block = grad_w.narrow(0, 0, active_out).narrow(1, 0, active_in);
    at::mm_out(block, g.t(), x.reshape({rows, active_in}));
  }
  if (output_mask[2]) {
    grad_b = at::zeros({weight.size(0)}, opts);
    at::Tensor block = grad_b.narrow(0, 0, active_out);
    at::sum_out(block, g, {0});
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace growdense

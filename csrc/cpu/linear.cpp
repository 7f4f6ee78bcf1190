// Fast CPU kernels: ATen's GEMM called on the active block as a strided view of the
// capacity buffer (its leading dimension is the capacity, so nothing is copied out),
// with the bias fused into the GEMM (addmm) and the element-wise epilogues of
// cpu/epilogue.h (the activation after the forward's GEMM, its derivative before the
// backward's), vectorised for the CPU's capability.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <vector>

#include "activation_aten.h"
#include "args.h"
#include "cpu/epilogue.h"

namespace growdense {
namespace {

// The active block of a 2-D capacity buffer (the buffer itself when it is all active).
at::Tensor block_of(const at::Tensor& t, int64_t rows, int64_t cols) {
  if (t.size(0) == rows && t.size(1) == cols) return t;
  return t.narrow(0, 0, rows).narrow(1, 0, cols);
}

// `t` seen as a (rows, cols) matrix, without a new view when it already is one.
at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// act(x W_block^T + b_block) as a (rows, active_out) matrix: the bias fused into the GEMM
// (addmm: bit-identical to nn.Linear, which a GEMM followed by a bias pass is not), then
// the activation in one vectorised pass.
at::Tensor pre_activation(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t rows, int64_t active_in, int64_t active_out, Activation act) {
  const at::Tensor x2 = as_matrix(x, rows, active_in);
  const at::Tensor wt = block_of(weight, active_out, active_in).t();
  at::Tensor z = bias.has_value()
                     ? at::addmm(bias->size(0) == active_out ? *bias : bias->narrow(0, 0, active_out), x2, wt)
                     : at::mm(x2, wt);
  cpu::bias_activation_(z, std::nullopt, act);
  return z;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t active_in, int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, bias, active_in, active_out);
  at::Tensor y = pre_activation(x, weight, bias, rows, active_in, active_out, act);
  return x.dim() == 2 ? y : y.view(with_last(x.sizes(), active_out));
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, int64_t active_in,
                                                      int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, bias, active_in, active_out);
  const bool saves_z = backward_needs(act) == ActivationSaves::PreActivation;
  at::Tensor z = pre_activation(x, weight, bias, rows, active_in, active_out, saves_z ? Activation::None : act);
  if (x.dim() != 2) z = z.view(with_last(x.sizes(), active_out));
  if (!saves_z) return {z, at::empty({0}, x.options())};
  return {aten_activation(act, z), z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& saved,
    int64_t active_in, int64_t active_out, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, std::nullopt, active_in, active_out);
  check_backward_args(grad_out, x, saved, active_out, act);
  const auto opts = x.options();
  const int64_t cap_out = weight.size(0), cap_in = weight.size(1);
  at::Tensor grad_x, grad_w, grad_b;
  // The activation's derivative in one vectorised pass. The bias gradient stays ATen's
  // sum: the autograd kernel's in-place path (csrc/autograd/linear.cpp) sums with it too,
  // and both paths must give the same bits (cpu::activation_backward can fuse the column
  // sums into its pass, once both use it).
  const at::Tensor g = cpu::activation_backward(
      as_matrix(grad_out, rows, active_out).contiguous(),
      backward_needs(act) != ActivationSaves::Nothing ? as_matrix(*saved, rows, active_out).contiguous() : at::Tensor(),
      act, nullptr);
  if (output_mask[0]) {
    grad_x = at::mm(g, block_of(weight, active_out, active_in));
    if (x.dim() != 2) grad_x = grad_x.view(x.sizes());
  } else {
    grad_x = at::empty({0}, opts);
  }
  if (!output_mask[1]) {
    grad_w = at::empty({0}, opts);
  } else if (active_out == cap_out && active_in == cap_in) {
    grad_w = at::mm(g.t(), as_matrix(x, rows, active_in));
  } else {
    // Written once: the GEMM fills the active block, zero_() only what lies outside it.
    grad_w = at::empty(weight.sizes(), opts);
    at::Tensor block = block_of(grad_w, active_out, active_in);
    at::mm_out(block, g.t(), as_matrix(x, rows, active_in));
    if (active_in < cap_in) grad_w.narrow(0, 0, active_out).narrow(1, active_in, cap_in - active_in).zero_();
    if (active_out < cap_out) grad_w.narrow(0, active_out, cap_out - active_out).zero_();
  }
  if (!output_mask[2]) {
    grad_b = at::empty({0}, opts);
  } else if (active_out == cap_out) {
    grad_b = at::sum(g, {0});
  } else {
    grad_b = at::empty({cap_out}, opts);
    at::Tensor block = grad_b.narrow(0, 0, active_out);
    at::sum_out(block, g, {0});
    grad_b.narrow(0, active_out, cap_out - active_out).zero_();
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_forward", &linear_forward_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace growdense

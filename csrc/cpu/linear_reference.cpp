// Reference CPU kernels: plain loops over the active block, accumulating in
// float (double for double). Every other kernel is tested against these.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "args.h"

namespace growdense {
namespace {

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// y = act(z), z = x W_block^T + b, element by element with the activation.h
// functions; z is returned too when keep_pre (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> reference_forward(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, int64_t active_in,
                                                     int64_t active_out, Activation act, bool keep_pre) {
  const int64_t rows = check_linear_args(x, weight, bias, active_in, active_out);
  const at::Tensor x2 = x.reshape({rows, active_in}).contiguous();
  at::Tensor y = at::empty({rows, active_out}, x.options());
  at::Tensor pre = keep_pre ? at::empty({rows, active_out}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_reference", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1);
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int64_t bs = bias.has_value() ? bias->stride(0) : 0;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* pp = keep_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t o = 0; o < active_out; ++o) {
        acc_t acc = bp ? static_cast<acc_t>(bp[o * bs]) : acc_t(0);
        for (int64_t i = 0; i < active_in; ++i) {
          acc += static_cast<acc_t>(xp[r * active_in + i]) * static_cast<acc_t>(wp[o * ws0 + i * ws1]);
        }
        if (pp) pp[r * active_out + o] = static_cast<scalar_t>(acc);
        yp[r * active_out + o] = static_cast<scalar_t>(activation_forward(act, acc));
      }
    }
  });
  const auto sizes = with_last(x.sizes(), active_out);
  return {y.view(sizes), keep_pre ? pre.view(sizes) : pre};
}

at::Tensor linear_reference(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t active_in, int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  return std::get<0>(reference_forward(x, weight, bias, active_in, active_out, act, false));
}

std::tuple<at::Tensor, at::Tensor> linear_forward_reference(const at::Tensor& x, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            int64_t active_in, int64_t active_out,
                                                            c10::string_view activation) {
  const Activation act = parse_activation(activation);
  return reference_forward(x, weight, bias, active_in, active_out, act,
                           backward_needs(act) == ActivationSaves::PreActivation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_reference(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& saved,
    int64_t active_in, int64_t active_out, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, std::nullopt, active_in, active_out);
  check_backward_args(grad_out, x, saved, active_out, act);
  const bool with_saved = backward_needs(act) != ActivationSaves::Nothing;
  const at::Tensor x2 = x.reshape({rows, active_in}).contiguous();
  const at::Tensor g2 = grad_out.reshape({rows, active_out}).contiguous();
  const at::Tensor s2 = with_saved ? saved->reshape({rows, active_out}).contiguous() : at::Tensor();
  const auto opts = x.options();
  at::Tensor grad_x = output_mask[0] ? at::empty({rows, active_in}, opts) : at::empty({0}, opts);
  at::Tensor grad_w = output_mask[1] ? at::zeros(weight.sizes(), opts) : at::empty({0}, opts);
  at::Tensor grad_b = output_mask[2] ? at::zeros({weight.size(0)}, opts) : at::empty({0}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_backward_reference", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const scalar_t* gp = g2.const_data_ptr<scalar_t>();
    const scalar_t* sp = with_saved ? s2.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1);

    // The gradient of the pre-activation.
    std::vector<acc_t> g(rows * active_out);
    for (int64_t k = 0; k < rows * active_out; ++k) {
      const acc_t s = sp ? static_cast<acc_t>(sp[k]) : acc_t(0);
      g[k] = activation_backward(act, static_cast<acc_t>(gp[k]), s);
    }
    if (output_mask[0]) {
      scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < active_in; ++i) {
          acc_t acc(0);
          for (int64_t o = 0; o < active_out; ++o) acc += g[r * active_out + o] * static_cast<acc_t>(wp[o * ws0 + i * ws1]);
          gx[r * active_in + i] = static_cast<scalar_t>(acc);
        }
      }
    }
    if (output_mask[1]) {
      scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
      const int64_t cap_in = weight.size(1);
      for (int64_t o = 0; o < active_out; ++o) {
        for (int64_t i = 0; i < active_in; ++i) {
          acc_t acc(0);
          for (int64_t r = 0; r < rows; ++r) acc += g[r * active_out + o] * static_cast<acc_t>(xp[r * active_in + i]);
          gw[o * cap_in + i] = static_cast<scalar_t>(acc);
        }
      }
    }
    if (output_mask[2]) {
      scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
      for (int64_t o = 0; o < active_out; ++o) {
        acc_t acc(0);
        for (int64_t r = 0; r < rows; ++r) acc += g[r * active_out + o];
        gb[o] = static_cast<scalar_t>(acc);
      }
    }
  });
  if (output_mask[0]) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) {
  m.impl("linear_reference", &linear_reference);
  m.impl("linear_forward_reference", &linear_forward_reference);
  m.impl("linear_backward_reference", &linear_backward_reference);
}

}  // namespace growdense

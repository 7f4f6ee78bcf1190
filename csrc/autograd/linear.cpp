// Autograd of growdense::linear and growdense::linear_reference, in C++.
//
// Device-independent: the forward and backward call the ops below autograd through the
// dispatcher, so the CPU and CUDA kernels both get it. Written in C++ rather than with
// torch.library.register_autograd because the Python autograd wrapper costs tens of
// microseconds per forward+backward, as much as the whole GEMM of a small layer.
//
// What is saved: x, weight, bias, and what the activation's backward reads
// (backward_needs in activation.h): the output for relu, the pre-activation for gelu
// and silu (the forward then runs `linear_forward`, which returns it).
//
// Double backward: when the backward itself is recorded (create_graph=True), the
// gradients are computed with differentiable ATen ops instead of the kernels (the
// pre-activation recomputed from x, weight and bias so that it carries their graph, the
// activation's derivative by activation_aten.h, the capacity padding by constant_pad_nd),
// so their own derivatives are right.
//
// Gradients straight into .grad's active block (on the CPU in float32 with no activation
// or ReLU by cpu::linear_backward, which sums the bias gradient in the ReLU mask's pass). When the engine is about to accumulate
// into an existing `.grad` of the weight (or bias) in place (`grad += new_grad`), the
// backward does that addition itself on the active block only and returns no gradient
// for that input, so nothing of the capacity's size is allocated or touched: everything
// outside the active block is zero, so `grad[block] += new_grad[block]` is exactly
// AccumulateGrad's result. When that is certain is asked of the engine's internals
// (torch_internals.h); where they are unknown the answer is "no" and the backward
// returns the capacity-shaped gradient as usual.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "activation_aten.h"
#include "args.h"
#include "cpu/epilogue.h"
#include "cpu/linear_cpu.h"
#include "torch_internals.h"

namespace growdense {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                            c10::string_view);
using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, int64_t, int64_t,
                                                     c10::string_view);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const std::optional<at::Tensor>&,
                                                                  int64_t, int64_t, c10::string_view,
                                                                  std::array<bool, 3>);

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

template <bool kReference>
struct Ops {
  static const c10::TypedOperatorHandle<LinearFn>& linear() {
    static const auto op = find_op<LinearFn>(kReference ? "growdense::linear_reference" : "growdense::linear");
    return op;
  }
  static const c10::TypedOperatorHandle<ForwardFn>& forward() {
    static const auto op =
        find_op<ForwardFn>(kReference ? "growdense::linear_forward_reference" : "growdense::linear_forward");
    return op;
  }
  static const c10::TypedOperatorHandle<BackwardFn>& backward() {
    static const auto op =
        find_op<BackwardFn>(kReference ? "growdense::linear_backward_reference" : "growdense::linear_backward");
    return op;
  }
};

// The gradients with differentiable ATen ops, for a backward that is itself recorded.
variable_list differentiable_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, int64_t active_in, int64_t active_out,
                                      Activation act, bool need_x, bool need_w, bool need_b) {
  const int64_t cap_out = weight.size(0), cap_in = weight.size(1);
  const at::Tensor w = weight.narrow(0, 0, active_out).narrow(1, 0, active_in);
  at::Tensor g = grad_out;
  if (act != Activation::None) {
    const at::Tensor b = bias.defined() ? bias.narrow(0, 0, active_out) : at::Tensor();
    g = aten_activation_backward(act, grad_out, at::linear(x, w, maybe(b)));
  }
  variable_list result(6);
  if (need_x) result[0] = at::matmul(g, w);
  const int64_t rows = active_in == 0 ? 0 : x.numel() / active_in;
  const at::Tensor g2 = g.reshape({rows, active_out});
  if (need_w) {
    result[1] = at::constant_pad_nd(at::mm(g2.t(), x.reshape({rows, active_in})),
                                    {0, cap_in - active_in, 0, cap_out - active_out});
  }
  if (need_b) result[2] = at::constant_pad_nd(at::sum(g2, {0}), {0, cap_out - active_out});
  return result;
}

template <bool kReference>
struct LinearFunction : public torch::autograd::Function<LinearFunction<kReference>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t active_in, int64_t active_out,
                            c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Activation act = parse_activation(activation);
    at::Tensor y, saved;
    if (backward_needs(act) == ActivationSaves::PreActivation) {
      std::tie(y, saved) = Ops<kReference>::forward().call(x, weight, bias, active_in, active_out, activation);
    } else {
      y = Ops<kReference>::linear().call(x, weight, bias, active_in, active_out, activation);
      if (backward_needs(act) == ActivationSaves::Output) saved = y;
    }
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), saved});
    ctx->saved_data["active_in"] = active_in;
    ctx->saved_data["active_out"] = active_out;
    ctx->saved_data["activation"] = static_cast<int64_t>(act);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved_vars = ctx->get_saved_variables();
    const at::Tensor &x = saved_vars[0], &weight = saved_vars[1], &bias = saved_vars[2], &saved = saved_vars[3];
    const int64_t active_in = ctx->saved_data["active_in"].toInt();
    const int64_t active_out = ctx->saved_data["active_out"].toInt();
    const auto act = static_cast<Activation>(ctx->saved_data["activation"].toInt());
    const std::string_view name = activation_name(act);
    const c10::string_view activation(name.data(), name.size());
    const at::Tensor& grad_out = grads[0];
    variable_list result(6);
    if (!grad_out.defined()) return result;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = bias.defined() && ctx->needs_input_grad(2);
    if (at::GradMode::is_enabled()) {
      return differentiable_backward(grad_out, x, weight, bias, active_in, active_out, act, need_x, need_w, need_b);
    }
    // The reference op keeps its own (plain-loop) backward for every gradient.
    const bool in_place_w = !kReference && need_w && internals::accumulates_in_place(weight);
    const bool in_place_b = !kReference && need_b && internals::accumulates_in_place(bias);

    if ((in_place_w || in_place_b) && cpu::fused_backward_applies(grad_out, act) &&
        x.scalar_type() == at::kFloat) {
      // The CPU backward adds into the .grad blocks itself; the bias gradient is summed in
      // the pass that applies the ReLU mask.
      auto [gx, gw, gb] = cpu::linear_backward(grad_out, x, weight, saved, active_in, active_out, act, need_x, need_w,
                                               need_b, in_place_w ? weight.grad() : at::Tensor(),
                                               in_place_b ? bias.grad() : at::Tensor());
      if (need_x) result[0] = gx;
      if (need_w && !in_place_w) result[1] = gw;
      if (need_b && !in_place_b) result[2] = gb;
      return result;
    }
    if (!in_place_w && !in_place_b) {
      auto [gx, gw, gb] = Ops<kReference>::backward().call(grad_out, x, weight, maybe(saved), active_in, active_out,
                                                           activation, {need_x, need_w, need_b});
      if (need_x) result[0] = gx;
      if (need_w) result[1] = gw;
      if (need_b) result[2] = gb;
      return result;
    }
    // Apply the activation's derivative once here (on the CPU by the kernel the op's own
    // backward uses, so that both paths give the same bits); the op then sees a plain linear.
    const int64_t rows = active_in == 0 ? 0 : x.numel() / active_in;
    at::Tensor g = grad_out;
    if (saved.defined()) {
      g = grad_out.is_cpu() ? cpu::activation_backward(grad_out.reshape({rows, active_out}).contiguous(),
                                                       saved.reshape({rows, active_out}).contiguous(), act, nullptr)
                                  .view(grad_out.sizes())
                            : aten_activation_backward(act, grad_out, saved);
    }
    auto [gx, gw, gb] = Ops<kReference>::backward().call(g, x, weight, std::nullopt, active_in, active_out, "none",
                                                         {need_x, need_w && !in_place_w, need_b && !in_place_b});
    const at::Tensor g2 = g.reshape({rows, active_out});
    if (in_place_w) {
      at::Tensor block = weight.grad().narrow(0, 0, active_out).narrow(1, 0, active_in);
      block.add_(at::mm(g2.t(), x.reshape({rows, active_in})));
    } else if (need_w) {
      result[1] = gw;
    }
    if (in_place_b) {
      bias.grad().narrow(0, 0, active_out).add_(at::sum(g2, {0}));
    } else if (need_b) {
      result[2] = gb;
    }
    if (need_x) result[0] = gx;
    return result;
  }
};

template <bool kReference>
at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t active_in, int64_t active_out, c10::string_view activation) {
  const bool records = at::GradMode::is_enabled() &&
                       (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  // Forward-mode AD (dual tensors) goes through the Function too, which refuses it.
  const bool dual = x._fw_grad(0).defined() || weight._fw_grad(0).defined() ||
                    (bias.has_value() && bias->_fw_grad(0).defined());
  if (!records && !dual) {
    // Nothing to differentiate: the plain op, without saving what a backward would read.
    at::AutoDispatchBelowADInplaceOrView guard;
    return Ops<kReference>::linear().call(x, weight, bias, active_in, active_out, activation);
  }
  return LinearFunction<kReference>::apply(x, weight, bias, active_in, active_out, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, Autograd, m) {
  m.impl("linear", &linear_autograd<false>);
  m.impl("linear_reference", &linear_autograd<true>);
}

}  // namespace growdense

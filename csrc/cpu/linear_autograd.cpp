// Autograd of growdense::linear and growdense::linear_reference, in C++.
//
// Device-independent: the forward and backward call the ops below autograd through the
// dispatcher, so the CPU and CUDA kernels both get it. It lives in csrc/cpu/ only because
// the build compiles csrc/cpu/*.cpp on every build. Written in C++ rather than with
// torch.library.register_autograd because the Python autograd wrapper costs tens of
// microseconds per forward+backward, as much as the whole GEMM of a small layer.
//
// Gradients straight into .grad's active block. When the engine is about to accumulate
// into an existing `.grad` of the weight (or bias) in place (`grad += new_grad`, which is
// what AccumulateGrad does when `.grad` is already set and no graph is being built),
// the backward does that addition itself on the active block only and returns no
// gradient for that input, so nothing of the capacity's size is allocated or touched:
// everything outside the active block is zero, so `grad[block] += new_grad[block]` is
// exactly AccumulateGrad's result. It does this only when the result is certain to be
// the same: no graph being built, the gradient accumulator of that tensor will run in
// this backward (plain .backward(), or .backward(inputs=...) naming it; never
// torch.autograd.grad, which returns the gradient instead), and no hook of any kind is
// registered on the tensor or its accumulator (DDP's, retain_grad, post-accumulate
// hooks...). Otherwise the backward returns the capacity-shaped gradient as usual.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "args.h"

namespace growdense {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                            c10::string_view);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const std::optional<at::Tensor>&,
                                                                  int64_t, int64_t, c10::string_view,
                                                                  std::array<bool, 3>);

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Whether the engine, in the backward now running, would finish by doing
// `tensor.grad += new_grad` in place through the tensor's gradient accumulator and
// nothing else (no hooks), so that doing that addition here is the same.
bool accumulates_in_place(const at::Tensor& tensor) {
  if (!tensor.defined() || at::GradMode::is_enabled() || !tensor.is_leaf() || !tensor.requires_grad()) return false;
  const at::Tensor& grad = tensor.grad();
  if (!grad.defined() || grad.layout() != at::kStrided || grad.requires_grad() || grad.sizes() != tensor.sizes() ||
      grad.scalar_type() != tensor.scalar_type() || grad.device() != tensor.device()) {
    return false;
  }
  const c10::intrusive_ptr<torch::autograd::Node> acc = torch::autograd::impl::try_get_grad_accumulator(tensor);
  if (!acc || !acc->pre_hooks().empty() || !acc->tensor_pre_hooks().empty() || !acc->retains_grad_hooks().empty() ||
      !acc->post_hooks().empty() || acc->tensor_post_acc_grad_hooks() != nullptr) {
    return false;
  }
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (exec_info == nullptr) return false;
  if (exec_info->empty()) return true;  // plain .backward(): every accumulator runs
  const auto it = exec_info->find(acc.get());
  return it != exec_info->end() && it->second.needed_ && !it->second.captures_;
}

template <bool kReference>
struct LinearFunction : public torch::autograd::Function<LinearFunction<kReference>> {
  static const c10::TypedOperatorHandle<LinearFn>& forward_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(kReference ? "growdense::linear_reference" : "growdense::linear", "")
                               .typed<LinearFn>();
    return op;
  }
  static const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(kReference ? "growdense::linear_backward_reference" : "growdense::linear_backward", "")
            .typed<BackwardFn>();
    return op;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t active_in, int64_t active_out,
                            c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = forward_op().call(x, weight, bias, active_in, active_out, activation);
    const bool relu = parse_activation(activation) == Activation::Relu;
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), relu ? y : at::Tensor()});
    ctx->saved_data["active_in"] = active_in;
    ctx->saved_data["active_out"] = active_out;
    ctx->saved_data["activation"] = std::string(activation);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &out = saved[3];
    const int64_t active_in = ctx->saved_data["active_in"].toInt();
    const int64_t active_out = ctx->saved_data["active_out"].toInt();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const at::Tensor& grad_out = grads[0];
    variable_list result(6);
    if (!grad_out.defined()) return result;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = bias.defined() && ctx->needs_input_grad(2);
    // The reference op keeps its own (plain-loop) backward for every gradient.
    const bool in_place_w = !kReference && need_w && accumulates_in_place(weight);
    const bool in_place_b = !kReference && need_b && accumulates_in_place(bias);

    if (!in_place_w && !in_place_b) {
      auto [gx, gw, gb] = backward_op().call(grad_out, x, weight, maybe(out), active_in, active_out, activation,
                                             {need_x, need_w, need_b});
      if (need_x) result[0] = gx;
      if (need_w) result[1] = gw;
      if (need_b) result[2] = gb;
      return result;
    }
    // Apply the activation's derivative once here; the op then sees a plain linear.
    const at::Tensor g = out.defined() ? at::threshold_backward(grad_out, out, 0) : grad_out;
    auto [gx, gw, gb] = backward_op().call(g, x, weight, std::nullopt, active_in, active_out, "none",
                                           {need_x, need_w && !in_place_w, need_b && !in_place_b});
    const int64_t rows = active_in == 0 ? 0 : x.numel() / active_in;
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
  return LinearFunction<kReference>::apply(x, weight, bias, active_in, active_out, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, Autograd, m) {
  m.impl("linear", &linear_autograd<false>);
  m.impl("linear_reference", &linear_autograd<true>);
}

}  // namespace growdense

// Autograd of growdense::negative_elbo, in C++ (device-independent: it calls the ops
// below autograd through the dispatcher; it sits in csrc/cpu/ because every build
// compiles that folder). Its backward is growdense::negative_elbo_backward, which reads
// the logits once more and writes their gradient once.
//
// Double backward: when the backward itself is recorded (create_graph=True, as a gradient
// penalty asks), the gradients are computed with differentiable ATen ops instead of the
// kernel (the same formulas: see csrc/cpu/vec/elbo_kernel.h), so that their own
// derivatives are right, as the linear op's backward does.
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/expm1.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace growdense {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ElboFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using ElboBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 4>);

// The gradients with differentiable ATen ops, for a backward that is itself recorded.
variable_list differentiable_backward(const at::Tensor& grad, const variable_list& saved,
                                      const std::array<bool, 4>& mask) {
  const at::Tensor &logits = saved[0], &target = saved[1], &mu = saved[2], &logvar = saved[3];
  const at::Tensor scale = grad / static_cast<double>(logits.size(0));  // g / L, (B,)
  variable_list result(4);
  if (mask[0] || mask[1]) {
    const at::Tensor v = logits.to(at::toOpMathType(logits.scalar_type()));
    if (mask[0]) result[0] = ((at::sigmoid(v) - target) * scale.view({1, -1, 1})).to(logits.scalar_type());
    if (mask[1]) result[1] = -(scale.unsqueeze(1) * at::sum(v, {0}));
  }
  if (mask[2]) result[2] = grad.unsqueeze(1) * mu;
  if (mask[3]) result[3] = 0.5 * grad.unsqueeze(1) * at::expm1(logvar);
  return result;
}

struct NegativeElboFunction : public torch::autograd::Function<NegativeElboFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& mu, const at::Tensor& logvar) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("growdense::negative_elbo", "").typed<ElboFn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits, target, mu, logvar});
    return op.call(logits, target, mu, logvar);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("growdense::negative_elbo_backward", "")
                               .typed<ElboBackwardFn>();
    const auto saved = ctx->get_saved_variables();
    variable_list result(4);
    if (!grads[0].defined()) return result;
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   ctx->needs_input_grad(3)};
    if (at::GradMode::is_enabled()) return differentiable_backward(grads[0], saved, mask);
    auto [gl, gt, gm, gv] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], mask);
    if (mask[0]) result[0] = gl;
    if (mask[1]) result[1] = gt;
    if (mask[2]) result[2] = gm;
    if (mask[3]) result[3] = gv;
    return result;
  }
};

at::Tensor negative_elbo_autograd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                                  const at::Tensor& logvar) {
  return NegativeElboFunction::apply(logits, target, mu, logvar);
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, Autograd, m) { m.impl("negative_elbo", &negative_elbo_autograd); }

}  // namespace growdense

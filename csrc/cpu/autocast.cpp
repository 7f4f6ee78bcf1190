// Autocast kernels of the growdense ops, for torch.autocast on the CPU and on CUDA
// (device-independent like the autograd kernels; in csrc/cpu/ because every build
// compiles that folder).
//
// growdense::linear runs as nn.Linear does under autocast: its floating inputs are cast
// to the autocast dtype (bfloat16, or float16) and the op runs there, accumulating in
// float32 inside the GEMM; the output is in the autocast dtype. Only the active block of
// the capacity-shaped weight and bias is cast, so the cost does not grow with the
// capacity; the cast is differentiable, so the gradients reach the float32 Parameters
// (zero outside the block) and the weights and optimizer state stay float32.
//
// growdense::negative_elbo is a loss, computed in float32 as autocast does for
// binary_cross_entropy_with_logits: its logits are read in whatever dtype they come in
// (low-precision logits are the point: half the bytes), the target, mu and logvar are
// cast to the logits' accumulation type.
#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace growdense {
namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                            c10::string_view);
using ElboFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

// Whether autocast would cast `t` on this device type (floating and not float64).
bool eligible(const at::Tensor& t, c10::DeviceType device_type) {
  if (!t.defined() || !t.is_floating_point() || t.scalar_type() == at::kDouble) return false;
  return device_type == c10::DeviceType::CUDA ? t.is_cuda() : t.is_cpu();
}

at::Tensor cast_to(const at::Tensor& t, at::ScalarType dtype, c10::DeviceType device_type) {
  return eligible(t, device_type) && t.scalar_type() != dtype ? t.to(dtype) : t;
}

template <c10::DeviceType kDevice>
at::Tensor linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t active_in, int64_t active_out, c10::string_view activation) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("growdense::linear", "").typed<LinearFn>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  at::Tensor w = weight;
  std::optional<at::Tensor> b = bias;
  // The active widths are checked by the op; cast the block only when they fit.
  const bool fits = weight.dim() == 2 && active_in >= 1 && active_in <= weight.size(1) && active_out >= 1 &&
                    active_out <= weight.size(0);
  if (eligible(weight, kDevice) && weight.scalar_type() != dtype) {
    if (fits && (active_in < weight.size(1) || active_out < weight.size(0))) {
      w = weight.narrow(0, 0, active_out).narrow(1, 0, active_in).to(dtype);
    } else {
      w = at::autocast::cached_cast(dtype, weight, kDevice);  // the whole buffer is active
    }
  }
  if (bias.has_value() && eligible(*bias, kDevice) && bias->scalar_type() != dtype) {
    const bool bias_fits = fits && bias->dim() == 1 && bias->size(0) >= active_out;
    b = bias_fits && active_out < bias->size(0) ? bias->narrow(0, 0, active_out).to(dtype)
                                                : at::autocast::cached_cast(dtype, *bias, kDevice);
  }
  return op.call(cast_to(x, dtype, kDevice), w, b, active_in, active_out, activation);
}

template <c10::DeviceType kDevice>
at::Tensor negative_elbo_autocast(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                                  const at::Tensor& logvar) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("growdense::negative_elbo", "").typed<ElboFn>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType acc = at::toOpMathType(logits.scalar_type());
  const auto up = [&](const at::Tensor& t) {
    return t.is_floating_point() && t.scalar_type() != acc && t.device() == logits.device() ? t.to(acc) : t;
  };
  return op.call(logits, up(target), up(mu), up(logvar));
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, AutocastCPU, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CPU>);
  m.impl("negative_elbo", &negative_elbo_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(growdense, AutocastCUDA, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CUDA>);
  m.impl("negative_elbo", &negative_elbo_autocast<c10::DeviceType::CUDA>);
}

}  // namespace growdense

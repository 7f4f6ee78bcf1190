// CPU kernels of growdense::negative_elbo and growdense::negative_elbo_backward: the
// vectorised loops of elbo_kernel.h, compiled for AVX-512 (elbo_avx512.cpp, used when
// the CPU has it and ATen's own kernels use it: ATEN_CPU_CAPABILITY lowers both) and
// for the baseline (here).
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/elbo_kernel.h"

namespace growdense {
namespace elbo_cpu {

bool avx512_compiled();
void forward_avx512(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                    const at::Tensor& logvar, at::Tensor& out, const ElboSizes& s);
void backward_avx512(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                     const at::Tensor& logvar, at::Tensor& grad_logits, at::Tensor& grad_target, at::Tensor& grad_mu,
                     at::Tensor& grad_logvar, const ElboSizes& s);

}  // namespace elbo_cpu

namespace {

bool use_avx512() {
  static const bool use = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (!elbo_cpu::avx512_compiled()) return false;
    __builtin_cpu_init();
    const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return has && at::get_cpu_capability().rfind("AVX512", 0) == 0;
#else
    return false;
#endif
  }();
  return use;
}

at::Tensor negative_elbo_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                             const at::Tensor& logvar) {
  const ElboSizes s = check_elbo_args(logits, target, mu, logvar);
  const at::Tensor l = logits.contiguous(), x = target.contiguous(), m = mu.contiguous(), v = logvar.contiguous();
  at::Tensor out = at::empty({s.batch}, target.options());
  if (use_avx512()) {
    elbo_cpu::forward_avx512(l, x, m, v, out, s);
  } else {
    elbo_forward_dispatch(l, x, m, v, out, s);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> negative_elbo_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
    const at::Tensor& logvar, std::array<bool, 4> output_mask) {
  const ElboSizes s = check_elbo_args(logits, target, mu, logvar);
  check_elbo_grad(grad, logits, s);
  const at::Tensor g = grad.contiguous(), l = logits.contiguous(), x = target.contiguous(), m = mu.contiguous(),
                   v = logvar.contiguous();
  at::Tensor gl = output_mask[0] ? at::empty(logits.sizes(), logits.options()) : at::Tensor();
  at::Tensor gt = output_mask[1] ? at::empty(target.sizes(), target.options()) : at::Tensor();
  at::Tensor gm = output_mask[2] ? at::empty(mu.sizes(), mu.options()) : at::Tensor();
  at::Tensor gv = output_mask[3] ? at::empty(logvar.sizes(), logvar.options()) : at::Tensor();
  if (use_avx512()) {
    elbo_cpu::backward_avx512(g, l, x, m, v, gl, gt, gm, gv, s);
  } else {
    elbo_backward_dispatch(g, l, x, m, v, gl, gt, gm, gv, s);
  }
  const auto empty = [&](at::Tensor& t) {
    if (!t.defined()) t = at::empty({0}, target.options());
  };
  if (!gl.defined()) gl = at::empty({0}, logits.options());
  empty(gt);
  empty(gm);
  empty(gv);
  return {gl, gt, gm, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) {
  m.impl("negative_elbo", &negative_elbo_cpu);
  m.impl("negative_elbo_backward", &negative_elbo_backward_cpu);
}

}  // namespace growdense

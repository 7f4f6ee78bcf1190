// The negative-ELBO CPU kernels compiled for AVX-512 (elbo_kernel.h); elbo.cpp calls
// them only on a CPU that has it. The at::vec types land in their own namespace
// (at::vec::AVX512), as in ATen's own per-capability builds.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
// The pragma enables the instructions but, unlike -mavx512f, does not define the macros
// that sleef.h and the at::vec headers test to declare their AVX-512 functions.
#ifndef __AVX512F__
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define __AVX__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define GROWDENSE_ELBO_AVX512 1

#include "cpu/elbo_kernel.h"

namespace growdense::elbo_cpu {

bool avx512_compiled() { return true; }

void forward_avx512(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                    const at::Tensor& logvar, at::Tensor& out, const ElboSizes& s) {
  elbo_forward_dispatch(logits, target, mu, logvar, out, s);
}

void backward_avx512(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                     const at::Tensor& logvar, at::Tensor& grad_logits, at::Tensor& grad_target, at::Tensor& grad_mu,
                     at::Tensor& grad_logvar, const ElboSizes& s) {
  elbo_backward_dispatch(grad, logits, target, mu, logvar, grad_logits, grad_target, grad_mu, grad_logvar, s);
}

}  // namespace growdense::elbo_cpu

#else
#include <ATen/core/Tensor.h>

#include "elbo_args.h"

namespace growdense::elbo_cpu {
bool avx512_compiled() { return false; }
void forward_avx512(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                    const ElboSizes&) {}
void backward_avx512(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const ElboSizes&) {}
}  // namespace growdense::elbo_cpu
#endif

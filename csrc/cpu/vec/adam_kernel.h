// The CPU kernel of growdense::adam_step_ over at::vec::Vectorized: one pass over a
// (rows, cols) block of a parameter, its gradient and Adam's two moments, each read and
// written once. Included only by kernels.cpp (one compilation per CPU capability).
//
// Per element, in the parameter's accumulation type, in the order of torch's
// single-tensor Adam (torch.optim.Adam with foreach=False):
//   g = grad (negated under maximize); L2 decay: g += wd p; decoupled decay: p *= 1 - lr wd
//   m += (1 - beta1) (g - m)
//   v = beta2 v + (1 - beta2) g g
//   p += -step_size m / (sqrt(v) / bc2_sqrt + eps)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/capability.h"

namespace growdense::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
void adam_block_impl(const AdamBlock& b, const AdamHyper& h) {
  using A = at::opmath_type<T>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t kStep = V::size();
  const A beta1c = static_cast<A>(1 - h.beta1), beta2 = static_cast<A>(h.beta2), beta2c = static_cast<A>(1 - h.beta2);
  const A wd = static_cast<A>(h.weight_decay), decay = static_cast<A>(1 - h.lr * h.weight_decay);
  const A neg_step = static_cast<A>(-h.step_size), bc2_sqrt = static_cast<A>(h.bias_correction2_sqrt);
  const A eps = static_cast<A>(h.eps);
  const bool l2 = h.weight_decay != 0 && !h.decoupled, decoupled = h.weight_decay != 0 && h.decoupled;
  const V vbeta1c(beta1c), vbeta2(beta2), vbeta2c(beta2c), vwd(wd), vdecay(decay), vneg(neg_step),
      vbc2(bc2_sqrt), veps(eps);
  const int64_t cols = b.cols;
  auto row = [&](int64_t r) {
    T* p = static_cast<T*>(b.param) + r * b.ld_param;
    const T* g = static_cast<const T*>(b.grad) + r * b.ld_grad;
    T* m = static_cast<T*>(b.exp_avg) + r * b.ld_exp_avg;
    T* v = static_cast<T*>(b.exp_avg_sq) + r * b.ld_exp_avg_sq;
    int64_t c = 0;
    if constexpr (std::is_same_v<T, A>) {
      for (; c + kStep <= cols; c += kStep) {
        V pv = V::loadu(p + c), gv = V::loadu(g + c), mv = V::loadu(m + c), vv = V::loadu(v + c);
        if (h.maximize) gv = gv.neg();
        if (l2) gv = gv + vwd * pv;
        if (decoupled) pv = pv * vdecay;
        mv = mv + vbeta1c * (gv - mv);
        vv = vv * vbeta2 + vbeta2c * (gv * gv);
        pv = pv + vneg * (mv / (vv.sqrt() / vbc2 + veps));
        pv.store(p + c);
        mv.store(m + c);
        vv.store(v + c);
      }
    }
    for (; c < cols; ++c) {  // the tail, and the 16-bit types element by element
      A pe = static_cast<A>(p[c]), ge = static_cast<A>(g[c]), me = static_cast<A>(m[c]), ve = static_cast<A>(v[c]);
      if (h.maximize) ge = -ge;
      if (l2) ge = ge + wd * pe;
      if (decoupled) pe = pe * decay;
      me = me + beta1c * (ge - me);
      ve = ve * beta2 + beta2c * (ge * ge);
      pe = pe + neg_step * (me / (std::sqrt(ve) / bc2_sqrt + eps));
      p[c] = static_cast<T>(pe);
      m[c] = static_cast<T>(me);
      v[c] = static_cast<T>(ve);
    }
  };
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols));
  at::parallel_for(0, b.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(r);
  });
}

inline void adam_block(const AdamBlock& b, const AdamHyper& h) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.dtype, "growdense_adam_step_cpu",
                                  [&] { adam_block_impl<scalar_t>(b, h); });
}

}  // namespace CPU_CAPABILITY
}  // namespace growdense::cpu

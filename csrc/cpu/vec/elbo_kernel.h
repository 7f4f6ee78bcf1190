// The CPU kernels of growdense::negative_elbo over at::vec::Vectorized. Included only by
// kernels.cpp, which is compiled once per CPU capability (capability.h): everything here
// lives in growdense::cpu::CPU_CAPABILITY.
//
// Per image b, with L samples and the logits read once:
//   loss[b] = 1/L sum_l sum_d bce(v, x) + KL(b),   v = logits[l, b, d], x = target[b, d]
//   grad_logits[l, b, d] = g[b] / L (sigmoid(v) - x)
//   grad_target[b, d]    = -g[b] / L sum_l v
//   grad_mu = g mu,  grad_logvar = g (exp(logvar) - 1) / 2
// bce(v, x) = (1 - x) v - log_sigmoid(v) = (1 - x) v - min(v, 0) + log1p(exp(-|v|)), the
// form torch's binary_cross_entropy_with_logits computes: stable for any finite v, and
// the same inf or NaN as torch for infinite logits (+inf with x = 0 gives inf).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/capability.h"

namespace growdense::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Two accumulation-type vectors' worth of T (one Vectorized<T> for the 16-bit types).
template <typename T>
struct Lanes {
  using A = at::opmath_type<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kHalf = V::size();
  static constexpr int64_t kStep = 2 * kHalf;
  static constexpr bool kSame = std::is_same_v<T, A>;

  // Loads n <= kStep elements (zeros beyond n).
  static void load(const T* p, int64_t n, V& a, V& b) {
    if constexpr (kSame) {
      if (n >= kStep) {
        a = V::loadu(p);
        b = V::loadu(p + kHalf);
      } else {
        a = V::loadu(p, std::min(n, kHalf));
        b = n > kHalf ? V::loadu(p + kHalf, n - kHalf) : V(A(0));
      }
    } else {
      static_assert(Vectorized<T>::size() == kStep);
      const Vectorized<T> raw = n >= kStep ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
      std::tie(a, b) = at::vec::convert_to_float<T>(raw);
    }
  }
  static void store(T* p, int64_t n, const V& a, const V& b) {
    if constexpr (kSame) {
      store_acc(p, n, a, b);
    } else {
      const Vectorized<T> raw = at::vec::convert_from_float<T>(a, b);
      if (n >= kStep) {
        raw.store(p);
      } else {
        raw.store(p, n);
      }
    }
  }
  // Loads / stores n <= kStep accumulation-type elements as two vectors.
  static void load_acc(const A* p, int64_t n, V& a, V& b) {
    if (n >= kStep) {
      a = V::loadu(p);
      b = V::loadu(p + kHalf);
    } else {
      a = V::loadu(p, std::min(n, kHalf));
      b = n > kHalf ? V::loadu(p + kHalf, n - kHalf) : V(A(0));
    }
  }
  static void store_acc(A* p, int64_t n, const V& a, const V& b) {
    if (n >= kStep) {
      a.store(p);
      b.store(p + kHalf);
    } else {
      a.store(p, std::min(n, kHalf));
      if (n > kHalf) b.store(p + kHalf, n - kHalf);
    }
  }
  // Keeps the first n lanes of the pair (a, b), sets the rest to `fill`.
  static void keep(int64_t n, V& a, V& b, A fill) {
    if (n >= kStep) return;
    a = V::set(V(fill), a, std::min(n, kHalf));
    b = n > kHalf ? V::set(V(fill), b, n - kHalf) : V(fill);
  }
};

// exp within about 20 ulp for float (ATen's exp_u20, a few times cheaper than Sleef's
// 1-ulp exp), the 1-ulp exp for double. Exact 0 for -inf. In the forward's sums its
// error is far below the float accumulation's own (over a row of 784 terms, a bias of
// about 2e-9 relative).
template <typename V>
inline V fast_exp(const V& v) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__aarch64__)
// The x86-64 baseline has no vector exp in at::vec (its generic Vectorized calls std::exp
// lane by lane): exp(y) for y <= 0 in plain float arithmetic the compiler vectorises with
// SSE2. Cody-Waite reduction y = n ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor polynomial
// (truncation below 2e-7 relative), 2^n from its exponent bits; 0 below the smallest
// normal float's log, and for -inf.
inline float exp_nonpositive(float y) {
  const float t = y * 1.44269504f + 12582912.0f;  // 1.5 * 2^23: rounds y log2(e) to an integer
  const float n = t - 12582912.0f;
  const float r = (y - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const int32_t k = c10::bit_cast<int32_t>(t) - c10::bit_cast<int32_t>(12582912.0f);  // n as an integer
  const float scale = c10::bit_cast<float>(static_cast<int32_t>(static_cast<uint32_t>(k + 127) << 23));
  return y < -87.33654f ? 0.0f : p * scale;
}
#endif

#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__aarch64__)
// For float rows (and 16-bit rows widened to float), plain loops rather than at::vec,
// whose baseline Vectorized goes lane by lane through arrays: GCC's -O3 vectorises these
// with SSE2 (CMakeLists.txt compiles this capability with -fno-trapping-math, so that the
// selects become blends). kLanes independent partial sums and products, folded as
// BceRowSum does.
#define GROWDENSE_PLAIN_FLOAT_ROWS 1
namespace plain {
constexpr int kLanes = 8;
constexpr int kFold = 64;  // products of kFold factors in [1, 2] cannot overflow

// The sum over a row of bce(v, x) (as BceRowSum), omx = 1 - x.
inline float bce_row_sum(const float* __restrict v, const float* __restrict omx, int64_t D) {
  float lin[kLanes] = {}, prod[kLanes];
  std::fill(prod, prod + kLanes, 1.0f);
  int count = 0;
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float a = v[d + k];
      lin[k] += omx[d + k] * a - std::min(a, 0.0f);
      prod[k] += prod[k] * exp_nonpositive(-std::fabs(a));
    }
    if (++count == kFold) {
      for (int k = 0; k < kLanes; ++k) {
        lin[k] += std::log(prod[k]);
        prod[k] = 1.0f;
      }
      count = 0;
    }
  }
  for (int64_t k = 0; k < D - d; ++k) {  // fewer than kLanes: one more factor per lane at most
    const float a = v[d + k];
    lin[k] += omx[d + k] * a - std::min(a, 0.0f);
    prod[k] += prod[k] * exp_nonpositive(-std::fabs(a));
  }
  float sum = 0.0f;
  for (int k = 0; k < kLanes; ++k) sum += lin[k] + std::log(prod[k]);
  return sum;
}

// The row as float: itself, or widened into `buffer` (D elements) from a 16-bit type.
template <typename T>
inline const float* as_float(const T* row, std::vector<float>& buffer, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t d = 0; d < D; ++d) buffer[d] = static_cast<float>(row[d]);
    return buffer.data();
  }
}

// out[d] = scale (sigmoid(v[d]) - x[d]), sigmoid as below.
inline void sigmoid_minus_row(const float* __restrict v, const float* __restrict x, float* __restrict out,
                              float scale, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float a = v[d];
    const float e = exp_nonpositive(-std::fabs(a));
    const float r = 1.0f / (1.0f + e);
    const float s = a != a ? a : (a < 0.0f ? e * r : r);
    out[d] = (s - x[d]) * scale;
  }
}
}  // namespace plain
#endif

// exp(-|v|), in (0, 1].
template <typename V>
inline V exp_neg_abs(const V& v) {
#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__aarch64__)
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    __at_align__ float lanes[V::size()];
    v.store(lanes);
    for (int i = 0; i < V::size(); ++i) lanes[i] = exp_nonpositive(-std::fabs(lanes[i]));
    return V::loadu(lanes);
  }
#endif
  return fast_exp(v.abs().neg());
}

// The sum over a row of bce(v, x) = (1 - x) v - min(v, 0) + log1p(exp(-|v|)). The log1p
// terms are not taken one by one: each lane keeps the running product of (1 + exp(-|v|))
// by one fma (p + p e, which keeps e's bits even when e is far below p's ulp) and adds
// the product's log every kFold elements and at the end of the row. Each factor is in
// [1, 2], so kFold = 64 cannot overflow; the product's rounding adds at most one ulp of
// relative error per element, less than the sum's own.
template <typename V>
struct BceRowSum {
  using A = typename V::value_type;
  static constexpr int kFold = 64;
  V lin0{A(0)}, lin1{A(0)}, prod0{A(1)}, prod1{A(1)};
  int count = 0;

  // omx = 1 - x. Lanes beyond the row hold v = 0 and omx = 0: they add 0 to lin, but a
  // factor 2 to the product, which the caller takes out with keep() (see add_tail).
  void add(const V& v0, const V& v1, const V& omx0, const V& omx1) {
    const V zero(A(0));
    lin0 += at::vec::fmsub(omx0, v0, at::vec::minimum(v0, zero));
    lin1 += at::vec::fmsub(omx1, v1, at::vec::minimum(v1, zero));
    mul(exp_neg_abs(v0), exp_neg_abs(v1));
  }
  template <typename LanesT>
  void add_tail(int64_t n, const V& v0, const V& v1, const V& omx0, const V& omx1) {
    const V zero(A(0));
    lin0 += at::vec::fmsub(omx0, v0, at::vec::minimum(v0, zero));
    lin1 += at::vec::fmsub(omx1, v1, at::vec::minimum(v1, zero));
    V e0 = exp_neg_abs(v0), e1 = exp_neg_abs(v1);
    LanesT::keep(n, e0, e1, A(0));
    mul(e0, e1);
  }
  void mul(const V& e0, const V& e1) {
    prod0 = at::vec::fmadd(prod0, e0, prod0);
    prod1 = at::vec::fmadd(prod1, e1, prod1);
    if (++count == kFold) fold();
  }
  void fold() {
    lin0 += prod0.log();
    lin1 += prod1.log();
    prod0 = prod1 = V(A(1));
    count = 0;
  }
  A total() {
    fold();
    return at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, lin0 + lin1);
  }
};

// sigmoid(v) = 1 / (1 + e) for v >= 0, e / (1 + e) for v < 0, with e = exp(-|v|): exact
// 0 and 1 at -inf and +inf, accurate for large negative v, NaN for NaN.
template <typename V>
inline V sigmoid(const V& v) {
  using A = typename V::value_type;
  const V one(A(1));
  const V e = exp_neg_abs(v);
  const V r = one / (one + e);
  const V s = V::blendv(r, e * r, v < V(A(0)));
  return V::blendv(s, v, v != v);
}

template <typename A>
A gaussian_kl_row(const A* mu, const A* logvar, int64_t Z) {
  A kl = 0;
  for (int64_t j = 0; j < Z; ++j) kl += A(1) + logvar[j] - mu[j] * mu[j] - std::exp(logvar[j]);
  return A(-0.5) * kl;
}

inline int64_t grain_for(int64_t work_per_image) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_image));
}

template <typename T>
void elbo_forward_impl(const ElboArgs& args, void* out) {
  using LanesT = Lanes<T>;
  using A = typename LanesT::A;
  using V = typename LanesT::V;
  const T* lp = static_cast<const T*>(args.logits);
  const A* xp = static_cast<const A*>(args.target);
  const A* mp = static_cast<const A*>(args.mu);
  const A* vp = static_cast<const A*>(args.logvar);
  A* op = static_cast<A*>(out);
  const int64_t L = args.samples, B = args.batch, D = args.pixels, Z = args.latent;
  const int64_t full = D - D % LanesT::kStep;
  at::parallel_for(0, B, grain_for(L * D), [&](int64_t begin, int64_t end) {
    std::vector<A> omx(static_cast<size_t>(D));  // 1 - x of the image, read L times
    [[maybe_unused]] std::vector<float> widened(std::is_same_v<T, A> ? 0 : static_cast<size_t>(D));
    for (int64_t b = begin; b < end; ++b) {
      const A* x = xp + b * D;
      at::vec::map([](V t) { return V(A(1)) - t; }, omx.data(), x, D);
      double total = 0;  // sum over the L rows of each row's sum
      for (int64_t l = 0; l < L; ++l) {
        const T* row = lp + (l * B + b) * D;
#ifdef GROWDENSE_PLAIN_FLOAT_ROWS
        if constexpr (std::is_same_v<A, float>) {
          total += plain::bce_row_sum(plain::as_float(row, widened, D), omx.data(), D);
          continue;
        }
#endif
        BceRowSum<V> sum;
        for (int64_t d = 0; d < full; d += LanesT::kStep) {
          V v0, v1, o0, o1;
          LanesT::load(row + d, LanesT::kStep, v0, v1);
          LanesT::load_acc(omx.data() + d, LanesT::kStep, o0, o1);
          sum.add(v0, v1, o0, o1);
        }
        if (full < D) {
          const int64_t n = D - full;
          V v0, v1, o0, o1;
          LanesT::load(row + full, n, v0, v1);
          LanesT::load_acc(omx.data() + full, n, o0, o1);
          sum.template add_tail<LanesT>(n, v0, v1, o0, o1);
        }
        total += sum.total();
      }
      op[b] = static_cast<A>(total / static_cast<double>(L)) + gaussian_kl_row(mp + b * Z, vp + b * Z, Z);
    }
  });
}

template <typename T>
void elbo_backward_impl(const ElboArgs& args, const ElboGrads& grads) {
  using LanesT = Lanes<T>;
  using A = typename LanesT::A;
  using V = typename LanesT::V;
  const A* gp = static_cast<const A*>(grads.grad);
  const T* lp = static_cast<const T*>(args.logits);
  const A* xp = static_cast<const A*>(args.target);
  const A* mp = static_cast<const A*>(args.mu);
  const A* vp = static_cast<const A*>(args.logvar);
  T* glp = static_cast<T*>(grads.logits);
  A* gtp = static_cast<A*>(grads.target);
  A* gmp = static_cast<A*>(grads.mu);
  A* gvp = static_cast<A*>(grads.logvar);
  const int64_t L = args.samples, B = args.batch, D = args.pixels, Z = args.latent;
  const A inv_l = A(1) / static_cast<A>(L);
  const bool per_pixel = glp != nullptr || gtp != nullptr;
  at::parallel_for(0, B, grain_for(per_pixel ? L * D : Z), [&](int64_t begin, int64_t end) {
    [[maybe_unused]] std::vector<float> widened(std::is_same_v<T, A> || !per_pixel ? 0 : static_cast<size_t>(D));
    [[maybe_unused]] std::vector<float> narrowed(widened.size());
    for (int64_t b = begin; b < end; ++b) {
      const A g = gp[b];
      for (int64_t j = b * Z; j < (b + 1) * Z; ++j) {
        if (gmp) gmp[j] = g * mp[j];
        if (gvp) gvp[j] = A(0.5) * g * (std::exp(vp[j]) - A(1));
      }
      if (!per_pixel) continue;
      const A scale = g * inv_l;
      const V vscale(scale);
      const A* x = xp + b * D;
      A* gt = gtp ? gtp + b * D : nullptr;
      if (gt) std::fill(gt, gt + D, A(0));
      for (int64_t l = 0; l < L; ++l) {
        const T* row = lp + (l * B + b) * D;
        T* grow = glp ? glp + (l * B + b) * D : nullptr;
#ifdef GROWDENSE_PLAIN_FLOAT_ROWS
        if constexpr (std::is_same_v<A, float>) {
          const float* v = plain::as_float(row, widened, D);
          if (grow) {
            if constexpr (std::is_same_v<T, float>) {
              plain::sigmoid_minus_row(v, x, grow, scale, D);
            } else {
              plain::sigmoid_minus_row(v, x, narrowed.data(), scale, D);
              for (int64_t d = 0; d < D; ++d) grow[d] = static_cast<T>(narrowed[d]);
            }
          }
          if (gt) {
            for (int64_t d = 0; d < D; ++d) gt[d] += v[d];
          }
          continue;
        }
#endif
        for (int64_t d = 0; d < D; d += LanesT::kStep) {
          const int64_t n = std::min(LanesT::kStep, D - d);
          V v0, v1;
          LanesT::load(row + d, n, v0, v1);
          if (grow) {
            V x0, x1;
            LanesT::load_acc(x + d, n, x0, x1);
            LanesT::store(grow + d, n, (sigmoid(v0) - x0) * vscale, (sigmoid(v1) - x1) * vscale);
          }
          if (gt) {
            V s0, s1;
            LanesT::load_acc(gt + d, n, s0, s1);
            LanesT::store_acc(gt + d, n, s0 + v0, s1 + v1);
          }
        }
      }
      if (gt) {
        const V neg(-scale);
        at::vec::map([neg](V t) { return t * neg; }, gt, gt, D);
      }
    }
  });
}

inline void elbo_forward(const ElboArgs& args, void* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "growdense_negative_elbo_cpu",
                                  [&] { elbo_forward_impl<scalar_t>(args, out); });
}

inline void elbo_backward(const ElboArgs& args, const ElboGrads& grads) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "growdense_negative_elbo_backward_cpu",
                                  [&] { elbo_backward_impl<scalar_t>(args, grads); });
}

}  // namespace CPU_CAPABILITY
}  // namespace growdense::cpu

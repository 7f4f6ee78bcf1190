// The CPU kernels of growdense::negative_elbo, written once with at::vec::Vectorized and
// compiled twice: for the machine's baseline (elbo.cpp) and for AVX-512 (elbo_avx512.cpp),
// picked at run time. Include only from those two files: everything here has internal
// linkage, so the two compilations never mix.
//
// Per image b, with S = L samples and the logits read once:
//   loss[b] = 1/L sum_l sum_d (softplus(v) - x v) + KL(b),   v = logits[l, b, d], x = target[b, d]
//   grad_logits[l, b, d] = g[b] / L (sigmoid(v) - x)
//   grad_target[b, d]    = -g[b] / L sum_l v
//   grad_mu = g mu,  grad_logvar = g (exp(logvar) - 1) / 2
// softplus(v) - x v is the binary cross-entropy of sigmoid(v) against x (computed as
// max(v, 0) + log1p(exp(-|v|)) - x v, stable for any v).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "elbo_args.h"

namespace growdense {
namespace {

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
      if (n >= kStep) {
        a.store(p);
        b.store(p + kHalf);
      } else {
        a.store(p, std::min(n, kHalf));
        if (n > kHalf) b.store(p + kHalf, n - kHalf);
      }
    } else {
      const Vectorized<T> raw = at::vec::convert_from_float<T>(a, b);
      if (n >= kStep) {
        raw.store(p);
      } else {
        raw.store(p, n);
      }
    }
  }
  // Loads n <= kStep accumulation-type elements (the target) as two vectors.
  static void load_acc(const A* p, int64_t n, V& a, V& b) {
    if (n >= kStep) {
      a = V::loadu(p);
      b = V::loadu(p + kHalf);
    } else {
      a = V::loadu(p, std::min(n, kHalf));
      b = n > kHalf ? V::loadu(p + kHalf, n - kHalf) : V(A(0));
    }
  }
  // Keeps the first n lanes of the pair (a, b), zeroes the rest.
  static void keep(int64_t n, V& a, V& b) {
    if (n >= kStep) return;
    a = V::set(V(A(0)), a, std::min(n, kHalf));
    b = n > kHalf ? V::set(V(A(0)), b, n - kHalf) : V(A(0));
  }
};

// exp within about 20 ulp for float (ATen's exp_u20, a few times cheaper than Sleef's
// 1-ulp exp), the 1-ulp exp for double. Used by the backward's sigmoid only, whose
// elements are independent: the forward sums its terms, where a biased error would add up.
template <typename V>
inline V fast_exp(const V& v) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// log1p(u) for u in [0, 1]. float: 2 atanh(s) with s = u / (2 + u) in [0, 1/3], its
// odd series to s^13 (the first term left out is below 1e-8, under float's rounding),
// cheaper than the general log1p; double: the 1-ulp log1p.
template <typename V>
inline V log1p_unit(const V& u) {
  using A = typename V::value_type;
  if constexpr (std::is_same_v<A, float>) {
    const V s = u / (V(2.0f) + u);
    const V s2 = s * s;
    V p = at::vec::fmadd(s2, V(1.0f / 13), V(1.0f / 11));
    p = at::vec::fmadd(s2, p, V(1.0f / 9));
    p = at::vec::fmadd(s2, p, V(1.0f / 7));
    p = at::vec::fmadd(s2, p, V(1.0f / 5));
    p = at::vec::fmadd(s2, p, V(1.0f / 3));
    p = at::vec::fmadd(s2, p, V(1.0f));
    return V(2.0f) * s * p;
  } else {
    return u.log1p();
  }
}

template <typename V>
inline V bce(const V& v, const V& x) {  // softplus(v) - x v
  using A = typename V::value_type;
  const V zero(A(0));
  return at::vec::maximum(v, zero) + log1p_unit((zero - v.abs()).exp()) - x * v;
}

template <typename V>
inline V sigmoid(const V& v) {
  using A = typename V::value_type;
  const V one(A(1));
  return one / (one + fast_exp(v.neg()));
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
void elbo_forward_impl(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                       const at::Tensor& logvar, at::Tensor& out, const ElboSizes& s) {
  using LanesT = Lanes<T>;
  using A = typename LanesT::A;
  using V = typename LanesT::V;
  const T* lp = logits.const_data_ptr<T>();
  const A* xp = target.const_data_ptr<A>();
  const A* mp = mu.const_data_ptr<A>();
  const A* vp = logvar.const_data_ptr<A>();
  A* op = out.mutable_data_ptr<A>();
  const int64_t L = s.samples, B = s.batch, D = s.pixels, Z = s.latent;
  at::parallel_for(0, B, grain_for(L * D), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const A* x = xp + b * D;
      double total = 0;  // sum over the L rows of each row's float sum
      for (int64_t l = 0; l < L; ++l) {
        const T* row = lp + (l * B + b) * D;
        V acc0(A(0)), acc1(A(0));
        for (int64_t d = 0; d < D; d += LanesT::kStep) {
          const int64_t n = std::min(LanesT::kStep, D - d);
          V v0, v1, x0, x1;
          LanesT::load(row + d, n, v0, v1);
          LanesT::load_acc(x + d, n, x0, x1);
          V c0 = bce(v0, x0), c1 = bce(v1, x1);
          LanesT::keep(n, c0, c1);
          acc0 += c0;
          acc1 += c1;
        }
        total += at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, acc0 + acc1);
      }
      op[b] = static_cast<A>(total / static_cast<double>(L)) + gaussian_kl_row(mp + b * Z, vp + b * Z, Z);
    }
  });
}

template <typename T>
void elbo_backward_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& mu, const at::Tensor& logvar, at::Tensor& grad_logits,
                        at::Tensor& grad_target, at::Tensor& grad_mu, at::Tensor& grad_logvar,
                        const ElboSizes& s) {
  using LanesT = Lanes<T>;
  using A = typename LanesT::A;
  using V = typename LanesT::V;
  const A* gp = grad.const_data_ptr<A>();
  const T* lp = logits.const_data_ptr<T>();
  const A* xp = target.const_data_ptr<A>();
  const A* mp = mu.const_data_ptr<A>();
  const A* vp = logvar.const_data_ptr<A>();
  T* glp = grad_logits.defined() ? grad_logits.mutable_data_ptr<T>() : nullptr;
  A* gtp = grad_target.defined() ? grad_target.mutable_data_ptr<A>() : nullptr;
  A* gmp = grad_mu.defined() ? grad_mu.mutable_data_ptr<A>() : nullptr;
  A* gvp = grad_logvar.defined() ? grad_logvar.mutable_data_ptr<A>() : nullptr;
  const int64_t L = s.samples, B = s.batch, D = s.pixels, Z = s.latent;
  const A inv_l = A(1) / static_cast<A>(L);
  const bool per_pixel = glp != nullptr || gtp != nullptr;
  at::parallel_for(0, B, grain_for(per_pixel ? L * D : Z), [&](int64_t begin, int64_t end) {
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
            s0 += v0;
            s1 += v1;
            LanesT::keep(n, s0, s1);
            if (n >= LanesT::kStep) {
              s0.store(gt + d);
              s1.store(gt + d + LanesT::kHalf);
            } else {
              s0.store(gt + d, std::min(n, LanesT::kHalf));
              if (n > LanesT::kHalf) s1.store(gt + d + LanesT::kHalf, n - LanesT::kHalf);
            }
          }
        }
      }
      if (gt) {
        for (int64_t d = 0; d < D; ++d) gt[d] *= -scale;
      }
    }
  });
}

// Dispatches on the logits' dtype; the outputs are allocated by the caller.
inline void elbo_forward_dispatch(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                                  const at::Tensor& logvar, at::Tensor& out, const ElboSizes& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "growdense_negative_elbo_cpu", [&] {
    elbo_forward_impl<scalar_t>(logits, target, mu, logvar, out, s);
  });
}

inline void elbo_backward_dispatch(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& mu, const at::Tensor& logvar, at::Tensor& grad_logits,
                                   at::Tensor& grad_target, at::Tensor& grad_mu, at::Tensor& grad_logvar,
                                   const ElboSizes& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "growdense_negative_elbo_backward_cpu", [&] {
        elbo_backward_impl<scalar_t>(grad, logits, target, mu, logvar, grad_logits, grad_target, grad_mu,
                                     grad_logvar, s);
      });
}

}  // namespace
}  // namespace growdense

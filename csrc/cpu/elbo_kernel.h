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
// max(v, 0) + log1p(exp(-|v|)) - x v, stable for any v; see BceRowSum).
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
// 1-ulp exp), the 1-ulp exp for double. In the forward's sums its error is far below the
// float accumulation's own (over a row of 784 terms, a bias of about 2e-9 relative).
template <typename V>
inline V fast_exp(const V& v) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// The binary cross-entropy softplus(v) - x v = max(v, 0) - x v + log1p(exp(-|v|)) summed
// over a row. The log1p terms are not taken one by one: each lane keeps the running
// product of (1 + exp(-|v|)) by one fma (p + p e, which keeps e's bits even when e is far
// below p's ulp) and adds the product's log every kFold elements and at the end of the
// row. Each factor is in (1, 2], so kFold = 64 cannot overflow; the product's rounding
// adds at most one ulp of relative error per element, less than the sum's own.
template <typename V>
struct BceRowSum {
  using A = typename V::value_type;
  static constexpr int kFold = 64;
  V lin0{A(0)}, lin1{A(0)}, prod0{A(1)}, prod1{A(1)};
  int count = 0;

  // The first n lanes of (v0, v1) and (x0, x1) are elements of the row; the rest are zeros.
  template <typename Lanes>
  void add(int64_t n, const V& v0, const V& v1, const V& x0, const V& x1) {
    const V zero(A(0));
    lin0 += at::vec::maximum(v0, zero) - x0 * v0;
    lin1 += at::vec::maximum(v1, zero) - x1 * v1;
    V e0 = fast_exp(zero - v0.abs()), e1 = fast_exp(zero - v1.abs());
    Lanes::keep(n, e0, e1);
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
        BceRowSum<V> sum;
        for (int64_t d = 0; d < D; d += LanesT::kStep) {
          const int64_t n = std::min(LanesT::kStep, D - d);
          V v0, v1, x0, x1;
          LanesT::load(row + d, n, v0, v1);
          LanesT::load_acc(x + d, n, x0, x1);
          sum.template add<LanesT>(n, v0, v1, x0, x1);
        }
        total += sum.total();
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

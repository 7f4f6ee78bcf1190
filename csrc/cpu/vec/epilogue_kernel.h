// The linear op's element-wise epilogues over at::vec::Vectorized: bias + activation after
// the forward's GEMM, and the activation's derivative (with the bias gradient, the column
// sums of its result, in the same pass) before the backward's GEMMs. Included only by
// kernels.cpp (compiled per CPU capability); the formulas are activation.h's, lane-wise,
// except the float GELU's normal CDF (normal_cdf below).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "cpu/capability.h"
#include "cpu/vec/elbo_kernel.h"

namespace growdense::cpu {
inline namespace CPU_CAPABILITY {

namespace act_vec {

// Phi(z), the standard normal CDF, given e = exp(-z^2 / 2). In float: Abramowitz and
// Stegun 7.1.26, the erf at::vec's float kernels use (absolute error below 1.5e-7), written
// as Phi(-|z|) = t P(t) e / 2 with t = 1 / (1 + p |z| / sqrt 2), so that GELU's two
// exponentials (erf's and the density's) are one. In double: erf itself.
template <typename V>
inline V normal_cdf(const V& z, const V& e) {
  using A = typename V::value_type;
  const V half(A(0.5)), one(A(1));
  if constexpr (std::is_same_v<A, float>) {
    const V t = one / (one + V(0.3275911f * activation_detail::sqrt1_2<float>()) * z.abs());
    V poly = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    poly = at::vec::fmadd(poly, t, V(1.421413741f));
    poly = at::vec::fmadd(poly, t, V(-0.284496736f));
    poly = at::vec::fmadd(poly, t, V(0.254829592f));
    const V tail = half * t * poly * e;
    return V::blendv(one - tail, tail, z < V(A(0)));
  } else {
    (void)e;
    return half + half * (z * V(activation_detail::sqrt1_2<A>())).erf();
  }
}

// exp(-z^2 / 2). Every exponential here is elbo_kernel.h's fast_exp: within about 20 ulp in
// float, a relative error near 1e-6 in the activations and their derivatives.
template <typename V>
inline V gauss(const V& z) {
  using A = typename V::value_type;
  return fast_exp(V(A(-0.5)) * z * z);
}

// (1 + tanh(u)) / 2 and 1 - tanh(u)^2 from e = exp(-2|u|) (activation.h's tanh_parts).
template <typename V>
inline void tanh_parts(const V& u, V& half_one_plus, V& sech2) {
  using A = typename V::value_type;
  const V one(A(1));
  const V e = fast_exp(u.abs() * V(A(-2)));
  const V inv = one / (one + e);
  half_one_plus = V::blendv(inv, e * inv, u < V(A(0)));
  sech2 = V(A(4)) * e * inv * inv;
}

template <Activation kAct, typename V>
inline V forward(const V& z) {
  using A = typename V::value_type;
  if constexpr (kAct == Activation::Relu) {
    return V::blendv(z, V(A(0)), z < V(A(0)));  // NaN passes, as torch.relu
  } else if constexpr (kAct == Activation::Gelu) {
    return z * normal_cdf(z, gauss(z));
  } else if constexpr (kAct == Activation::GeluTanh) {
    V h, s;
    tanh_parts(V(activation_detail::sqrt_2_pi<A>()) * (z + V(A(activation_detail::kGeluTanhCubic)) * z * z * z), h, s);
    return z * h;
  } else if constexpr (kAct == Activation::Silu) {
    return z / (V(A(1)) + fast_exp(z.neg()));
  } else {
    static_assert(kAct == Activation::None, "an activation without its lane-wise forward");
    return z;
  }
}

// grad * act'(saved), saved as backward_needs(act) says (activation.h's activation_backward).
template <Activation kAct, typename V>
inline V backward(const V& grad, const V& saved) {
  using A = typename V::value_type;
  const V one(A(1)), zero(A(0));
  if constexpr (kAct == Activation::Relu) {  // zero where the output is not positive; NaN passes the gradient
    return V::blendv(grad, zero, saved <= zero);
  } else if constexpr (kAct == Activation::Gelu) {
    const V& z = saved;
    const V e = gauss(z);
    return grad * at::vec::fmadd(z * e, V(activation_detail::inv_sqrt_2pi<A>()), normal_cdf(z, e));
  } else if constexpr (kAct == Activation::GeluTanh) {
    const V& z = saved;
    const V z2 = z * z;
    V h, s;
    tanh_parts(V(activation_detail::sqrt_2_pi<A>()) * (z + V(A(activation_detail::kGeluTanhCubic)) * z2 * z), h, s);
    const V d_inner = V(activation_detail::sqrt_2_pi<A>()) * (one + V(A(3 * activation_detail::kGeluTanhCubic)) * z2);
    return grad * (h + V(A(0.5)) * z * s * d_inner);
  } else if constexpr (kAct == Activation::Silu) {
    const V& z = saved;
    const V neg = z < zero;
    const V e = fast_exp(V::blendv(z.neg(), z, neg));  // exp(-|z|)
    const V inv = one / (one + e);
    const V s = V::blendv(inv, e * inv, neg), one_minus_s = V::blendv(e * inv, inv, neg);
    return grad * s * (one + z * one_minus_s);
  } else {
    static_assert(kAct == Activation::None, "an activation without its lane-wise derivative");
    return grad;
  }
}

// Calls f(std::integral_constant<Activation, act>{}): the row loops are compiled once per
// activation, so no lane-wise pass branches on it.
template <typename F>
inline void with_activation(Activation act, F&& f) {
  using C = Activation;
  switch (act) {
    case C::None:
      return f(std::integral_constant<C, C::None>{});
    case C::Relu:
      return f(std::integral_constant<C, C::Relu>{});
    case C::Gelu:
      return f(std::integral_constant<C, C::Gelu>{});
    case C::GeluTanh:
      return f(std::integral_constant<C, C::GeluTanh>{});
    case C::Silu:
      return f(std::integral_constant<C, C::Silu>{});
  }
  TORCH_CHECK(false, "growdense: activation ", static_cast<int>(act), " has no CPU epilogue");
}

}  // namespace act_vec

inline int64_t rows_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)); }

template <typename T>
void bias_activation_impl(const EpilogueArgs& args, const T* z, int64_t ld_z, T* y, int64_t ld_y, const T* bias) {
  using LanesT = Lanes<T>;
  using A = typename LanesT::A;
  using V = typename LanesT::V;
  const int64_t cols = args.cols;
  act_vec::with_activation(args.act, [&](auto act) {
    at::parallel_for(0, args.rows, rows_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* in = z + r * ld_z;
        T* out = y + r * ld_y;
        for (int64_t c = 0; c < cols; c += LanesT::kStep) {
          const int64_t n = std::min(LanesT::kStep, cols - c);
          V z0, z1;
          LanesT::load(in + c, n, z0, z1);
          if (bias != nullptr) {
            V b0, b1;
            LanesT::load(bias + c, n, b0, b1);
            z0 += b0;
            z1 += b1;
          }
          LanesT::store(out + c, n, act_vec::forward<act()>(z0), act_vec::forward<act()>(z1));
        }
      }
    });
  });
}

template <typename T>
void activation_backward_impl(const EpilogueArgs& args, const T* grad, const T* saved, T* out, T* grad_bias) {
  using LanesT = Lanes<T>;
  using A = typename LanesT::A;
  using V = typename LanesT::V;
  const int64_t rows = args.rows, cols = args.cols;
  act_vec::with_activation(args.act, [&](auto act) {
    const auto rows_range = [&](int64_t begin, int64_t end, A* sums) {
      for (int64_t r = begin; r < end; ++r) {
        const T* g = grad + r * cols;
        const T* s = saved != nullptr ? saved + r * cols : nullptr;
        T* o = out + r * cols;
        for (int64_t c = 0; c < cols; c += LanesT::kStep) {
          const int64_t n = std::min(LanesT::kStep, cols - c);
          V g0, g1, s0(A(0)), s1(A(0));
          LanesT::load(g + c, n, g0, g1);
          if (s != nullptr) LanesT::load(s + c, n, s0, s1);
          const V r0 = act_vec::backward<act()>(g0, s0), r1 = act_vec::backward<act()>(g1, s1);
          LanesT::store(o + c, n, r0, r1);
          if (sums != nullptr) {
            V a0, a1;
            LanesT::load_acc(sums + c, n, a0, a1);
            LanesT::store_acc(sums + c, n, a0 + r0, a1 + r1);
          }
        }
      }
    };
    if (grad_bias == nullptr) {
      at::parallel_for(0, rows, rows_grain(cols), [&](int64_t b, int64_t e) { rows_range(b, e, nullptr); });
      return;
    }
    // The column sums: one partial row of sums per thread, added up at the end.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    std::vector<A> partial(static_cast<size_t>(threads * cols), A(0));
    std::vector<char> used(static_cast<size_t>(threads), 0);
    at::parallel_for(0, rows, std::max<int64_t>(rows_grain(cols), 64), [&](int64_t b, int64_t e) {
      const int64_t t = std::min<int64_t>(at::get_thread_num(), threads - 1);
      used[t] = 1;
      rows_range(b, e, partial.data() + t * cols);
    });
    for (int64_t c = 0; c < cols; ++c) {
      A total = 0;
      for (int64_t t = 0; t < threads; ++t) {
        if (used[t]) total += partial[t * cols + c];
      }
      grad_bias[c] = static_cast<T>(total);
    }
  });
}

inline void bias_activation(const EpilogueArgs& args, const void* z, int64_t ld_z, void* y, int64_t ld_y,
                            const void* bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "growdense_bias_activation_cpu", [&] {
    bias_activation_impl<scalar_t>(args, static_cast<const scalar_t*>(z), ld_z, static_cast<scalar_t*>(y), ld_y,
                                   static_cast<const scalar_t*>(bias));
  });
}

inline void activation_backward(const EpilogueArgs& args, const void* grad, const void* saved, void* out,
                                void* grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "growdense_activation_backward_cpu", [&] {
    activation_backward_impl<scalar_t>(args, static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(saved),
                                       static_cast<scalar_t*>(out), static_cast<scalar_t*>(grad_bias));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace growdense::cpu

// Device kernels of growdense::negative_elbo and its backward (see csrc/cpu/elbo_kernel.h
// for the formulas). Free of launches and CUDA runtime calls so that a host compiler can
// build them too (tests/elbo_host_emulation.cpp runs them on the CPU).
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace growdense::cuda::elbo {

constexpr int kThreads = 256;  // per block, both kernels (a power of two: the reduction halves it)

template <typename A>
__device__ __forceinline__ A exp_(A v) {
  if constexpr (std::is_same_v<A, float>) {
    return expf(v);
  } else {
    return exp(v);
  }
}

template <typename A>
__device__ __forceinline__ A log1p_(A v) {
  if constexpr (std::is_same_v<A, float>) {
    return log1pf(v);
  } else {
    return log1p(v);
  }
}

// softplus(v) - x v, the binary cross-entropy of sigmoid(v) against x, stable for any v.
template <typename A>
__device__ __forceinline__ A bce(A v, A x) {
  const A pos = v > A(0) ? v : A(0);
  const A neg_abs = v > A(0) ? -v : v;
  return pos + log1p_(exp_(neg_abs)) - x * v;
}

template <typename A>
__device__ __forceinline__ A sigmoid(A v) {
  return A(1) / (A(1) + exp_(-v));
}

template <typename T>
struct ElboArgs {
  using A = at::opmath_type<T>;
  const T* logits = nullptr;  // (L, B, D), contiguous
  const A* target = nullptr;  // (B, D)
  const A* mu = nullptr;      // (B, Z)
  const A* logvar = nullptr;  // (B, Z)
  int64_t L = 0, B = 0, D = 0, Z = 0;
};

// One block per image b (blockIdx.x, grid-strided): out[b] = 1/L sum_{l,d} bce + KL(b).
template <typename T>
__global__ void __launch_bounds__(kThreads) elbo_forward_kernel(ElboArgs<T> p, at::opmath_type<T>* out) {
  using A = at::opmath_type<T>;
  __shared__ A partial[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const A* x = p.target + b * p.D;
    A acc = 0;
    for (int64_t l = 0; l < p.L; ++l) {
      const T* row = p.logits + (l * p.B + b) * p.D;
      for (int64_t d = tid; d < p.D; d += kThreads) acc += bce(static_cast<A>(row[d]), x[d]);
    }
    A kl = 0;
    for (int64_t j = tid; j < p.Z; j += kThreads) {
      const A m = p.mu[b * p.Z + j], v = p.logvar[b * p.Z + j];
      kl += A(1) + v - m * m - exp_(v);
    }
    partial[tid] = acc / static_cast<A>(p.L) - A(0.5) * kl;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (tid < half) partial[tid] += partial[tid + half];
      __syncthreads();
    }
    if (tid == 0) out[b] = partial[0];
    __syncthreads();  // partial is reused by the next image
  }
}

template <typename T>
struct ElboGrads {
  using A = at::opmath_type<T>;
  const A* grad = nullptr;   // (B,)
  T* logits = nullptr;       // (L, B, D) or null
  A* target = nullptr;       // (B, D) or null
  A* mu = nullptr;           // (B, Z) or null
  A* logvar = nullptr;       // (B, Z) or null
};

// One thread per pixel (b, d) (grid-strided over B * D), looping over the L samples:
// the logits are read once, their gradient written once, the target's summed on the way.
// The first B * Z threads also write the gradients of mu and logvar.
template <typename T>
__global__ void __launch_bounds__(kThreads) elbo_backward_kernel(ElboArgs<T> p, ElboGrads<T> g) {
  using A = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const A inv_l = A(1) / static_cast<A>(p.L);
  if (g.mu != nullptr || g.logvar != nullptr) {
    for (int64_t i = first; i < p.B * p.Z; i += stride) {
      const A gb = g.grad[i / p.Z];
      if (g.mu != nullptr) g.mu[i] = gb * p.mu[i];
      if (g.logvar != nullptr) g.logvar[i] = A(0.5) * gb * (exp_(p.logvar[i]) - A(1));
    }
  }
  if (g.logits == nullptr && g.target == nullptr) return;
  const int64_t plane = p.B * p.D;
  for (int64_t i = first; i < plane; i += stride) {
    const A scale = g.grad[i / p.D] * inv_l;
    const A x = p.target[i];
    A sum = 0;
    for (int64_t l = 0; l < p.L; ++l) {
      const A v = static_cast<A>(p.logits[l * plane + i]);
      if (g.logits != nullptr) g.logits[l * plane + i] = static_cast<T>(scale * (sigmoid(v) - x));
      sum += v;
    }
    if (g.target != nullptr) g.target[i] = -scale * sum;
  }
}

}  // namespace growdense::cuda::elbo

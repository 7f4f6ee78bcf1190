// Runs the CUDA kernels of csrc/cuda/elbo_kernels.cuh (the fused negative ELBO) on the
// CPU, each CUDA thread a coroutine and __syncthreads a switch back to the block's
// scheduler, and checks them against float64 loops: the forward's block reduction, the
// grid-stride loops (grids smaller than the work), D above and below the block size,
// L = 1 and 20, batch 1, and every output of the backward. It checks the kernels' logic,
// not the GPU's arithmetic or speed. Built and run by tests/test_cuda_kernels_host.py;
// prints one line per failure, exits 1 if any.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <math.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "host_emulation.h"

#include "cuda/elbo_kernels.cuh"

namespace {

// |got - want| <= rounding of the stored value (out_eps relative) + accumulation error
// of a sum whose terms have absolute sum abs_terms (acc_eps each, a few times over).
void expect_close(const std::string& what, int64_t index, double got, double want, double out_eps, double acc_eps,
                  double abs_terms) {
  const double tol = out_eps * std::abs(want) + 8 * acc_eps * abs_terms + 1e-300;
  if (!(std::abs(got - want) <= tol)) {
    if (failures < 40) {
      std::printf("FAIL %s element %lld: got %.9g, want %.9g (tol %.3g)\n", what.c_str(),
                  static_cast<long long>(index), got, want, tol);
    }
    ++failures;
  }
}

double softplus_minus(double v, double x) { return std::max(v, 0.0) + std::log1p(std::exp(-std::abs(v))) - x * v; }

template <typename T>
void check_case(int64_t L, int64_t B, int64_t D, int64_t Z, unsigned grid_forward, unsigned grid_backward,
                uint64_t seed) {
  using A = at::opmath_type<T>;
  namespace e = growdense::cuda::elbo;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<T> logits(L * B * D);
  for (auto& v : logits) v = static_cast<T>(4.0 * normal(rng));
  std::vector<A> target(B * D), mu(B * Z), logvar(B * Z), grad(B);
  for (auto& v : target) v = static_cast<A>(uniform(rng));
  for (auto& v : mu) v = static_cast<A>(normal(rng));
  for (auto& v : logvar) v = static_cast<A>(normal(rng));
  for (auto& v : grad) v = static_cast<A>(normal(rng));
  e::ElboArgs<T> p;
  p.logits = logits.data();
  p.target = target.data();
  p.mu = mu.data();
  p.logvar = logvar.data();
  p.L = L;
  p.B = B;
  p.D = D;
  p.Z = Z;
  const std::string where = type_name<T>() + " L=" + std::to_string(L) + " B=" + std::to_string(B) +
                            " D=" + std::to_string(D) + " Z=" + std::to_string(Z);
  const double acc_eps = std::is_same_v<A, double> ? 0x1p-52 : 0x1p-23;

  // forward, NaN-poisoned output
  std::vector<A> out(B, static_cast<A>(NAN));
  launch({grid_forward, 1, 1}, {e::kThreads, 1, 1}, [&] { e::elbo_forward_kernel<T>(p, out.data()); });
  for (int64_t b = 0; b < B; ++b) {
    double nll = 0, abs_terms = 0, kl = 0;
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t d = 0; d < D; ++d) {
        const double t = softplus_minus(static_cast<double>(logits[(l * B + b) * D + d]), target[b * D + d]);
        nll += t;
        abs_terms += std::abs(t) / L;
      }
    }
    for (int64_t j = 0; j < Z; ++j) {
      const double m = mu[b * Z + j], v = logvar[b * Z + j];
      kl += 1 + v - m * m - std::exp(v);
      abs_terms += 0.5 * (1 + std::abs(v) + m * m + std::exp(v));
    }
    expect_close("forward " + where, b, out[b], nll / L - 0.5 * kl, acc_eps, acc_eps, abs_terms);
  }

  // backward: every output, NaN-poisoned
  std::vector<T> g_logits(L * B * D, static_cast<T>(NAN));
  std::vector<A> g_target(B * D, static_cast<A>(NAN)), g_mu(B * Z, static_cast<A>(NAN)),
      g_logvar(B * Z, static_cast<A>(NAN));
  e::ElboGrads<T> g;
  g.grad = grad.data();
  g.logits = g_logits.data();
  g.target = g_target.data();
  g.mu = g_mu.data();
  g.logvar = g_logvar.data();
  launch({grid_backward, 1, 1}, {e::kThreads, 1, 1}, [&] { e::elbo_backward_kernel<T>(p, g); });
  for (int64_t b = 0; b < B; ++b) {
    const double scale = static_cast<double>(grad[b]) / L;
    for (int64_t d = 0; d < D; ++d) {
      double sum = 0, abs_sum = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t i = (l * B + b) * D + d;
        const double v = static_cast<double>(logits[i]);
        const double want = scale * (1 / (1 + std::exp(-v)) - target[b * D + d]);
        expect_close("grad_logits " + where, i, static_cast<double>(g_logits[i]), want, epsilon<T>(), acc_eps,
                     4 * std::abs(scale));
        sum += v;
        abs_sum += std::abs(v);
      }
      expect_close("grad_target " + where, b * D + d, g_target[b * D + d], -scale * sum, acc_eps, acc_eps,
                   std::abs(scale) * abs_sum);
    }
    for (int64_t j = 0; j < Z; ++j) {
      const int64_t i = b * Z + j;
      expect_close("grad_mu " + where, i, g_mu[i], static_cast<double>(grad[b]) * mu[i], acc_eps, acc_eps, 0);
      expect_close("grad_logvar " + where, i, g_logvar[i], 0.5 * grad[b] * (std::exp(logvar[i]) - 1), 4 * acc_eps,
                   acc_eps, 0);
    }
  }

  // backward with only the logits' gradient asked for: the others stay untouched
  std::fill(g_mu.begin(), g_mu.end(), static_cast<A>(7));
  std::fill(g_target.begin(), g_target.end(), static_cast<A>(7));
  g.target = nullptr;
  g.mu = nullptr;
  g.logvar = nullptr;
  launch({grid_backward, 1, 1}, {e::kThreads, 1, 1}, [&] { e::elbo_backward_kernel<T>(p, g); });
  for (auto v : g_mu) {
    if (v != static_cast<A>(7)) {
      std::printf("FAIL %s: grad_mu written though not asked for\n", where.c_str());
      ++failures;
    }
  }
  for (auto v : g_target) {
    if (v != static_cast<A>(7)) {
      std::printf("FAIL %s: grad_target written though not asked for\n", where.c_str());
      ++failures;
    }
  }
}

template <typename T>
void check_type() {
  // L, B, D, Z, forward grid, backward grid
  check_case<T>(1, 1, 7, 3, 1, 1, 1);
  check_case<T>(20, 1, 784, 20, 1, 4, 2);
  check_case<T>(1, 5, 784, 20, 2, 3, 3);    // grids smaller than the work: grid-stride loops
  check_case<T>(20, 3, 37, 2, 3, 1, 4);
  check_case<T>(3, 4, 300, 1, 8, 64, 5);    // D above the block size, grids larger than the work
  check_case<T>(2, 3, 1, 0, 1, 1, 6);       // one pixel, no latent
}

}  // namespace

int main() {
  check_type<float>();
  check_type<double>();
  check_type<c10::BFloat16>();
  check_type<c10::Half>();
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}

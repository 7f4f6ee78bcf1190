// Runs the CUDA kernels of csrc/cuda/linear_kernels.cuh on the CPU, each CUDA thread a
// coroutine and __syncthreads a switch back to the block's scheduler, and checks them
// against float64 loops.
// This exercises the kernels' index arithmetic, ragged edges, shared-memory tiling and
// capacity padding on machines without a GPU; it says nothing about speed, and the
// host compiler's float rounding stands in for the GPU's. Built and run by
// tests/test_cuda_kernels_host.py; prints one line per failure, exits 1 if any.
#include <ATen/OpMathType.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "host_emulation.h"

#include "cuda/linear_kernels.cuh"

namespace {

using growdense::Activation;
using growdense::cuda::FusedGemm;
using growdense::cuda::LargeTiles;
using growdense::cuda::SmallTiles;

template <typename Tiles, typename T>
void run_fused(FusedGemm<T> first, FusedGemm<T> second) {
  const int64_t blocks =
      growdense::cuda::set_tiles<Tiles>(first) + growdense::cuda::set_tiles<Tiles>(second);
  if (blocks == 0) return;
  launch({static_cast<unsigned>(blocks), 1, 1}, {Tiles::kThreads, 1, 1},
         [&] { growdense::cuda::fused_gemm_kernel<T, Tiles>(first, second); });
}

const double kNaN = std::numeric_limits<double>::quiet_NaN();

// The spacing of T's subnormal numbers: below its smallest normal, a result rounded
// to T keeps only this absolute precision (float16: 2**-24, reached by small gradients).
template <typename T>
double subnormal_spacing() {
  if constexpr (std::is_same_v<T, double>) return 0x1p-1074;
  if constexpr (std::is_same_v<T, float>) return 0x1p-149;
  if constexpr (std::is_same_v<T, c10::Half>) return 0x1p-24;
  return 0x1p-133;  // bfloat16
}

// got must equal want (NaN matching NaN) within the rounding of the output to T
// (relative, or the subnormal spacing) plus the accumulation error of a float (double
// for double) sum with the given |terms|.
template <typename T>
void expect_close(const std::string& what, int64_t index, T got_t, double want, double abs_terms) {
  const double got = static_cast<double>(got_t);
  const double acc_eps = std::is_same_v<T, double> ? 0x1p-52 : 0x1p-23;
  const double tol = 2 * epsilon<T>() * std::abs(want) + 4 * acc_eps * abs_terms + subnormal_spacing<T>();
  const bool ok = std::isnan(want) ? std::isnan(got) : std::abs(got - want) <= tol;
  if (!ok) {
    if (failures < 40) {
      std::printf("FAIL %s [%s] element %lld: got %.9g, want %.9g (tol %.3g)\n", what.c_str(), type_name<T>().c_str(),
                  static_cast<long long>(index), got, want, tol);
    }
    ++failures;
  }
}

struct Rng {
  std::mt19937_64 engine;
  explicit Rng(uint64_t seed) : engine(seed) {}
  int64_t uniform_int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(engine); }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(engine); }
};

// Values already rounded to T, so that the float64 reference sees what the kernel sees.
template <typename T>
std::vector<T> random_values(Rng& rng, int64_t n) {
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(rng.normal());
  return v;
}

template <typename T>
double d(T v) {
  return static_cast<double>(v);
}

// The activations in float64, written out here independently of csrc/activation.h.
constexpr Activation kActivations[] = {Activation::None, Activation::Relu, Activation::Gelu, Activation::GeluTanh,
                                       Activation::Silu};

std::string act_name(Activation act) {
  switch (act) {
    case Activation::None:
      return "none";
    case Activation::Relu:
      return "relu";
    case Activation::Gelu:
      return "gelu";
    case Activation::GeluTanh:
      return "gelu_tanh";
    case Activation::Silu:
      return "silu";
  }
  return "?";
}

double ref_act(Activation act, double z) {
  const double pi = 3.141592653589793;
  switch (act) {
    case Activation::None:
      return z;
    case Activation::Relu:
      return z > 0 ? z : (std::isnan(z) ? z : 0.0);
    case Activation::Gelu:
      return z * 0.5 * std::erfc(-z / std::sqrt(2.0));
    case Activation::GeluTanh:
      return 0.5 * z * (1 + std::tanh(std::sqrt(2 / pi) * (z + 0.044715 * z * z * z)));
    case Activation::Silu:
      return z / (1 + std::exp(-z));
  }
  return kNaN;
}

// d act / dz, from the output for relu (NaN passes the gradient), from z otherwise.
double ref_dact(Activation act, double saved) {
  const double pi = 3.141592653589793;
  const double z = saved;
  switch (act) {
    case Activation::None:
      return 1;
    case Activation::Relu:
      return (saved > 0 || std::isnan(saved)) ? 1 : 0;
    case Activation::Gelu:
      return 0.5 * std::erfc(-z / std::sqrt(2.0)) + z * std::exp(-z * z / 2) / std::sqrt(2 * pi);
    case Activation::GeluTanh: {
      const double u = std::sqrt(2 / pi) * (z + 0.044715 * z * z * z);
      const double sech2 = 1 / (std::cosh(u) * std::cosh(u));
      return 0.5 * (1 + std::tanh(u)) + 0.5 * z * sech2 * std::sqrt(2 / pi) * (1 + 3 * 0.044715 * z * z);
    }
    case Activation::Silu: {
      const double sig = 1 / (1 + std::exp(-z));
      return sig + z * sig * (1 - sig);
    }
  }
  return kNaN;
}

bool saves_output(Activation act) { return act == Activation::Relu; }

struct Shape {
  int64_t rows, cap_in, cap_out, active_in, active_out;
  std::string str() const {
    return "rows=" + std::to_string(rows) + " cap=" + std::to_string(cap_out) + "x" + std::to_string(cap_in) +
           " active=" + std::to_string(active_out) + "x" + std::to_string(active_in);
  }
};

// A capacity buffer whose active block holds random values and whose padding holds
// NaN: a kernel that reads outside the block produces NaN and fails.
template <typename T>
std::vector<T> capacity_weight(Rng& rng, const Shape& s, int64_t ld) {
  std::vector<T> w(s.cap_out * ld, static_cast<T>(kNaN));
  for (int64_t o = 0; o < s.active_out; ++o) {
    for (int64_t i = 0; i < s.active_in; ++i) w[o * ld + i] = static_cast<T>(rng.normal());
  }
  return w;
}

template <typename T, typename Tiles>
void check_forward(Rng& rng, const Shape& s, bool with_bias, Activation act, bool with_pre) {
  const int64_t ld = s.cap_in + rng.uniform_int(0, 2);  // a row stride past the capacity, as a view may have
  const std::vector<T> x = random_values<T>(rng, s.rows * s.active_in);
  const std::vector<T> w = capacity_weight<T>(rng, s, ld);
  std::vector<T> bias(s.cap_out, static_cast<T>(kNaN));
  for (int64_t o = 0; o < s.active_out; ++o) bias[o] = static_cast<T>(rng.normal());
  std::vector<T> y(s.rows * s.active_out, static_cast<T>(kNaN));
  std::vector<T> pre(s.rows * s.active_out, static_cast<T>(kNaN));

  run_fused<Tiles>(growdense::cuda::forward_gemm<T>(x.data(), w.data(), ld, with_bias ? bias.data() : nullptr, act,
                                                    with_pre ? pre.data() : nullptr, y.data(), s.rows, s.active_in,
                                                    s.active_out),
                   FusedGemm<T>{});
  const std::string what = "forward " + s.str() + (with_bias ? " bias " : " ") + act_name(act);
  for (int64_t r = 0; r < s.rows; ++r) {
    for (int64_t o = 0; o < s.active_out; ++o) {
      double want = with_bias ? d(bias[o]) : 0.0;
      double terms = std::abs(want);
      for (int64_t i = 0; i < s.active_in; ++i) {
        want += d(x[r * s.active_in + i]) * d(w[o * ld + i]);
        terms += std::abs(d(x[r * s.active_in + i]) * d(w[o * ld + i]));
      }
      if (with_pre) expect_close<T>(what + " pre", r * s.active_out + o, pre[r * s.active_out + o], want, terms);
      // act's slope is below 1.2: the error of z grows by at most that much.
      expect_close<T>(what, r * s.active_out + o, y[r * s.active_out + o], ref_act(act, want), 1.2 * terms);
    }
  }
}

// The relu's forward output: random, with exact zeros, and one NaN (whose gradient passes).
template <typename T>
std::vector<T> relu_output(Rng& rng, int64_t n) {
  std::vector<T> out(n);
  for (auto& e : out) {
    const double v = rng.normal();
    e = static_cast<T>(v < -0.3 ? 0.0 : v);
  }
  if (n > 2) out[n / 2] = static_cast<T>(kNaN);
  return out;
}

// What the activation's backward reads: the relu output (relu_output), or random
// pre-activations over the range where the derivatives vary (with a NaN).
template <typename T>
std::vector<T> saved_values(Rng& rng, Activation act, int64_t n) {
  if (saves_output(act)) return relu_output<T>(rng, n);
  std::vector<T> z(n);
  for (auto& e : z) e = static_cast<T>(2.5 * rng.normal());
  return z;
}

template <typename T, typename Tiles>
void check_backward(Rng& rng, const Shape& s, Activation act, bool need_x, bool need_w, bool need_b) {
  const std::vector<T> x = random_values<T>(rng, s.rows * s.active_in);
  const std::vector<T> w = capacity_weight<T>(rng, s, s.cap_in);
  const std::vector<T> grad = random_values<T>(rng, s.rows * s.active_out);
  const std::vector<T> out = saved_values<T>(rng, act, s.rows * s.active_out);
  const T* keep = act != Activation::None ? out.data() : nullptr;
  std::vector<T> grad_x(s.rows * s.active_in, static_cast<T>(kNaN));
  std::vector<T> grad_w(s.cap_out * s.cap_in, static_cast<T>(kNaN));
  std::vector<T> grad_b(s.cap_out, static_cast<T>(kNaN));

  FusedGemm<T> gx, gw;
  if (need_x) {
    gx = growdense::cuda::grad_input_gemm<T>(grad.data(), keep, act, w.data(), s.cap_in, grad_x.data(), s.rows,
                                             s.active_in, s.active_out);
  }
  if (need_w) {
    gw = growdense::cuda::grad_weight_gemm<T>(grad.data(), keep, act, x.data(), grad_w.data(), s.cap_out, s.cap_in,
                                              need_b ? grad_b.data() : nullptr, s.rows, s.active_in, s.active_out);
  }
  if (need_x) {
    run_fused<Tiles>(gx, gw);
  } else {
    run_fused<Tiles>(gw, FusedGemm<T>{});
  }

  // The gradient of the pre-activation; its error bound also counts |grad| itself, the
  // derivative being computed in the kernel's float precision (cancellation near 0).
  auto g = [&](int64_t r, int64_t o) {
    const int64_t k = r * s.active_out + o;
    const double dk = ref_dact(act, d(out[k]));
    return dk == 0 ? 0.0 : d(grad[k]) * dk;
  };
  auto g_abs = [&](int64_t r, int64_t o) {
    return std::abs(g(r, o)) + (act == Activation::None ? 0.0 : std::abs(d(grad[r * s.active_out + o])));
  };
  const std::string what = "backward " + s.str() + " " + act_name(act);
  if (need_x) {
    for (int64_t r = 0; r < s.rows; ++r) {
      for (int64_t i = 0; i < s.active_in; ++i) {
        double want = 0, terms = 0;
        for (int64_t o = 0; o < s.active_out; ++o) {
          want += g(r, o) * d(w[o * s.cap_in + i]);
          terms += g_abs(r, o) * std::abs(d(w[o * s.cap_in + i]));
        }
        expect_close<T>(what + " grad_x", r * s.active_in + i, grad_x[r * s.active_in + i], want, terms);
      }
    }
  }
  if (need_w) {
    for (int64_t o = 0; o < s.cap_out; ++o) {
      for (int64_t i = 0; i < s.cap_in; ++i) {
        double want = 0, terms = 0;
        if (o < s.active_out && i < s.active_in) {
          for (int64_t r = 0; r < s.rows; ++r) {
            want += g(r, o) * d(x[r * s.active_in + i]);
            terms += g_abs(r, o) * std::abs(d(x[r * s.active_in + i]));
          }
        }
        expect_close<T>(what + " grad_w", o * s.cap_in + i, grad_w[o * s.cap_in + i], want, terms);
      }
    }
    if (need_b) {
      for (int64_t o = 0; o < s.cap_out; ++o) {
        double want = 0, terms = 0;
        if (o < s.active_out) {
          for (int64_t r = 0; r < s.rows; ++r) {
            want += g(r, o);
            terms += g_abs(r, o);
          }
        }
        expect_close<T>(what + " grad_b", o, grad_b[o], want, terms);
      }
    }
  }
}

template <typename T>
void check_mask_column_sums(Rng& rng, int64_t rows, int64_t cols, int64_t cap, Activation act) {
  using acc_t = at::opmath_type<T>;
  const std::vector<T> grad = random_values<T>(rng, rows * cols);
  const std::vector<T> out = saved_values<T>(rng, act, rows * cols);
  const bool with_saved = act != Activation::None;
  const T* keep = with_saved ? out.data() : nullptr;
  std::vector<T> masked(rows * cols, static_cast<T>(kNaN));
  const growdense::cuda::ColumnSumsGrid split = growdense::cuda::column_sums_grid(rows);
  std::vector<acc_t> partial(split.chunks * cols, static_cast<acc_t>(kNaN));
  std::vector<T> bias_grad(cap, static_cast<T>(kNaN));

  launch({static_cast<unsigned>((cols + growdense::cuda::kSumCols - 1) / growdense::cuda::kSumCols),
          static_cast<unsigned>(split.chunks), 1},
         {growdense::cuda::kSumCols, growdense::cuda::kSumRows, 1}, [&] {
           growdense::cuda::mask_column_sums_kernel<T>(grad.data(), keep, act, with_saved ? masked.data() : nullptr,
                                                       partial.data(), rows, cols, split.rows_per_chunk);
         });
  launch({static_cast<unsigned>((cap + 255) / 256), 1, 1}, {256, 1, 1}, [&] {
    growdense::cuda::sum_chunks_kernel<T>(partial.data(), split.chunks, cols, bias_grad.data(), cap);
  });

  const std::string what = "column sums rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                           " chunks=" + std::to_string(split.chunks) + " " + act_name(act);
  auto g = [&](int64_t k) {
    const double dk = ref_dact(act, d(out[k]));
    return dk == 0 ? 0.0 : d(grad[k]) * dk;
  };
  auto g_abs = [&](int64_t k) { return std::abs(g(k)) + (with_saved ? std::abs(d(grad[k])) : 0.0); };
  if (with_saved) {
    for (int64_t k = 0; k < rows * cols; ++k) expect_close<T>(what + " masked", k, masked[k], g(k), g_abs(k));
  }
  for (int64_t c = 0; c < cap; ++c) {
    double want = 0, terms = 0;
    if (c < cols) {
      for (int64_t r = 0; r < rows; ++r) {
        want += g(r * cols + c);
        terms += g_abs(r * cols + c);
      }
    }
    expect_close<T>(what + " sums", c, bias_grad[c], want, terms);
  }
}

template <typename T>
void check_bias_act(Rng& rng, int64_t rows, int64_t cols, bool with_bias, Activation act, bool with_pre,
                    bool in_place) {
  const std::vector<T> before = random_values<T>(rng, rows * cols);
  const std::vector<T> bias = random_values<T>(rng, cols);
  std::vector<T> pre(rows * cols, static_cast<T>(kNaN));
  std::vector<T> y(rows * cols, static_cast<T>(kNaN));
  // In place, as the cuBLAS path calls it: the GEMM's result is in pre (or y).
  std::vector<T>& in_buffer = with_pre ? pre : y;
  if (in_place) in_buffer = before;
  const T* in = in_place ? in_buffer.data() : before.data();
  // Fewer threads than elements, so the grid-stride loop runs more than once.
  launch({3, 1, 1}, {32, 1, 1}, [&] {
    growdense::cuda::bias_act_kernel<T>(in, with_pre ? pre.data() : nullptr, y.data(),
                                        with_bias ? bias.data() : nullptr, act, rows, cols);
  });
  const std::string what = "bias_act " + act_name(act) + (with_bias ? " bias" : "") + (with_pre ? " pre" : "") +
                           (in_place ? " in place" : "");
  for (int64_t k = 0; k < rows * cols; ++k) {
    const double z = d(before[k]) + (with_bias ? d(bias[k % cols]) : 0.0);
    const double terms = std::abs(d(before[k])) + std::abs(d(bias[k % cols]));
    if (with_pre) expect_close<T>(what + " pre", k, pre[k], z, terms);
    expect_close<T>(what, k, y[k], ref_act(act, z), 1.2 * terms);
  }
}

template <typename T>
void check_all(Rng& rng) {
  std::vector<Shape> shapes = {
      {1, 1, 1, 1, 1},        {1, 7, 5, 7, 5},      {3, 8, 6, 3, 4},       {17, 9, 5, 1, 1},
      {33, 70, 65, 70, 65},   {65, 40, 90, 33, 67}, {5, 130, 3, 129, 2},   {130, 16, 16, 16, 16},
      {2, 100, 100, 64, 64},  {70, 33, 31, 17, 29}, {40, 200, 70, 130, 65},
  };
  for (int n = 0; n < 6; ++n) {
    const int64_t cap_in = rng.uniform_int(1, 150), cap_out = rng.uniform_int(1, 150);
    shapes.push_back({rng.uniform_int(1, 150), cap_in, cap_out, rng.uniform_int(1, cap_in),
                      rng.uniform_int(1, cap_out)});
  }
  for (size_t n = 0; n < shapes.size(); ++n) {
    const Shape& s = shapes[n];
    for (int variant = 0; variant < 4; ++variant) {
      const bool with_bias = variant & 1;
      const Activation act = (variant & 2) ? Activation::Relu : Activation::None;
      check_forward<T, LargeTiles>(rng, s, with_bias, act, false);
      check_forward<T, SmallTiles>(rng, s, with_bias, act, false);
    }
    // The activations that save their pre-activation, each on a share of the shapes.
    for (Activation act : {Activation::Gelu, Activation::GeluTanh, Activation::Silu}) {
      if ((n + static_cast<size_t>(act)) % 2 == 0) {
        check_forward<T, LargeTiles>(rng, s, true, act, true);
      } else {
        check_forward<T, SmallTiles>(rng, s, n % 3 != 0, act, n % 4 != 0);
      }
    }
    for (Activation act : {Activation::None, Activation::Relu}) {
      check_backward<T, LargeTiles>(rng, s, act, true, true, true);
      check_backward<T, SmallTiles>(rng, s, act, true, true, true);
    }
    for (Activation act : {Activation::Gelu, Activation::GeluTanh, Activation::Silu}) {
      if ((n + static_cast<size_t>(act)) % 2 == 0) {
        check_backward<T, LargeTiles>(rng, s, act, true, true, true);
      } else {
        check_backward<T, SmallTiles>(rng, s, act, true, true, n % 2 == 0);
      }
    }
    check_backward<T, SmallTiles>(rng, s, Activation::Relu, true, false, false);
    check_backward<T, SmallTiles>(rng, s, Activation::Relu, false, true, false);
    check_backward<T, LargeTiles>(rng, s, Activation::None, false, true, true);
    check_backward<T, SmallTiles>(rng, s, Activation::Silu, false, true, true);
  }
  for (Activation act : kActivations) {
    check_mask_column_sums<T>(rng, 1, 1, 1, act);
    check_mask_column_sums<T>(rng, 7, 45, 50, act);
    check_mask_column_sums<T>(rng, 300, 33, 40, act);  // five chunks of rows
  }
  check_mask_column_sums<T>(rng, 300, 33, 33, Activation::None);
  check_mask_column_sums<T>(rng, 70000, 3, 5, Activation::Relu);  // rows_per_chunk above 64
  check_mask_column_sums<T>(rng, 70000, 3, 5, Activation::Gelu);
  for (Activation act : kActivations) {
    for (int variant = 0; variant < 8; ++variant) {
      check_bias_act<T>(rng, 37, 11, variant & 1, act, variant & 2, variant & 4);
    }
  }
}

void check_tile_choice() {
  FusedGemm<float> small, none;
  small.c = reinterpret_cast<float*>(16);
  small.M = 128;
  small.N = 256;
  // 2 x 4 large tiles cannot fill 132 SMs; 33 x 64 of them can.
  if (growdense::cuda::prefer_large_tiles(small, none, 132)) {
    std::printf("FAIL tile choice: 128 x 256 should use small tiles\n");
    ++failures;
  }
  small.M = 33 * 64;
  if (!growdense::cuda::prefer_large_tiles(small, none, 132)) {
    std::printf("FAIL tile choice: 2112 x 256 should use large tiles\n");
    ++failures;
  }
}

}  // namespace

int main() {
  Rng rng(20240611);
  check_tile_choice();
  check_all<double>(rng);
  check_all<float>(rng);
  check_all<c10::Half>(rng);
  check_all<c10::BFloat16>(rng);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}

// Helpers shared by the CUDA kernels of the growdense ops (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

namespace growdense::cuda {

// Which GEMM implementation the linear ops use. `Auto` picks by problem size; the
// environment variable GROWDENSE_CUDA_GEMM=fused|blas forces one, for tests and
// benchmarks (read on every call, so a running process can switch).
enum class GemmPath { Auto, Fused, Blas };

inline GemmPath gemm_path_from_env() {
  const char* value = std::getenv("GROWDENSE_CUDA_GEMM");
  if (value == nullptr || *value == '\0') return GemmPath::Auto;
  const std::string_view name(value);
  if (name == "auto") return GemmPath::Auto;
  if (name == "fused") return GemmPath::Fused;
  if (name == "blas") return GemmPath::Blas;
  TORCH_CHECK_VALUE(false, "growdense: GROWDENSE_CUDA_GEMM='", name, "' is not one of auto, fused, blas");
}

// The fused kernel pays off while a GEMM is small: launches and memory round trips
// dominate there, and one kernel with the epilogue inside saves both. Its tiles are
// computed with plain FMAs, so above this size cuBLAS (tensor cores) wins. The
// thresholds are estimates, not measurements; GROWDENSE_CUDA_GEMM overrides them.
constexpr int64_t kFusedMaxMacs = int64_t{1} << 25;  // multiply-adds of one GEMM
constexpr int64_t kFusedMaxK = 1024;                  // reduction length of one GEMM

inline bool fused_pays(int64_t m, int64_t n, int64_t k) {
  return k <= kFusedMaxK && m * n * k <= kFusedMaxMacs;
}

inline void check_on_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "growdense: ", name, " is on ", t.device(), " but the input is on ",
              like.device());
}

}  // namespace growdense::cuda

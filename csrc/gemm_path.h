// Which GEMM implementation the CUDA linear ops use. `Auto` picks by problem size;
// `Fused` and `Blas` force one (tests, benchmarks). Read from the environment variable
// GROWDENSE_CUDA_GEMM=auto|fused|blas once, at the first call; changed afterwards with
// the op growdense::_set_cuda_gemm_path (a running process cannot see a new
// environment variable, a test switching paths calls the op).
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string_view>

namespace growdense {

enum class GemmPath : int { Auto, Fused, Blas };

inline GemmPath parse_gemm_path(std::string_view name, const char* source) {
  if (name.empty() || name == "auto") return GemmPath::Auto;
  if (name == "fused") return GemmPath::Fused;
  if (name == "blas") return GemmPath::Blas;
  TORCH_CHECK_VALUE(false, "growdense: ", source, "='", name, "' is not one of auto, fused, blas");
}

inline const char* gemm_path_name(GemmPath path) {
  return path == GemmPath::Fused ? "fused" : path == GemmPath::Blas ? "blas" : "auto";
}

namespace detail {
inline GemmPath gemm_path_from_env() {
  const char* value = std::getenv("GROWDENSE_CUDA_GEMM");
  return parse_gemm_path(value == nullptr ? "" : value, "GROWDENSE_CUDA_GEMM");
}
// -1: not read yet.
inline std::atomic<int> gemm_path_state{-1};
}  // namespace detail

inline GemmPath gemm_path() {
  int value = detail::gemm_path_state.load(std::memory_order_relaxed);
  if (value < 0) {
    value = static_cast<int>(detail::gemm_path_from_env());
    detail::gemm_path_state.store(value, std::memory_order_relaxed);
  }
  return static_cast<GemmPath>(value);
}

// Sets the path; returns the previous one.
inline GemmPath set_gemm_path(GemmPath path) {
  const GemmPath before = gemm_path();
  detail::gemm_path_state.store(static_cast<int>(path), std::memory_order_relaxed);
  return before;
}

}  // namespace growdense

// Helpers shared by the CUDA kernels of the growdense ops (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "gemm_path.h"

namespace growdense::cuda {

// The fused kernel pays off while a GEMM is small: launches and memory round trips
// dominate there, and one kernel with the epilogue inside saves both. Its tiles are
// computed with plain FMAs, so above this size cuBLAS (tensor cores) wins. The
// thresholds are estimates, not measurements; GROWDENSE_CUDA_GEMM overrides them
// (gemm_path.h).
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

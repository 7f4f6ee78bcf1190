// cuBLAS and cuBLASLt GEMMs on the current stream, in cuBLAS's column-major terms:
// C (m x n, leading dimension ldc) = op(A) op(B), op(X) = X^T when trans_X, with A of
// shape m x k after op and B of shape k x n after op. float32 uses TF32 tensor cores
// only when torch allows it for matmuls (torch.backends.cuda.matmul.allow_tf32);
// half and bfloat16 accumulate in float32, float64 in float64.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "activation.h"

namespace growdense::cuda {

void blas_gemm(c10::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a,
               int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc);

// D = act(op(A) op(B) + bias) in one cuBLASLt call, the bias (length m, may be null)
// and the activation applied by the GEMM's epilogue; `pre` (may be null) receives the
// pre-activation op(A) op(B) + bias, laid out as D. Returns false without doing
// anything when cuBLASLt has no epilogue for the activation (with or without `pre`) or
// no algorithm for the problem (float64, unusual alignment, ...).
bool blaslt_gemm_bias_act(c10::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                          const void* a, int64_t lda, const void* b, int64_t ldb, const void* bias, Activation act,
                          void* pre, void* d, int64_t ldd);

}  // namespace growdense::cuda

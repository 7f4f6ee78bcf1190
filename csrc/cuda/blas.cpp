#include "blas.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <cublas_v2.h>

#include <climits>
#include <functional>
#include <mutex>
#include <unordered_map>

#include "torch_internals.h"

namespace growdense::cuda {
namespace {

cudaDataType_t data_type(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return CUDA_R_32F;
    case c10::kDouble:
      return CUDA_R_64F;
    case c10::kHalf:
      return CUDA_R_16F;
    case c10::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK_TYPE(false, "growdense: no CUDA GEMM for dtype ", dtype);
  }
}

bool tf32_allowed() { return internals::cuda_matmul_allows_tf32(); }

// The cuBLASLt epilogue computing act(. + bias) (bias: whether there is one), also
// writing the pre-activation to an auxiliary output when `aux`; false when it has none.
// cuBLASLt's GELU is the tanh approximation, so it serves gelu_tanh only.
bool lt_epilogue(Activation act, bool bias, bool aux, cublasLtEpilogue_t& epilogue) {
  switch (act) {
    case Activation::None:
      if (aux) return false;
      epilogue = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      return true;
    case Activation::Relu:
      if (aux) return false;
      epilogue = bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
      return true;
    case Activation::GeluTanh:
      if (aux) {
        epilogue = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      } else {
        epilogue = bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
      }
      return true;
    default:
      return false;
  }
}

cublasComputeType_t compute_type(c10::ScalarType dtype) {
  if (dtype == c10::kDouble) return CUBLAS_COMPUTE_64F;
  if (dtype == c10::kFloat && tf32_allowed()) return CUBLAS_COMPUTE_32F_FAST_TF32;
  return CUBLAS_COMPUTE_32F;
}

cublasOperation_t operation(bool transpose) { return transpose ? CUBLAS_OP_T : CUBLAS_OP_N; }

int to_int(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= INT_MAX, "growdense: GEMM ", what, "=", value, " exceeds cuBLAS's int range");
  return static_cast<int>(value);
}

// The largest power of two, up to 256, that divides the address.
uint32_t alignment_of(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t alignment = 1;
  while (alignment < 256 && address % (2 * alignment) == 0) alignment *= 2;
  return alignment;
}

// Owns the cuBLASLt descriptors of one call.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;

  LtDescriptors() = default;
  LtDescriptors(const LtDescriptors&) = delete;
  LtDescriptors& operator=(const LtDescriptors&) = delete;
  ~LtDescriptors() {
    if (preference != nullptr) cublasLtMatmulPreferenceDestroy(preference);
    if (d != nullptr) cublasLtMatrixLayoutDestroy(d);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

constexpr uint64_t kLtMaxWorkspace = uint64_t{32} << 20;

// cuBLASLt's algorithm choice depends only on the problem's description, and asking its
// heuristic costs more host time than a small GEMM takes on the GPU, so the answer is
// kept per description (including "no algorithm").
struct LtProblem {
  int device;
  c10::ScalarType dtype;
  cublasComputeType_t compute;
  cublasLtEpilogue_t epilogue;
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldd;
  uint32_t align_a, align_b, align_d, align_bias;
  bool operator==(const LtProblem&) const = default;
};

struct LtProblemHash {
  size_t operator()(const LtProblem& p) const {
    size_t h = 0;
    auto mix = [&h](int64_t v) { h ^= std::hash<int64_t>{}(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    mix(p.device);
    mix(static_cast<int64_t>(p.dtype));
    mix(static_cast<int64_t>(p.compute));
    mix(static_cast<int64_t>(p.epilogue));
    mix(p.trans_a * 2 + p.trans_b);
    for (int64_t v : {p.m, p.n, p.k, p.lda, p.ldb, p.ldd}) mix(v);
    for (uint32_t v : {p.align_a, p.align_b, p.align_d, p.align_bias}) mix(v);
    return h;
  }
};

struct LtPlan {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

class LtPlanCache {
 public:
  bool find(const LtProblem& problem, LtPlan& plan) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = plans_.find(problem);
    if (it == plans_.end()) return false;
    plan = it->second;
    return true;
  }
  void insert(const LtProblem& problem, const LtPlan& plan) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (plans_.size() >= kMaxPlans) plans_.clear();  // many distinct shapes: start over
    plans_[problem] = plan;
  }

 private:
  static constexpr size_t kMaxPlans = 4096;
  std::mutex mutex_;
  std::unordered_map<LtProblem, LtPlan, LtProblemHash> plans_;
};

LtPlanCache& lt_plans() {
  static LtPlanCache cache;
  return cache;
}

}  // namespace

void blas_gemm(c10::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a,
               int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc) {
  const cudaDataType_t type = data_type(dtype);
  const cublasComputeType_t compute = compute_type(dtype);
  // The handle comes bound to the current stream, with torch's workspace and math mode.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const int im = to_int(m, "m"), in = to_int(n, "n"), ik = to_int(k, "k");
  const int ilda = to_int(lda, "lda"), ildb = to_int(ldb, "ldb"), ildc = to_int(ldc, "ldc");
  if (dtype == c10::kDouble) {
    const double alpha = 1.0, beta = 0.0;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, operation(trans_a), operation(trans_b), im, in, ik, &alpha, a, type,
                                      ilda, b, type, ildb, &beta, c, type, ildc, compute, CUBLAS_GEMM_DEFAULT));
  } else {
    const float alpha = 1.0f, beta = 0.0f;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, operation(trans_a), operation(trans_b), im, in, ik, &alpha, a, type,
                                      ilda, b, type, ildb, &beta, c, type, ildc, compute, CUBLAS_GEMM_DEFAULT));
  }
}

bool blaslt_gemm_bias_act(c10::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                          const void* a, int64_t lda, const void* b, int64_t ldb, const void* bias, Activation act,
                          void* pre, void* d, int64_t ldd) {
  if (dtype == c10::kDouble) return false;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  if (!lt_epilogue(act, bias != nullptr, pre != nullptr, epilogue)) return false;
  // The auxiliary output's leading dimension must be a multiple of 8.
  if (pre != nullptr && (ldd % 8 != 0 || alignment_of(pre) < 16)) return false;
  const cudaDataType_t type = data_type(dtype);
  const cublasComputeType_t compute = compute_type(dtype);
  LtDescriptors desc;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&desc.op, compute, CUDA_R_32F));
  const cublasOperation_t op_a = operation(trans_a), op_b = operation(trans_b);
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  TORCH_CUDABLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (pre != nullptr) {
    const int64_t aux_ld = ldd;
    TORCH_CUDABLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &pre, sizeof(pre)));
    TORCH_CUDABLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  }
  if (bias != nullptr) {
    TORCH_CUDABLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  // Layouts describe the matrices as stored, before op().
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&desc.a, type, trans_a ? k : m, trans_a ? m : k, lda));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&desc.b, type, trans_b ? n : k, trans_b ? k : n, ldb));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&desc.d, type, m, n, ldd));

  const uint32_t align_a = alignment_of(a), align_b = alignment_of(b), align_d = alignment_of(d);
  const LtProblem problem{c10::cuda::current_device(), dtype, compute, epilogue, trans_a, trans_b, m, n, k, lda, ldb,
                          ldd, align_a, align_b, align_d, bias != nullptr ? alignment_of(bias) : 0u};
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  LtPlan plan;
  if (!lt_plans().find(problem, plan)) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&desc.preference));
    const uint64_t max_workspace = kLtMaxWorkspace;
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        desc.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace)));
    // The heuristic would otherwise assume 256-byte aligned pointers.
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        desc.preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        desc.preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        desc.preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        desc.preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
    cublasLtMatmulHeuristicResult_t heuristic{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                                                 desc.preference, 1, &heuristic, &found);
    plan.found = status == CUBLAS_STATUS_SUCCESS && found > 0;
    if (plan.found) {
      plan.algo = heuristic.algo;
      plan.workspace = heuristic.workspaceSize;
    }
    lt_plans().insert(problem, plan);
  }
  if (!plan.found) return false;

  // The workspace comes from torch's caching allocator, ordered on the current stream.
  at::Tensor workspace;
  void* workspace_ptr = nullptr;
  if (plan.workspace > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace)},
                          at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
    workspace_ptr = workspace.data_ptr();
  }
  const float alpha = 1.0f, beta = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasLtMatmul(handle, desc.op, &alpha, a, desc.a, b, desc.b, &beta, d, desc.d, d, desc.d,
                                     &plan.algo, workspace_ptr, plan.workspace, at::cuda::getCurrentCUDAStream()));
  return true;
}

}  // namespace growdense::cuda

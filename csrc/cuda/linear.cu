// CUDA kernels of growdense::linear and growdense::linear_backward.
//
// Two paths, picked per call by size (common.h):
//  - small GEMMs: one launch of the fused tiled kernel (linear_kernels.cuh) with the
//    bias, the activation (and the pre-activation it saves), the activation's backward
//    and the bias gradient inside it; the backward's two gradient GEMMs share that one
//    launch.
//  - large GEMMs: cuBLASLt with the bias and activation in its epilogue for the forward
//    where it has one (relu, gelu_tanh), else with the bias only followed by one
//    element-wise kernel (cuBLAS plus that kernel where cuBLASLt offers no algorithm);
//    for the backward, one kernel that applies the activation's backward and reduces
//    the bias gradient, then two cuBLAS GEMMs.
// Both read the active block of the capacity-shaped weight in place (leading
// dimension = its row stride) and write grad_weight's active block in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "args.h"
#include "blas.h"
#include "common.h"
#include "linear_kernels.cuh"

namespace growdense::cuda {
namespace {

constexpr int kThreads = 256;

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// The weight as a matrix whose element (o, i) is at data[o * ld + i]: the capacity
// buffer itself when its rows are unit-stride (the usual case), else a contiguous copy.
struct RowMajor {
  at::Tensor tensor;
  int64_t ld;
};

RowMajor row_major(const at::Tensor& weight) {
  if (weight.is_contiguous()) return {weight, weight.size(1)};
  if (weight.stride(1) == 1 && weight.stride(0) >= weight.size(1)) return {weight, weight.stride(0)};
  return {weight.contiguous(), weight.size(1)};
}

template <typename Tiles, typename T>
void launch_fused_gemm_with(FusedGemm<T> first, FusedGemm<T> second, cudaStream_t stream) {
  const int64_t blocks = set_tiles<Tiles>(first) + set_tiles<Tiles>(second);
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= INT32_MAX, "growdense: too many output tiles (", blocks, ") for one launch");
  fused_gemm_kernel<T, Tiles><<<static_cast<unsigned>(blocks), Tiles::kThreads, 0, stream>>>(first, second);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One launch for one or two GEMMs (second.c == nullptr for one).
template <typename T>
void launch_fused_gemm(const FusedGemm<T>& first, const FusedGemm<T>& second, cudaStream_t stream) {
  if (prefer_large_tiles(first, second, sm_count())) {
    launch_fused_gemm_with<LargeTiles>(first, second, stream);
  } else {
    launch_fused_gemm_with<SmallTiles>(first, second, stream);
  }
}

// Writes G = activation_backward(act, grad, saved) (grad: rows x cols, contiguous) into
// `masked` (when saved is given) and the column sums of G into bias_grad (when given;
// length >= cols, zero beyond cols).
template <typename T>
void mask_and_column_sums(const T* grad, const T* saved, Activation act, T* masked, T* bias_grad,
                          int64_t bias_length, int64_t rows, int64_t cols, const at::TensorOptions& options,
                          cudaStream_t stream) {
  using acc_t = at::opmath_type<T>;
  const ColumnSumsGrid split = column_sums_grid(rows);
  at::Tensor partial;
  if (bias_grad != nullptr) {
    partial = at::empty({split.chunks, cols}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kSumCols)), static_cast<unsigned>(split.chunks));
  const dim3 block(kSumCols, kSumRows);
  mask_column_sums_kernel<T><<<grid, block, 0, stream>>>(
      grad, saved, act, saved != nullptr ? masked : nullptr,
      partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr, rows, cols, split.rows_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (bias_grad != nullptr) {
    sum_chunks_kernel<T><<<static_cast<unsigned>(ceil_div(bias_length, kThreads)), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), split.chunks, cols, bias_grad, bias_length);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool use_fused(bool small) {
  const GemmPath path = gemm_path();
  return path == GemmPath::Fused || (path == GemmPath::Auto && small);
}

// y = act(z), z = x W_block^T + bias; z is written to `pre` too when it is defined.
template <typename T>
void linear_forward(const at::Tensor& x2, const RowMajor& w, const at::Tensor& bias, at::Tensor& y, at::Tensor& pre,
                    int64_t rows, int64_t active_in, int64_t active_out, Activation act) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* x_ptr = x2.const_data_ptr<T>();
  const T* w_ptr = w.tensor.const_data_ptr<T>();
  const T* b_ptr = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* y_ptr = y.mutable_data_ptr<T>();
  T* pre_ptr = pre.defined() ? pre.mutable_data_ptr<T>() : nullptr;

  if (use_fused(fused_pays(rows, active_out, active_in))) {
    launch_fused_gemm<T>(
        forward_gemm<T>(x_ptr, w_ptr, w.ld, b_ptr, act, pre_ptr, y_ptr, rows, active_in, active_out),
        FusedGemm<T>{}, stream);
    return;
  }
  // Column-major view: y^T (active_out x rows) = W_block (active_out x active_in) x^T,
  // W_block^T being stored with ld = w.ld and x^T with ld = active_in.
  const c10::ScalarType dtype = y.scalar_type();
  if (blaslt_gemm_bias_act(dtype, /*trans_a=*/true, /*trans_b=*/false, active_out, rows, active_in, w_ptr, w.ld,
                           x_ptr, active_in, b_ptr, act, pre_ptr, y_ptr, active_out)) {
    return;
  }
  // No epilogue for this activation: the GEMM (with the bias, where cuBLASLt takes it)
  // writes z, then one element-wise pass the rest.
  T* z_ptr = pre_ptr != nullptr ? pre_ptr : y_ptr;
  const bool bias_done = blaslt_gemm_bias_act(dtype, /*trans_a=*/true, /*trans_b=*/false, active_out, rows,
                                              active_in, w_ptr, w.ld, x_ptr, active_in, b_ptr, Activation::None,
                                              nullptr, z_ptr, active_out);
  if (!bias_done) {
    blas_gemm(dtype, /*trans_a=*/true, /*trans_b=*/false, active_out, rows, active_in, w_ptr, w.ld, x_ptr,
              active_in, z_ptr, active_out);
  }
  const T* add_bias = bias_done ? nullptr : b_ptr;
  if (add_bias != nullptr || act != Activation::None) {
    const int64_t blocks = std::min<int64_t>(ceil_div(rows * active_out, kThreads), int64_t{sm_count()} * 8);
    bias_act_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(z_ptr, pre_ptr, y_ptr, add_bias, act,
                                                                                rows, active_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// (y, pre), pre the pre-activation when keep_pre, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> linear_forward_both(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, int64_t active_in,
                                                       int64_t active_out, Activation act, bool keep_pre) {
  const int64_t rows = check_linear_args(x, weight, bias, active_in, active_out);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({rows, active_out}, x.options());
  at::Tensor pre = keep_pre ? at::empty({rows, active_out}, x.options()) : at::Tensor();
  if (rows > 0) {
    const at::Tensor x2 = x.reshape({rows, active_in}).contiguous();
    const RowMajor w = row_major(weight);
    at::Tensor b;
    if (bias.has_value()) b = bias->stride(0) == 1 ? *bias : bias->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "growdense_linear_cuda", [&] {
      linear_forward<scalar_t>(x2, w, b, y, pre, rows, active_in, active_out, act);
    });
  }
  const auto sizes = with_last(x.sizes(), active_out);
  return {y.view(sizes), keep_pre ? pre.view(sizes) : at::empty({0}, x.options())};
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t active_in, int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  return std::get<0>(linear_forward_both(x, weight, bias, active_in, active_out, act, false));
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, int64_t active_in,
                                                       int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  return linear_forward_both(x, weight, bias, active_in, active_out, act,
                             backward_needs(act) == ActivationSaves::PreActivation);
}

// grad_x (rows x active_in), grad_w (capacity) and grad_b (capacity) are allocated,
// uninitialised, when requested; everything requested is written here.
template <typename T>
void linear_backward_impl(const at::Tensor& g2, const at::Tensor& x2, const RowMajor& w, const at::Tensor& s2,
                          Activation act, std::array<bool, 3> need, at::Tensor& grad_x, at::Tensor& grad_w,
                          at::Tensor& grad_b, int64_t rows, int64_t active_in, int64_t active_out) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto [need_x, need_w, need_b] = need;
  const T* g_ptr = g2.const_data_ptr<T>();
  const T* x_ptr = x2.const_data_ptr<T>();
  const T* w_ptr = w.tensor.const_data_ptr<T>();
  const T* saved = s2.defined() ? s2.const_data_ptr<T>() : nullptr;
  T* gx_ptr = need_x ? grad_x.mutable_data_ptr<T>() : nullptr;
  T* gw_ptr = need_w ? grad_w.mutable_data_ptr<T>() : nullptr;
  T* gb_ptr = need_b ? grad_b.mutable_data_ptr<T>() : nullptr;
  const int64_t cap_out = need_b ? grad_b.size(0) : 0;

  const bool small = (!need_x || fused_pays(rows, active_in, active_out)) &&
                     (!need_w || fused_pays(active_out, active_in, rows));
  if (use_fused(small)) {
    FusedGemm<T> gx, gw;
    if (need_x) gx = grad_input_gemm<T>(g_ptr, saved, act, w_ptr, w.ld, gx_ptr, rows, active_in, active_out);
    if (need_w) {
      gw = grad_weight_gemm<T>(g_ptr, saved, act, x_ptr, gw_ptr, grad_w.size(0), grad_w.size(1), gb_ptr, rows,
                               active_in, active_out);
    }
    if (need_x) {
      launch_fused_gemm<T>(gx, gw, stream);
    } else if (need_w) {
      launch_fused_gemm<T>(gw, FusedGemm<T>{}, stream);
    }
    if (need_b && !need_w) {
      mask_and_column_sums<T>(g_ptr, saved, act, nullptr, gb_ptr, cap_out, rows, active_out, g2.options(), stream);
    }
    return;
  }

  // cuBLAS: one pass applies the activation's backward (materialising the gradient of
  // the pre-activation, which both GEMMs read) and reduces the bias gradient.
  at::Tensor masked;
  const T* gm_ptr = g_ptr;
  if (saved != nullptr || need_b) {
    if (saved != nullptr) masked = at::empty_like(g2);
    T* masked_ptr = masked.defined() ? masked.mutable_data_ptr<T>() : nullptr;
    mask_and_column_sums<T>(g_ptr, saved, act, masked_ptr, gb_ptr, cap_out, rows, active_out, g2.options(), stream);
    if (masked_ptr != nullptr) gm_ptr = masked_ptr;
  }
  const c10::ScalarType dtype = g2.scalar_type();
  if (need_x) {
    // Column-major: grad_x^T (active_in x rows) = W_block^T (active_in x active_out) G^T.
    blas_gemm(dtype, /*trans_a=*/false, /*trans_b=*/false, active_in, rows, active_out, w_ptr, w.ld, gm_ptr,
              active_out, gx_ptr, active_in);
  }
  if (need_w) {
    if (active_out < grad_w.size(0) || active_in < grad_w.size(1)) grad_w.zero_();
    // Column-major: grad_w_block^T (active_in x active_out) = x^T G, written in place
    // into the capacity buffer (ld = capacity_in).
    blas_gemm(dtype, /*trans_a=*/false, /*trans_b=*/true, active_in, active_out, rows, x_ptr, active_in, gm_ptr,
              active_out, gw_ptr, grad_w.size(1));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& saved,
    int64_t active_in, int64_t active_out, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, std::nullopt, active_in, active_out);
  check_on_device(grad_out, x, "grad_out");
  check_backward_args(grad_out, x, saved, active_out, act);
  const bool with_saved = backward_needs(act) != ActivationSaves::Nothing;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options();
  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), opts) : at::empty({0}, opts);
  at::Tensor grad_w = output_mask[1] ? at::empty(weight.sizes(), opts) : at::empty({0}, opts);
  at::Tensor grad_b = output_mask[2] ? at::empty({weight.size(0)}, opts) : at::empty({0}, opts);
  if (rows == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {grad_x, grad_w, grad_b};

  const at::Tensor x2 = x.reshape({rows, active_in}).contiguous();
  const at::Tensor g2 = grad_out.reshape({rows, active_out}).contiguous();
  const at::Tensor s2 = with_saved ? saved->reshape({rows, active_out}).contiguous() : at::Tensor();
  const RowMajor w = row_major(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "growdense_linear_backward_cuda", [&] {
    linear_backward_impl<scalar_t>(g2, x2, w, s2, act, output_mask, grad_x, grad_w, grad_b, rows, active_in,
                                   active_out);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("linear_forward", &linear_forward_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
}

}  // namespace growdense::cuda

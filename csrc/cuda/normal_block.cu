// CUDA kernel of growdense::normal_block_: N(0, std^2) values written in place into
// one block of a 2-D tensor (rows or columns of a capacity buffer), drawn from
// torch's CUDA generator so that torch.manual_seed makes them reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "args.h"

namespace growdense::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kValuesPerDraw = 4;

// Each thread owns one Philox subsequence and writes values 4t..4t+3 of the block
// (in row-major order), then the same four positions one grid further, and so on.
// A draw of four normals consumes 4 of the subsequence's 32-bit numbers in float, 8 in
// double.
template <typename T>
__global__ void normal_block_kernel(T* block, int64_t stride0, int64_t stride1, int64_t cols, int64_t numel,
                                    at::opmath_type<T> stddev, at::PhiloxCudaState philox) {
  using acc_t = at::opmath_type<T>;
  const auto seeds = at::cuda::philox::unpack(philox);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  curandStatePhilox4_32_10_t state;
  curand_init(std::get<0>(seeds), static_cast<unsigned long long>(thread), std::get<1>(seeds), &state);
  for (int64_t base = thread * kValuesPerDraw; base < numel; base += threads * kValuesPerDraw) {
    acc_t z[kValuesPerDraw];
    if constexpr (std::is_same_v<acc_t, double>) {
      const double2 z01 = curand_normal2_double(&state);
      const double2 z23 = curand_normal2_double(&state);
      z[0] = z01.x;
      z[1] = z01.y;
      z[2] = z23.x;
      z[3] = z23.y;
    } else {
      const float4 z4 = curand_normal4(&state);
      z[0] = z4.x;
      z[1] = z4.y;
      z[2] = z4.z;
      z[3] = z4.w;
    }
#pragma unroll
    for (int j = 0; j < kValuesPerDraw; ++j) {
      const int64_t i = base + j;
      if (i < numel) {
        const int64_t r = i / cols;
        const int64_t c = i % cols;
        block[r * stride0 + c * stride1] = static_cast<T>(stddev * z[j]);
      }
    }
  }
}

void normal_block_cuda(const at::Tensor& self, int64_t row_start, int64_t row_end, int64_t col_start,
                       int64_t col_end, double stddev, std::optional<at::Generator> generator) {
  check_block(self, row_start, row_end, col_start, col_end, stddev);
  const int64_t rows = row_end - row_start;
  const int64_t cols = col_end - col_start;
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(self.device());

  const int64_t numel = rows * cols;
  const int64_t max_blocks =
      int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * (2048 / kThreads);
  const int64_t per_block = int64_t{kValuesPerDraw} * kThreads;
  const int64_t blocks = std::min<int64_t>((numel + per_block - 1) / per_block, max_blocks);
  const int64_t draws_per_thread = (numel + per_block * blocks - 1) / (per_block * blocks);
  const uint64_t numbers_per_draw = self.scalar_type() == at::kDouble ? 8 : 4;

  at::PhiloxCudaState philox;
  {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(self.device().index()));
    // See torch's note [Acquire lock when using random generators].
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(static_cast<uint64_t>(draws_per_thread) * numbers_per_draw);
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "growdense_normal_block_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* block = self.mutable_data_ptr<scalar_t>() + row_start * self.stride(0) + col_start * self.stride(1);
    normal_block_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        block, self.stride(0), self.stride(1), cols, numel, static_cast<acc_t>(stddev), philox);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CUDA, m) { m.impl("normal_block_", &normal_block_cuda); }

}  // namespace growdense::cuda

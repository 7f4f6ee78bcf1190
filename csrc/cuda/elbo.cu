// CUDA kernels of growdense::negative_elbo and growdense::negative_elbo_backward
// (device code in elbo_kernels.cuh). One launch each; the forward reads the logits once,
// the backward reads them once and writes their gradient once.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "elbo_args.h"
#include "elbo_kernels.cuh"

namespace growdense::cuda {
namespace {

template <typename T>
elbo::ElboArgs<T> elbo_args(const at::Tensor& l, const at::Tensor& x, const at::Tensor& m, const at::Tensor& v,
                            const ElboSizes& s) {
  using A = at::opmath_type<T>;
  elbo::ElboArgs<T> p;
  p.logits = l.const_data_ptr<T>();
  p.target = x.const_data_ptr<A>();
  p.mu = m.const_data_ptr<A>();
  p.logvar = v.const_data_ptr<A>();
  p.L = s.samples;
  p.B = s.batch;
  p.D = s.pixels;
  p.Z = s.latent;
  return p;
}

unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(std::clamp<int64_t>((work + per_block - 1) / per_block, 1, std::min<int64_t>(cap, 65535)));
}

at::Tensor negative_elbo_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
                              const at::Tensor& logvar) {
  const ElboSizes s = check_elbo_args(logits, target, mu, logvar);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor l = logits.contiguous(), x = target.contiguous(), m = mu.contiguous(), v = logvar.contiguous();
  at::Tensor out = at::empty({s.batch}, target.options());
  if (s.batch == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "growdense_negative_elbo_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(s.batch, 65535));
    elbo::elbo_forward_kernel<scalar_t><<<blocks, elbo::kThreads, 0, stream>>>(elbo_args<scalar_t>(l, x, m, v, s),
                                                                                out.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> negative_elbo_backward_cuda(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mu,
    const at::Tensor& logvar, std::array<bool, 4> output_mask) {
  const ElboSizes s = check_elbo_args(logits, target, mu, logvar);
  check_elbo_grad(grad, logits, s);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = grad.contiguous(), l = logits.contiguous(), x = target.contiguous(), m = mu.contiguous(),
                   v = logvar.contiguous();
  const auto empty_like_or_none = [](bool want, const at::Tensor& like) {
    return want ? at::empty(like.sizes(), like.options()) : at::empty({0}, like.options());
  };
  at::Tensor gl = empty_like_or_none(output_mask[0], logits);
  at::Tensor gt = empty_like_or_none(output_mask[1], target);
  at::Tensor gm = empty_like_or_none(output_mask[2], mu);
  at::Tensor gv = empty_like_or_none(output_mask[3], logvar);
  const int64_t work = std::max(s.batch * s.pixels, s.batch * s.latent);
  if (work == 0 || !(output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3])) return {gl, gt, gm, gv};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "growdense_negative_elbo_backward_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        elbo::ElboGrads<scalar_t> out;
        out.grad = g.const_data_ptr<A>();
        out.logits = output_mask[0] ? gl.mutable_data_ptr<scalar_t>() : nullptr;
        out.target = output_mask[1] ? gt.mutable_data_ptr<A>() : nullptr;
        out.mu = output_mask[2] ? gm.mutable_data_ptr<A>() : nullptr;
        out.logvar = output_mask[3] ? gv.mutable_data_ptr<A>() : nullptr;
        elbo::elbo_backward_kernel<scalar_t><<<blocks_for(work, elbo::kThreads), elbo::kThreads, 0, stream>>>(
            elbo_args<scalar_t>(l, x, m, v, s), out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {gl, gt, gm, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CUDA, m) {
  m.impl("negative_elbo", &negative_elbo_cuda);
  m.impl("negative_elbo_backward", &negative_elbo_backward_cuda);
}

}  // namespace growdense::cuda

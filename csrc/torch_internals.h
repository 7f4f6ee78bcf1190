// Every use of torch's private C++ internals, in one place. Each sits behind a check of
// the torch version it was written against (torch/version.h); for any other version the
// public-API fallback is compiled instead, which is always correct, only slower.
//
//  - autograd engine internals (graph_task.h's ExecInfo, the gradient accumulator's
//    hooks): let the linear backward add the gradient straight into `.grad`'s active
//    block. Fallback: return the capacity-shaped gradient, accumulated by the engine.
//  - the float32 matmul precision setting in its per-backend form: whether cuBLAS may
//    use TF32. Fallback: the legacy setting (torch.set_float32_matmul_precision).
//
// Checked against the headers of torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <torch/version.h>

#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR) && TORCH_VERSION_MAJOR == 2 && \
    TORCH_VERSION_MINOR >= 11 && TORCH_VERSION_MINOR <= 15
#define GROWDENSE_AUTOGRAD_INTERNALS 1
#define GROWDENSE_FLOAT32_PRECISION_API 1
#else
#define GROWDENSE_AUTOGRAD_INTERNALS 0
#define GROWDENSE_FLOAT32_PRECISION_API 0
#endif

#if GROWDENSE_AUTOGRAD_INTERNALS
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#endif

namespace growdense::internals {

// Whether the engine, in the backward now running, would finish by doing
// `tensor.grad += new_grad` in place through the tensor's gradient accumulator and
// nothing else (no hooks of any kind, no graph being built, the accumulator certain to
// run), so that doing that addition in the backward itself gives the same result.
// False whenever that cannot be known, which is always safe.
inline bool accumulates_in_place(const at::Tensor& tensor) {
#if GROWDENSE_AUTOGRAD_INTERNALS
  if (!tensor.defined() || at::GradMode::is_enabled() || !tensor.is_leaf() || !tensor.requires_grad()) return false;
  const at::Tensor& grad = tensor.grad();
  if (!grad.defined() || grad.layout() != at::kStrided || grad.requires_grad() || grad.sizes() != tensor.sizes() ||
      grad.scalar_type() != tensor.scalar_type() || grad.device() != tensor.device()) {
    return false;
  }
  // std::shared_ptr<Node> up to torch 2.12, c10::intrusive_ptr<Node> from 2.13.
  const auto acc = torch::autograd::impl::try_get_grad_accumulator(tensor);
  if (!acc || !acc->pre_hooks().empty() || !acc->tensor_pre_hooks().empty() || !acc->retains_grad_hooks().empty() ||
      !acc->post_hooks().empty() || acc->tensor_post_acc_grad_hooks() != nullptr) {
    return false;
  }
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (exec_info == nullptr) return false;
  if (exec_info->empty()) return true;  // plain .backward(): every accumulator runs
  const auto it = exec_info->find(acc.get());
  return it != exec_info->end() && it->second.needed_ && !it->second.captures_;
#else
  (void)tensor;
  return false;
#endif
}

// Whether float32 matmuls on CUDA may use TF32 tensor cores (torch.backends.cuda.
// matmul.allow_tf32 / fp32_precision, torch.set_float32_matmul_precision).
inline bool cuda_matmul_allows_tf32() {
#if GROWDENSE_FLOAT32_PRECISION_API
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
#endif
}

}  // namespace growdense::internals

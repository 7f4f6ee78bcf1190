// CPU kernel of growdense::adam_step_: Adam's update over a list of blocks (views of the
// active parts of parameters), each read and written once by vec/adam_kernel.h.
#include <torch/library.h>

#include <cmath>

#include "cpu/capability.h"

namespace growdense {
namespace {

bool adam_dtype(at::ScalarType d) {
  return d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf;
}

// rows, cols and row strides of a block viewed as a matrix with contiguous columns.
void check_block(const at::Tensor& t, const at::Tensor& param, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "growdense::adam_step_: ", what, "[", i, "] is on ", t.device(),
              "; this kernel steps CPU tensors (use torch.optim.Adam's own fused=True on other devices)");
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), "growdense::adam_step_: ", what, "[", i, "] is ",
              t.scalar_type(), " but params[", i, "] is ", param.scalar_type(),
              "; the gradient and the moments must have the parameter's dtype");
  TORCH_CHECK(t.sizes() == param.sizes(), "growdense::adam_step_: ", what, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK(t.dim() <= 2, "growdense::adam_step_: ", what, "[", i, "] has ", t.dim(),
              " dimensions; blocks are at most 2-D (view higher-dimensional parameters as 2-D)");
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "growdense::adam_step_: ", what, "[", i,
              "] has column stride ", t.stride(-1), "; blocks need contiguous columns");
}

int64_t row_stride(const at::Tensor& t) { return t.dim() == 2 && t.size(0) > 1 ? t.stride(0) : 0; }

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::ArrayRef<double> steps, double lr, double beta1, double beta2,
                   double weight_decay, double eps, bool maximize, bool decoupled_weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "growdense::adam_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have one entry per "
              "block; got ",
              n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), " and ", steps.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(adam_dtype(p.scalar_type()), "growdense::adam_step_: params[", i, "] is ", p.scalar_type(),
                "; expected float32, float64, bfloat16 or float16");
    check_block(p, p, "params", i);
    check_block(grads[i], p, "grads", i);
    check_block(exp_avgs[i], p, "exp_avgs", i);
    check_block(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    TORCH_CHECK(steps[i] >= 1, "growdense::adam_step_: steps[", i, "] is ", steps[i],
                "; a block's step count is at least 1 when it is stepped");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const int64_t rows = p.dim() == 2 ? p.size(0) : 1, cols = p.dim() == 0 ? 1 : p.size(-1);
    const cpu::AdamBlock block{p.scalar_type(),
                               rows,
                               cols,
                               p.mutable_data_ptr(),
                               grads[i].const_data_ptr(),
                               exp_avgs[i].mutable_data_ptr(),
                               exp_avg_sqs[i].mutable_data_ptr(),
                               row_stride(p),
                               row_stride(grads[i]),
                               row_stride(exp_avgs[i]),
                               row_stride(exp_avg_sqs[i])};
    const double bc1 = 1 - std::pow(beta1, steps[i]), bc2 = 1 - std::pow(beta2, steps[i]);
    const cpu::AdamHyper hyper{lr, beta1, beta2, weight_decay, eps, lr / bc1, std::sqrt(bc2), maximize,
                               decoupled_weight_decay};
    cpu::kernels().adam_block(block, hyper);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace growdense

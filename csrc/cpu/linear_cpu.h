// The CPU linear op's backward as one function, for the op's CPU kernel and for the
// autograd kernel (csrc/autograd/linear.cpp), which calls it directly when it adds the
// gradients of the weight and bias into their `.grad` in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "activation.h"

namespace growdense {
namespace cpu {

// Whether linear_backward below takes the fused path for these arguments (CPU float32,
// no activation or ReLU); otherwise it takes ATen's ops one after another.
bool fused_backward_applies(const at::Tensor& grad_out, Activation act);

// The gradients of act(x W_block^T + b_block) (act: none or ReLU, `saved` its output):
// the activation's mask and the bias gradient in one pass over grad_out, then the two
// GEMMs. `grad_w_into` / `grad_b_into`, when defined, are capacity-shaped gradients the
// weight's and bias's gradients are added into (on their active block, in place, as
// AccumulateGrad would add them); the returned gw / gb are then undefined. Otherwise gw
// and gb are new capacity-shaped tensors, zero outside the active block. gx is (rows,
// active_in) seen with x's sizes; undefined where not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& saved,
                                                               int64_t active_in, int64_t active_out, Activation act,
                                                               bool need_x, bool need_w, bool need_b,
                                                               const at::Tensor& grad_w_into,
                                                               const at::Tensor& grad_b_into);

}  // namespace cpu
}  // namespace growdense

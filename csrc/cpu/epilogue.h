// The linear op's element-wise epilogues on the CPU, on tensors: the vectorised kernels of
// csrc/cpu/vec/epilogue_kernel.h in the compilation for this CPU (capability.h), with
// ATen's ops where a layout or dtype falls outside them.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "activation.h"

namespace growdense::cpu {

// y = act(y + bias) in place, y a (rows, cols) matrix, bias (cols,) or none.
void bias_activation_(at::Tensor& y, const std::optional<at::Tensor>& bias, Activation act);

// act(z) as a new contiguous tensor, z a (rows, cols) matrix.
at::Tensor activation(const at::Tensor& z, Activation act);

// grad * act'(saved) for a (rows, cols) grad, `saved` as backward_needs(act) says (unused
// for none). When grad_bias is given ((cols,), grad's dtype), it receives the column sums
// of the result, from the same pass.
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& saved, Activation act,
                               at::Tensor* grad_bias);

}  // namespace growdense::cpu

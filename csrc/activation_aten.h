// The activations of activation.h written with ATen ops (host code, any device): the
// CPU fast path uses them for their vectorised kernels, and autograd for a backward
// that is itself differentiable (double backward), which the scalar functions of
// activation.h cannot give.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/threshold_backward.h>

#include "activation.h"

namespace growdense {

// act(z), a new tensor.
inline at::Tensor aten_activation(Activation act, const at::Tensor& z) {
  switch (act) {
    case Activation::None:
      return z;
    case Activation::Relu:
      return at::relu(z);
    case Activation::Gelu:
      return at::gelu(z, "none");
    case Activation::GeluTanh:
      return at::gelu(z, "tanh");
    case Activation::Silu:
      return at::silu(z);
  }
  TORCH_CHECK(false, "growdense: no ATen form of activation ", static_cast<int>(act));
}

// z = act(z) in place.
inline void aten_activation_(Activation act, at::Tensor& z) {
  switch (act) {
    case Activation::None:
      return;
    case Activation::Relu:
      z.relu_();
      return;
    case Activation::Gelu:
      at::gelu_(z, "none");
      return;
    case Activation::GeluTanh:
      at::gelu_(z, "tanh");
      return;
    case Activation::Silu:
      at::silu_(z);
      return;
  }
  TORCH_CHECK(false, "growdense: no ATen form of activation ", static_cast<int>(act));
}

// grad * act'(z) from what backward_needs(act) says was saved (the output y or the
// pre-activation z), with differentiable ATen ops: when grad mode is on, the result
// carries the graph through grad and saved.
inline at::Tensor aten_activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved) {
  switch (act) {
    case Activation::None:
      return grad;
    case Activation::Relu:  // from y or z alike: zero where not positive
      return at::threshold_backward(grad, saved, 0);
    case Activation::Gelu:
      return at::gelu_backward(grad, saved, "none");
    case Activation::GeluTanh:
      return at::gelu_backward(grad, saved, "tanh");
    case Activation::Silu: {
      if (!at::GradMode::is_enabled()) return at::silu_backward(grad, saved);
      // silu_backward has no derivative of its own: the same written out.
      const at::Tensor s = at::sigmoid(saved);
      return grad * s * (1 + saved * (1 - s));
    }
  }
  TORCH_CHECK(false, "growdense: no ATen form of activation ", static_cast<int>(act));
}

}  // namespace growdense

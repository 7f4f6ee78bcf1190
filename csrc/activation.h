// The activations a growdense linear layer fuses, in one place: their names, their
// forward, their backward from the output or from the pre-activation, and which of the
// two the backward reads. Scalar functions usable on the host and on the device: the
// plain-loop reference, the CUDA kernels and their host emulation all call these.
// Adding an activation: docs/adding-an-activation.md.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <string_view>

namespace growdense {

enum class Activation : uint8_t { None, Relu, Gelu, GeluTanh, Silu };

// What an activation's backward reads, besides the gradient of its output.
enum class ActivationSaves : uint8_t {
  Nothing,        // the derivative is a constant
  Output,         // y = act(z): relu's derivative is known from the output alone
  PreActivation,  // z: gelu's and silu's derivatives need the input of the activation
};

constexpr ActivationSaves backward_needs(Activation act) {
  switch (act) {
    case Activation::None:
      return ActivationSaves::Nothing;
    case Activation::Relu:
      return ActivationSaves::Output;
    case Activation::Gelu:
    case Activation::GeluTanh:
    case Activation::Silu:
      return ActivationSaves::PreActivation;
  }
  return ActivationSaves::PreActivation;
}

// The names the ops take, as torch.nn.functional spells the function
// ("gelu_tanh" is F.gelu(approximate="tanh")).
struct ActivationName {
  Activation act;
  std::string_view name;
};
inline constexpr ActivationName kActivationNames[] = {
    {Activation::None, "none"}, {Activation::Relu, "relu"},     {Activation::Gelu, "gelu"},
    {Activation::GeluTanh, "gelu_tanh"}, {Activation::Silu, "silu"},
};

// The activation called `name`, or false when there is none (the caller raises).
constexpr bool find_activation(std::string_view name, Activation& act) {
  for (const ActivationName& entry : kActivationNames) {
    if (entry.name == name) {
      act = entry.act;
      return true;
    }
  }
  return false;
}

constexpr std::string_view activation_name(Activation act) {
  for (const ActivationName& entry : kActivationNames) {
    if (entry.act == act) return entry.name;
  }
  return "?";
}

namespace activation_detail {
// In the precision of T (float or double: the accumulation type of every kernel).
template <typename T>
C10_HOST_DEVICE inline T sqrt1_2() {
  return T(0.70710678118654752440);  // 1 / sqrt(2)
}
template <typename T>
C10_HOST_DEVICE inline T inv_sqrt_2pi() {
  return T(0.39894228040143267794);  // 1 / sqrt(2 pi)
}
template <typename T>
C10_HOST_DEVICE inline T sqrt_2_pi() {
  return T(0.79788456080286535588);  // sqrt(2 / pi)
}
constexpr double kGeluTanhCubic = 0.044715;

// std:: on the host (float overloads), the CUDA math library's overloads on the device.
#if defined(__CUDA_ARCH__)
template <typename T>
__device__ inline T erf_(T x) { return ::erf(x); }
template <typename T>
__device__ inline T exp_(T x) { return ::exp(x); }
template <typename T>
__device__ inline T tanh_(T x) { return ::tanh(x); }
#else
template <typename T>
inline T erf_(T x) { return std::erf(x); }
template <typename T>
inline T exp_(T x) { return std::exp(x); }
template <typename T>
inline T tanh_(T x) { return std::tanh(x); }
#endif
}  // namespace activation_detail

// y = act(z). T is float or double.
template <typename T>
C10_HOST_DEVICE inline T activation_forward(Activation act, T z) {
  using namespace activation_detail;
  switch (act) {
    case Activation::None:
      return z;
    case Activation::Relu:
      return z < T(0) ? T(0) : z;  // NaN passes, as torch.relu
    case Activation::Gelu:
      return z * T(0.5) * (T(1) + erf_(z * sqrt1_2<T>()));
    case Activation::GeluTanh: {
      const T inner = sqrt_2_pi<T>() * (z + T(kGeluTanhCubic) * z * z * z);
      return T(0.5) * z * (T(1) + tanh_(inner));
    }
    case Activation::Silu:
      return z / (T(1) + exp_(-z));
  }
  return z;
}

// d act / dz at z: the backward from the pre-activation (every activation has one).
template <typename T>
C10_HOST_DEVICE inline T activation_derivative(Activation act, T z) {
  using namespace activation_detail;
  switch (act) {
    case Activation::None:
      return T(1);
    case Activation::Relu:
      return z <= T(0) ? T(0) : T(1);  // as threshold_backward: NaN passes the gradient
    case Activation::Gelu: {
      const T cdf = T(0.5) * (T(1) + erf_(z * sqrt1_2<T>()));
      const T pdf = exp_(T(-0.5) * z * z) * inv_sqrt_2pi<T>();
      return cdf + z * pdf;
    }
    case Activation::GeluTanh: {
      const T z2 = z * z;
      const T t = tanh_(sqrt_2_pi<T>() * (z + T(kGeluTanhCubic) * z2 * z));
      const T d_inner = sqrt_2_pi<T>() * (T(1) + T(3 * kGeluTanhCubic) * z2);
      return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * d_inner;
    }
    case Activation::Silu: {
      const T s = T(1) / (T(1) + exp_(-z));
      return s * (T(1) + z * (T(1) - s));
    }
  }
  return T(1);
}

// d act / dz from the output y = act(z), for the activations whose backward_needs() is
// Output or Nothing (the others cannot be inverted; they return NaN).
template <typename T>
C10_HOST_DEVICE inline T activation_derivative_from_output(Activation act, T y) {
  switch (act) {
    case Activation::None:
      return T(1);
    case Activation::Relu:
      return y <= T(0) ? T(0) : T(1);
    default:
      return T(NAN);
  }
}

// The gradient of the pre-activation, grad * act'(z), from what backward_needs(act)
// says was saved: the output for Output, the pre-activation for PreActivation
// (ignored for Nothing). A zero derivative gives an exact zero (a masked relu gradient
// stays 0 even where grad is infinite).
template <typename T>
C10_HOST_DEVICE inline T activation_backward(Activation act, T grad, T saved) {
  switch (backward_needs(act)) {
    case ActivationSaves::Nothing:
      return grad;
    case ActivationSaves::Output: {
      const T d = activation_derivative_from_output(act, saved);
      return d == T(0) ? T(0) : grad * d;
    }
    case ActivationSaves::PreActivation:
      return grad * activation_derivative(act, saved);
  }
  return grad;
}

}  // namespace growdense

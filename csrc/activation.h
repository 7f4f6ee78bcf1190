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
__device__ inline T erfc_(T x) { return ::erfc(x); }
template <typename T>
__device__ inline T exp_(T x) { return ::exp(x); }
#else
template <typename T>
inline T erfc_(T x) { return std::erfc(x); }
template <typename T>
inline T exp_(T x) { return std::exp(x); }
#endif

// The standard normal CDF, without the cancellation of 0.5 (1 + erf(.)) for z < 0.
template <typename T>
C10_HOST_DEVICE inline T normal_cdf(T z) {
  return T(0.5) * erfc_(-z * sqrt1_2<T>());
}

// For u = sqrt(2/pi) (z + 0.044715 z^3): (1 + tanh(u)) / 2 and 1 - tanh(u)^2, both from
// e = exp(-2|u|), free of the cancellation of 1 + tanh and 1 - tanh^2 where |tanh| ~ 1.
template <typename T>
struct TanhParts {
  T half_one_plus;
  T sech2;
};
template <typename T>
C10_HOST_DEVICE inline TanhParts<T> tanh_parts(T u) {
  const T e = exp_(T(-2) * (u < T(0) ? -u : u));
  const T inv = T(1) / (T(1) + e);
  return {u < T(0) ? e * inv : inv, T(4) * e * inv * inv};
}

// sigmoid(z) and 1 - sigmoid(z), each without cancellation.
template <typename T>
struct SigmoidParts {
  T s, one_minus_s;
};
template <typename T>
C10_HOST_DEVICE inline SigmoidParts<T> sigmoid_parts(T z) {
  const T e = exp_(z < T(0) ? z : -z);  // in (0, 1]
  const T inv = T(1) / (T(1) + e);
  return z < T(0) ? SigmoidParts<T>{e * inv, inv} : SigmoidParts<T>{inv, e * inv};
}
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
      return z * normal_cdf(z);
    case Activation::GeluTanh:
      return z * tanh_parts(sqrt_2_pi<T>() * (z + T(kGeluTanhCubic) * z * z * z)).half_one_plus;
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
    case Activation::Gelu:
      return normal_cdf(z) + z * exp_(T(-0.5) * z * z) * inv_sqrt_2pi<T>();
    case Activation::GeluTanh: {
      const T z2 = z * z;
      const TanhParts<T> t = tanh_parts(sqrt_2_pi<T>() * (z + T(kGeluTanhCubic) * z2 * z));
      const T d_inner = sqrt_2_pi<T>() * (T(1) + T(3 * kGeluTanhCubic) * z2);
      return t.half_one_plus + T(0.5) * z * t.sech2 * d_inner;
    }
    case Activation::Silu: {
      const SigmoidParts<T> p = sigmoid_parts(z);
      return p.s * (T(1) + z * p.one_minus_s);
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

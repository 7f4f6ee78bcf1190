// The hand-written CPU kernels, compiled once per CPU capability and chosen at run time.
//
// csrc/cpu/vec/kernels.cpp is written once over at::vec::Vectorized and compiled several
// times (CMakeLists.txt, as ATen compiles its native/cpu/ kernels): for the baseline
// ("default": SSE2 on x86-64, NEON on aarch64), AVX2 and AVX-512 on x86-64, SVE with
// 256-bit vectors on aarch64. Each compilation lands in its own namespace
// (growdense::cpu::<CAPABILITY>) and fills one KernelTable; capability.cpp picks the
// table at the first call: the best one the CPU runs and ATen itself uses (so
// ATEN_CPU_CAPABILITY lowers both), unless GROWDENSE_CPU_CAPABILITY names one.
//
// The kernels take raw pointers and sizes, no at::Tensor: the capability-compiled code
// then shares no inline tensor code with the rest of the library.
#pragma once

#include <ATen/core/MT19937RNGEngine.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "activation.h"

namespace growdense::cpu {

enum class Capability : uint8_t { Default, Avx2, Avx512, Sve256, Count };

// "default", "avx2", "avx512", "sve256".
const char* capability_name(Capability cap);

// ---- the kernels --------------------------------------------------------------------

// negative_elbo: logits (L, B, D) of `dtype`; target (B, D), mu and logvar (B, Z) in its
// accumulation type (float for the 16-bit types); all contiguous.
struct ElboArgs {
  c10::ScalarType dtype;
  const void* logits;
  const void* target;
  const void* mu;
  const void* logvar;
  int64_t samples, batch, pixels, latent;  // L, B, D, Z
};
// The gradients to write (nullptr: not asked for), given `grad` (B,) of the loss.
struct ElboGrads {
  const void* grad;
  void* logits;  // (L, B, D) of dtype
  void* target;  // (B, D), accumulation type
  void* mu;      // (B, Z)
  void* logvar;  // (B, Z)
};

// The linear op's element-wise epilogues on a (rows, cols) matrix of `dtype` whose rows are
// `ld` elements apart.
struct EpilogueArgs {
  c10::ScalarType dtype;
  Activation act;
  int64_t rows, cols;
};

// Adam's update of one (rows, cols) block: parameter, gradient and the two moments, all of
// `dtype`, each with rows `ld_*` elements apart and contiguous columns.
struct AdamBlock {
  c10::ScalarType dtype;
  int64_t rows, cols;
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  int64_t ld_param, ld_grad, ld_exp_avg, ld_exp_avg_sq;
};
// The block's hyper-parameters, its bias corrections already taken from its step count.
struct AdamHyper {
  double lr, beta1, beta2, weight_decay, eps;
  double step_size;             // lr / (1 - beta1^step)
  double bias_correction2_sqrt; // sqrt(1 - beta2^step)
  bool maximize, decoupled;     // decoupled: AdamW's decay of the parameter, else L2 in the gradient
};

struct KernelTable {
  // out (B,) in the accumulation type
  void (*elbo_forward)(const ElboArgs& args, void* out);
  void (*elbo_backward)(const ElboArgs& args, const ElboGrads& grads);
  // y[r, c] = act(z[r, c] + bias[c]) (bias may be nullptr); z's rows ld_z apart, y's ld_y.
  // y may be z (in place).
  void (*bias_activation)(const EpilogueArgs& args, const void* z, int64_t ld_z, void* y, int64_t ld_y,
                          const void* bias);
  // out = grad * act'(saved) (saved: the output for relu, the pre-activation for gelu and
  // silu, unused for none; all three (rows, cols) with rows `cols` apart), and, when
  // grad_bias is not nullptr, grad_bias[c] = sum_r out[r, c] (cols elements of dtype).
  void (*activation_backward)(const EpilogueArgs& args, const void* grad, const void* saved, void* out,
                              void* grad_bias);
  void (*adam_block)(const AdamBlock& block, const AdamHyper& hyper);
  // data[0, n) = what torch's CPU normal_(mean, std) gives a contiguous float tensor of n >= 16
  // elements when its generator's engine is `engine`, which it advances as torch does.
  // Exact only in the table of the capability ATen's own kernels use, and used only after a
  // check against torch (csrc/cpu/normal_block.cpp).
  void (*normal_fill)(float* data, int64_t n, float mean, float std, at::mt19937_data_pod& engine);
};

// The capabilities compiled into this library, in increasing order.
std::vector<Capability> compiled_capabilities();
// Those of them this CPU runs.
std::vector<Capability> supported_capabilities();
// The capability in use (chosen at the first call; see above). Throws when
// GROWDENSE_CPU_CAPABILITY names one this CPU lacks or that is unknown.
Capability active_capability();
// Uses `name` from now on (for tests and benchmarks); returns the previous one's name.
// Throws, changing nothing, when the name is unknown or the CPU lacks it.
std::string set_capability(const std::string& name);
// The active capability's kernels.
const KernelTable& kernels();
// The capability ATen's own kernels use (ATEN_CPU_CAPABILITY lowers it), and its kernels when
// this build has them and the CPU runs them (nullptr otherwise): the table whose normal_fill
// can give torch's values.
Capability aten_capability();
const KernelTable* aten_kernels();

}  // namespace growdense::cpu

namespace growdense {
// Which kernel draws normal_block_'s float32 values on the CPU: the capability name of
// growdense's own (torch's values, checked once against torch; csrc/cpu/normal_block.cpp), or
// "torch" where it does not give them.
std::string cpu_normal_draws();
}  // namespace growdense

// The growdense operator schemas. Kernels register themselves per device in csrc/cpu/
// and csrc/cuda/, the autograd kernels in csrc/autograd/; the fake (meta) kernels are
// registered in Python (growdense/ops.py).
#include <torch/library.h>

#include <string>

#include "cpu/capability.h"
#include "gemm_path.h"

namespace growdense {
namespace {

std::string set_cuda_gemm_path(c10::string_view path) {
  return gemm_path_name(set_gemm_path(parse_gemm_path(std::string_view(path.data(), path.size()), "path")));
}

std::string join_capabilities(const std::vector<cpu::Capability>& caps) {
  std::string out;
  for (cpu::Capability c : caps) out += (out.empty() ? "" : " ") + std::string(cpu::capability_name(c));
  return out;
}

std::string cpu_capability() { return cpu::capability_name(cpu::active_capability()); }
std::string cpu_capabilities_supported() { return join_capabilities(cpu::supported_capabilities()); }
std::string cpu_capabilities_compiled() { return join_capabilities(cpu::compiled_capabilities()); }
std::string set_cpu_capability(c10::string_view name) { return cpu::set_capability(std::string(name)); }

}  // namespace

TORCH_LIBRARY(growdense, m) {
  m.set_python_module("growdense.ops");
  // y = act(x @ weight[:active_out, :active_in]^T + bias[:active_out]). `activation`
  // is one of the names in csrc/activation.h ("none", "relu", "gelu", "gelu_tanh", "silu").
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, int active_in, int active_out, str activation) -> Tensor");
  // `linear` for training: (y, saved), saved being what the activation's backward reads
  // beyond y: the pre-activation z (y = act(z)) for gelu, gelu_tanh and silu, an empty
  // tensor for none and relu (whose backward reads y).
  m.def(
      "linear_forward(Tensor x, Tensor weight, Tensor? bias, int active_in, int active_out, str activation) "
      "-> (Tensor, Tensor)");
  // Gradients of `linear`: (grad_x, grad_weight, grad_bias). grad_weight and grad_bias
  // have the capacity shapes and are zero outside the active block. `saved` is what the
  // activation's backward reads: the forward's output for relu, its pre-activation for
  // gelu, gelu_tanh and silu, nothing for none. An output not asked for in output_mask
  // is returned empty.
  m.def(
      "linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? saved, int active_in, "
      "int active_out, str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The same three ops as plain loops: the reference every other kernel is tested against.
  m.def(
      "linear_reference(Tensor x, Tensor weight, Tensor? bias, int active_in, int active_out, "
      "str activation) -> Tensor");
  m.def(
      "linear_forward_reference(Tensor x, Tensor weight, Tensor? bias, int active_in, int active_out, "
      "str activation) -> (Tensor, Tensor)");
  m.def(
      "linear_backward_reference(Tensor grad_out, Tensor x, Tensor weight, Tensor? saved, int active_in, "
      "int active_out, str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Fills self[row_start:row_end, col_start:col_end] with N(0, std^2) in place.
  m.def(
      "normal_block_(Tensor(a!) self, int row_start, int row_end, int col_start, int col_end, float std, "
      "Generator? generator=None) -> ()");
  // Adam (AdamW with decoupled_weight_decay) over blocks in place, one pass each: each
  // block's parameter, gradient and moments (same shape and dtype, at most 2-D, contiguous
  // columns) and its own step count, already incremented (growdense.optim's fused=True).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "float[] steps, float lr, float beta1, float beta2, float weight_decay, float eps, bool maximize, "
      "bool decoupled_weight_decay) -> ()");
  // The GEMM path of the CUDA linear ops ("auto", "fused" or "blas"; see gemm_path.h);
  // returns the previous one. No effect without the CUDA kernels.
  m.def("_set_cuda_gemm_path(str path) -> str", &set_cuda_gemm_path);
  // The CPU kernels' capability (csrc/cpu/capability.h): the one in use ("default",
  // "avx2", "avx512", "sve256"), those this CPU runs and those compiled in (space
  // separated), and a setter returning the previous one (tests and benchmarks).
  m.def("_cpu_capability() -> str", &cpu_capability);
  m.def("_cpu_capabilities_supported() -> str", &cpu_capabilities_supported);
  m.def("_cpu_capabilities_compiled() -> str", &cpu_capabilities_compiled);
  m.def("_set_cpu_capability(str name) -> str", &set_cpu_capability);
  // Which kernel draws normal_block_'s float32 values on the CPU: a capability name
  // (growdense's own, giving torch's values) or "torch".
  m.def("_cpu_normal_draws() -> str", &cpu_normal_draws);
  // Per-image negative ELBO of a Bernoulli decoder and a Gaussian posterior:
  // mean over the L samples of sum_d BCE(sigmoid(logits[l, b, d]), target[b, d]) plus
  // KL(N(mu[b], exp(logvar[b])) || N(0, I)). logits (L, B, D); target (B, D), mu and
  // logvar (B, Z) in the logits' accumulation type (float32 for 16-bit logits); -> (B,).
  m.def("negative_elbo(Tensor logits, Tensor target, Tensor mu, Tensor logvar) -> Tensor");
  // Gradients of `negative_elbo` (logits, target, mu, logvar), given that of its output;
  // an output not asked for in output_mask is returned empty.
  m.def(
      "negative_elbo_backward(Tensor grad, Tensor logits, Tensor target, Tensor mu, Tensor logvar, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace growdense

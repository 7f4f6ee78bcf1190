// Fast CPU kernels: ATen's GEMM called on the active block as a strided view of the
// capacity buffer (its leading dimension is the capacity, so nothing is copied out),
// with the bias fused into the GEMM (addmm) and the element-wise epilogues of
// cpu/epilogue.h (the activation after the forward's GEMM, its derivative before the
// backward's), vectorised for the CPU's capability.
//
// The float32 backward without activation or with ReLU reads grad_out once for the ReLU
// mask and the bias gradient together (one pass over rows split between the threads),
// and adds the gradients into given `.grad`s: besides the two GEMMs it makes one pass
// over grad_out and allocates nothing of its size when there is no mask to apply.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "args.h"
#include "cpu/linear_cpu.h"
#include "cpu/epilogue.h"

namespace growdense {
namespace cpu {
namespace {

// Rows summed into a local block before they are added to a thread's total: the sum's
// rounding error grows with kSumBlock + rows / kSumBlock rather than with the rows.
constexpr int64_t kSumBlock = 64;
// Elements of grad_out a thread takes at least (a pass over fewer is not worth a thread).
constexpr int64_t kGrainElements = 16384;

// One row of the pass. Both operands are loaded before the select, and the pointers
// are __restrict__: so the compiler vectorises the loops (a select that reads grad only
// where it keeps it compiles to a branch per element, ten times slower).
void mask_row(const float* __restrict__ gr, const float* __restrict__ yr, float* __restrict__ out, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) {
    const float g = gr[c], y = yr[c];
    out[c] = y <= 0.0f ? 0.0f : g;  // threshold_backward's rule (a NaN output passes the gradient)
  }
}

void mask_row_sum(const float* __restrict__ gr, const float* __restrict__ yr, float* __restrict__ out,
                  float* __restrict__ acc, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) {
    const float g = gr[c], y = yr[c];
    const float v = y <= 0.0f ? 0.0f : g;
    out[c] = v;
    acc[c] += v;
  }
}

void sum_row(const float* __restrict__ gr, float* __restrict__ acc, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) acc[c] += gr[c];
}

// g = mask ? (saved <= 0 ? 0 : grad) : grad, for a contiguous (rows, cols) float grad
// (and saved), with the column sums of g into `sums` (cols floats) when it is not null.
// Returns g: a new tensor with a mask, `grad` itself without one.
at::Tensor mask_and_column_sums(const at::Tensor& grad, const at::Tensor& saved, float* sums) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const bool mask = saved.defined();
  at::Tensor g = mask ? at::empty({rows, cols}, grad.options()) : grad;
  if (!mask && sums == nullptr) return g;
  const float* gin = grad.const_data_ptr<float>();
  const float* y = mask ? saved.const_data_ptr<float>() : nullptr;
  float* gout = mask ? g.mutable_data_ptr<float>() : nullptr;
  const int64_t min_rows = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / min_rows));
  std::vector<float> partial(sums != nullptr ? chunks * cols : 0, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> block(sums != nullptr ? cols : 0);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
      float* total = sums != nullptr ? partial.data() + chunk * cols : nullptr;
      for (int64_t rb = r0; rb < r1; rb += kSumBlock) {
        const int64_t re = std::min(r1, rb + kSumBlock);
        if (total != nullptr) std::fill(block.begin(), block.end(), 0.0f);
        float* acc = block.data();
        for (int64_t r = rb; r < re; ++r) {
          const float* gr = gin + r * cols;
          if (!mask) {
            sum_row(gr, acc, cols);
          } else if (total != nullptr) {
            mask_row_sum(gr, y + r * cols, gout + r * cols, acc, cols);
          } else {
            mask_row(gr, y + r * cols, gout + r * cols, cols);
          }
        }
        if (total != nullptr) {
          for (int64_t c = 0; c < cols; ++c) total[c] += acc[c];
        }
      }
    }
  });
  if (sums != nullptr) {
    for (int64_t c = 0; c < cols; ++c) {
      float s = 0.0f;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[chunk * cols + c];
      sums[c] = s;
    }
  }
  return g;
}

}  // namespace

bool fused_backward_applies(const at::Tensor& grad_out, Activation act) {
  return grad_out.device().is_cpu() && grad_out.scalar_type() == at::kFloat &&
         (act == Activation::None || act == Activation::Relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& saved,
                                                               int64_t active_in, int64_t active_out, Activation act,
                                                               bool need_x, bool need_w, bool need_b,
                                                               const at::Tensor& grad_w_into,
                                                               const at::Tensor& grad_b_into) {
  const int64_t rows = active_in == 0 ? 0 : x.numel() / active_in;
  const int64_t cap_out = weight.size(0), cap_in = weight.size(1);
  const at::Tensor g_in = grad_out.reshape({rows, active_out}).contiguous();
  const at::Tensor y = act == Activation::Relu ? saved.reshape({rows, active_out}).contiguous() : at::Tensor();
  // The bias gradient's active block, summed in the same pass as the mask.
  std::vector<float> bias_sums(need_b ? active_out : 0);
  const at::Tensor g = mask_and_column_sums(g_in, y, need_b ? bias_sums.data() : nullptr);
  const auto opts = x.options();
  at::Tensor gx, gw, gb;
  if (need_x) {
    const at::Tensor w = weight.narrow(0, 0, active_out).narrow(1, 0, active_in);
    gx = at::mm(g, w);
    if (x.dim() != 2) gx = gx.view(x.sizes());
  }
  if (need_w) {
    const at::Tensor x2 = x.reshape({rows, active_in});
    if (grad_w_into.defined()) {
      at::Tensor block = grad_w_into.narrow(0, 0, active_out).narrow(1, 0, active_in);
      // The product, then the addition: bit for bit what AccumulateGrad's `grad += new`
      // gives (a GEMM adding into the block itself, beta = 1, rounds differently).
      block.add_(at::mm(g.t(), x2));
    } else if (active_out == cap_out && active_in == cap_in) {
      gw = at::mm(g.t(), x2);
    } else {
      // Written once: the GEMM fills the active block, zero_() only what lies outside it.
      gw = at::empty(weight.sizes(), opts);
      at::Tensor block = gw.narrow(0, 0, active_out).narrow(1, 0, active_in);
      at::mm_out(block, g.t(), x2);
      if (active_in < cap_in) gw.narrow(0, 0, active_out).narrow(1, active_in, cap_in - active_in).zero_();
      if (active_out < cap_out) gw.narrow(0, active_out, cap_out - active_out).zero_();
    }
  }
  if (need_b) {
    float* dst = nullptr;
    at::Tensor target = grad_b_into;
    if (target.defined() && target.is_contiguous()) {
      dst = target.mutable_data_ptr<float>();
      for (int64_t c = 0; c < active_out; ++c) dst[c] += bias_sums[c];
    } else {
      gb = at::zeros({cap_out}, opts);
      dst = gb.mutable_data_ptr<float>();
      std::copy(bias_sums.begin(), bias_sums.end(), dst);
      if (target.defined()) {  // a strided .grad: added through ATen
        target.narrow(0, 0, active_out).add_(gb.narrow(0, 0, active_out));
        gb = at::Tensor();
      }
    }
  }
  return {gx, gw, gb};
}

}  // namespace cpu

namespace {

// The active block of a 2-D capacity buffer (the buffer itself when it is all active).
at::Tensor block_of(const at::Tensor& t, int64_t rows, int64_t cols) {
  if (t.size(0) == rows && t.size(1) == cols) return t;
  return t.narrow(0, 0, rows).narrow(1, 0, cols);
}

// `t` seen as a (rows, cols) matrix, without a new view when it already is one.
at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// act(x W_block^T + b_block) as a (rows, active_out) matrix: the bias fused into the GEMM
// (addmm: bit-identical to nn.Linear, which a GEMM followed by a bias pass is not), then
// the activation in one vectorised pass.
at::Tensor pre_activation(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t rows, int64_t active_in, int64_t active_out, Activation act) {
  const at::Tensor x2 = as_matrix(x, rows, active_in);
  const at::Tensor wt = block_of(weight, active_out, active_in).t();
  at::Tensor z = bias.has_value()
                     ? at::addmm(bias->size(0) == active_out ? *bias : bias->narrow(0, 0, active_out), x2, wt)
                     : at::mm(x2, wt);
  cpu::bias_activation_(z, std::nullopt, act);
  return z;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t active_in, int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, bias, active_in, active_out);
  at::Tensor y = pre_activation(x, weight, bias, rows, active_in, active_out, act);
  return x.dim() == 2 ? y : y.view(with_last(x.sizes(), active_out));
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, int64_t active_in,
                                                      int64_t active_out, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, bias, active_in, active_out);
  const bool saves_z = backward_needs(act) == ActivationSaves::PreActivation;
  at::Tensor z = pre_activation(x, weight, bias, rows, active_in, active_out, saves_z ? Activation::None : act);
  if (x.dim() != 2) z = z.view(with_last(x.sizes(), active_out));
  if (!saves_z) return {z, at::empty({0}, x.options())};
  const at::Tensor y = cpu::activation(as_matrix(z, rows, active_out), act);
  return {x.dim() == 2 ? y : y.view(z.sizes()), z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& saved,
    int64_t active_in, int64_t active_out, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  const int64_t rows = check_linear_args(x, weight, std::nullopt, active_in, active_out);
  check_backward_args(grad_out, x, saved, active_out, act);
  if (cpu::fused_backward_applies(grad_out, act) && x.scalar_type() == at::kFloat) {
    auto [gx, gw, gb] = cpu::linear_backward(grad_out, x, weight, saved.value_or(at::Tensor()), active_in, active_out,
                                             act, output_mask[0], output_mask[1], output_mask[2], at::Tensor(),
                                             at::Tensor());
    const auto none = [&](at::Tensor& t) {
      if (!t.defined()) t = at::empty({0}, x.options());
    };
    none(gx);
    none(gw);
    none(gb);
    return {gx, gw, gb};
  }
  const auto opts = x.options();
  const int64_t cap_out = weight.size(0), cap_in = weight.size(1);
  at::Tensor grad_x, grad_w, grad_b;
  // Other dtypes and activations: the activation's derivative in one vectorised pass, the
  // bias gradient by ATen's sum, as the autograd kernel's in-place path
  // (csrc/autograd/linear.cpp) computes it, so that both paths give the same bits.
  const at::Tensor g = cpu::activation_backward(
      as_matrix(grad_out, rows, active_out).contiguous(),
      backward_needs(act) != ActivationSaves::Nothing ? as_matrix(*saved, rows, active_out).contiguous() : at::Tensor(),
      act, nullptr);
  if (output_mask[0]) {
    grad_x = at::mm(g, block_of(weight, active_out, active_in));
    if (x.dim() != 2) grad_x = grad_x.view(x.sizes());
  } else {
    grad_x = at::empty({0}, opts);
  }
  if (!output_mask[1]) {
    grad_w = at::empty({0}, opts);
  } else if (active_out == cap_out && active_in == cap_in) {
    grad_w = at::mm(g.t(), as_matrix(x, rows, active_in));
  } else {
    // Written once: the GEMM fills the active block, zero_() only what lies outside it.
    grad_w = at::empty(weight.sizes(), opts);
    at::Tensor block = block_of(grad_w, active_out, active_in);
    at::mm_out(block, g.t(), as_matrix(x, rows, active_in));
    if (active_in < cap_in) grad_w.narrow(0, 0, active_out).narrow(1, active_in, cap_in - active_in).zero_();
    if (active_out < cap_out) grad_w.narrow(0, active_out, cap_out - active_out).zero_();
  }
  if (!output_mask[2]) {
    grad_b = at::empty({0}, opts);
  } else if (active_out == cap_out) {
    grad_b = at::sum(g, {0});
  } else {
    grad_b = at::empty({cap_out}, opts);
    at::Tensor block = grad_b.narrow(0, 0, active_out);
    at::sum_out(block, g, {0});
    grad_b.narrow(0, active_out, cap_out - active_out).zero_();
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_forward", &linear_forward_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace growdense

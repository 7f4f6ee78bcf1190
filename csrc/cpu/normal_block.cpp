// In-place normal initialisation of a block of a 2-D tensor, from torch's CPU generator.
#include <algorithm>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include "args.h"
#include "cpu/capability.h"

namespace growdense {
namespace {

bool same_engine(const at::mt19937_data_pod& a, const at::mt19937_data_pod& b) {
  return a.seed_ == b.seed_ && a.left_ == b.left_ && a.seeded_ == b.seeded_ && a.next_ == b.next_ &&
         a.state_ == b.state_;
}

// t (contiguous float32, 16 values or more) = N(mean, std^2) by table's normal_fill from gen's engine.
void fill_from(const cpu::KernelTable& table, const at::Tensor& t, float mean, float std, at::CPUGeneratorImpl* gen) {
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod state = engine.data();
  table.normal_fill(t.data_ptr<float>(), t.numel(), mean, std, state);
  engine.set_data(state);
  gen->set_engine(engine);
}

// The kernels whose normal_fill gives exactly what torch's normal_ gives on this machine, or
// nullptr: the table of ATen's own capability, checked once against torch itself (values and
// the generator's state after) over sizes that take every path (a tail of fewer than 16,
// the engine's 624-word regeneration, a start in the middle of its words).
const cpu::KernelTable* exact_kernels() {
  static const cpu::KernelTable* table = []() -> const cpu::KernelTable* {
    const cpu::KernelTable* candidate = cpu::aten_kernels();
    if (candidate == nullptr) return nullptr;
    at::Generator ours = at::make_generator<at::CPUGeneratorImpl>(20261207);
    at::Generator theirs = ours.clone();
    for (int64_t n : {16, 17, 100, 624, 625, 1000, 4103}) {
      at::Tensor expected = at::empty({n}, at::kFloat);
      expected.normal_(0.25, 1.5, theirs);
      at::Tensor got = at::empty({n}, at::kFloat);
      auto* gen = at::check_generator<at::CPUGeneratorImpl>(ours);
      fill_from(*candidate, got, 0.25f, 1.5f, gen);
      auto* their_gen = at::check_generator<at::CPUGeneratorImpl>(theirs);
      if (!at::equal(got, expected) || !same_engine(gen->engine().data(), their_gen->engine().data())) {
        return nullptr;
      }
    }
    return candidate;
  }();
  return table;
}

// tensor.normal_(0, std, generator) for a contiguous tensor: growdense's kernel where it gives
// torch's values (float32, 16 values or more), else torch's.
void draw_contiguous(const at::Tensor& t, double std, const std::optional<at::Generator>& generator) {
  if (t.scalar_type() == at::kFloat && t.numel() >= 16) {
    if (const cpu::KernelTable* table = exact_kernels()) {
      auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
      fill_from(*table, t, 0.0f, static_cast<float>(std), gen);
      return;
    }
  }
  t.normal_(0.0, std, generator);
}

// The most values staged at once for a block that is not contiguous; the same constant
// as growdense.protocol.DRAW_CHUNK, whose draw_normal_ is this kernel's pure-torch twin.
constexpr int64_t kDrawChunk = int64_t{1} << 12;

void normal_block_cpu(const at::Tensor& self, int64_t row_start, int64_t row_end, int64_t col_start,
                      int64_t col_end, double std, std::optional<at::Generator> generator) {
  check_block(self, row_start, row_end, col_start, col_end, std);
  if (row_start == row_end || col_start == col_end) return;
  at::Tensor block = self.slice(0, row_start, row_end).slice(1, col_start, col_end);
  if (block.is_contiguous()) {
    draw_contiguous(block, std, generator);
    return;
  }
  // torch draws a strided tensor value by value; contiguous chunks of whole rows draw
  // vectorised, and the copy into the block costs far less than the difference.
  const int64_t rows = block.size(0);
  const int64_t cols = block.size(1);
  const int64_t step = std::max<int64_t>(1, kDrawChunk / std::max<int64_t>(1, cols));
  at::Tensor scratch = at::empty({std::min(step, rows), cols}, block.options());
  for (int64_t start = 0; start < rows; start += step) {
    const int64_t n = std::min(step, rows - start);
    at::Tensor chunk = scratch.narrow(0, 0, n);
    draw_contiguous(chunk, std, generator);
    block.narrow(0, start, n).copy_(chunk);
  }
}

}  // namespace

std::string cpu_normal_draws() {
  const cpu::KernelTable* table = exact_kernels();
  return table == nullptr ? "torch" : cpu::capability_name(cpu::aten_capability());
}

TORCH_LIBRARY_IMPL(growdense, CPU, m) { m.impl("normal_block_", &normal_block_cpu); }

}  // namespace growdense

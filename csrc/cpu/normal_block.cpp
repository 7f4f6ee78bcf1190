// In-place normal initialisation of a block of a 2-D tensor, from torch's CPU generator.
#include <algorithm>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "args.h"

namespace growdense {
namespace {

// The most values staged at once for a block that is not contiguous; the same constant
// as growdense.protocol.DRAW_CHUNK, whose draw_normal_ is this kernel's pure-torch twin.
constexpr int64_t kDrawChunk = int64_t{1} << 12;

void normal_block_cpu(const at::Tensor& self, int64_t row_start, int64_t row_end, int64_t col_start,
                      int64_t col_end, double std, std::optional<at::Generator> generator) {
  check_block(self, row_start, row_end, col_start, col_end, std);
  if (row_start == row_end || col_start == col_end) return;
  at::Tensor block = self.slice(0, row_start, row_end).slice(1, col_start, col_end);
  if (block.is_contiguous()) {
    block.normal_(0.0, std, generator);
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
    chunk.normal_(0.0, std, generator);
    block.narrow(0, start, n).copy_(chunk);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) { m.impl("normal_block_", &normal_block_cpu); }

}  // namespace growdense

// In-place normal initialisation of a block of a 2-D tensor, from torch's CPU generator.
#include <torch/library.h>

#include "args.h"

namespace growdense {
namespace {

void normal_block_cpu(const at::Tensor& self, int64_t row_start, int64_t row_end, int64_t col_start,
                      int64_t col_end, double std, std::optional<at::Generator> generator) {
  check_block(self, row_start, row_end, col_start, col_end, std);
  if (row_start == row_end || col_start == col_end) return;
  self.slice(0, row_start, row_end).slice(1, col_start, col_end).normal_(0.0, std, generator);
}

}  // namespace

TORCH_LIBRARY_IMPL(growdense, CPU, m) { m.impl("normal_block_", &normal_block_cpu); }

}  // namespace growdense

// The host emulation of CUDA shared by the kernel tests (tests/*_host_emulation.cpp):
// each CUDA thread of a block runs as a coroutine on one OS thread and __syncthreads
// switches back to the block's scheduler, so a kernel's index arithmetic, barriers and
// shared-memory use run on a machine without a GPU. Include it before the kernels'
// header: it defines the CUDA keywords and built-in variables they use.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

namespace emu {
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
Dim3 thread_idx, block_idx, block_dim, grid_dim;
ucontext_t scheduler;
ucontext_t* running = nullptr;
// A CUDA thread waiting at __syncthreads hands control back to the block's scheduler.
inline void syncthreads() { swapcontext(running, &scheduler); }
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another, so one static array serves as every block's shared memory.
#define __shared__ static
#define __syncthreads emu::syncthreads
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

namespace {

int failures = 0;

// The CUDA threads of a block run as coroutines on this one OS thread. Each round
// resumes every unfinished thread until it reaches its next __syncthreads or its end,
// so a round is one barrier phase; a block whose threads disagree on the number of
// barriers (some finished, some waiting) is reported.
struct Block {
  static constexpr size_t kStack = 64 * 1024;
  std::vector<ucontext_t> contexts;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
};
Block block_state;
const std::function<void()>* block_kernel = nullptr;
unsigned block_thread = 0;

void thread_entry() {
  (*block_kernel)();
  block_state.done[block_thread] = 1;
}  // returns to the scheduler through uc_link

template <typename Kernel>
void launch(emu::Dim3 grid, emu::Dim3 block, Kernel kernel) {
  emu::grid_dim = grid;
  emu::block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  const std::function<void()> body = kernel;
  block_kernel = &body;
  Block& b = block_state;
  b.contexts.resize(threads);
  b.done.assign(threads, 0);
  while (b.stacks.size() < threads) b.stacks.emplace_back(Block::kStack);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        emu::block_idx = {bx, by, bz};
        for (unsigned t = 0; t < threads; ++t) {
          getcontext(&b.contexts[t]);
          b.contexts[t].uc_stack.ss_sp = b.stacks[t].data();
          b.contexts[t].uc_stack.ss_size = Block::kStack;
          b.contexts[t].uc_link = &emu::scheduler;
          makecontext(&b.contexts[t], thread_entry, 0);
          b.done[t] = 0;
        }
        for (bool waiting = true; waiting;) {
          waiting = false;
          unsigned finished = 0;
          for (unsigned t = 0; t < threads; ++t) {
            if (b.done[t]) continue;
            emu::thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            block_thread = t;
            emu::running = &b.contexts[t];
            swapcontext(&emu::scheduler, &b.contexts[t]);
            if (b.done[t]) {
              ++finished;
            } else {
              waiting = true;
            }
          }
          if (waiting && finished > 0) {
            std::printf("FAIL divergent __syncthreads in block (%u, %u, %u)\n", bx, by, bz);
            ++failures;
          }
        }
      }
    }
  }
}

template <typename T>
double epsilon() {
  if constexpr (std::is_same_v<T, double>) return 0x1p-52;
  if constexpr (std::is_same_v<T, float>) return 0x1p-23;
  if constexpr (std::is_same_v<T, c10::Half>) return 0x1p-10;
  return 0x1p-7;  // bfloat16
}

template <typename T>
std::string type_name() {
  if constexpr (std::is_same_v<T, double>) return "float64";
  if constexpr (std::is_same_v<T, float>) return "float32";
  if constexpr (std::is_same_v<T, c10::Half>) return "float16";
  return "bfloat16";
}

}  // namespace

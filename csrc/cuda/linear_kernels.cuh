// Device kernels of the linear ops, and the host-side description of the GEMMs they
// compute. Kept free of launches and of CUDA runtime calls, so that a host compiler can
// also build them (tests/cuda_host_emulation.cpp runs them on the CPU, one thread per
// CUDA thread, where no GPU is present).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "activation.h"

namespace growdense::cuda {

// ---- the fused GEMM ---------------------------------------------------------------
//
//   C(m, n) = act(sum_k A(m, k) B(k, n) + bias(n))    for m < M, n < N
//   C(m, n) = 0                                        for M <= m < M_store or N <= n < N_store
//
// A and B are read through element strides, so the active block of a capacity buffer is
// read in place and either operand may be a transpose. A may pass through an
// activation's backward on the way in, reading a tensor of its layout (the gradient of
// the output becomes that of the pre-activation: activation_backward(a_act, A, saved)),
// the GEMM can write the pre-activation too (what the activation's backward will read),
// and the sums of A's rows (the bias gradient).
// One launch runs up to two independent GEMMs, each block taking one output tile.
template <typename T>
struct FusedGemm {
  const T* a = nullptr;  // A(m, k) = a[m * a_sm + k * a_sk]
  int64_t a_sm = 0, a_sk = 0;
  const T* a_saved = nullptr;  // optional: A(m, k) = activation_backward(a_act, a(m, k), a_saved(m, k)); a's strides
  Activation a_act = Activation::None;
  const T* b = nullptr;  // B(k, n) = b[k * b_sk + n * b_sn]
  int64_t b_sk = 0, b_sn = 0;
  int64_t M = 0, N = 0, K = 0;
  T* c = nullptr;  // C(m, n) = c[m * c_sm + n]; null: no GEMM
  int64_t c_sm = 0;
  int64_t M_store = 0, N_store = 0;  // extent of C written, >= (M, N)
  const T* bias = nullptr;           // optional, indexed by n
  Activation act = Activation::None;  // applied to C after the bias
  T* c_pre = nullptr;                 // optional: the pre-activation, C's layout, for m < M, n < N
  T* a_row_sums = nullptr;  // optional: a_row_sums[m] = sum_k A(m, k) for m < M_store (0 beyond M)
  int64_t tiles_n = 1;      // output tiles along n, over N_store (set by set_tiles)
  int64_t tiles = 0;        // output tiles in all (set by set_tiles)
};

// The forward, y = act(x W_block^T + bias): x (rows x active_in, contiguous), W with
// element (o, i) at w[o * ldw + i], y and pre (the pre-activation; may be null) (rows x
// active_out, contiguous).
template <typename T>
FusedGemm<T> forward_gemm(const T* x, const T* w, int64_t ldw, const T* bias, Activation act, T* pre, T* y,
                          int64_t rows, int64_t active_in, int64_t active_out) {
  FusedGemm<T> g;
  g.a = x;  // A(r, i) = x(r, i)
  g.a_sm = active_in;
  g.a_sk = 1;
  g.b = w;  // B(i, o) = W(o, i)
  g.b_sk = 1;
  g.b_sn = ldw;
  g.M = rows;
  g.N = active_out;
  g.K = active_in;
  g.c = y;
  g.c_sm = active_out;
  g.M_store = rows;
  g.N_store = active_out;
  g.bias = bias;
  g.act = act;
  g.c_pre = pre;
  return g;
}

// grad_x = G W_block, G = activation_backward(act, grad, saved) (rows x active_out,
// contiguous; saved may be null for the identity); grad_x (rows x active_in, contiguous).
template <typename T>
FusedGemm<T> grad_input_gemm(const T* grad, const T* saved, Activation act, const T* w, int64_t ldw, T* grad_x,
                             int64_t rows, int64_t active_in, int64_t active_out) {
  FusedGemm<T> g;
  g.a = grad;  // A(r, o) = G(r, o)
  g.a_sm = active_out;
  g.a_sk = 1;
  g.a_saved = saved;
  g.a_act = act;
  g.b = w;  // B(o, i) = W(o, i)
  g.b_sk = ldw;
  g.b_sn = 1;
  g.M = rows;
  g.N = active_in;
  g.K = active_out;
  g.c = grad_x;
  g.c_sm = active_in;
  g.M_store = rows;
  g.N_store = active_in;
  return g;
}

// grad_w = G^T x over the whole capacity buffer (cap_out x cap_in, contiguous; zero
// outside the active block) and, if grad_b is given, grad_b = G^T 1 over the whole
// capacity (cap_out), from the row sums of this GEMM's A = G^T.
template <typename T>
FusedGemm<T> grad_weight_gemm(const T* grad, const T* saved, Activation act, const T* x, T* grad_w, int64_t cap_out,
                              int64_t cap_in, T* grad_b, int64_t rows, int64_t active_in, int64_t active_out) {
  FusedGemm<T> g;
  g.a = grad;  // A(o, r) = G(r, o)
  g.a_sm = 1;
  g.a_sk = active_out;
  g.a_saved = saved;
  g.a_act = act;
  g.b = x;  // B(r, i) = x(r, i)
  g.b_sk = active_in;
  g.b_sn = 1;
  g.M = active_out;
  g.N = active_in;
  g.K = rows;
  g.c = grad_w;
  g.c_sm = cap_in;
  g.M_store = cap_out;
  g.N_store = cap_in;
  g.a_row_sums = grad_b;
  return g;
}

// Tile shapes: a block of (BM / TM) x (BN / TN) threads computes a BM x BN tile of C.
struct LargeTiles {
  static constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
  static constexpr int kThreads = (kBM / kTM) * (kBN / kTN);
};
struct SmallTiles {
  static constexpr int kBM = 32, kBN = 32, kBK = 32, kTM = 2, kTN = 2;
  static constexpr int kThreads = (kBM / kTM) * (kBN / kTN);
};

template <typename Tiles, typename T>
int64_t set_tiles(FusedGemm<T>& g) {
  if (g.c == nullptr) {
    g.tiles_n = 1;
    g.tiles = 0;
    return 0;
  }
  g.tiles_n = (g.N_store + Tiles::kBN - 1) / Tiles::kBN;
  g.tiles = ((g.M_store + Tiles::kBM - 1) / Tiles::kBM) * g.tiles_n;
  return g.tiles;
}

// Large tiles when they alone give every SM a block, else small tiles (four times as
// many blocks) so that small problems spread over more of the GPU.
template <typename T>
bool prefer_large_tiles(const FusedGemm<T>& first, const FusedGemm<T>& second, int sm_count) {
  auto active_tiles = [](const FusedGemm<T>& g) -> int64_t {
    if (g.c == nullptr) return 0;
    return ((g.M + LargeTiles::kBM - 1) / LargeTiles::kBM) * ((g.N + LargeTiles::kBN - 1) / LargeTiles::kBN);
  };
  return active_tiles(first) + active_tiles(second) >= sm_count;
}

// Launched with first.tiles + second.tiles blocks of Tiles::kThreads threads, after
// set_tiles<Tiles> on both. Thread (ty, tx) holds the TM x TN elements
// m = ty + i * (BM / TM), n = tx + j * (BN / TN) of its block's tile, so that
// neighbouring threads touch neighbouring columns (coalesced stores, conflict-free
// shared-memory reads).
template <typename T, typename Tiles>
__global__ void __launch_bounds__(Tiles::kThreads)
    fused_gemm_kernel(const FusedGemm<T> first, const FusedGemm<T> second) {
  using acc_t = at::opmath_type<T>;
  constexpr int BM = Tiles::kBM, BN = Tiles::kBN, BK = Tiles::kBK, TM = Tiles::kTM, TN = Tiles::kTN;
  constexpr int kThreadsM = BM / TM;
  constexpr int kThreadsN = BN / TN;
  constexpr int kThreads = Tiles::kThreads;
  static_assert(BM % TM == 0 && BN % TN == 0, "the tile must split evenly among the threads");
  static_assert(kThreads >= BM, "the row sums need one thread per row of the tile");

  // k-major tiles; the +1 keeps the transposing stores free of bank conflicts.
  __shared__ acc_t As[BK][BM + 1];
  __shared__ acc_t Bs[BK][BN + 1];

  int64_t tile = blockIdx.x;
  const bool in_first = tile < first.tiles;
  const FusedGemm<T> g = in_first ? first : second;
  if (!in_first) tile -= first.tiles;
  const int64_t m0 = (tile / g.tiles_n) * BM;
  const int64_t n0 = (tile % g.tiles_n) * BN;

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kThreadsN;
  const int ty = tid / kThreadsN;
  const bool row_sums = g.a_row_sums != nullptr && n0 == 0;

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);
  }
  acc_t row_sum = acc_t(0);

  // A tile wholly outside the active block (padding of a capacity-shaped output) needs
  // no products. The condition is the same for every thread of the block.
  if (m0 < g.M && n0 < g.N) {
    // Each thread moves kLoadsA elements of A and kLoadsB of B per k-step, consecutive
    // threads along whichever dimension is contiguous in memory. The next step's
    // elements are loaded into registers while the current step is computed.
    constexpr int kLoadsA = BM * BK / kThreads;
    constexpr int kLoadsB = BK * BN / kThreads;
    static_assert(kLoadsA * kThreads == BM * BK && kLoadsB * kThreads == BK * BN,
                  "the tiles must split evenly among the threads");
    const bool a_k_fastest = g.a_sk == 1;
    const bool b_k_fastest = g.b_sk == 1;
    acc_t a_next[kLoadsA];
    acc_t b_next[kLoadsB];
    auto load = [&](int64_t k0) {
#pragma unroll
      for (int l = 0; l < kLoadsA; ++l) {
        const int e = tid + l * kThreads;
        const int64_t m = m0 + (a_k_fastest ? e / BK : e % BM);
        const int64_t k = k0 + (a_k_fastest ? e % BK : e / BM);
        acc_t v = acc_t(0);
        if (m < g.M && k < g.K) {
          const int64_t offset = m * g.a_sm + k * g.a_sk;
          v = static_cast<acc_t>(g.a[offset]);
          if (g.a_saved != nullptr) v = activation_backward(g.a_act, v, static_cast<acc_t>(g.a_saved[offset]));
        }
        a_next[l] = v;
      }
#pragma unroll
      for (int l = 0; l < kLoadsB; ++l) {
        const int e = tid + l * kThreads;
        const int64_t n = n0 + (b_k_fastest ? e / BK : e % BN);
        const int64_t k = k0 + (b_k_fastest ? e % BK : e / BN);
        b_next[l] = (n < g.N && k < g.K) ? static_cast<acc_t>(g.b[k * g.b_sk + n * g.b_sn]) : acc_t(0);
      }
    };
    load(0);
    for (int64_t k0 = 0; k0 < g.K; k0 += BK) {
#pragma unroll
      for (int l = 0; l < kLoadsA; ++l) {
        const int e = tid + l * kThreads;
        As[a_k_fastest ? e % BK : e / BM][a_k_fastest ? e / BK : e % BM] = a_next[l];
      }
#pragma unroll
      for (int l = 0; l < kLoadsB; ++l) {
        const int e = tid + l * kThreads;
        Bs[b_k_fastest ? e % BK : e / BN][b_k_fastest ? e / BK : e % BN] = b_next[l];
      }
      __syncthreads();
      if (k0 + BK < g.K) load(k0 + BK);

      if (row_sums && tid < BM) {
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) row_sum += As[kk][tid];
      }
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        acc_t a_frag[TM];
        acc_t b_frag[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a_frag[i] = As[kk][ty + i * kThreadsM];
#pragma unroll
        for (int j = 0; j < TN; ++j) b_frag[j] = Bs[kk][tx + j * kThreadsN];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a_frag[i] * b_frag[j];
        }
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty + i * kThreadsM;
    if (m >= g.M_store) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tx + j * kThreadsN;
      if (n >= g.N_store) continue;
      acc_t v = acc_t(0);
      if (m < g.M && n < g.N) {
        v = acc[i][j];
        if (g.bias != nullptr) v += static_cast<acc_t>(g.bias[n]);
        if (g.c_pre != nullptr) g.c_pre[m * g.c_sm + n] = static_cast<T>(v);
        v = activation_forward(g.act, v);
      }
      g.c[m * g.c_sm + n] = static_cast<T>(v);
    }
  }
  if (row_sums && tid < BM) {
    const int64_t m = m0 + tid;
    if (m < g.M_store) g.a_row_sums[m] = static_cast<T>(m < g.M ? row_sum : acc_t(0));
  }
}

// ---- the cuBLAS path's element-wise kernels ---------------------------------------

// The epilogue where cuBLASLt cannot do it, over (rows x cols, contiguous) matrices:
// z = in + bias (bias may be null), pre = z (if pre is given), out = act(z). in may be
// pre or out (in place).
template <typename T>
__global__ void bias_act_kernel(const T* in, T* pre, T* out, const T* bias, Activation act, int64_t rows,
                                int64_t cols) {
  using acc_t = at::opmath_type<T>;
  const int64_t total = rows * cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    acc_t v = static_cast<acc_t>(in[i]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[i % cols]);
    if (pre != nullptr) pre[i] = static_cast<T>(v);
    out[i] = static_cast<T>(activation_forward(act, v));
  }
}

constexpr int kSumCols = 32;  // columns per block of the column-sum kernel (blockDim.x)
constexpr int kSumRows = 8;   // threads per column (blockDim.y)

// Rows are split into chunks, one per blockIdx.y, so that tall matrices still give
// enough blocks; the partial sums are then added in a fixed order (deterministic).
struct ColumnSumsGrid {
  int64_t rows_per_chunk;
  int64_t chunks;
};

inline ColumnSumsGrid column_sums_grid(int64_t rows) {
  const int64_t min_rows = (rows + 1023) / 1024;  // at most 1024 chunks
  const int64_t rows_per_chunk = min_rows > 64 ? min_rows : 64;
  return {rows_per_chunk, (rows + rows_per_chunk - 1) / rows_per_chunk};
}

// For grad (rows x cols, contiguous): writes G = activation_backward(act, grad, saved)
// into `masked` (if given; saved may be null, G = grad), and the column sums of G over
// this block's chunk of rows into partial[blockIdx.y * cols + col] (if given). Grid:
// (ceil(cols / kSumCols), chunks); block: (kSumCols, kSumRows).
template <typename T>
__global__ void mask_column_sums_kernel(const T* grad, const T* saved, Activation act, T* masked,
                                        at::opmath_type<T>* partial, int64_t rows, int64_t cols,
                                        int64_t rows_per_chunk) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t sums[kSumRows][kSumCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
  acc_t sum = acc_t(0);
  if (col < cols) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kSumRows) {
      const int64_t offset = r * cols + col;
      acc_t v = static_cast<acc_t>(grad[offset]);
      if (saved != nullptr) v = activation_backward(act, v, static_cast<acc_t>(saved[offset]));
      if (masked != nullptr) masked[offset] = static_cast<T>(v);
      sum += v;
    }
  }
  if (partial != nullptr) {
    sums[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
      acc_t total = acc_t(0);
      for (int y = 0; y < kSumRows; ++y) total += sums[y][threadIdx.x];
      partial[static_cast<int64_t>(blockIdx.y) * cols + col] = total;
    }
  }
}

// out[i] = sum over chunks of partial[chunk * cols + i] for i < cols, 0 for cols <= i < length.
template <typename T>
__global__ void sum_chunks_kernel(const at::opmath_type<T>* partial, int64_t chunks, int64_t cols, T* out,
                                  int64_t length) {
  using acc_t = at::opmath_type<T>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= length) return;
  acc_t total = acc_t(0);
  if (i < cols) {
    for (int64_t c = 0; c < chunks; ++c) total += partial[c * cols + i];
  }
  out[i] = static_cast<T>(total);
}

}  // namespace growdense::cuda

// torch's CPU normal_ of a contiguous float tensor, the same values, faster. Included only by
// kernels.cpp (one compilation per CPU capability).
//
// torch (ATen/native/cpu/DistributionTemplates.h, normal_fill) draws n >= 16 values as: n
// uniforms u = (r & 0xffffff) * 2^-24 from its mt19937 engine's next n outputs r, one at a
// time; Box-Muller in place on each 16 (NormalFill16: pairs j, j + 8); when n is not a
// multiple of 16, 16 more uniforms overwrite the last 16 places and are transformed again.
// Here the engine's outputs are made in bulk (the state regenerated 624 words at a time,
// the tempering and the conversion in loops the compiler vectorises) and the transform is
// the same NormalFill16, from the same header, compiled for the same capability as ATen's
// kernel. normal_block.cpp uses it only after checking, once per process, that it gives
// torch's values and leaves the generator where torch leaves it.
#pragma once

#include <ATen/core/MT19937RNGEngine.h>
#include <ATen/native/cpu/DistributionTemplates.h>

#include <algorithm>
#include <cstdint>

#include "cpu/capability.h"

namespace growdense::cpu {
inline namespace CPU_CAPABILITY {

// at::mt19937's next_state: the 624 words regenerated in place.
inline void mt_regenerate(uint32_t* s) {
  constexpr int N = at::MERSENNE_STATE_N, M = at::MERSENNE_STATE_M;
  auto twist = [](uint32_t u, uint32_t v) {
    return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((v & 1u) ? at::MATRIX_A : 0u);
  };
  int j = 0;
  for (; j < N - M; ++j) s[j] = s[j + M] ^ twist(s[j], s[j + 1]);  // reads words not yet rewritten
  for (; j < N - 1; ++j) s[j] = s[j + M - N] ^ twist(s[j], s[j + 1]);  // reads words rewritten above
  s[N - 1] = s[M - 1] ^ twist(s[N - 1], s[0]);
}

// The engine's next `count` outputs as torch's float uniforms in [0, 1), the engine advanced
// exactly as `count` calls of at::mt19937::operator() advance it.
inline void mt_uniforms(float* out, int64_t count, at::mt19937_data_pod& e) {
  uint32_t* s = e.state_.data();
  constexpr float kScale = 1.0f / static_cast<float>(1u << 24);
  while (count > 0) {
    if (e.left_ <= 1) {  // the next output regenerates: operator() decrements left_ first, then reads word 0
      mt_regenerate(s);
      e.left_ = at::MERSENNE_STATE_N + 1;
      e.next_ = 0;
    }
    const int64_t k = std::min<int64_t>(count, e.left_ - 1);
    const uint32_t* src = s + e.next_;
    for (int64_t i = 0; i < k; ++i) {
      uint32_t y = src[i];
      y ^= (y >> 11);
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= (y >> 18);
      out[i] = static_cast<float>(static_cast<int32_t>(y & 0xffffffu)) * kScale;
    }
    out += k;
    count -= k;
    e.left_ -= static_cast<int>(k);
    e.next_ += static_cast<uint32_t>(k);
  }
}

inline void normal_fill(float* data, int64_t n, float mean, float std, at::mt19937_data_pod& engine) {
  at::native::templates::cpu::NormalFill16<float> transform(mean, std);
  mt_uniforms(data, n, engine);
  for (int64_t i = 0; i < n - 15; i += 16) transform(data + i);
  if (n % 16 != 0) {
    mt_uniforms(data + n - 16, 16, engine);
    transform(data + n - 16);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace growdense::cpu

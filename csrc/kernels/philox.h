// Counter-based random numbers for pivot sampling (ALGORITHM.md §2.7), shared by CPU and CUDA.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps a
// 128-bit counter and a 64-bit key to four 32-bit words with no state, so every (group, step,
// position) draws its noise independently: threads need no coordination and the CPU and CUDA
// code see identical bits for the same seed.
//
// Counter layout for the exponential noise of pivot step `step` at position `pos` (global index of
// the key in its group's sequence) of group `group`:
//   counter = (pos / 4, step, group low word, group high word), key = (seed low, seed high),
//   word pos % 4 of the output.
// Positions are global rather than bin-relative so that a key's noise does not depend on how the
// sequence is binned.
#pragma once

#include "common.h"
#include "fastmath.h"

namespace wildcat {
namespace kernels {

struct Philox4 {
  uint32_t v[4];
};

WILDCAT_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

WILDCAT_HD Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kBump0 = 0x9E3779B9u;
  constexpr uint32_t kBump1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kMul0, counter.v[0], &hi0);
    const uint32_t lo1 = philox_mulhilo(kMul1, counter.v[2], &hi1);
    Philox4 next;
    next.v[0] = hi1 ^ counter.v[1] ^ key0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ counter.v[3] ^ key1;
    next.v[3] = lo0;
    counter = next;
    key0 += kBump0;
    key1 += kBump1;
  }
  return counter;
}

// The four words that hold the noise of positions 4*quad .. 4*quad+3.
WILDCAT_HD Philox4 pivot_noise_bits(uint64_t seed, uint64_t group, uint32_t step, uint64_t quad) {
  Philox4 counter;
  counter.v[0] = static_cast<uint32_t>(quad);
  counter.v[1] = step;
  counter.v[2] = static_cast<uint32_t>(group);
  counter.v[3] = static_cast<uint32_t>(group >> 32);
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A uniform variate in the open interval (0, 1) from the top 23 bits of a word:
// u = (2k + 1) / 2^24, exactly representable in float and double, never 0 or 1.
template <typename T>
WILDCAT_HD T open_uniform(uint32_t word) {
  // via int32 (the value is below 2^24): SIMD units convert signed integers to float directly
  return static_cast<T>(static_cast<int32_t>(2u * (word >> 9) + 1u)) *
         static_cast<T>(5.9604644775390625e-08);  // 2^-24
}

// An Exp(1) variate E = -log(u). Pivot selection takes the largest log(d_l / E_l) + s_l over the
// candidates, which is Gumbel-max argmax(log d + s + g) with g = -log E: a sample proportional to
// d_l exp(s_l) (ALGORITHM.md §2.7).
template <typename T>
WILDCAT_HD T exponential_variate(uint32_t word) {
  return -vlog(open_uniform<T>(word));
}

}  // namespace kernels
}  // namespace wildcat

// Branch-free exp and log for float that compilers vectorize inside `#pragma omp simd` loops
// (libm calls do not vectorize without -ffast-math). Cephes-style minimax polynomials, within
// 2 ulp on the ranges used here. Double keeps libm: it is the precision of the oracle comparisons.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace wildcat {
namespace kernels {

WILDCAT_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

WILDCAT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// exp(x); x is clamped to [-87.3, 88.7], so the result is never 0, denormal or infinite: below
// -87.3 it returns about 1.2e-38, which every caller treats as negligible against terms near 1.
WILDCAT_HD float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float t = x * 1.44269504088896341f + 0.5f;
  float n = static_cast<float>(static_cast<int32_t>(t));
  n -= n > t ? 1.0f : 0.0f;  // floor
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r2 + r + 1.0f;
  return y * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// log(x) for finite x > 0 in the normal range.
WILDCAT_HD float fast_log(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool high = m > 1.41421356f;                             // move m to [sqrt(1/2), sqrt(2))
  m *= high ? 0.5f : 1.0f;  // selects constants, so loops if-convert and vectorize
  e += high ? 1.0f : 0.0f;
  const float z = m - 1.0f;
  const float z2 = z * z;
  float p = 7.0376836292e-2f;
  p = p * z - 1.1514610310e-1f;
  p = p * z + 1.1676998740e-1f;
  p = p * z - 1.2420140846e-1f;
  p = p * z + 1.4249322787e-1f;
  p = p * z - 1.6668057665e-1f;
  p = p * z + 2.0000714765e-1f;
  p = p * z - 2.4999993993e-1f;
  p = p * z + 3.3333331174e-1f;
  float y = p * z * z2;
  y += e * -2.12194440e-4f;
  y += -0.5f * z2;
  return z + y + e * 0.693359375f;
}

template <typename T>
WILDCAT_HD T vexp(T x) {
  return std::exp(x);
}
template <>
WILDCAT_HD float vexp<float>(float x) {
  return fast_exp(x);
}

template <typename T>
WILDCAT_HD T vlog(T x) {
  return std::log(x);
}
template <>
WILDCAT_HD float vlog<float>(float x) {
  return fast_log(x);
}

}  // namespace kernels
}  // namespace wildcat

// Device-agnostic helpers shared by the CPU and CUDA implementations. No torch headers here:
// the same source compiles with a host compiler and with nvcc, which is what makes the same seed
// pick the same pivots on both devices.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define WILDCAT_HD __host__ __device__ __forceinline__
#else
#define WILDCAT_HD inline
#endif

namespace wildcat {
namespace kernels {

// Slots per bin and bin lengths are balanced: `total` items split into `parts` contiguous pieces
// whose sizes differ by at most one, the first `total % parts` pieces one larger (ALGORITHM.md §2.4).
WILDCAT_HD int64_t balanced_size(int64_t total, int64_t parts, int64_t index) {
  return total / parts + (index < total % parts ? 1 : 0);
}

WILDCAT_HD int64_t balanced_start(int64_t total, int64_t parts, int64_t index) {
  const int64_t base = total / parts;
  const int64_t extra = total % parts;
  return index * base + (index < extra ? index : extra);
}

// x · e^{a} given factor = e^{a}: the plain product while the factor is finite (so unshifted
// outputs are exactly x · factor), else through logarithms (a tiny x with a factor beyond double's
// range: an entry whose inner sums underflowed), and 0 for x = 0 rather than 0 · inf = NaN.
WILDCAT_HD double scaled_product(double x, double a, double factor) {
  if (x == 0) return 0;
  if (factor <= 1.7976931348623157e308) return x * factor;
  return std::copysign(std::exp(std::log(std::fabs(x)) + a), x);
}

}  // namespace kernels
}  // namespace wildcat

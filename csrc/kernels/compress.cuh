// CUDA kernels of compress_kv and rp_nystrom (ALGORITHM.md §2), torch-free: POD parameters, raw
// pointers into contiguous (group, N, ·) tensors, launched on the caller's stream.
//
// Five stages, none launched per pivot step and none with a host synchronisation:
//   1. group_stats_partial / group_stats_finalize: key mean (double sums) and value bounds per
//      group, two-level so that each group is read by many CTAs and the sums are deterministic;
//   2. pivot_kernel: one CTA per (group, bin) of at most 16 slots runs all of the bin's pivot
//      steps (the bordered algorithm of the CPU code, csrc/ops/cpu/pivoted_cholesky.h, with the
//      same random stream, so the same seed picks the same pivots); the argmax is a block
//      reduction. Bins of more slots choose their pivots in rounds (compress_block.cuh);
//   3. weights_partial: Σ_l R(:, l) e^{(s_l - s_ref)/2} [v_l | 1] over chunks of points;
//   4. finalize: sums the chunks in double, multiplies by G_SS^-1: each slot up to its factor;
//   5. write_group: applies the factors, shifted per group where they would overflow, and copies
//      the core keys.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "block_pivoting.h"
#include "common.h"
#include "fastmath.h"
#include "philox.h"
#include "temperature.h"

namespace wildcat {
namespace kernels {

// A seed either in device memory (drawn on the GPU: read at run time, so graph replays differ)
// or a host value.
struct SeedRef {
  const int64_t* device_ptr;
  uint64_t value;
};

__device__ __forceinline__ uint64_t load_seed(const SeedRef& s) {
  return s.device_ptr != nullptr ? static_cast<uint64_t>(*s.device_ptr) : s.value;
}

// The number of keys of group g: all N, or its entry of compress_kv's `lengths` clamped to [0, N]
// (checking the values would cost a host synchronisation).
__device__ __forceinline__ int64_t group_length(const int64_t* lengths, int64_t g, int64_t n) {
  if (lengths == nullptr) return n;
  const int64_t valid = lengths[g];
  return valid < 0 ? 0 : (valid > n ? n : valid);
}

template <typename T>
__device__ __forceinline__ T to_acc(T v) {
  return v;
}
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// a · b rounded to T on its own. The CPU rounds a centred, scaled coordinate to T before it enters a
// difference (pivoted_cholesky.h); a plain product there is fused by the compiler into that
// subtraction (one FFMA), which rounds once instead of twice, and the rows drift from the CPU's.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// A residual above tol raised to T's smallest normal before its logarithm, as the CPU does
// (pivoted_cholesky.h): the two pick the same pivots even for a tol below that.
template <typename T>
__device__ __forceinline__ T normal_floor(T d) {
  const T tiny = sizeof(T) == 4 ? static_cast<T>(FLT_MIN) : static_cast<T>(DBL_MIN);
  return d > tiny ? d : tiny;
}

// ---------------------------------------------------------------------------------------------
// 1. Group statistics
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct StatsParams {
  const scalar_t* keys;    // (G, N, E)
  const scalar_t* values;  // (G, N, D)
  const int64_t* lengths;  // (G) keys per group, or null: N
  int64_t n, e, dv, splits, chunk;
  bool value_bounds;       // false: the resident pivot kernel bounds the values (it stages them anyway)
  double* key_sum;         // (G, splits, E)
  double* value_min;       // (G, splits, D)
  double* value_max;       // (G, splits, D)
};

// grid (G, splits), blockDim (32, 8): x walks columns, y walks rows of this split's points.
template <typename scalar_t>
__global__ void group_stats_partial_kernel(StatsParams<scalar_t> p) {
  __shared__ double scratch[3][8][32];
  const int64_t g = blockIdx.x, split = blockIdx.y;
  const int64_t first = split * p.chunk;
  const int64_t valid = group_length(p.lengths, g, p.n);
  const int64_t last = first + p.chunk < valid ? first + p.chunk : valid;
  const int64_t out = (g * p.splits + split);
  const int64_t cols = p.e > p.dv ? p.e : p.dv;
  for (int64_t c0 = 0; c0 < cols; c0 += 32) {
    const int64_t c = c0 + threadIdx.x;
    double sum = 0, lo = DBL_MAX, hi = -DBL_MAX;
    for (int64_t l = first + threadIdx.y; l < last; l += 8) {
      if (c < p.e) sum += static_cast<double>(to_acc(p.keys[(g * p.n + l) * p.e + c]));
      if (p.value_bounds && c < p.dv) {
        const double v = static_cast<double>(to_acc(p.values[(g * p.n + l) * p.dv + c]));
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
      }
    }
    scratch[0][threadIdx.y][threadIdx.x] = sum;
    scratch[1][threadIdx.y][threadIdx.x] = lo;
    scratch[2][threadIdx.y][threadIdx.x] = hi;
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int y = 1; y < 8; ++y) {  // fixed order: deterministic
        sum += scratch[0][y][threadIdx.x];
        lo = scratch[1][y][threadIdx.x] < lo ? scratch[1][y][threadIdx.x] : lo;
        hi = scratch[2][y][threadIdx.x] > hi ? scratch[2][y][threadIdx.x] : hi;
      }
      if (c < p.e) p.key_sum[out * p.e + c] = sum;
      if (p.value_bounds && c < p.dv) {
        p.value_min[out * p.dv + c] = lo;
        p.value_max[out * p.dv + c] = hi;
      }
    }
    __syncthreads();
  }
}

// The same partial statistics from 16-byte loads, for rows of 16-byte multiples whose pieces per
// row (E / kVec and D / kVec) divide kThreads: thread t reads piece t % pieces of every
// (kThreads / pieces)-th row, four rows in flight, so each warp reads whole rows. Key sums in
// double (exact for 16-bit keys); value bounds in the values' own precision (float for 16-bit and
// float values: a minimum or maximum is exact in any type that holds the values, and each
// conversion to double costs a slot of the H100's narrow conversion pipe: 216 -> 201 us at
// N = 65,536, benchmarks/NOTES.md); the row groups are combined in a fixed order.
template <typename scalar_t, typename Acc>
__device__ __forceinline__ void unpack_piece(const uint4& raw, Acc (&out)[16 / sizeof(scalar_t)]) {
  scalar_t v[16 / sizeof(scalar_t)];
  memcpy(v, &raw, sizeof raw);
#pragma unroll
  for (int i = 0; i < 16 / static_cast<int>(sizeof(scalar_t)); ++i) out[i] = static_cast<Acc>(to_acc(v[i]));
}

template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(kThreads) group_stats_vector_kernel(StatsParams<scalar_t> p) {
  constexpr int kVec = 16 / sizeof(scalar_t), kInFlight = 4;
  __shared__ double partial[2][kThreads * kVec];
  const int64_t g = blockIdx.x, split = blockIdx.y;
  const int64_t first = split * p.chunk;
  const int64_t valid = group_length(p.lengths, g, p.n);
  const int64_t last = first + p.chunk < valid ? first + p.chunk : valid;
  const int64_t out = g * p.splits + split;
  const int t = threadIdx.x;
  // Folds the pieces of this thread's rows into acc (f(acc, x) per element; `twice`: a second
  // accumulator acc2 with f2, for the value bounds), then writes the row groups' fixed-order
  // combination of each column to out0 (and out1).
  auto reduce = [&](const scalar_t* rows, int64_t width, auto init, auto init2, auto&& f, auto&& f2, bool twice,
                    double* out0, double* out1) {
    using Acc = decltype(init);
    Acc* part0 = reinterpret_cast<Acc*>(partial[0]);
    Acc* part1 = reinterpret_cast<Acc*>(partial[1]);
    const int pieces = static_cast<int>(width / kVec), row_step = kThreads / pieces;
    Acc acc[kVec], acc2[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = init, acc2[i] = init2;
    const uint4* src = reinterpret_cast<const uint4*>(rows + (g * p.n) * width) + t % pieces;
    int64_t l = first + t / pieces;
    for (; l + (kInFlight - 1) * row_step < last; l += kInFlight * row_step) {
      uint4 raw[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) raw[k] = src[(l + k * row_step) * pieces];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
        Acc x[kVec];
        unpack_piece<scalar_t>(raw[k], x);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] = f(acc[i], x[i]), acc2[i] = twice ? f2(acc2[i], x[i]) : acc2[i];
      }
    }
    for (; l < last; l += row_step) {
      Acc x[kVec];
      unpack_piece<scalar_t>(src[l * pieces], x);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = f(acc[i], x[i]), acc2[i] = twice ? f2(acc2[i], x[i]) : acc2[i];
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) part0[t * kVec + i] = acc[i], part1[t * kVec + i] = acc2[i];
    __syncthreads();
    for (int c = t; c < width; c += kThreads) {
      Acc r = init, r2 = init2;
      for (int group = 0; group < row_step; ++group) {
        const int at = (group * pieces + c / kVec) * kVec + c % kVec;
        r = f(r, part0[at]);
        r2 = f2(r2, part1[at]);
      }
      out0[c] = static_cast<double>(r);
      if (twice) out1[c] = static_cast<double>(r2);
    }
    __syncthreads();
  };
  using Bound = std::conditional_t<sizeof(scalar_t) <= sizeof(float), float, double>;  // holds every value exactly
  const auto add = [](double a, double x) { return a + x; };
  const auto low = [](Bound a, Bound x) { return x < a ? x : a; };
  const auto high = [](Bound a, Bound x) { return x > a ? x : a; };
  reduce(p.keys, p.e, 0.0, 0.0, add, add, false, p.key_sum + out * p.e, nullptr);
  // ±infinity to start: an empty split (key padding) bounds nothing
  if (p.value_bounds) {
    reduce(p.values, p.dv, static_cast<Bound>(INFINITY), static_cast<Bound>(-INFINITY), low, high, true,
           p.value_min + out * p.dv, p.value_max + out * p.dv);
  }
}

// The key mean and the value bounds from the partials of `splits` parts per group. Either part may
// be absent (null): the resident pivot kernel bounds the values itself, so its calls finish the
// mean before the pivots and the bounds after them, in two launches.
template <typename T>
struct StatsFinalizeParams {
  const double* key_sum;    // (G, splits, E) or null
  const double* value_min;  // (G, splits, D) or null
  const double* value_max;
  const int64_t* lengths;
  int64_t n, e, dv, splits;
  float* key_mean;  // (G, E)
  T* out_min;       // (G, D)
  T* out_max;       // (G, D)
  unsigned long long* group_top;  // (G): zeroed here (by both launches), raised by finalize_kernel (write_group_kernel's shift)
};

template <typename T>
__global__ void group_stats_finalize_kernel(StatsFinalizeParams<T> p) {
  const int64_t g = blockIdx.x;
  const int64_t valid = group_length(p.lengths, g, p.n);
  if (threadIdx.x == 0) p.group_top[g] = 0;  // the identity of the ordered maximum
  for (int64_t c = threadIdx.x; p.key_sum != nullptr && c < p.e; c += blockDim.x) {
    double sum = 0;
    for (int64_t s = 0; s < p.splits; ++s) sum += p.key_sum[(g * p.splits + s) * p.e + c];
    p.key_mean[g * p.e + c] = valid > 0 ? static_cast<float>(sum / static_cast<double>(valid)) : 0.0f;
  }
  for (int64_t c = threadIdx.x; p.value_min != nullptr && c < p.dv; c += blockDim.x) {
    double lo = DBL_MAX, hi = -DBL_MAX;
    for (int64_t s = 0; s < p.splits; ++s) {
      const double a = p.value_min[(g * p.splits + s) * p.dv + c];
      const double b = p.value_max[(g * p.splits + s) * p.dv + c];
      lo = a < lo ? a : lo;
      hi = b > hi ? b : hi;
    }
    // a group without keys: bounds [0, 0], so its (empty) attention output is 0
    p.out_min[g * p.dv + c] = valid > 0 ? static_cast<T>(lo) : T(0);
    p.out_max[g * p.dv + c] = valid > 0 ? static_cast<T>(hi) : T(0);
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Pivot loop
// ---------------------------------------------------------------------------------------------

// Workspace layout per (group, bin) row gb = g * num_bins + b, padded to the largest bin:
// per-point arrays (length_max), kernel rows (slots_max × length_max), kinv (slots_max²).
template <typename scalar_t, typename T>
struct PivotParams {
  const scalar_t* points;     // (G, N, E): keys, or rp_nystrom's points
  const float* key_mean;      // (G, E); null: the points are used as given (rp_nystrom)
  const T* query_norm;        // (G) or null (R_q = R_k, query-agnostic)
  const int64_t* lengths;     // (G) keys per group, or null: N
  int64_t n, e, num_bins, rank, slots_max, length_max;
  double beta;
  TauMode tau;
  T tol;
  SeedRef seed;
  bool keys_in_smem;          // the bin's keys are staged in shared memory, else in keys_t
  scalar_t* keys_t;           // (G*C, E, length_max) workspace when they do not fit
  bool sample_all;            // rp_nystrom: sample even when rank >= length
  T* residual;                // (G*C, length_max)
  double* sq_norm;            // (G*C, length_max): s_l = |x_l|^2
  T* rows;                    // (G*C, slots_max, length_max): R_i(l)
  double* kinv;               // (G*C, slots_max, slots_max), zero-initialised
  int64_t* pivots;            // (G*C, slots_max): local indices
  int32_t* counts;            // (G*C): pivots taken; -1 for a bin kept exactly
  double* max_sq_norm;        // (G*C): s_ref, the bin's largest s
};

struct ArgMax {
  float score;
  int64_t index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  // larger score wins; ties go to the smaller index, like the CPU's first maximum
  if (b.score > a.score || (b.score == a.score && b.index < a.index && b.index >= 0)) return b;
  return a;
}

// Block-wide argmax; every thread gets the result. `scratch` holds one entry per warp.
template <int kThreads>
__device__ ArgMax block_argmax(ArgMax mine, ArgMax* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    ArgMax other;
    other.score = __shfl_down_sync(0xffffffffu, mine.score, offset);
    other.index = __shfl_down_sync(0xffffffffu, mine.index, offset);
    mine = better(mine, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = mine;
  __syncthreads();
  if (warp == 0) {
    mine = lane < kThreads / 32 ? scratch[lane] : ArgMax{-INFINITY, -1};
    for (int offset = 16; offset > 0; offset >>= 1) {
      ArgMax other;
      other.score = __shfl_down_sync(0xffffffffu, mine.score, offset);
      other.index = __shfl_down_sync(0xffffffffu, mine.index, offset);
      mine = better(mine, other);
    }
    if (lane == 0) scratch[kThreads / 32] = mine;
  }
  __syncthreads();
  const ArgMax result = scratch[kThreads / 32];
  __syncthreads();  // scratch is reused by the next reduction
  return result;
}

template <int kThreads>
__device__ double block_max(double mine, double* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double other = __shfl_down_sync(0xffffffffu, mine, offset);
    mine = other > mine ? other : mine;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) mine = scratch[w] > mine ? scratch[w] : mine;
    scratch[kThreads / 32] = mine;
  }
  __syncthreads();
  const double result = scratch[kThreads / 32];
  __syncthreads();
  return result;
}

// A double as an unsigned integer of the same order (NaN aside), so that atomicMax on the integers
// keeps the largest double: negative numbers have every bit flipped, the others their sign bit set.
// Every encoded value is above 0, which therefore stands for "no value yet".
__device__ __forceinline__ unsigned long long ordered_bits(double x) {
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(x));
  return bits >> 63 ? ~bits : bits | (1ull << 63);
}
__device__ __forceinline__ double from_ordered_bits(unsigned long long u) {
  return __longlong_as_double(static_cast<long long>(u >> 63 ? u & ~(1ull << 63) : ~u));
}

// Shared memory of pivot_kernel: the reduction scratch (64 doubles) and g (double), then mean and
// pivot point (E each) and g (T), so every array is aligned to its type; then the bin's keys
// transposed (E × length_max) when keys_in_smem.
template <typename scalar_t, typename T>
__host__ __device__ inline size_t pivot_smem_bytes(int64_t e, int64_t slots_max, int64_t length_max,
                                                   bool keys_in_smem) {
  size_t bytes = (64 + slots_max) * sizeof(double) + (2 * e + slots_max) * sizeof(T);
  bytes = (bytes + 15) / 16 * 16;
  if (keys_in_smem) bytes += static_cast<size_t>(e) * length_max * sizeof(scalar_t);
  return bytes;
}

template <typename scalar_t, typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) pivot_kernel(PivotParams<scalar_t, T> p) {
  const int64_t gb = blockIdx.x;
  const int64_t g = gb / p.num_bins, b = gb % p.num_bins;
  const int64_t valid = group_length(p.lengths, g, p.n);
  const int64_t length = balanced_size(valid, p.num_bins, b);
  const int64_t slots = balanced_size(p.rank, p.num_bins, b);
  const int64_t start = balanced_start(valid, p.num_bins, b);
  const int64_t e = p.e;
  if (uses_block_pivoting(slots)) return;  // block_pivot_kernel's bin (compress_block.cuh)
  if (length <= slots && !p.sample_all) {  // kept exactly (§2.4): nothing to sample
    if (threadIdx.x == 0) p.counts[gb] = -1;
    return;
  }

  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* scratch = reinterpret_cast<double*>(smem_raw);
  ArgMax* arg_scratch = reinterpret_cast<ArgMax*>(scratch);  // 16 bytes each, fits in 64 doubles
  double* g_d = scratch + 64;
  T* mean = reinterpret_cast<T*>(g_d + p.slots_max);
  T* xp = mean + e;
  T* g_t = xp + e;
  scalar_t* keys_t = p.keys_in_smem ? reinterpret_cast<scalar_t*>(smem_raw + pivot_smem_bytes<scalar_t, T>(
                                          e, p.slots_max, p.length_max, false))
                                    : p.keys_t + gb * e * p.length_max;

  const scalar_t* keys = p.points + (g * p.n + start) * e;
  T* residual = p.residual + gb * p.length_max;
  double* sq_norm = p.sq_norm + gb * p.length_max;
  T* rows = p.rows + gb * p.slots_max * p.length_max;
  double* kinv = p.kinv + gb * p.slots_max * p.slots_max;
  const uint64_t seed = load_seed(p.seed);
  const bool centred = p.key_mean != nullptr;

  for (int64_t c = threadIdx.x; c < e; c += kThreads) {
    mean[c] = centred ? static_cast<T>(p.key_mean[g * e + c]) : T(0);
  }
  // Stage the bin's keys transposed (E × length) once: the reads walk rows (coalesced), and every
  // later pass reads consecutive points from consecutive threads (coalesced, no bank conflicts).
  for (int64_t idx = threadIdx.x; idx < length * e; idx += kThreads) {
    keys_t[(idx % e) * length + idx / e] = keys[idx];
  }
  __syncthreads();
  auto key_at = [&](int64_t l, int64_t c) -> T { return static_cast<T>(to_acc(keys_t[c * length + l])); };

  // Centred norms, the bin's largest, and the temperature (§2.5).
  double norm_max = 0;
  for (int64_t l = threadIdx.x; l < length; l += kThreads) {
    double norm2 = 0;
    for (int64_t c = 0; c < e; ++c) {
      const T centred_value = key_at(l, c) - mean[c];
      norm2 += static_cast<double>(centred_value) * static_cast<double>(centred_value);
    }
    norm_max = norm2 > norm_max ? norm2 : norm_max;
  }
  norm_max = block_max<kThreads>(norm_max, scratch);
  const double key_norm = sqrt(norm_max);
  double m = 1.0;
  if (centred) {
    const double rq = p.query_norm != nullptr ? static_cast<double>(p.query_norm[g]) : key_norm;
    m = key_scale<double>(p.beta, rq, key_norm, length, p.tau);
  }
  const T m_t = static_cast<T>(m);

  // x_l = m (k_l - mean), formed on the fly exactly as the CPU forms it; s_l in double.
  ArgMax best{-INFINITY, -1};
  double s_max = 0;
  for (int64_t l = threadIdx.x; l < length; l += kThreads) {
    double s = 0;
    for (int64_t c = 0; c < e; ++c) {
      const double x = static_cast<double>((key_at(l, c) - mean[c]) * m_t);
      s += x * x;
    }
    sq_norm[l] = s;
    s_max = s > s_max ? s : s_max;
    residual[l] = T(1);
    const uint64_t pos = static_cast<uint64_t>(start + l);
    const Philox4 bits = pivot_noise_bits(seed, static_cast<uint64_t>(g), 0u, pos >> 2);
    const T score = static_cast<T>(s) - vlog(exponential_variate<T>(bits.v[pos & 3]));  // log d = 0
    best = better(best, ArgMax{static_cast<float>(score), l});
  }
  s_max = block_max<kThreads>(s_max, scratch);
  if (threadIdx.x == 0) {
    p.max_sq_norm[gb] = s_max;
  }
  best = block_argmax<kThreads>(best, arg_scratch);

  int64_t count = 0;
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t piv = best.index;
    if (piv < 0) break;  // every residual <= tol (early stop)
    count = i + 1;
    if (threadIdx.x == 0) p.pivots[gb * p.slots_max + i] = piv;
    for (int64_t c = threadIdx.x; c < e; c += kThreads) xp[c] = mul_rn(key_at(piv, c) - mean[c], m_t);
    // bordering (one warp): g = (L a, -1) / sqrt(d_p), a_j = R_j(p)
    if (threadIdx.x < 32) {
      const double inv_sqrt_dp = 1.0 / sqrt(static_cast<double>(residual[piv]));
      for (int64_t a = threadIdx.x; a < i; a += 32) {
        double acc = 0;
        for (int64_t j = 0; j < i; ++j) {
          acc += kinv[a * p.slots_max + j] * static_cast<double>(rows[j * p.length_max + piv]);
        }
        g_d[a] = acc * inv_sqrt_dp;
      }
      if (threadIdx.x == 0) g_d[i] = -inv_sqrt_dp;
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < (i + 1) * (i + 1); idx += kThreads) {
      const int64_t a = idx / (i + 1), c = idx % (i + 1);
      kinv[a * p.slots_max + c] += g_d[a] * g_d[c];
    }
    for (int64_t a = threadIdx.x; a <= i; a += kThreads) g_t[a] = static_cast<T>(g_d[a]);
    __syncthreads();

    const bool last = i + 1 == slots;
    best = ArgMax{-INFINITY, -1};
    for (int64_t l = threadIdx.x; l < length; l += kThreads) {
      T dist = 0;  // |x_p - x_l|^2: no cancellation, exactly 0 for a key equal to the pivot
      for (int64_t c = 0; c < e; ++c) {
        const T diff = mul_rn(key_at(l, c) - mean[c], m_t) - xp[c];
        dist += diff * diff;
      }
      const T kernel = vexp(dist * T(-0.5));
      rows[i * p.length_max + l] = kernel;
      T y = g_t[i] * kernel;
      for (int64_t j = 0; j < i; ++j) y += g_t[j] * rows[j * p.length_max + l];
      T d = residual[l] - y * y;
      d = (l == piv || d < T(0)) ? T(0) : d;
      residual[l] = d;
      if (!last && d > p.tol) {
        const uint64_t pos = static_cast<uint64_t>(start + l);
        const Philox4 bits =
            pivot_noise_bits(seed, static_cast<uint64_t>(g), static_cast<uint32_t>(i + 1), pos >> 2);
        const T score = vlog(normal_floor(d) / exponential_variate<T>(bits.v[pos & 3])) + static_cast<T>(sq_norm[l]);
        best = better(best, ArgMax{static_cast<float>(score), l});
      }
    }
    if (last) break;
    best = block_argmax<kThreads>(best, arg_scratch);
  }
  if (threadIdx.x == 0) {
    p.counts[gb] = static_cast<int32_t>(count);
    const int64_t first = count > 0 ? p.pivots[gb * p.slots_max] : 0;
    for (int64_t i = count; i < slots; ++i) p.pivots[gb * p.slots_max + i] = first;
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Weighted sums of values over chunks of points
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename T>
struct WeightsParams {
  const scalar_t* values;     // (G, N, D)
  const T* rows;              // pivot workspace
  const double* sq_norm;
  const double* max_sq_norm;
  const int32_t* counts;
  const int64_t* lengths;     // (G) keys per group, or null: N
  int64_t n, dv, num_bins, slots_max, length_max, chunk, chunks_max;
  double* partial;            // (G*C, chunks_max, slots_max, D + 1)
};

// d += a b on the FP64 tensor cores: an 8×4 by 4×8 product per warp (PTX mma m8n8k4 .f64, sm_80).
// Lane t holds A(t / 4, t % 4), B(t % 4, t / 4) and D(t / 4, 2 (t % 4) + {0, 1}).
__device__ __forceinline__ void dmma_m8n8k4(double& d0, double& d1, double a, double b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+d"(d0), "+d"(d1)
               : "d"(a), "d"(b));
#else  // the same product through shuffles, for architectures without FP64 mma
  const int lane = threadIdx.x % 32, row = lane / 4, col = 2 * (lane % 4);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const double ak = __shfl_sync(0xffffffffu, a, row * 4 + k);
    d0 += ak * __shfl_sync(0xffffffffu, b, col * 4 + k);
    d1 += ak * __shfl_sync(0xffffffffu, b, (col + 1) * 4 + k);
  }
#endif
}

// d += a b, a 16×8 by 8×8 product per warp (PTX mma m16n8k8 .f64, sm_90: 1.5× the speed of m8n8k4
// in the weighted sums, benchmarks/NOTES.md). With g = t / 4, q = t % 4, lane t holds
// A(g + 8 (i % 2), q + 4 (i / 2)) as a[i], B(q + 4 i, g) as b[i] and D(g + 8 (i / 2), 2 q + i % 2)
// as d[i]: each quarter is an m8n8k4 operand, which is how older architectures compute it.
__device__ __forceinline__ void dmma_m16n8k8(double (&d)[4], const double (&a)[4], const double (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+d"(d[0]), "+d"(d[1]), "+d"(d[2]), "+d"(d[3])
               : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(b[0]), "d"(b[1]));
#else
  dmma_m8n8k4(d[0], d[1], a[0], b[0]);
  dmma_m8n8k4(d[0], d[1], a[2], b[1]);
  dmma_m8n8k4(d[2], d[3], a[1], b[0]);
  dmma_m8n8k4(d[2], d[3], a[3], b[1]);
#endif
}

// Σ_{l in chunk} R_j(l) e^{(s_l - s_ref)/2} [v_l | 1] for every pivot j of the bin; one CTA per
// (bin, chunk). Accumulated in double: G_SS^-1 amplifies the rounding of these sums
// (benchmarks/NOTES.md). A matrix product F V on the FP64 tensor cores, F(j, l) = R_j(l)
// e^{(s_l - s_ref)/2}: the chunk is walked in pieces of kWeightsSub points whose factors (a block of
// kWeightsRows pivots) and values (a block of kWeightsCols columns, the last one the ones column)
// are staged in shared memory as double; the 8 warps split the block as 4 × 2 and each holds 2 × 5
// (or 2 × 4) m16n8k8 tiles of 16 × 8 sums.
constexpr int kWeightsSub = 32;                     // points staged at once: 4 steps of k = 8
constexpr int kWeightsRows = 128;                   // pivots per block: 8 tiles of 16, 2 per warp row
constexpr int kWeightsCols = 72;                    // columns per block: 9 tiles over 2 warp columns
constexpr int kWeightsFactorStride = kWeightsSub + 4;  // ≡ 4 (mod 16) doubles: the A loads of a
constexpr int kWeightsValueStride = kWeightsCols + 4;  // half-warp hit 16 distinct banks, as do B's

__host__ __device__ inline size_t weights_smem_bytes(int64_t chunk) {
  return sizeof(double) *
         (chunk + kWeightsRows * kWeightsFactorStride + kWeightsSub * kWeightsValueStride);
}

template <typename scalar_t, typename T, int kThreads, bool kVectorValues>
__global__ void __launch_bounds__(kThreads, 1) weights_partial_kernel(WeightsParams<scalar_t, T> p) {
  static_assert(kThreads == 256, "8 warps: 4 rows of pivot tiles x 2 columns of value tiles");
  constexpr int kTileRows = 16, kK = 8;                                   // m16n8k8 tiles
  constexpr int kRowTiles = kWeightsRows / kTileRows / 4, kColTiles = 5;  // per warp: tiles wm + 4u, wn + 2v
  constexpr int kFactorLoads = kWeightsSub * kWeightsRows / kThreads;
  static_assert(kFactorLoads * kThreads == kWeightsSub * kWeightsRows, "whole factor loads per thread");
  // values in 16-byte pieces of kValueWidth columns (D a multiple of the width, rows aligned) or one by one
  constexpr int kValueWidth = kVectorValues ? 16 / static_cast<int>(sizeof(scalar_t)) : 1;
  static_assert(kWeightsCols % kValueWidth == 0, "whole pieces per column block");
  constexpr int kValueUnits = kWeightsCols / kValueWidth;  // per point
  constexpr int kValueLoads = (kWeightsSub * kValueUnits + kThreads - 1) / kThreads;
  using ValueStage = std::conditional_t<kVectorValues, uint4, scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* point_scale = reinterpret_cast<double*>(smem_raw);
  double* factors = point_scale + p.chunk;                         // [kWeightsRows][factor stride]
  double* vals = factors + kWeightsRows * kWeightsFactorStride;    // [kWeightsSub][value stride]
  const int64_t gb = blockIdx.x, chunk = blockIdx.y;
  const int64_t g = gb / p.num_bins, b = gb % p.num_bins;
  const int64_t k = p.counts[gb];
  if (k <= 0) return;
  const int64_t valid = group_length(p.lengths, g, p.n);
  const int64_t length = balanced_size(valid, p.num_bins, b);
  const int64_t start = balanced_start(valid, p.num_bins, b);
  const int64_t first = chunk * p.chunk;
  if (first >= length) return;
  const int len = static_cast<int>(first + p.chunk < length ? p.chunk : length - first);
  const double s_ref = p.max_sq_norm[gb];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2, quad_row = lane / 4, quad_col = lane % 4;
  for (int l = tid; l < len; l += kThreads) {
    point_scale[l] = exp((p.sq_norm[gb * p.length_max + first + l] - s_ref) / 2);
  }
  const int64_t cols = p.dv + 1;
  const scalar_t* values = p.values + (g * p.n + start + first) * p.dv;
  const T* rows = p.rows + gb * p.slots_max * p.length_max + first;
  double* out = p.partial + (gb * p.chunks_max + chunk) * p.slots_max * cols;
  for (int64_t j0 = 0; j0 < k; j0 += kWeightsRows) {
    const int row_tiles = static_cast<int>(((k - j0 < kWeightsRows ? k - j0 : kWeightsRows) + kTileRows - 1) / kTileRows);
    for (int64_t c0 = 0; c0 < cols; c0 += kWeightsCols) {
      const int col_tiles = static_cast<int>(((cols - c0 < kWeightsCols ? cols - c0 : kWeightsCols) + 7) / 8);
      // The next piece's factors and values are loaded into registers while the tensor cores work
      // on the current one (one CTA per SM: nothing else would hide the loads' latency). Thread
      // tid loads the factors of point tid % 32 for pivots tid / 32 + 8 i, and 16-byte pieces of
      // value rows (or single values where rows are not 16-byte aligned).
      const int factor_rows = static_cast<int>(k - j0) - tid / 32;  // rows of this thread below k
      const T* factor_src = rows + (j0 + tid / 32) * p.length_max + tid % 32;
      const int64_t factor_step = 8 * p.length_max;
      T factor_raw[kFactorLoads];
      ValueStage value_raw[kValueLoads];
      const auto load_piece = [&](int l0) {
        const bool point_in = tid % 32 < len - l0;
#pragma unroll
        for (int i = 0; i < kFactorLoads; ++i) {
          factor_raw[i] = point_in && 8 * i < factor_rows ? factor_src[i * factor_step + l0] : T(0);
        }
#pragma unroll
        for (int i = 0; i < kValueLoads; ++i) {
          const int idx = tid + i * kThreads, l = idx / kValueUnits;
          const int64_t col = c0 + idx % kValueUnits * kValueWidth;
          const bool in = idx < kWeightsSub * kValueUnits && l < len - l0 && col < p.dv;
          if constexpr (kVectorValues) {
            value_raw[i] = in ? *reinterpret_cast<const uint4*>(values + (l0 + l) * p.dv + col) : uint4{};
          } else {
            value_raw[i] = in ? values[(l0 + l) * p.dv + col] : scalar_t{};
          }
        }
      };
      const auto store_piece = [&](int l0) {
        const bool point_in = tid % 32 < len - l0;
        const double scale = point_in ? point_scale[l0 + tid % 32] : 0.0;
#pragma unroll
        for (int i = 0; i < kFactorLoads; ++i) {
          factors[(tid / 32 + 8 * i) * kWeightsFactorStride + tid % 32] = static_cast<double>(factor_raw[i]) * scale;
        }
#pragma unroll
        for (int i = 0; i < kValueLoads; ++i) {
          const int idx = tid + i * kThreads, l = idx / kValueUnits, c = idx % kValueUnits * kValueWidth;
          if (idx >= kWeightsSub * kValueUnits) break;
          const bool in = l < len - l0;
          double v[kValueWidth];
          if constexpr (kVectorValues) {
            unpack_piece<scalar_t>(value_raw[i], v);
          } else {
            v[0] = static_cast<double>(to_acc(value_raw[i]));
          }
#pragma unroll
          for (int w = 0; w < kValueWidth; ++w) {
            const int64_t col = c0 + c + w;  // past D: the ones column, then zeros
            vals[l * kWeightsValueStride + c + w] = !in || col > p.dv ? 0.0 : (col == p.dv ? 1.0 : v[w]);
          }
        }
      };
      double acc[kRowTiles][kColTiles][4] = {};
      load_piece(0);
      for (int l0 = 0; l0 < len; l0 += kWeightsSub) {
        __syncthreads();  // point_scale is written; the previous piece is consumed
        store_piece(l0);
        __syncthreads();
        if (l0 + kWeightsSub < len) load_piece(l0 + kWeightsSub);
#pragma unroll 1
        for (int kk = 0; kk < kWeightsSub; kk += kK) {
          double a[kRowTiles][4], bv[kColTiles][2];
#pragma unroll
          for (int u = 0; u < kRowTiles; ++u) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int row = (wm + 4 * u) * kTileRows + quad_row + 8 * (i % 2), col = kk + quad_col + 4 * (i / 2);
              a[u][i] = factors[row * kWeightsFactorStride + col];
            }
          }
#pragma unroll
          for (int v = 0; v < kColTiles; ++v) {
            const int tile = wn + 2 * v < 9 ? wn + 2 * v : 8;  // wn = 1 has 4 tiles
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              bv[v][i] = vals[(kk + quad_col + 4 * i) * kWeightsValueStride + tile * 8 + quad_row];
            }
          }
#pragma unroll
          for (int u = 0; u < kRowTiles; ++u) {
            if (wm + 4 * u >= row_tiles) continue;  // warp-uniform
#pragma unroll
            for (int v = 0; v < kColTiles; ++v) {
              if (wn + 2 * v >= col_tiles) continue;
              dmma_m16n8k8(acc[u][v], a[u], bv[v]);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kRowTiles; ++u) {
#pragma unroll
        for (int v = 0; v < kColTiles; ++v) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int64_t j = j0 + (wm + 4 * u) * kTileRows + quad_row + 8 * (i / 2);
            const int64_t col = c0 + (wn + 2 * v) * 8 + 2 * quad_col + i % 2;
            if (wn + 2 * v < 9 && j < k && col < cols) out[j * cols + col] = acc[u][v][i];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Finalize: the coreset
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename T>
struct FinalizeParams {
  const scalar_t* values;     // (G, N, D)
  const double* partial;
  const double* kinv;
  const double* sq_norm;
  const double* max_sq_norm;
  const int64_t* pivots;
  const int32_t* counts;
  const T* value_min;         // (G, D)
  const T* value_max;
  const int64_t* lengths;     // (G) keys per group, or null: N
  bool center_values;
  int64_t n, dv, rank, num_bins, kept, slots_max, length_max, chunk, chunks_max;
  int64_t tile_cols;          // value columns per CTA (finalize_tile_cols)
  double* rhs;                // (G*C, column tiles, slots_max, tile_cols + 1) workspace
  double* scaled;             // (G, kept, D + 1): values | weight of each slot, up to
  double* log_scale;          // (G, kept): ... the factor e^{log_scale} (write_group_kernel)
  unsigned long long* group_top;  // (G): the group's largest log|entry| + log_scale, as ordered_bits
  int64_t* core_indices;      // (G, kept)
};

// grid (G*C, column tiles of p.tile_cols): each CTA sums the chunks of its columns (and of the
// weights' column, which value centring subtracts) and multiplies them by G_SS^-1. The chunk sums
// are loads from HBM, latency-bound with one CTA per bin where bins are few: 0.61 ms at bins = 1,
// N = 65,536 with all columns in one CTA, 0.19 ms with 8 (benchmarks/NOTES.md). Where bins fill the
// GPU, one CTA per bin takes all columns (8 columns took 14 -> 51 us at bins = 16).
__host__ __device__ inline int64_t finalize_tile_cols(int64_t bins_total, int64_t cols, int64_t sms) {
  return bins_total >= 2 * sms ? cols : (cols < 8 ? cols : 8);
}

// 1,024 threads per SM, four CTAs of 256 (64 registers, a few bytes spilled): at 80 registers three fit, and
// 2,048 bins (32 groups of 64) took more than five waves (benchmarks/NOTES.md, session 14).
template <typename scalar_t, typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads) finalize_kernel(FinalizeParams<scalar_t, T> p) {
  const int64_t gb = blockIdx.x;
  const int64_t g = gb / p.num_bins, b = gb % p.num_bins;
  const int64_t valid = group_length(p.lengths, g, p.n);
  const int64_t length = balanced_size(valid, p.num_bins, b);
  const int64_t slots = balanced_size(p.rank, p.num_bins, b);
  const int64_t start = balanced_start(valid, p.num_bins, b);
  const int64_t first_slot = balanced_start(p.kept, p.num_bins, b);
  const int64_t dv = p.dv, cols = dv + 1;
  double* scaled = p.scaled + (g * p.kept + first_slot) * cols;
  double* log_scale = p.log_scale + g * p.kept + first_slot;
  int64_t* core_indices = p.core_indices + g * p.kept + first_slot;
  const T* vmin = p.value_min + g * dv;
  const T* vmax = p.value_max + g * dv;
  const int64_t tile = blockIdx.y, tile_cols = p.tile_cols, c_begin = tile * tile_cols;
  // This CTA's share of the group's overflow guard (write_group_kernel): the largest
  // log|entry| + log_scale over the entries it writes, raised into the group's maximum.
  __shared__ double scratch[kThreads / 32 + 1];
  const auto raise_top = [&](double largest) {
    if (threadIdx.x == 0 && largest > -INFINITY) atomicMax(p.group_top + g, ordered_bits(largest));
  };
  if (length <= slots) {  // exact bin: V̂ = V (- v_c), w = 1; the first tile writes it all
    if (tile != 0) return;
    const scalar_t* values = p.values + (g * p.n + start) * dv;
    double largest = length > 0 ? 1.0 : 0.0;  // the weights; every log_scale here is 0
    for (int64_t o = threadIdx.x; o < length * dv; o += kThreads) {
      const int64_t l = o / dv, c = o % dv;
      const T offset = p.center_values ? (vmin[c] + vmax[c]) / T(2) : T(0);
      const double x = static_cast<double>(static_cast<T>(to_acc(values[o])) - offset);
      scaled[l * cols + c] = x;
      largest = fabs(x) > largest ? fabs(x) : largest;
    }
    largest = block_max<kThreads>(largest, scratch);  // one logarithm: log is monotonic
    raise_top(largest > 0 ? log(largest) : -INFINITY);
    for (int64_t l = threadIdx.x; l < length; l += kThreads) {
      scaled[l * cols + dv] = 1.0;
      core_indices[l] = start + l;
    }
    // Slots the bin cannot fill (a group shorter than N) get zero weight and value and the index
    // of a kept key, so that their logit never exceeds those of the real entries.
    const int64_t room = balanced_size(p.kept, p.num_bins, b);
    for (int64_t o = length * cols + threadIdx.x; o < room * cols; o += kThreads) scaled[o] = 0.0;
    for (int64_t l = threadIdx.x; l < room; l += kThreads) {
      log_scale[l] = 0.0;
      if (l >= length) core_indices[l] = length > 0 ? start : 0;
    }
    return;
  }
  const int64_t k = p.counts[gb];
  const int64_t chunks = (length + p.chunk - 1) / p.chunk;
  const int64_t c_count = cols - c_begin < tile_cols ? cols - c_begin : tile_cols;
  const int64_t rhs_cols = tile_cols + 1;  // the tile's columns, then the weights' column
  double* rhs = p.rhs + (gb * gridDim.y + tile) * p.slots_max * rhs_cols;
  const double* partial = p.partial + gb * p.chunks_max * p.slots_max * cols;
  const int64_t chunk_stride = p.slots_max * cols;
  for (int64_t o = threadIdx.x; o < k * rhs_cols; o += kThreads) {
    const int64_t j = o / rhs_cols, cc = o % rhs_cols;
    if (cc < tile_cols ? cc >= c_count : !p.center_values) continue;
    const double* src = partial + j * cols + (cc < tile_cols ? c_begin + cc : dv);
    double sum = 0;
#pragma unroll 8
    for (int64_t ch = 0; ch < chunks; ++ch) sum += src[ch * chunk_stride];
    rhs[o] = sum;
  }
  __syncthreads();
  const double* kinv = p.kinv + gb * p.slots_max * p.slots_max;
  const int64_t* pivots = p.pivots + gb * p.slots_max;
  const double s_ref = p.max_sq_norm[gb];
  double magnitude = -INFINITY;
  for (int64_t o = threadIdx.x; o < slots * c_count; o += kThreads) {
    const int64_t a = o / c_count, cc = o % c_count, col = c_begin + cc;
    const double slot_log_scale = a < k ? (s_ref - p.sq_norm[gb * p.length_max + pivots[a]]) / 2 : 0.0;
    double acc = 0;
    if (a < k) {
      if (p.center_values && col < dv) {
        const double offset = (static_cast<double>(vmin[col]) + vmax[col]) / 2;
        for (int64_t j = 0; j < k; ++j) {
          acc += kinv[a * p.slots_max + j] *
                 (rhs[j * rhs_cols + cc] - offset * rhs[j * rhs_cols + tile_cols]);
        }
      } else {
        for (int64_t j = 0; j < k; ++j) acc += kinv[a * p.slots_max + j] * rhs[j * rhs_cols + cc];
      }
    }
    scaled[a * cols + col] = acc;  // 0 after an early stop
    if (acc != 0) {  // as the CPU's write_group: per entry, so the group's largest is the same
      const double m = log(fabs(acc)) + slot_log_scale;
      magnitude = m > magnitude ? m : magnitude;
    }
    if (col == dv) {
      log_scale[a] = slot_log_scale;
      core_indices[a] = start + pivots[a];
    }
  }
  magnitude = block_max<kThreads>(magnitude, scratch);
  raise_top(magnitude);
}

// ---------------------------------------------------------------------------------------------
// 5. The group's outputs: §2.8's overflow guard
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename T>
struct WriteGroupParams {
  const double* scaled;       // (G, kept, D + 1)
  const double* log_scale;    // (G, kept)
  const unsigned long long* group_top;  // (G): finalize_kernel's largest magnitude, as ordered_bits
  const scalar_t* keys;       // (G, N, E)
  const int64_t* core_indices;  // (G, kept)
  int64_t n, e, kept, dv;
  T* core_values;             // (G, kept, D)
  T* core_weights;            // (G, kept)
  scalar_t* core_keys;        // (G, kept, E)
};

constexpr int64_t kWriteSlots = 16;  // slots per CTA step of write_group_kernel

// grid (G, up to 65,535 CTAs that step over the chunks of kWriteSlots slots): slot i's values and
// weight are scaled[i] e^{log_scale[i]}, and that factor e^{(s_ref - s_p)/2} overflows float32 once
// β R_q R_k is in the hundreds. A factor common to all of a group's values and weights cancels in
// the estimator, so the group is shifted down by e^{-shift} just enough that its largest entry,
// summed over the group's slots, stays in T's range; groups that need no shift get the plain
// products (the CPU's write_group). finalize_kernel's CTAs leave the group's largest entry in one
// word, so every chunk finds the same shift; each CTA also copies its slots' keys (the core keys).
template <typename scalar_t, typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) write_group_kernel(WriteGroupParams<scalar_t, T> p) {
  __shared__ double factors[kWriteSlots], exponents[kWriteSlots];
  const int64_t g = blockIdx.x, cols = p.dv + 1;
  const unsigned long long top_bits = p.group_top[g];
  const double top = top_bits == 0 ? -INFINITY : from_ordered_bits(top_bits);  // 0: every entry is zero
  const double limit = log(static_cast<double>(sizeof(T) == 4 ? FLT_MAX : DBL_MAX)) - log(2.0 * p.kept);
  const double shift = top > limit ? top - limit : 0.0;
  const int64_t chunks = (p.kept + kWriteSlots - 1) / kWriteSlots;
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t first = chunk * kWriteSlots;
    const int64_t count = p.kept - first < kWriteSlots ? p.kept - first : kWriteSlots;
    const double* log_scale = p.log_scale + g * p.kept + first;
    __syncthreads();  // the previous chunk's factors are consumed
    for (int64_t i = threadIdx.x; i < count; i += kThreads) {  // one exponential per slot
      exponents[i] = log_scale[i] - shift;
      factors[i] = exp(exponents[i]);
    }
    __syncthreads();
    const double* scaled = p.scaled + (g * p.kept + first) * cols;
    for (int64_t o = threadIdx.x; o < count * cols; o += kThreads) {
      const int64_t i = o / cols, c = o % cols;
      const T y = static_cast<T>(scaled_product(scaled[o], exponents[i], factors[i]));
      if (c < p.dv) {
        p.core_values[(g * p.kept + first + i) * p.dv + c] = y;
      } else {
        p.core_weights[g * p.kept + first + i] = y;
      }
    }
    const int64_t* indices = p.core_indices + g * p.kept + first;
    for (int64_t o = threadIdx.x; o < count * p.e; o += kThreads) {
      const int64_t i = o / p.e, c = o % p.e;
      p.core_keys[(g * p.kept + first + i) * p.e + c] = p.keys[(g * p.n + indices[i]) * p.e + c];
    }
  }
}

}  // namespace kernels
}  // namespace wildcat

// CUDA kernels of coreset_attention (ALGORITHM.md §3), torch-free.
//
// Ô(q) = Σ_s e^{z_s} V̂_s / Σ_s e^{z_s} w_s, z_s = β q·k_s, clamped to [v_min, v_max]. Query head h
// reads kv head h / (Hq / Hkv): grouped-query attention by index arithmetic.
//
// Two kernels:
//  - coreset_attention_simt: any dtype (float64 too), E, D <= 256, any r; accumulation in T
//    (the glue picks double for float32/float64 inputs where shared memory allows). One warp per
//    query at a time, coreset staged in chunks.
//  - coreset_attention_mma: bfloat16 (float16 compiles too; the glue routes it to the general
//    kernel, see there) with E = D in {64, 128} and the coreset resident in
//    shared memory (r up to 512 at 64). Tensor cores for both products: Q Kᵀ on the exact
//    16-bit inputs, P V̂ on float16 P and V̂ (mma m16n8k16, float accumulation). V̂ is float32
//    with signed, possibly large entries, so each of its columns is scaled by a power of two
//    that puts its largest magnitude in [2^14, 2^15) before the float16 rounding, and the
//    epilogue divides the scale out exactly: the rounding is then relative, 2^-11, as TF32's.
//    The weights ride along as one more column of V̂, so Σ P w comes out of the same mma.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "common.h"
#include "device_helpers.cuh"

namespace wildcat {
namespace kernels {

constexpr double kDenominatorFloor = 1e-20;

template <typename scalar_t, typename T>
struct AttentionParams {
  const scalar_t* query;   // (B, Hq, M, E)
  const scalar_t* keys;    // (B, Hkv, r, E)
  const T* values;         // (B, Hkv, r, D)
  const T* weights;        // (B, Hkv, r)
  const T* value_min;      // (B, Hkv, D) or null
  const T* value_max;      // (B, Hkv, D) or null
  bool center_values;
  double beta;
  int64_t q_heads, kv_heads, m, r, e, dv;
  int64_t batch_heads;     // mma kernel: B * Hq, the heads whose query tiles the CTAs share
  int query_stages;        // mma kernel: per-warp query buffers (2: the next block loads during this one)
  int staging_units;       // mma kernel: tiles a head's coreset staging counts for in the shares (mma_shares)
  scalar_t* out;           // (B, Hq, M, D)
};

template <typename T>
__device__ __forceinline__ T load_acc(T v) {
  return v;
}
__device__ __forceinline__ float load_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float load_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t, typename T>
__device__ __forceinline__ scalar_t store_as(T v) {
  return static_cast<scalar_t>(v);
}
template <>
__device__ __forceinline__ __half store_as<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// The epilogue shared by both kernels: division, value offset and clamp.
template <typename T>
__device__ __forceinline__ T finish(T numerator, T denominator, const T* vmin, const T* vmax,
                                    bool center_values, int64_t c) {
  T y = denominator > T(kDenominatorFloor) ? numerator / denominator : T(0);
  if (center_values) y += (vmin[c] + vmax[c]) / T(2);
  if (vmin != nullptr) y = y < vmin[c] ? vmin[c] : y;
  if (vmax != nullptr) y = y > vmax[c] ? vmax[c] : y;
  return y;
}

// ---------------------------------------------------------------------------------------------
// SIMT kernel
// ---------------------------------------------------------------------------------------------

constexpr int kSimtWarps = 8;
constexpr int kSimtQueriesPerWarp = 8;
constexpr int kSimtChunk = 64;
constexpr int kSimtMaxDim = 256;

template <typename T>
__host__ __device__ inline size_t simt_smem_bytes(int64_t e, int64_t dv) {
  return sizeof(T) * (kSimtChunk * (e + 1) + kSimtChunk * dv + kSimtChunk +
                      kSimtWarps * kSimtQueriesPerWarp * e);
}

// grid (B * Hq, ceil(M / 64)), block 256: each warp owns 8 queries, lanes split the keys of a
// chunk for the logits and the value columns for the sums.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) coreset_attention_simt(AttentionParams<scalar_t, T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* keys_s = reinterpret_cast<T*>(smem_raw);             // chunk × (E + 1): padded rows
  T* values_s = keys_s + kSimtChunk * (p.e + 1);          // chunk × D
  T* weights_s = values_s + kSimtChunk * p.dv;            // chunk
  T* queries_s = weights_s + kSimtChunk;                  // (warps × queries) × E
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x;
  const int64_t batch = bh / p.q_heads, head = bh % p.q_heads;
  const int64_t kvh = batch * p.kv_heads + head / (p.q_heads / p.kv_heads);
  const int64_t q_first = blockIdx.y * (kSimtWarps * kSimtQueriesPerWarp);
  const scalar_t* keys = p.keys + kvh * p.r * p.e;
  const T* values = p.values + kvh * p.r * p.dv;
  const T* weights = p.weights + kvh * p.r;
  const T* vmin = p.value_min ? p.value_min + kvh * p.dv : nullptr;
  const T* vmax = p.value_max ? p.value_max + kvh * p.dv : nullptr;
  constexpr int kCols = kSimtMaxDim / 32;

  for (int64_t i = threadIdx.x; i < kSimtWarps * kSimtQueriesPerWarp * p.e; i += blockDim.x) {
    const int64_t row = q_first + i / p.e;
    queries_s[i] = row < p.m ? static_cast<T>(load_acc(p.query[(bh * p.m + row) * p.e + i % p.e])) : T(0);
  }
  T running_max[kSimtQueriesPerWarp], denominator[kSimtQueriesPerWarp];
  T numerator[kSimtQueriesPerWarp][kCols];
#pragma unroll
  for (int q = 0; q < kSimtQueriesPerWarp; ++q) {
    running_max[q] = -INFINITY;
    denominator[q] = 0;
#pragma unroll
    for (int t = 0; t < kCols; ++t) numerator[q][t] = 0;
  }

  for (int64_t s0 = 0; s0 < p.r; s0 += kSimtChunk) {
    const int64_t len = p.r - s0 < kSimtChunk ? p.r - s0 : kSimtChunk;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < len * p.e; i += blockDim.x) {
      keys_s[(i / p.e) * (p.e + 1) + i % p.e] = static_cast<T>(load_acc(keys[s0 * p.e + i]));
    }
    for (int64_t i = threadIdx.x; i < len * p.dv; i += blockDim.x) values_s[i] = values[s0 * p.dv + i];
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) weights_s[i] = weights[s0 + i];
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kSimtQueriesPerWarp; ++q) {
      const T* qv = queries_s + (warp * kSimtQueriesPerWarp + q) * p.e;
      T z[kSimtChunk / 32];
      T chunk_max = -INFINITY;
#pragma unroll
      for (int t = 0; t < kSimtChunk / 32; ++t) {
        const int64_t s = lane + 32 * t;
        T acc = 0;
        if (s < len) {
          for (int64_t c = 0; c < p.e; ++c) acc += qv[c] * keys_s[s * (p.e + 1) + c];
          acc *= static_cast<T>(p.beta);
        }
        z[t] = s < len ? acc : T(-INFINITY);
        chunk_max = z[t] > chunk_max ? z[t] : chunk_max;
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(0xffffffffu, chunk_max, offset);
        chunk_max = other > chunk_max ? other : chunk_max;
      }
      const T new_max = chunk_max > running_max[q] ? chunk_max : running_max[q];
      const T correction = exp(running_max[q] - new_max);  // exp(-inf) = 0 on the first chunk
      running_max[q] = new_max;
      T den = 0;
#pragma unroll
      for (int t = 0; t < kSimtChunk / 32; ++t) {
        const int64_t s = lane + 32 * t;
        z[t] = s < len ? exp(z[t] - new_max) : T(0);
        den += s < len ? z[t] * weights_s[s] : T(0);
      }
      for (int offset = 16; offset > 0; offset >>= 1) den += __shfl_xor_sync(0xffffffffu, den, offset);
      denominator[q] = denominator[q] * correction + den;
#pragma unroll
      for (int t = 0; t < kCols; ++t) numerator[q][t] *= correction;
#pragma unroll
      for (int half = 0; half < kSimtChunk / 32; ++half) {  // z[half] is held by lane s % 32
        for (int j = 0; j < 32; ++j) {
          const int64_t s = 32 * half + j;
          const T prob = __shfl_sync(0xffffffffu, z[half], j);
          if (s >= len) break;  // uniform across the warp
#pragma unroll
          for (int t = 0; t < kCols; ++t) {
            const int64_t c = lane + 32 * t;
            if (c < p.dv) numerator[q][t] += prob * values_s[s * p.dv + c];
          }
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kSimtQueriesPerWarp; ++q) {
    const int64_t row = q_first + warp * kSimtQueriesPerWarp + q;
    if (row >= p.m) continue;
#pragma unroll
    for (int t = 0; t < kCols; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < p.dv) {
        const T y = finish(numerator[q][t], denominator[q], vmin, vmax, p.center_values, c);
        p.out[(bh * p.m + row) * p.dv + c] = store_as<scalar_t>(y);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------------------------

constexpr float kRescaleSlack = 8.0f;  // log2 units the running maximum may lag behind a row's logits
constexpr int kMmaQueryPad = 8;  // 16-bit elements of padding per query row: ldmatrix without bank conflicts
constexpr int kMmaKeyPad = 32;   // per key row: each row's 16-byte loads start 64 bytes (mod 128) after the last's

// Keys per online-softmax step: 32 at D = 64, where 64 keys measured 3% slower when two CTAs of 128
// registers shared an SM (not measured again with two row tiles at 168 registers, where 64 keys
// would hold 64 logits per thread); 64 at D = 128 (3% faster than 32).
template <int kDim>
constexpr int mma_chunk() {
  return kDim == 64 ? 32 : 64;
}

// 16-row tiles of queries per warp. At D = 64 a warp takes 32 rows, so that every B fragment of
// the keys and of V̂ it loads from shared memory serves two mma: with 16 rows per warp the kernel
// was bound by those loads (shared-memory wavefronts 80% of the cycles, benchmarks/NOTES.md). At
// D = 128 the accumulators of two tiles would not fit in registers.
template <int kDim>
constexpr int mma_row_tiles() {
  return kDim == 64 ? 2 : 1;
}

// Warps of a CTA, one CTA per SM. At D = 64 the 32-row blocks fit the 168 registers that 12 warps
// allow, 384 rows per SM; 8 warps (256 rows) measured 5-8% slower, also with the next chunk's
// Q Kᵀ issued beside this chunk's P V̂ (benchmarks/NOTES.md).
template <int kDim>
constexpr int mma_warps() {
  return kDim == 64 ? 12 : 8;
}

// Query rows per tile of a CTA (all its warps).
template <int kDim>
constexpr int mma_tile_rows() {
  return 16 * mma_row_tiles<kDim>() * mma_warps<kDim>();
}

template <int kDim>
__host__ __device__ inline int64_t mma_padded_rank(int64_t r) {
  return (r + mma_chunk<kDim>() - 1) / mma_chunk<kDim>() * mma_chunk<kDim>();
}

// The coreset (keys, in the fragment order below; float16 values with the weights as column D and
// zeros up to D + 8, whose 16-byte row stride is odd, so ldmatrix is free of bank conflicts;
// per-column scale factors and their inverses; bounds), then `stages` buffers per warp of its
// 16 mma_row_tiles query rows, which also stage the warp's output block.
template <int kDim>
__host__ __device__ inline size_t mma_smem_bytes(int64_t r, int stages) {
  const int64_t rp = mma_padded_rank<kDim>(r);
  return rp * (kDim + kMmaKeyPad) * 2 + rp * (kDim + 8) * 2 + 2 * (kDim + 8) * 4 + 2 * kDim * 4 +
         static_cast<size_t>(mma_tile_rows<kDim>()) * stages * (kDim + kMmaQueryPad) * 2;
}

// Where key column c goes within its row: in each block of 32 columns (two k-steps of 16), the
// four 32-bit B-fragment words a lane `quad` needs (columns 2 quad, 2 quad + 1 and 2 quad + 8,
// 2 quad + 9 of each step) lie side by side, so one 16-byte load gives both steps' b0 and b1.
__host__ __device__ inline int mma_key_position(int c) {
  const int step = c % 32 / 16, high = c % 16 / 8, quad = c % 8 / 2;
  return c / 32 * 32 + quad * 8 + step * 4 + high * 2 + c % 2;
}

template <typename scalar_t>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                           uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two 16-bit values as one 32-bit word, the first in the low half (memory order).
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack_pair(scalar_t low, scalar_t high) {
  static_assert(sizeof(scalar_t) == 2, "16-bit values");
  uint16_t a, b;
  memcpy(&a, &low, 2);
  memcpy(&b, &high, 2);
  return static_cast<uint32_t>(a) | static_cast<uint32_t>(b) << 16;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], unsigned shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared));
}

__device__ __forceinline__ uint4 load_shared_16(unsigned shared) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(shared));
  return v;
}

// The B fragments of m16n8k16 from a row-major (k, n) tile: x4 gives two 8-column tiles (matrices
// 0, 1: keys 0..7, 8..15 of the first; 2, 3: of the second), x2 one.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], unsigned shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], unsigned shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared));
}

// Two floats as a float16 pair (round to nearest), the first in the low half: an A fragment word.
__device__ __forceinline__ uint32_t half_pair(float low, float high) {
  const __half2 h = __floats2half2_rn(low, high);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}

// The power of two 2^k that scales a column whose largest magnitude is `peak` into [2^14, 2^15)
// (float16's top binade, no overflow); 1 for a zero or non-finite column. k stays within
// [-126, 126] so that 2^k and 2^-k are normal floats.
__device__ __forceinline__ int half_scale_exponent(float peak) {
  if (!(peak > 0.0f) || !isfinite(peak)) return 0;
  int e;
  frexpf(peak, &e);  // peak = m 2^e, m in [0.5, 1)
  const int k = 15 - e;
  return k < -126 ? -126 : (k > 126 ? 126 : k);
}

// 2^x in one MUFU instruction: results below 2^-126 flush to zero, which probabilities of at
// most 1 can afford (exp2f adds a range fix-up around the same instruction).
__device__ __forceinline__ float exp2_flush(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Clamps that keep a NaN a NaN (fmaxf / fminf would return the bound).
__device__ __forceinline__ float max_keep_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}
__device__ __forceinline__ float min_keep_nan(float a, float b) {
  float y;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

// The coreset's place at the start of the tensor-core kernel's shared memory (mma_smem_bytes): keys
// in fragment order, float16 V̂ with the weights' column and the zero columns, the columns' scales
// and inverse scales, the bounds; the query buffers follow at end().
template <typename scalar_t, int kDim>
struct MmaCoresetSmem {
  scalar_t* keys;
  __half* values;
  float *scale, *unscale, *vmin, *vmax;
  __device__ MmaCoresetSmem(unsigned char* base, int rp)
      : keys(reinterpret_cast<scalar_t*>(base)),
        values(reinterpret_cast<__half*>(keys + rp * (kDim + kMmaKeyPad))),
        scale(reinterpret_cast<float*>(values + rp * (kDim + 8))),
        unscale(scale + kDim + 8),
        vmin(unscale + kDim + 8),
        vmax(vmin + kDim) {}
  __device__ unsigned char* end() const { return reinterpret_cast<unsigned char*>(vmax + kDim); }
};

// Stages one kv head's coreset in the shared-memory layout of coreset_attention_mma (keys in
// fragment order, float16 V̂ with the weights' column, the columns' scales, the bounds) and ends
// with a barrier. Kept out of line: with the staging's registers in the kernel's one allocation,
// the tile loop's code came out 8% slower at N = 262,144 (benchmarks/NOTES.md).
template <typename scalar_t, int kDim, int kThreads>
__device__ __noinline__ void stage_coreset(const scalar_t* keys, const float* values, const float* weights,
                                           const float* value_min, const float* value_max, int r, int rp,
                                           unsigned char* smem_raw) {
  constexpr int kKeyStride = kDim + kMmaKeyPad;
  constexpr int kValueCols = kDim + 8;
  constexpr int kPieces = kDim * 2 / 16;
  constexpr int kBatch = 8;
  const MmaCoresetSmem<scalar_t, kDim> core(smem_raw, rp);
  scalar_t* keys_s = core.keys;
  __half* values_s = core.values;
  float *scale_s = core.scale, *unscale_s = core.unscale, *vmin_s = core.vmin, *vmax_s = core.vmax;
  // Stage the coreset (padding slots: zero key, value and weight; masked from the softmax): a
  // fixed cost per segment. Each thread owns one value column. First the largest magnitude of each
  // value column and of the weights (non-negative floats order as their bit patterns; a NaN wins,
  // which leaves the column unscaled), then the float16 columns scaled by their powers of two.
  // Every global load goes out before the first is used: the thread's first kValueRows rows of its
  // column stay in registers for both passes, and its first kKeyBatch key pieces, its weight and
  // bound load beside them, so that the staging waits about one round trip to L2 (in separate
  // passes it took about 9 µs, more than a tile of queries; benchmarks/NOTES.md). The registers
  // hold r = 128; larger coresets read their further rows and pieces in the loops after.
  constexpr int kRowsPerPass = kThreads / kDim;  // rows of the values covered by one pass of the block
  constexpr int kValueRows = (128 + kRowsPerPass - 1) / kRowsPerPass;
  constexpr int kKeyBatch = (128 * kPieces + kThreads - 1) / kThreads;
  const int col = threadIdx.x % kDim, row_first = threadIdx.x / kDim;
  unsigned* peak_s = reinterpret_cast<unsigned*>(unscale_s);
  for (int c = threadIdx.x; c < kValueCols; c += kThreads) peak_s[c] = 0u;
  uint4 key_piece[kKeyBatch];
#pragma unroll
  for (int j = 0; j < kKeyBatch; ++j) {
    const int piece = threadIdx.x + j * kThreads;
    key_piece[j] = piece < r * kPieces ? reinterpret_cast<const uint4*>(keys)[piece] : make_uint4(0u, 0u, 0u, 0u);
  }
  float x[kValueRows];
#pragma unroll
  for (int j = 0; j < kValueRows; ++j) {
    const int row = row_first + j * kRowsPerPass;
    x[j] = row < r ? values[row * kDim + col] : 0.0f;
  }
  const float weight = threadIdx.x < r ? weights[threadIdx.x] : 0.0f;
  float lo = -INFINITY, hi = INFINITY;
  if (threadIdx.x < kDim) {
    if (value_min) lo = value_min[threadIdx.x];
    if (value_max) hi = value_max[threadIdx.x];
  }
  __syncthreads();  // peak_s is zero
  float peak = 0.0f;
#pragma unroll
  for (int j = 0; j < kValueRows; ++j) peak = max_keep_nan(peak, fabsf(x[j]));
#pragma unroll 8
  for (int s = row_first + kValueRows * kRowsPerPass; s < r; s += kRowsPerPass) {
    peak = max_keep_nan(peak, fabsf(values[s * kDim + col]));
  }
  atomicMax(&peak_s[col], __float_as_uint(peak));
  float weight_peak = max_keep_nan(0.0f, fabsf(weight));
  for (int s = threadIdx.x + kThreads; s < r; s += kThreads) weight_peak = max_keep_nan(weight_peak, fabsf(weights[s]));
  atomicMax(&peak_s[kDim], __float_as_uint(weight_peak));
  // keys: 16-byte pieces (8 columns), each scattered as four 32-bit words to mma_key_position
  auto store_key_piece = [&](int piece, uint4 v) {
    uint32_t* row = reinterpret_cast<uint32_t*>(keys_s + piece / kPieces * kKeyStride);
    const int c = piece % kPieces * 8;
    row[mma_key_position(c) / 2] = v.x;
    row[mma_key_position(c + 2) / 2] = v.y;
    row[mma_key_position(c + 4) / 2] = v.z;
    row[mma_key_position(c + 6) / 2] = v.w;
  };
#pragma unroll
  for (int j = 0; j < kKeyBatch; ++j) {
    const int piece = threadIdx.x + j * kThreads;
    if (piece < rp * kPieces) store_key_piece(piece, key_piece[j]);
  }
  for (int t = threadIdx.x + kKeyBatch * kThreads; t < rp * kPieces; t += kThreads * kBatch) {
    uint4 more[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int piece = t + j * kThreads;
      more[j] = piece < r * kPieces ? reinterpret_cast<const uint4*>(keys)[piece] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int piece = t + j * kThreads;
      if (piece < rp * kPieces) store_key_piece(piece, more[j]);
    }
  }
  if (threadIdx.x < kDim) {
    vmin_s[threadIdx.x] = lo;
    vmax_s[threadIdx.x] = hi;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < kValueCols; c += kThreads) {
    const int k = half_scale_exponent(__uint_as_float(peak_s[c]));  // read before unscale_s[c] replaces it
    scale_s[c] = ldexpf(1.0f, k);
    unscale_s[c] = ldexpf(1.0f, -k);
  }
  __syncthreads();
  const float column_scale = scale_s[col];
#pragma unroll
  for (int j = 0; j < kValueRows; ++j) {
    const int row = row_first + j * kRowsPerPass;
    if (row < rp) values_s[row * kValueCols + col] = __float2half_rn(x[j] * column_scale);
  }
#pragma unroll 8
  for (int s = row_first + kValueRows * kRowsPerPass; s < rp; s += kRowsPerPass) {
    values_s[s * kValueCols + col] = __float2half_rn((s < r ? values[s * kDim + col] : 0.0f) * column_scale);
  }
  for (int i = threadIdx.x; i < rp * 8; i += kThreads) {
    const int s = i / 8, c = kDim + i % 8;
    values_s[s * kValueCols + c] = __float2half_rn(c == kDim && s < r ? weights[s] * scale_s[kDim] : 0.0f);
  }
  __syncthreads();
}

// The CTAs' shares of the (head, query tile) items, heads major and contiguous, so that one wave of
// CTAs covers the launch whatever the head count: CTA b takes the items of the b-th of `ctas` equal
// parts of a line on which each head counts its tiles plus `staging_units` for the staging of its
// coreset. Each run of one head's tiles (a segment) stages that head's coreset, which costs about
// a tile, so with one staging unit a CTA whose share crosses into the next head gets about one tile
// less; with none the shares are equal item counts. item_at(u) is the first item at or after unit
// u of the line; share b is [item_at(b U / ctas), item_at((b + 1) U / ctas)), possibly empty.
struct MmaShares {
  int64_t heads, tiles, ctas, staging_units;
  __host__ __device__ int64_t item_at(int64_t unit) const {
    const int64_t head_units = tiles + staging_units, offset = unit % head_units;
    return unit / head_units * tiles + (offset > staging_units ? offset - staging_units : 0);
  }
  __host__ __device__ int64_t first(int64_t cta) const { return item_at(cta * heads * (tiles + staging_units) / ctas); }
  __host__ __device__ int64_t last(int64_t cta) const { return first(cta + 1); }
};

// grid (CTAs, one per SM), block 32 mma_warps (384 at D = 64, 256 at D = 128). The CTA stages the kv
// head's coreset in shared memory, then walks its query tiles of that head (and of the following
// heads, where its share of tiles reaches into them). Fragment layouts are those of the PTX ISA for
// mma.m16n8k16: lane = 4 * group + quad; a thread holds rows group and group + 8 and columns
// 2 * quad, 2 * quad + 1 of every 8-column tile.
// kCenter is p.center_values, a template parameter so that the common uncentred call issues no
// per-entry offset.
template <typename scalar_t, int kDim, bool kCenter>
__global__ void __launch_bounds__(mma_warps<kDim>() * 32, 1)
    coreset_attention_mma(AttentionParams<scalar_t, float> p) {
  constexpr int kQueryStride = kDim + kMmaQueryPad;  // 16-bit elements
  constexpr int kKeyStride = kDim + kMmaKeyPad;
  constexpr int kValueCols = kDim + 8;               // V̂, then the weights, then 7 zero columns
  constexpr int kSteps = kDim / 16;                  // k-steps of Q Kᵀ
  constexpr int kTiles = kDim / 8;                   // 8-column tiles of the output
  constexpr int kPieces = kDim * 2 / 16;             // 16-byte pieces of a row
  constexpr int kThreads = mma_warps<kDim>() * 32;
  constexpr int kMmaChunk = mma_chunk<kDim>();
  constexpr int kRowTiles = mma_row_tiles<kDim>();
  constexpr int kRows = 16 * kRowTiles;              // query rows of a warp's block
  constexpr int kTileRows = mma_tile_rows<kDim>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rp = static_cast<int>(mma_padded_rank<kDim>(p.r));
  const int r = static_cast<int>(p.r);
  const MmaCoresetSmem<scalar_t, kDim> core(smem_raw, rp);
  const scalar_t* keys_s = core.keys;
  const __half* values_s = core.values;
  const float* unscale_s = core.unscale;  // 2^-k of each column
  const float *vmin_s = core.vmin, *vmax_s = core.vmax;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  // this warp's query buffers: kRows rows of kQueryStride elements (the padding keeps ldmatrix and
  // the output block's 32-bit writes free of bank conflicts)
  scalar_t* rows_s = reinterpret_cast<scalar_t*>(core.end()) + warp * p.query_stages * kRows * kQueryStride;
  const unsigned rows_address = shared_address(rows_s);
  constexpr unsigned kBufferBytes = kRows * kQueryStride * 2;

  const int64_t tiles = (p.m + kTileRows - 1) / kTileRows;
  const MmaShares shares{p.batch_heads, tiles, gridDim.x, p.staging_units};
  const int64_t item_first = shares.first(blockIdx.x), item_last = shares.last(blockIdx.x);
  for (int64_t item = item_first; item < item_last;) {
    const int64_t bh = item / tiles;
    const int64_t tile_first = item % tiles;
    const int64_t tile_last = tile_first + (item_last - item) < tiles ? tile_first + (item_last - item) : tiles;
    item += tile_last - tile_first;
    __syncthreads();  // every warp is done with the previous segment's coreset
    const int64_t batch = bh / p.q_heads, head = bh % p.q_heads;
    const int64_t kvh = batch * p.kv_heads + head / (p.q_heads / p.kv_heads);
    // The warp's kRows rows of a tile: row0 + 0..kRows - 1. Lane l copies piece l % kPieces (16 bytes) of rows
    // row0 + l / kPieces + kRowStep i; the per-lane parts of the addresses are formed once here.
    constexpr int kRowStep = 32 / kPieces;
    const int lane_row = lane / kPieces, lane_part = lane % kPieces;
    const scalar_t* query_lane = p.query + (bh * p.m + lane_row) * kDim + lane_part * 8;
    scalar_t* out_lane = p.out + (bh * p.m + lane_row) * kDim + lane_part * 8;
    const unsigned buffer_lane = (lane_row * kQueryStride + lane_part * 8) * 2;  // bytes into a buffer
    auto block_row0 = [&](int64_t tile) { return tile * kTileRows + warp * kRows; };
    // A whole block copies from one base address with constant offsets and no tests (the tests and
    // 64-bit selects per piece cost about 100 instructions per block); only a block that reaches
    // past M tests each row.
    auto load_block = [&](int64_t tile, int buffer) {
      const int64_t row0 = block_row0(tile);
      const unsigned dst = rows_address + buffer * kBufferBytes + buffer_lane;
      if (row0 + kRows <= p.m) {
        const scalar_t* src = query_lane + row0 * kDim;
#pragma unroll
        for (int i = 0; i < kRows / kRowStep; ++i) {
          copy_async_16_or_zero(dst + kRowStep * i * kQueryStride * 2, src + kRowStep * i * kDim, true);
        }
      } else {
#pragma unroll
        for (int i = 0; i < kRows / kRowStep; ++i) {
          const int64_t row = row0 + kRowStep * i;
          const bool valid = row + lane_row < p.m;
          copy_async_16_or_zero(dst + kRowStep * i * kQueryStride * 2, valid ? query_lane + row * kDim : p.query,
                                valid);
        }
      }
      copy_async_commit();
    };
    // the first block's copies go out before the coreset is staged, which overlaps their latency
    if (tile_first < tile_last) load_block(tile_first, 0);

    stage_coreset<scalar_t, kDim, kThreads>(p.keys + kvh * p.r * kDim, p.values + kvh * p.r * kDim, p.weights + kvh * p.r,
                                            p.value_min ? p.value_min + kvh * kDim : nullptr,
                                            p.value_max ? p.value_max + kvh * kDim : nullptr, r, rp, smem_raw);
    // exp(β x) = exp2(x β log2 e); β > 0 (checked by the op), so the running maximum of the raw
    // logits is that of the scaled ones. A β below float range becomes the least normal float:
    // finite logits still give exp2(~0) = 1, and the padding's -inf gives 0 rather than NaN.
    const float scale_log2 = fmaxf(static_cast<float>(p.beta * 1.4426950408889634), FLT_MIN);
    const unsigned values_address = shared_address(values_s);
    // ldmatrix rows for V̂ (.trans): lane l addresses key 16 kk + l % 16 at columns 8 (t + l / 16)
    // (b0, b1 of tile t, then of tile t + 1)
    const unsigned value_lane = ((lane % 16) * kValueCols + 8 * (lane / 16)) * 2;
    // the B fragments of the keys: key 8 n + group, the words of this quad (mma_key_position)
    const unsigned keys_address = shared_address(keys_s);
    const unsigned key_lane = (group * kKeyStride + quad * 8) * 2;

    for (int64_t tile = tile_first; tile < tile_last; ++tile) {
      const int buffer = p.query_stages == 2 ? static_cast<int>((tile - tile_first) % 2) : 0;
      const bool prefetch = p.query_stages == 2 && tile + 1 < tile_last;
      if (prefetch) load_block(tile + 1, buffer ^ 1);  // in flight while this block computes
      if (prefetch) {
        copy_async_wait_group<1>();
      } else {
        copy_async_wait_group<0>();
      }
      __syncwarp();
      const unsigned block_address = rows_address + buffer * kBufferBytes;
      // Row tile rt of the block: rows 16 rt .. 16 rt + 15. Its fragments, logits, maxima and
      // accumulators carry rt as their first index; each B fragment serves every row tile.
      uint32_t qa[kRowTiles][kSteps][4];
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
        for (int k = 0; k < kSteps; ++k) {  // lane l addresses row l % 16, columns 16 k + 8 (l / 16)
          ldmatrix_x4(qa[rt][k],
                      block_address + ((16 * rt + lane % 16) * kQueryStride + 16 * k + 8 * (lane / 16)) * 2);
        }
      }
      float acc[kRowTiles][kTiles + 1][4];  // tile kTiles: column 0 is Σ P w
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
        for (int n = 0; n <= kTiles; ++n) acc[rt][n][0] = acc[rt][n][1] = acc[rt][n][2] = acc[rt][n][3] = 0.0f;
      }
      float row_max[kRowTiles][2];

      for (int s0 = 0; s0 < rp; s0 += kMmaChunk) {
        // The logits of the chunk, in tiles of 8 keys. One 16-byte load holds b0, b1 of two
        // k-steps. The loads are volatile, as the mma are, so they stay in this order: the next
        // tile's keys are in flight while this tile multiplies.
        float sc[kRowTiles][kMmaChunk / 8][4];
        const unsigned krow = keys_address + (s0 * kKeyStride) * 2 + key_lane;
        uint4 b[kSteps / 2], next[kSteps / 2];
#pragma unroll
        for (int k = 0; k < kSteps / 2; ++k) b[k] = load_shared_16(krow + k * 64);
#pragma unroll
        for (int n = 0; n < kMmaChunk / 8; ++n) {
          if (n + 1 < kMmaChunk / 8) {
#pragma unroll
            for (int k = 0; k < kSteps / 2; ++k) {
              next[k] = load_shared_16(krow + (8 * (n + 1) * kKeyStride) * 2 + k * 64);
            }
          }
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            sc[rt][n][0] = sc[rt][n][1] = sc[rt][n][2] = sc[rt][n][3] = 0.0f;
#pragma unroll
            for (int k = 0; k < kSteps; k += 2) {
              mma_16x8x16<scalar_t>(sc[rt][n], qa[rt][k], b[k / 2].x, b[k / 2].y);
              mma_16x8x16<scalar_t>(sc[rt][n], qa[rt][k + 1], b[k / 2].z, b[k / 2].w);
            }
          }
#pragma unroll
          for (int k = 0; k < kSteps / 2; ++k) b[k] = next[k];
        }
        // online softmax in base 2 on the raw logits (the scale is positive); padding slots, only
        // in a last partial chunk, get -inf
        if (s0 + kMmaChunk > r) {
          const int live = r - s0 - 2 * quad;  // this lane's slots 8 n + (v & 1) below it are real
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
            for (int n = 0; n < kMmaChunk / 8; ++n) {
#pragma unroll
              for (int v = 0; v < 4; ++v) sc[rt][n][v] = 8 * n + (v & 1) < live ? sc[rt][n][v] : -INFINITY;
            }
          }
        }
        float chunk_max[kRowTiles][2];
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          chunk_max[rt][0] = chunk_max[rt][1] = -INFINITY;
#pragma unroll
          for (int n = 0; n < kMmaChunk / 8; ++n) {
#pragma unroll
            for (int v = 0; v < 4; ++v) chunk_max[rt][v / 2] = fmaxf(chunk_max[rt][v / 2], sc[rt][n][v]);
          }
        }
        // The running maximum (scaled) moves on the first chunk and then only when some row of the
        // row tile exceeds it by more than kRescaleSlack: any offset gives the same quotient, and
        // P = 2^(x - max) ≤ 2^kRescaleSlack stays far inside float16, so most chunks skip the
        // rescaling of the accumulators. A lane's own logits decide whether its row moves (the row's
        // maximum exceeds the bound exactly when one of its lanes' does), so the shuffles that form
        // the row's maximum run only on the first chunk and on a move.
        // Each row tile decides on its own (one vote per 16 rows, as with one tile per warp).
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          float top[2];
          auto row_top = [&] {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float x = chunk_max[rt][h];
              x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
              x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
              top[h] = x * scale_log2;
            }
          };
          if (s0 == 0) {
            row_top();
            row_max[rt][0] = top[0];
            row_max[rt][1] = top[1];
          } else if (__any_sync(0xffffffffu, chunk_max[rt][0] * scale_log2 > row_max[rt][0] + kRescaleSlack ||
                                                 chunk_max[rt][1] * scale_log2 > row_max[rt][1] + kRescaleSlack)) {
            row_top();
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float new_max = fmaxf(row_max[rt][h], top[h]);
              const float correction = exp2_flush(row_max[rt][h] - new_max);
              row_max[rt][h] = new_max;
#pragma unroll
              for (int n = 0; n <= kTiles; ++n) {
                acc[rt][n][2 * h] *= correction;
                acc[rt][n][2 * h + 1] *= correction;
              }
            }
          }
        }
        // P in float16 as the A fragments of m16n8k16: the logits' accumulator tiles 2 kk and
        // 2 kk + 1 are exactly the fragment of the 16-key step kk (formed step by step, so that
        // the logits die as they are used)
        float neg_max[kRowTiles][2];  // the exponent's offsets
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) neg_max[rt][0] = -row_max[rt][0], neg_max[rt][1] = -row_max[rt][1];
#pragma unroll
        for (int kk = 0; kk < kMmaChunk / 16; ++kk) {
          uint32_t pa[kRowTiles][4];
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const float* t = sc[rt][2 * kk + half];
              pa[rt][2 * half] = half_pair(exp2_flush(fmaf(t[0], scale_log2, neg_max[rt][0])),
                                           exp2_flush(fmaf(t[1], scale_log2, neg_max[rt][0])));
              pa[rt][2 * half + 1] = half_pair(exp2_flush(fmaf(t[2], scale_log2, neg_max[rt][1])),
                                               exp2_flush(fmaf(t[3], scale_log2, neg_max[rt][1])));
            }
          }
          const unsigned vrow = values_address + ((s0 + 16 * kk) * kValueCols) * 2 + value_lane;
#pragma unroll
          for (int t = 0; t < kTiles; t += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vrow + 8 * t * 2);
#pragma unroll
            for (int rt = 0; rt < kRowTiles; ++rt) {
              mma_16x8x16<__half>(acc[rt][t], pa[rt], b[0], b[1]);
              mma_16x8x16<__half>(acc[rt][t + 1], pa[rt], b[2], b[3]);
            }
          }
          uint32_t b[2];  // the weights' tile (x2 reads the addresses of lanes 0..15)
          ldmatrix_x2_trans(b, vrow + 8 * kTiles * 2);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) mma_16x8x16<__half>(acc[rt][kTiles], pa[rt], b[0], b[1]);
        }
      }
      // The output block goes through this block's query buffer (its fragments are in registers):
      // 32-bit pairs in, then whole 16-byte pieces of each row out to global memory.
      __syncwarp();
      uint32_t* out_s = reinterpret_cast<uint32_t*>(rows_s + buffer * kRows * kQueryStride);
      // Σ P w of rows group and group + 8 of each row tile sits in column 0 of the weights' tile, at
      // quad 0. The epilogue of finish(), with one reciprocal per row instead of a division per
      // entry; each column's bounds and scale are read once for all row tiles.
      float inverse[kRowTiles][2];
      bool positive[kRowTiles][2];
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float den = __shfl_sync(0xffffffffu, acc[rt][kTiles][2 * h], lane & ~3) * unscale_s[kDim];
          positive[rt][h] = den > static_cast<float>(kDenominatorFloor);
          inverse[rt][h] = 1.0f / den;
        }
      }
#pragma unroll
      for (int d = 0; d < kTiles; ++d) {
        const int c = 8 * d + 2 * quad;
        const float2 lo = *reinterpret_cast<const float2*>(vmin_s + c);
        const float2 hi = *reinterpret_cast<const float2*>(vmax_s + c);
        const float2 u = *reinterpret_cast<const float2*>(unscale_s + c);
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float y0 = positive[rt][h] ? acc[rt][d][2 * h] * u.x * inverse[rt][h] : 0.0f;
            float y1 = positive[rt][h] ? acc[rt][d][2 * h + 1] * u.y * inverse[rt][h] : 0.0f;
            if (kCenter) {
              y0 += (lo.x + hi.x) / 2;
              y1 += (lo.y + hi.y) / 2;
            }
            y0 = min_keep_nan(max_keep_nan(y0, lo.x), hi.x);  // bounds absent: -inf and inf
            y1 = min_keep_nan(max_keep_nan(y1, lo.y), hi.y);
            out_s[((16 * rt + group + 8 * h) * kQueryStride + c) / 2] =
                pack_pair(store_as<scalar_t>(y0), store_as<scalar_t>(y1));
          }
        }
      }
      __syncwarp();
      const int64_t row0 = block_row0(tile);
      const unsigned char* piece_s = reinterpret_cast<const unsigned char*>(rows_s) + buffer * kBufferBytes + buffer_lane;
      scalar_t* dst = out_lane + row0 * kDim;
      const bool whole = row0 + kRows <= p.m;  // as for the copies in: one base, constant offsets
#pragma unroll
      for (int i = 0; i < kRows / kRowStep; ++i) {
        if (whole || row0 + kRowStep * i + lane_row < p.m) {
          *reinterpret_cast<uint4*>(dst + kRowStep * i * kDim) =
              *reinterpret_cast<const uint4*>(piece_s + kRowStep * i * kQueryStride * 2);
        }
      }
      __syncwarp();  // the buffer is free for the block after next (or, with one stage, the next)
      if (p.query_stages == 1 && tile + 1 < tile_last) load_block(tile + 1, 0);
    }
  }
}

}  // namespace kernels
}  // namespace wildcat

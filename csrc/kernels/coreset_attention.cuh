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
//    16-bit inputs (mma m16n8k16, float accumulation), P V̂ in TF32 (mma m16n8k8) because V̂ is
//    float32 with signed, possibly large entries; the denominator Σ P w stays in float32 FMAs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

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
  int64_t tiles_per_cta;   // mma kernel: query tiles of kMmaTileRows handled by one CTA
  int query_stages;        // mma kernel: per-warp query buffers (2: the next block loads during this one)
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

constexpr int kMmaWarps = 8;            // 16 query rows each
constexpr int kMmaTileRows = 16 * kMmaWarps;
constexpr int kMmaChunk = 64;           // keys per softmax step
constexpr int kMmaKeyPad = 8;           // 16-bit elements of padding per key row: no bank conflicts
constexpr int kMmaValuePad = 4;         // floats of padding per value row: no bank conflicts

__host__ __device__ inline int64_t mma_padded_rank(int64_t r) { return (r + kMmaChunk - 1) / kMmaChunk * kMmaChunk; }

// The coreset (keys, TF32 values, weights, bounds), then `stages` buffers per warp of its 16 query
// rows, which also stage the warp's output block.
template <int kDim>
__host__ __device__ inline size_t mma_smem_bytes(int64_t r, int stages) {
  const int64_t rp = mma_padded_rank(r);
  return rp * (kDim + kMmaKeyPad) * 2 + rp * (kDim + kMmaValuePad) * 4 + rp * 4 + 2 * kDim * 4 +
         static_cast<size_t>(kMmaWarps) * stages * 16 * (kDim + kMmaKeyPad) * 2;
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
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

__device__ __forceinline__ void mma_tf32_16x8x8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 bytes from global to shared memory, asynchronously; `valid` false writes zeros instead.
__device__ __forceinline__ void copy_async_16_or_zero(unsigned shared, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(global), "r"(valid ? 16 : 0));
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

// grid (B * Hq, ceil(tiles / tiles_per_cta)), block 256. The kv head's coreset is loaded into
// shared memory once, then the CTA walks its query tiles. Fragment layouts are those of the PTX
// ISA for mma.m16n8k16 / m16n8k8: lane = 4 * group + quad; a thread holds rows group and
// group + 8 and columns 2 * quad, 2 * quad + 1 of every 8-column tile.
// E = D = 64 fits two CTAs per SM in shared memory, and in registers (at most 128) too.
template <typename scalar_t, int kDim>
__global__ void __launch_bounds__(kMmaWarps * 32, kDim == 64 ? 2 : 1)
    coreset_attention_mma(AttentionParams<scalar_t, float> p) {
  constexpr int kKeyStride = kDim + kMmaKeyPad;      // 16-bit elements
  constexpr int kValueStride = kDim + kMmaValuePad;  // floats
  constexpr int kSteps = kDim / 16;                  // k-steps of Q Kᵀ
  constexpr int kTiles = kDim / 8;                   // 8-column tiles of the output
  constexpr int kPieces = kDim * 2 / 16;             // 16-byte pieces of a query or output row
  // ldmatrix for the keys and 16-byte value loads: fewer instructions but more registers. At
  // E = D = 64 they cost the second CTA per SM (measured slower: benchmarks/NOTES.md).
  constexpr bool kWideLoads = kDim == 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t rp = mma_padded_rank(p.r);
  scalar_t* keys_s = reinterpret_cast<scalar_t*>(smem_raw);
  float* values_s = reinterpret_cast<float*>(keys_s + rp * kKeyStride);  // TF32 bit patterns
  float* weights_s = values_s + rp * kValueStride;
  float* vmin_s = weights_s + rp;
  float* vmax_s = vmin_s + kDim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  // this warp's query buffers: 16 rows of kKeyStride elements (the padding keeps ldmatrix and the
  // output block's 32-bit writes free of bank conflicts)
  scalar_t* rows_s = reinterpret_cast<scalar_t*>(vmax_s + kDim) + warp * p.query_stages * 16 * kKeyStride;
  const unsigned rows_address = static_cast<unsigned>(__cvta_generic_to_shared(rows_s));
  constexpr unsigned kBufferBytes = 16 * kKeyStride * 2;

  const int64_t bh = blockIdx.x;
  const int64_t batch = bh / p.q_heads, head = bh % p.q_heads;
  const int64_t kvh = batch * p.kv_heads + head / (p.q_heads / p.kv_heads);
  const int64_t tiles = (p.m + kMmaTileRows - 1) / kMmaTileRows;
  const int64_t tile_first = blockIdx.y * p.tiles_per_cta;
  const int64_t tile_last = tile_first + p.tiles_per_cta < tiles ? tile_first + p.tiles_per_cta : tiles;
  // The warp's 16 rows of a tile: row0 + 0..15. Each lane copies kPieces / 2 pieces of 16 bytes.
  auto block_row0 = [&](int64_t tile) { return tile * kMmaTileRows + warp * 16; };
  auto load_block = [&](int64_t tile, int buffer) {
    const int64_t row0 = block_row0(tile);
    for (int piece = lane; piece < 16 * kPieces; piece += 32) {
      const int row = piece / kPieces, part = piece % kPieces;
      const bool valid = row0 + row < p.m;
      const scalar_t* src = p.query + (bh * p.m + (valid ? row0 + row : 0)) * kDim + part * 8;
      copy_async_16_or_zero(rows_address + buffer * kBufferBytes + (row * kKeyStride + part * 8) * 2, src, valid);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  // the first block's copies go out before the coreset is staged, which overlaps their latency
  if (tile_first < tile_last) load_block(tile_first, 0);

  // Stage the coreset (padding slots: zero key, value and weight; masked from the softmax). The
  // values are rounded to TF32 once here, not per use. With kWideLoads their columns are permuted
  // so that the B fragments a lane needs from one value row (column 8 d + group of every output
  // tile d) lie in whole 16-byte vectors: position (d / 4) · 32 + group · 4 + d % 4. With a row
  // stride of 4 (mod 32) floats, the 8 lanes of a quarter-warp (2 groups × 4 rows 2 quad) hit
  // distinct 16-byte bank groups.
  for (int64_t i = threadIdx.x; i < rp * kDim; i += blockDim.x) {
    const int64_t s = i / kDim, c = i % kDim;
    keys_s[s * kKeyStride + c] = s < p.r ? p.keys[(kvh * p.r + s) * kDim + c] : store_as<scalar_t>(0.0f);
    const int64_t d = c / 8, g = c % 8;  // column c = 8 d + g of the output tile d, lane group g
    values_s[s * kValueStride + (kWideLoads ? (d / 4) * 32 + g * 4 + d % 4 : c)] =
        __uint_as_float(to_tf32(s < p.r ? p.values[(kvh * p.r + s) * kDim + c] : 0.0f));
  }
  for (int64_t s = threadIdx.x; s < rp; s += blockDim.x) weights_s[s] = s < p.r ? p.weights[kvh * p.r + s] : 0.0f;
  for (int64_t c = threadIdx.x; c < kDim; c += blockDim.x) {
    vmin_s[c] = p.value_min ? p.value_min[kvh * kDim + c] : -INFINITY;
    vmax_s[c] = p.value_max ? p.value_max[kvh * kDim + c] : INFINITY;
  }
  __syncthreads();
  const float scale_log2 = static_cast<float>(p.beta * 1.4426950408889634);  // exp(x) = exp2(x log2 e)
  const unsigned keys_address = static_cast<unsigned>(__cvta_generic_to_shared(keys_s));

  for (int64_t tile = tile_first; tile < tile_last; ++tile) {
    const int buffer = p.query_stages == 2 ? static_cast<int>((tile - tile_first) % 2) : 0;
    const bool prefetch = p.query_stages == 2 && tile + 1 < tile_last;
    if (prefetch) load_block(tile + 1, buffer ^ 1);  // in flight while this block computes
    if (prefetch) {
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncwarp();
    const unsigned block_address = rows_address + buffer * kBufferBytes;
    uint32_t qa[kSteps][4];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {  // lane l addresses row l % 16, columns 16 k + 8 (l / 16)
      ldmatrix_x4(qa[k], block_address + ((lane % 16) * kKeyStride + 16 * k + 8 * (lane / 16)) * 2);
    }
    float acc[kTiles][4];
#pragma unroll
    for (int n = 0; n < kTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY}, den[2] = {0.0f, 0.0f};

    for (int64_t s0 = 0; s0 < rp; s0 += kMmaChunk) {
      float sc[kMmaChunk / 8][4];  // logits of 64 keys: 8 tiles of 8
#pragma unroll
      for (int n = 0; n < kMmaChunk / 8; ++n) {
        sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
        if constexpr (kWideLoads) {
          // B fragments of two k-steps per ldmatrix: keys s0 + 8 n + 0..7 (lane % 8), columns
          // 16 k + 8 (lane / 8): matrices b0, b1 of step k, then of step k + 1
          const unsigned krow = keys_address + ((s0 + 8 * n + lane % 8) * kKeyStride + 8 * (lane / 8)) * 2;
#pragma unroll
          for (int k = 0; k < kSteps; k += 2) {
            uint32_t b[4];
            ldmatrix_x4(b, krow + 16 * k * 2);
            mma_16x8x16<scalar_t>(sc[n], qa[k], b[0], b[1]);
            mma_16x8x16<scalar_t>(sc[n], qa[k + 1], b[2], b[3]);
          }
        } else {
          const scalar_t* krow = keys_s + (s0 + 8 * n + group) * kKeyStride + 2 * quad;
#pragma unroll
          for (int k = 0; k < kSteps; ++k) {
            const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + 16 * k);
            const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + 16 * k + 8);
            mma_16x8x16<scalar_t>(sc[n], qa[k], b0, b1);
          }
        }
      }
      // online softmax in base 2; padding slots get -inf
      float chunk_max[2] = {-INFINITY, -INFINITY};
      const int live = static_cast<int>(p.r - s0) - 2 * quad;  // this lane's slots 8 n + (v & 1) below it are real
#pragma unroll
      for (int n = 0; n < kMmaChunk / 8; ++n) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          sc[n][v] = 8 * n + (v & 1) < live ? sc[n][v] * scale_log2 : -INFINITY;
          chunk_max[v / 2] = fmaxf(chunk_max[v / 2], sc[n][v]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        chunk_max[h] = fmaxf(chunk_max[h], __shfl_xor_sync(0xffffffffu, chunk_max[h], 1));
        chunk_max[h] = fmaxf(chunk_max[h], __shfl_xor_sync(0xffffffffu, chunk_max[h], 2));
        const float new_max = fmaxf(row_max[h], chunk_max[h]);
        const float correction = exp2f(row_max[h] - new_max);
        row_max[h] = new_max;
        den[h] *= correction;
#pragma unroll
        for (int n = 0; n < kTiles; ++n) {
          acc[n][2 * h] *= correction;
          acc[n][2 * h + 1] *= correction;
        }
      }
#pragma unroll
      for (int n = 0; n < kMmaChunk / 8; ++n) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          sc[n][v] = exp2f(sc[n][v] - row_max[v / 2]);
          den[v / 2] += sc[n][v] * weights_s[s0 + 8 * n + 2 * quad + (v & 1)];
        }
      }
      // P V̂ in TF32: within each 8-key step, k-index quad holds key 2 quad and k-index quad + 4
      // holds key 2 quad + 1, which is where the logits' accumulator layout already put them;
      // V̂'s rows are read in the same order.
#pragma unroll
      for (int n = 0; n < kMmaChunk / 8; ++n) {
        const uint32_t a0 = to_tf32(sc[n][0]), a1 = to_tf32(sc[n][2]);
        const uint32_t a2 = to_tf32(sc[n][1]), a3 = to_tf32(sc[n][3]);
        if constexpr (kWideLoads) {
          const float* v0 = values_s + (s0 + 8 * n + 2 * quad) * kValueStride + group * 4;
          const float* v1 = v0 + kValueStride;
#pragma unroll
          for (int j = 0; j < kTiles / 4; ++j) {  // output tiles 4 j .. 4 j + 3
            const float4 x0 = *reinterpret_cast<const float4*>(v0 + 32 * j);
            const float4 x1 = *reinterpret_cast<const float4*>(v1 + 32 * j);
            mma_tf32_16x8x8(acc[4 * j], a0, a1, a2, a3, __float_as_uint(x0.x), __float_as_uint(x1.x));
            mma_tf32_16x8x8(acc[4 * j + 1], a0, a1, a2, a3, __float_as_uint(x0.y), __float_as_uint(x1.y));
            mma_tf32_16x8x8(acc[4 * j + 2], a0, a1, a2, a3, __float_as_uint(x0.z), __float_as_uint(x1.z));
            mma_tf32_16x8x8(acc[4 * j + 3], a0, a1, a2, a3, __float_as_uint(x0.w), __float_as_uint(x1.w));
          }
        } else {
          const float* v0 = values_s + (s0 + 8 * n + 2 * quad) * kValueStride + group;
          const float* v1 = v0 + kValueStride;
#pragma unroll
          for (int d = 0; d < kTiles; ++d) {
            mma_tf32_16x8x8(acc[d], a0, a1, a2, a3, __float_as_uint(v0[8 * d]), __float_as_uint(v1[8 * d]));
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      den[h] += __shfl_xor_sync(0xffffffffu, den[h], 1);
      den[h] += __shfl_xor_sync(0xffffffffu, den[h], 2);
    }
    // The output block goes through this block's query buffer (its fragments are in registers):
    // 32-bit pairs in, then whole 16-byte pieces of each row out to global memory.
    __syncwarp();
    uint32_t* out_s = reinterpret_cast<uint32_t*>(rows_s + buffer * 16 * kKeyStride);
#pragma unroll
    for (int d = 0; d < kTiles; ++d) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = 8 * d + 2 * quad;
        const float y0 = finish(acc[d][2 * h], den[h], p.value_min ? vmin_s : nullptr, p.value_max ? vmax_s : nullptr,
                                p.center_values, c);
        const float y1 = finish(acc[d][2 * h + 1], den[h], p.value_min ? vmin_s : nullptr,
                                p.value_max ? vmax_s : nullptr, p.center_values, c + 1);
        out_s[((group + 8 * h) * kKeyStride + c) / 2] = pack_pair(store_as<scalar_t>(y0), store_as<scalar_t>(y1));
      }
    }
    __syncwarp();
    const int64_t row0 = block_row0(tile);
    for (int piece = lane; piece < 16 * kPieces; piece += 32) {
      const int row = piece / kPieces, part = piece % kPieces;
      if (row0 + row < p.m) {
        *reinterpret_cast<uint4*>(p.out + (bh * p.m + row0 + row) * kDim + part * 8) =
            *reinterpret_cast<const uint4*>(rows_s + buffer * 16 * kKeyStride + row * kKeyStride + part * 8);
      }
    }
    __syncwarp();  // the buffer is free for the block after next (or, with one stage, the next)
    if (p.query_stages == 1 && tile + 1 < tile_last) load_block(tile + 1, 0);
  }
}

}  // namespace kernels
}  // namespace wildcat

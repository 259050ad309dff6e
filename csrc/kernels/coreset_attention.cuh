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

template <int kDim>
__host__ __device__ inline size_t mma_smem_bytes(int64_t r) {
  const int64_t rp = mma_padded_rank(r);
  return rp * (kDim + kMmaKeyPad) * 2 + rp * (kDim + kMmaValuePad) * 4 + rp * 4 + 2 * kDim * 4;
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

// grid (B * Hq, ceil(tiles / tiles_per_cta)), block 256. The kv head's coreset is loaded into
// shared memory once, then the CTA walks its query tiles. Fragment layouts are those of the PTX
// ISA for mma.m16n8k16 / m16n8k8: lane = 4 * group + quad; a thread holds rows group and
// group + 8 and columns 2 * quad, 2 * quad + 1 of every 8-column tile.
template <typename scalar_t, int kDim>
__global__ void __launch_bounds__(kMmaWarps * 32) coreset_attention_mma(AttentionParams<scalar_t, float> p) {
  constexpr int kKeyStride = kDim + kMmaKeyPad;      // 16-bit elements
  constexpr int kValueStride = kDim + kMmaValuePad;  // floats
  constexpr int kSteps = kDim / 16;                  // k-steps of Q Kᵀ
  constexpr int kTiles = kDim / 8;                   // 8-column tiles of the output
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t rp = mma_padded_rank(p.r);
  scalar_t* keys_s = reinterpret_cast<scalar_t*>(smem_raw);
  float* values_s = reinterpret_cast<float*>(keys_s + rp * kKeyStride);
  float* weights_s = values_s + rp * kValueStride;
  float* vmin_s = weights_s + rp;
  float* vmax_s = vmin_s + kDim;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int64_t bh = blockIdx.x;
  const int64_t batch = bh / p.q_heads, head = bh % p.q_heads;
  const int64_t kvh = batch * p.kv_heads + head / (p.q_heads / p.kv_heads);

  // Stage the coreset (padding slots: zero key, value and weight; masked from the softmax).
  for (int64_t i = threadIdx.x; i < rp * kDim; i += blockDim.x) {
    const int64_t s = i / kDim, c = i % kDim;
    keys_s[s * kKeyStride + c] = s < p.r ? p.keys[(kvh * p.r + s) * kDim + c] : store_as<scalar_t>(0.0f);
    values_s[s * kValueStride + c] = s < p.r ? p.values[(kvh * p.r + s) * kDim + c] : 0.0f;
  }
  for (int64_t s = threadIdx.x; s < rp; s += blockDim.x) weights_s[s] = s < p.r ? p.weights[kvh * p.r + s] : 0.0f;
  for (int64_t c = threadIdx.x; c < kDim; c += blockDim.x) {
    vmin_s[c] = p.value_min ? p.value_min[kvh * kDim + c] : -INFINITY;
    vmax_s[c] = p.value_max ? p.value_max[kvh * kDim + c] : INFINITY;
  }
  __syncthreads();
  const float scale_log2 = static_cast<float>(p.beta * 1.4426950408889634);  // exp(x) = exp2(x log2 e)
  const int64_t tiles = (p.m + kMmaTileRows - 1) / kMmaTileRows;

  for (int64_t t = 0; t < p.tiles_per_cta; ++t) {
    const int64_t tile = blockIdx.y * p.tiles_per_cta + t;
    if (tile >= tiles) break;
    const int64_t row0 = tile * kMmaTileRows + warp * 16 + group;  // this thread's rows: row0, row0 + 8
    const scalar_t* q0 = p.query + (bh * p.m + row0) * kDim;
    const scalar_t* q1 = q0 + 8 * kDim;
    const bool has0 = row0 < p.m, has1 = row0 + 8 < p.m;
    uint32_t qa[kSteps][4];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      const int c = 16 * k + 2 * quad;
      qa[k][0] = has0 ? *reinterpret_cast<const uint32_t*>(q0 + c) : 0u;
      qa[k][1] = has1 ? *reinterpret_cast<const uint32_t*>(q1 + c) : 0u;
      qa[k][2] = has0 ? *reinterpret_cast<const uint32_t*>(q0 + c + 8) : 0u;
      qa[k][3] = has1 ? *reinterpret_cast<const uint32_t*>(q1 + c + 8) : 0u;
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
        const scalar_t* krow = keys_s + (s0 + 8 * n + group) * kKeyStride + 2 * quad;
#pragma unroll
        for (int k = 0; k < kSteps; ++k) {
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + 16 * k);
          const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + 16 * k + 8);
          mma_16x8x16<scalar_t>(sc[n], qa[k], b0, b1);
        }
      }
      // online softmax in base 2; padding slots get -inf
      float chunk_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kMmaChunk / 8; ++n) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int64_t s = s0 + 8 * n + 2 * quad + (v & 1);
          sc[n][v] = s < p.r ? sc[n][v] * scale_log2 : -INFINITY;
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
        const float* v0 = values_s + (s0 + 8 * n + 2 * quad) * kValueStride + group;
        const float* v1 = v0 + kValueStride;
#pragma unroll
        for (int d = 0; d < kTiles; ++d) {
          mma_tf32_16x8x8(acc[d], a0, a1, a2, a3, to_tf32(v0[8 * d]), to_tf32(v1[8 * d]));
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      den[h] += __shfl_xor_sync(0xffffffffu, den[h], 1);
      den[h] += __shfl_xor_sync(0xffffffffu, den[h], 2);
    }
#pragma unroll
    for (int d = 0; d < kTiles; ++d) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int h = v / 2;
        const int64_t row = row0 + 8 * h;
        const int c = 8 * d + 2 * quad + (v & 1);
        if (row < p.m) {
          const float y = finish(acc[d][v], den[h], p.value_min ? vmin_s : nullptr,
                                 p.value_max ? vmax_s : nullptr, p.center_values, c);
          p.out[(bh * p.m + row) * kDim + c] = store_as<scalar_t>(y);
        }
      }
    }
  }
}

}  // namespace kernels
}  // namespace wildcat

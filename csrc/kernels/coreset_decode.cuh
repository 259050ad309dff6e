// Split-entries kernels of coreset_attention for few queries per kv head (decoding), torch-free.
//
// With a handful of queries per kv head (one decode step: Hq / Hkv queries), the query-tiled
// kernels of coreset_attention.cuh run one CTA per query head and walk all r entries serially:
// 32 CTAs on 132 SMs, about 0.7 ms for 576 entries at E = 128 (benchmarks/NOTES.md). Here the
// entries of each kv head are split over many CTAs instead ("flash-decoding"):
//  1. coreset_decode_split: one CTA per (kv group, chunk of entries) computes, for every query of
//     the group, the chunk's logit maximum m, Σ e^{z-m} w and Σ e^{z-m} V̂;
//  2. coreset_decode_combine: one CTA per query rescales the chunks to the global maximum, sums
//     them in a fixed order (deterministic), divides and clamps (the shared epilogue `finish`).
// Every load of the entries is a short, independent one: small chunks (a few entries per warp)
// and many CTAs hide the memory latency, which bounds this regime rather than bandwidth.
// Entries are read through strides (the last dim contiguous), so a cache's buffer views need no
// copy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "coreset_attention.cuh"

namespace wildcat {
namespace kernels {

constexpr int kDecodeThreads = 128;
constexpr int kCombineThreads = 256;
constexpr int kKeysPerWarp = 4;
constexpr int kDecodeMaxQueries = 16;  // queries per kv head: Hq / Hkv · M
constexpr int kDecodeMaxDim = 256;
constexpr int64_t kDecodeMinChunk = 16;
constexpr int64_t kDecodeMaxChunk = 256;

template <typename scalar_t, typename T>
struct DecodeParams {
  const scalar_t* query;  // (G, Q, E): the Q queries of kv group g = b * Hkv + h, contiguous
  const scalar_t* keys;   // entry s of (b, h): keys[b * key_stride[0] + h * key_stride[1] + s * key_stride[2] + c]
  const T* values;        // likewise with value_stride
  const T* weights;       // likewise with weight_stride
  int64_t key_stride[3], value_stride[3], weight_stride[3];
  const T* value_min;     // (G, D) or null
  const T* value_max;     // (G, D) or null
  bool center_values;
  double beta;
  int64_t kv_heads, queries, entries, e, dv, chunk, splits;
  T* part_max;            // (G, splits, Q)
  T* part_den;            // (G, splits, Q)
  T* part_num;            // (G, splits, Q, D)
  scalar_t* out;          // (G, Q, D)
};

template <typename T>
__host__ __device__ inline size_t decode_smem_bytes(int64_t queries, int64_t e, int64_t chunk) {
  return sizeof(T) * queries * (e + chunk);
}

// Threads per value column in the combine: as many as the block holds.
__host__ __device__ inline int64_t decode_combine_lanes(int64_t dv) {
  return kCombineThreads / dv > 1 ? kCombineThreads / dv : 1;
}

// Entries of the scale-factor array: the splits, the denominator, and three of padding: the
// compiler merges the 1-3 loads of a summation loop's tail into one vector load, which reads past
// the last factor (memcheck flagged it when the allocation ended there). A multiple of 4, so the
// partial sums after it stay 16-byte aligned.
__host__ __device__ inline int64_t decode_combine_scales(int64_t splits) {
  return (splits + 1 + 3 + 3) / 4 * 4;
}

template <typename T>
__host__ __device__ inline size_t decode_combine_smem_bytes(int64_t splits, int64_t dv) {
  return sizeof(T) * (decode_combine_scales(splits) + decode_combine_lanes(dv) * dv);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// grid G * splits, block kDecodeThreads.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kDecodeThreads) coreset_decode_split(DecodeParams<scalar_t, T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* query_s = reinterpret_cast<T*>(smem_raw);  // Q × E, times β
  T* prob_s = query_s + p.queries * p.e;        // Q × chunk: logits, then e^{z - m}
  constexpr int kWarps = kDecodeThreads / 32;
  constexpr int kCols = kDecodeMaxDim / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g = blockIdx.x / p.splits, split = blockIdx.x % p.splits;
  const int64_t b = g / p.kv_heads, h = g % p.kv_heads;
  const int64_t first = split * p.chunk;
  const int64_t len = first < p.entries ? (p.entries - first < p.chunk ? p.entries - first : p.chunk) : 0;

  const scalar_t* query = p.query + g * p.queries * p.e;
  for (int64_t o = threadIdx.x; o < p.queries * p.e; o += kDecodeThreads) {
    query_s[o] = static_cast<T>(load_acc(query[o])) * static_cast<T>(p.beta);
  }
  __syncthreads();

  // logits: each warp takes kKeysPerWarp entries at a time, their keys loaded into registers
  // together (independent loads in flight), lanes over the E columns
  const scalar_t* keys = p.keys + b * p.key_stride[0] + h * p.key_stride[1] + first * p.key_stride[2];
  for (int64_t s0 = warp * kKeysPerWarp; s0 < len; s0 += kWarps * kKeysPerWarp) {
    T key[kKeysPerWarp][kCols];
#pragma unroll
    for (int u = 0; u < kKeysPerWarp; ++u) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int64_t c = lane + 32 * j;
        key[u][j] = (s0 + u < len && c < p.e) ? static_cast<T>(load_acc(keys[(s0 + u) * p.key_stride[2] + c])) : T(0);
      }
    }
    for (int64_t i = 0; i < p.queries; ++i) {
      T dot[kKeysPerWarp];
#pragma unroll
      for (int u = 0; u < kKeysPerWarp; ++u) dot[u] = 0;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int64_t c = lane + 32 * j;
        const T qc = c < p.e ? query_s[i * p.e + c] : T(0);
#pragma unroll
        for (int u = 0; u < kKeysPerWarp; ++u) dot[u] += key[u][j] * qc;
      }
#pragma unroll
      for (int u = 0; u < kKeysPerWarp; ++u) {
        dot[u] = warp_sum(dot[u]);
        if (lane == 0 && s0 + u < len) prob_s[i * p.chunk + s0 + u] = dot[u];
      }
    }
  }
  __syncthreads();

  // per query (a warp each): the chunk's maximum, e^{z - m} and Σ e^{z - m} w
  const T* weights = p.weights + b * p.weight_stride[0] + h * p.weight_stride[1] + first * p.weight_stride[2];
  const int64_t part = (g * p.splits + split) * p.queries;
  for (int64_t i = warp; i < p.queries; i += kWarps) {
    T* prob = prob_s + i * p.chunk;
    T top = -INFINITY;
    for (int64_t s = lane; s < len; s += 32) top = prob[s] > top ? prob[s] : top;
    top = warp_max(top);
    T den = 0;
    for (int64_t s = lane; s < len; s += 32) {
      const T e_z = exp(prob[s] - top);
      prob[s] = e_z;
      den += e_z * weights[s * p.weight_stride[2]];
    }
    den = warp_sum(den);
    if (lane == 0) {
      p.part_max[part + i] = top;  // -inf for an empty chunk: it weighs 0 in the combine
      p.part_den[part + i] = den;
    }
  }
  __syncthreads();

  // Σ e^{z - m} V̂: threads over (query, column), consecutive threads on consecutive columns
  const T* values = p.values + b * p.value_stride[0] + h * p.value_stride[1] + first * p.value_stride[2];
  for (int64_t o = threadIdx.x; o < p.queries * p.dv; o += kDecodeThreads) {
    const int64_t i = o / p.dv, c = o % p.dv;
    const T* prob = prob_s + i * p.chunk;
    T acc = 0;
    for (int64_t s = 0; s < len; ++s) acc += prob[s] * values[s * p.value_stride[2] + c];
    p.part_num[(part + i) * p.dv + c] = acc;
  }
}

// grid G * Q, block kCombineThreads, shared memory decode_combine_smem_bytes: the chunks of one
// query. The chunk maxima are staged in shared memory and turned into the chunks' scale factors
// e^{m - top} by one warp; then kCombineThreads / D threads per column sum interleaved chunks
// (several loads in flight per column instead of one chain) and their partial sums are added
// in a fixed order: deterministic.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kCombineThreads) coreset_decode_combine(DecodeParams<scalar_t, T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scale_s = reinterpret_cast<T*>(smem_raw);           // splits, the denominator, padding
  T* partial_s = scale_s + decode_combine_scales(p.splits);  // lanes × D partial numerators
  const int64_t gq = blockIdx.x;
  const int64_t g = gq / p.queries, i = gq % p.queries;
  const int64_t first = g * p.splits * p.queries + i;  // entry of split sp: first + sp * queries
  for (int64_t sp = threadIdx.x; sp < p.splits; sp += kCombineThreads) scale_s[sp] = p.part_max[first + sp * p.queries];
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    T top = -INFINITY;
    for (int64_t sp = lane; sp < p.splits; sp += 32) top = scale_s[sp] > top ? scale_s[sp] : top;
    top = warp_max(top);
    T den = 0;
    for (int64_t sp = lane; sp < p.splits; sp += 32) {
      const T m = scale_s[sp];
      const T factor = m > -INFINITY ? exp(m - top) : T(0);  // an empty chunk weighs 0
      scale_s[sp] = factor;
      den += factor * p.part_den[first + sp * p.queries];
    }
    den = warp_sum(den);
    if (lane == 0) scale_s[p.splits] = den;
  }
  __syncthreads();
  const int64_t lanes = decode_combine_lanes(p.dv);
  for (int64_t t = threadIdx.x; t < lanes * p.dv; t += kCombineThreads) {
    const int64_t lane = t / p.dv, c = t % p.dv;
    T num = 0;
    for (int64_t sp = lane; sp < p.splits; sp += lanes) num += scale_s[sp] * p.part_num[(first + sp * p.queries) * p.dv + c];
    partial_s[t] = num;
  }
  __syncthreads();
  const T den = scale_s[p.splits];
  const T* vmin = p.value_min ? p.value_min + g * p.dv : nullptr;
  const T* vmax = p.value_max ? p.value_max + g * p.dv : nullptr;
  for (int64_t c = threadIdx.x; c < p.dv; c += kCombineThreads) {
    T num = 0;
    for (int64_t lane = 0; lane < lanes; ++lane) num += partial_s[lane * p.dv + c];
    p.out[gq * p.dv + c] = store_as<scalar_t, T>(finish(num, den, vmin, vmax, p.center_values, c));
  }
}

}  // namespace kernels
}  // namespace wildcat

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
// The regime is bound by memory latency, not bandwidth (a few MB): each CTA stages its chunk in
// shared memory with independent loads and one barrier, and many small CTAs overlap their waits.
// Entries are read through strides (the last dim contiguous), so a cache's buffer views need no
// copy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "coreset_attention.cuh"

namespace wildcat {
namespace kernels {

constexpr int kDecodeThreads = 128;
constexpr int kCombineThreads = 1024;
constexpr int kDecodeMaxQueries = 16;  // queries per kv head: Hq / Hkv · M
constexpr int kDecodeMaxDim = 256;
constexpr int64_t kDecodeMinChunk = 4;
constexpr int64_t kDecodeMaxChunk = 32;  // the chunk is staged in shared memory

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
__host__ __device__ inline size_t decode_smem_bytes(int64_t queries, int64_t e, int64_t dv, int64_t chunk) {
  return sizeof(T) * (queries * (e + chunk) + chunk * (e + 1 + dv + 1));
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
  const int64_t partials = decode_combine_lanes(dv) * dv;  // also holds the denominators first
  return sizeof(T) * (decode_combine_scales(splits) + (partials > splits ? partials : splits));
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

// Copies `count` elements from global to shared memory with kDecodeThreads threads, each loading
// kStageBatch elements into registers before storing any: the loads of a batch are in flight
// together, so a chunk costs a few memory latencies instead of one per element.
constexpr int kStageBatch = 8;

template <typename T, typename Load, typename Store>
__device__ __forceinline__ void stage(int count, Load load, Store store) {
  for (int base = threadIdx.x; base < count; base += kDecodeThreads * kStageBatch) {
    T batch[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int o = base + u * kDecodeThreads;
      batch[u] = o < count ? load(o) : T(0);
    }
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int o = base + u * kDecodeThreads;
      if (o < count) store(o, batch[u]);
    }
  }
}

// One thread's copy of `count` entries of a column, kStageBatch loads in flight at a time.
template <typename T, typename Load, typename Store>
__device__ __forceinline__ void stage_column(int count, Load load, Store store) {
  for (int base = 0; base < count; base += kStageBatch) {
    T batch[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) batch[u] = base + u < count ? load(base + u) : T(0);
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      if (base + u < count) store(base + u, batch[u]);
    }
  }
}

// grid G * splits, block kDecodeThreads, shared memory decode_smem_bytes. The chunk's query,
// keys, values and weights are staged in shared memory first, every load issued before one
// barrier: the CTA waits for global memory once, not once per entry.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kDecodeThreads) coreset_decode_split(DecodeParams<scalar_t, T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t e = p.e, dv = p.dv, chunk = p.chunk;
  T* query_s = reinterpret_cast<T*>(smem_raw);  // Q × E, times β
  T* keys_s = query_s + p.queries * e;          // chunk × (E + 1): odd row stride, no bank conflicts
  T* values_s = keys_s + chunk * (e + 1);       // chunk × D
  T* weights_s = values_s + chunk * dv;         // chunk
  T* prob_s = weights_s + chunk;                // Q × chunk: logits, then e^{z - m}
  constexpr int kWarps = kDecodeThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g = blockIdx.x / p.splits, split = blockIdx.x % p.splits;
  const int64_t b = g / p.kv_heads, h = g % p.kv_heads;
  const int64_t first = split * chunk;
  const int64_t len = first < p.entries ? (p.entries - first < chunk ? p.entries - first : chunk) : 0;

  const scalar_t* query = p.query + g * p.queries * e;
  const scalar_t* keys = p.keys + b * p.key_stride[0] + h * p.key_stride[1] + first * p.key_stride[2];
  const T* values = p.values + b * p.value_stride[0] + h * p.value_stride[1] + first * p.value_stride[2];
  const T* weights = p.weights + b * p.weight_stride[0] + h * p.weight_stride[1] + first * p.weight_stride[2];
  // (indices within a chunk fit 32 bits: at most kDecodeMaxChunk × kDecodeMaxDim)
  const int ei = static_cast<int>(e), dvi = static_cast<int>(dv);
  stage<T>(static_cast<int>(p.queries) * ei, [&](int o) { return static_cast<T>(load_acc(query[o])) * static_cast<T>(p.beta); },
           [&](int o, T x) { query_s[o] = x; });
  // keys and values column by column: a thread walks the entries of its columns (no index
  // division), kStageBatch entries in flight
  const int leni = static_cast<int>(len);
  for (int c = threadIdx.x; c < ei; c += kDecodeThreads) {
    stage_column<T>(leni, [&](int s) { return static_cast<T>(load_acc(keys[s * p.key_stride[2] + c])); },
                    [&](int s, T x) { keys_s[s * (ei + 1) + c] = x; });
  }
  for (int c = threadIdx.x; c < dvi; c += kDecodeThreads) {
    stage_column<T>(leni, [&](int s) { return values[s * p.value_stride[2] + c]; },
                    [&](int s, T x) { values_s[s * dvi + c] = x; });
  }
  stage<T>(static_cast<int>(len), [&](int o) { return weights[o * p.weight_stride[2]]; },
           [&](int o, T x) { weights_s[o] = x; });
  __syncthreads();

  // logits: a warp per (query, entry) pair, lanes over the E columns, then a shuffle sum: short
  // dependency chains (E / 32 multiply-adds and five shuffles) instead of one thread's E-long one
  const int pairs = static_cast<int>(p.queries * len), chunki = static_cast<int>(chunk);
  for (int o = warp; o < pairs; o += kWarps) {
    const int i = o / leni, s = o % leni;
    const T* q = query_s + i * ei;
    const T* k = keys_s + s * (ei + 1);
    T dot = 0;
    for (int c = lane; c < ei; c += 32) dot += q[c] * k[c];
    dot = warp_sum(dot);
    if (lane == 0) prob_s[i * chunki + s] = dot;
  }
  __syncthreads();

  // per query (a warp each): the chunk's maximum, e^{z - m} and Σ e^{z - m} w
  const int64_t part = (g * p.splits + split) * p.queries;
  for (int64_t i = warp; i < p.queries; i += kWarps) {
    T* prob = prob_s + i * chunk;
    T top = -INFINITY;
    for (int64_t s = lane; s < len; s += 32) top = prob[s] > top ? prob[s] : top;
    top = warp_max(top);
    T den = 0;
    for (int64_t s = lane; s < len; s += 32) {
      const T e_z = exp(prob[s] - top);
      prob[s] = e_z;
      den += e_z * weights_s[s];
    }
    den = warp_sum(den);
    if (lane == 0) {
      p.part_max[part + i] = top;  // -inf for an empty chunk: it weighs 0 in the combine
      p.part_den[part + i] = den;
    }
  }
  __syncthreads();

  // Σ e^{z - m} V̂: threads over (query, column), consecutive threads on consecutive columns
  for (int o = threadIdx.x; o < static_cast<int>(p.queries) * dvi; o += kDecodeThreads) {
    const int i = o / dvi, c = o % dvi;
    const T* prob = prob_s + i * chunki;
    T acc = 0;
    for (int s = 0; s < leni; ++s) acc += prob[s] * values_s[s * dvi + c];
    p.part_num[(part + i) * dv + c] = acc;
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
  T* den_s = partial_s;  // the chunks' denominators, until the partial sums take the space
  for (int64_t sp = threadIdx.x; sp < p.splits; sp += kCombineThreads) {
    scale_s[sp] = p.part_max[first + sp * p.queries];
    den_s[sp] = p.part_den[first + sp * p.queries];
  }
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
      den += factor * den_s[sp];
    }
    den = warp_sum(den);
    if (lane == 0) scale_s[p.splits] = den;
  }
  __syncthreads();
  const int64_t lanes = decode_combine_lanes(p.dv);
  for (int64_t t = threadIdx.x; t < lanes * p.dv; t += kCombineThreads) {
    const int64_t lane = t / p.dv, c = t % p.dv;
    T num = 0;
    for (int64_t sp0 = lane; sp0 < p.splits; sp0 += lanes * kStageBatch) {  // kStageBatch loads in flight
      T batch[kStageBatch];
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int64_t sp = sp0 + u * lanes;
        batch[u] = sp < p.splits ? p.part_num[(first + sp * p.queries) * p.dv + c] : T(0);
      }
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int64_t sp = sp0 + u * lanes;
        if (sp < p.splits) num += scale_s[sp] * batch[u];
      }
    }
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

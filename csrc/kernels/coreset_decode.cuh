// Split-entries kernel of coreset_attention for few queries per kv head (decoding), torch-free.
//
// With a handful of queries per kv head (one decode step: Hq / Hkv queries), the query-tiled
// kernels of coreset_attention.cuh run one CTA per query head and walk all r entries serially:
// 32 CTAs on 132 SMs, about 0.7 ms for 576 entries at E = 128 (benchmarks/NOTES.md). Here the
// entries of each kv head are split over the CTAs of a thread-block cluster instead
// ("flash-decoding" in one launch):
//  1. each CTA of the cluster copies a span of the group's entries to shared memory (cp.async:
//     every load of the span in flight at once) and computes, for every query of the group, the
//     span's logit maximum m, Σ e^{z-m} w and Σ e^{z-m} V̂ (online rescaling when the span takes
//     several chunks). 16-bit keys take tensor cores for the logits (mma.m16n8k16: exact products,
//     float32 sums, as the other kernels); the value sums stay in float32 (or double) on CUDA
//     cores, each thread a 16-byte vector of columns for every query;
//  2. after a cluster barrier, each CTA reads the others' partial results through distributed
//     shared memory, rescales them to the global maximum, sums them in rank order
//     (deterministic) and finishes its share of the outputs (divide, clamp: the shared epilogue
//     `finish`).
// The regime is bound by latency, not bandwidth (a few MB), so the kernel counts instructions:
// the query count is a template parameter (no predicated-off work), one launch, one wait for
// global memory per chunk, no partial results through global memory and no second kernel.
// Entries are read through strides (the last dim contiguous), so a cache's buffer views need no
// copy.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "coreset_attention.cuh"
#include "device_helpers.cuh"

namespace wildcat {
namespace kernels {

constexpr int kDecodeThreads = 256;
constexpr int kDecodeMaxQueries = 16;  // queries per kv head: Hq / Hkv · M
constexpr int kDecodeMaxDim = 256;
constexpr int kDecodeMaxCluster = 8;  // the portable cluster size (16 measured slower)

// Shared-memory geometry of one CTA: row strides (elements) and byte offsets, 16-byte aligned.
struct DecodeLayout {
  int64_t key_row, value_row;
  size_t query, keys, values, weights, prob, acc, state, factor, bytes;
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// kQ: the template's query count (at least the group's). 16-bit keys go through mma.m16n8k16.
template <typename scalar_t, int kQ>
struct DecodeShape {
  static constexpr bool kMma = sizeof(scalar_t) == 2;
  static constexpr int kQueryRows = kMma ? (kQ + 7) / 8 * 8 : kQ;  // whole 8-query mma tiles
};

template <typename scalar_t, typename T, int kQ>
__host__ __device__ inline DecodeLayout decode_layout(int64_t e, int64_t dv, int64_t chunk, int64_t cluster) {
  using Shape = DecodeShape<scalar_t, kQ>;
  DecodeLayout l{};
  // mma keys: rows of whole 16-column k steps plus 8 columns, so that a fragment load (8 rows ×
  // 4 column pairs) hits 32 distinct banks; otherwise packed rows (a warp reads one row)
  l.key_row = Shape::kMma ? round_up(e, 16) + 8 : e;
  // values: whole 128-byte lines plus 64 bytes, so that the two rows a quarter-warp reads with
  // 16-byte loads fall on distinct banks
  l.value_row = static_cast<int64_t>((round_up(dv * sizeof(T), 128) + 64) / sizeof(T));
  const int64_t key_rows = Shape::kMma ? round_up(chunk, 16) : chunk;  // whole 16-entry m tiles
  size_t at = 0;
  l.query = at, at += align16((Shape::kMma ? sizeof(scalar_t) * l.key_row : sizeof(T) * e) * Shape::kQueryRows);
  l.keys = at, at += align16(sizeof(scalar_t) * l.key_row * key_rows);
  l.values = at, at += align16(sizeof(T) * l.value_row * chunk);
  l.weights = at, at += align16(sizeof(T) * chunk);
  l.prob = at, at += align16(sizeof(T) * kQ * chunk);
  l.acc = at, at += align16(sizeof(T) * kQ * dv);
  l.state = at, at += align16(sizeof(T) * 4 * kQ);
  l.factor = at, at += align16(sizeof(T) * kQ * cluster);
  l.bytes = at;
  return l;
}

template <typename scalar_t, typename T>
struct DecodeParams {
  const scalar_t* query;  // (G, Q, E): the Q queries of kv group g = b * Hkv + h, contiguous
  const scalar_t* keys;   // entry s of (b, h): keys[b * key_stride[0] + h * key_stride[1] + s * key_stride[2] + c]
  const T* values;        // likewise with value_stride
  const T* weights;       // likewise with weight_stride
  int64_t key_stride[3], value_stride[3], weight_stride[3];
  bool vector_query, vector_keys, vector_values;  // rows 16-byte aligned (pointer, strides): 16-byte copies
  const T* value_min;     // (G, D) or null
  const T* value_max;     // (G, D) or null
  bool center_values;
  double beta;
  int64_t kv_heads, queries, entries, e, dv;
  int64_t cluster;  // CTAs per group (a thread-block cluster when > 1), each a span of the entries
  int64_t span;     // entries per CTA
  int64_t chunk;    // entries staged in shared memory at a time
  DecodeLayout layout;
  scalar_t* out;    // (G, Q, D)
};

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

// Copies rows × cols elements (row i at src + i * row_stride) to dst (row i at dst + i * dst_row).
// With `vector` (src, row_stride and cols 16-byte multiples; dst and dst_row are) by asynchronous
// 16-byte copies, all in flight together (the caller waits with copy_async_wait), a thread
// stepping through its pieces without division; otherwise element by element, kBatch loads in
// flight per thread.
template <typename E>
__device__ __forceinline__ void stage_rows(E* dst, int dst_row, const E* src, int64_t row_stride, int rows, int cols,
                                           bool vector) {
  if (vector) {
    constexpr int kPerCopy = 16 / sizeof(E);
    const int per_row = cols / kPerCopy;
    const int row_step = kDecodeThreads / per_row, part_step = kDecodeThreads % per_row;
    int row = threadIdx.x / per_row, part = threadIdx.x % per_row;
    // pointers advance by a step, plus a wrap to the next row when the piece index passes the row
    const E* from = src + row * row_stride + part * kPerCopy;
    unsigned to = shared_address(dst + row * dst_row + part * kPerCopy);
    const int64_t from_step = row_step * row_stride + part_step * kPerCopy, from_wrap = row_stride - cols;
    const unsigned to_step = sizeof(E) * (row_step * dst_row + part_step * kPerCopy);
    const unsigned to_wrap = sizeof(E) * (dst_row - cols);
    while (row < rows) {
      copy_async_16(to, from);
      row += row_step, part += part_step, from += from_step, to += to_step;
      if (part >= per_row) part -= per_row, ++row, from += from_wrap, to += to_wrap;
    }
    return;
  }
  constexpr int kBatch = 8;
  const int count = rows * cols;
  for (int base = threadIdx.x; base < count; base += kDecodeThreads * kBatch) {
    E batch[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int o = base + u * kDecodeThreads;
      if (o < count) batch[u] = src[(o / cols) * row_stride + o % cols];
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int o = base + u * kDecodeThreads;
      if (o < count) dst[(o / cols) * dst_row + o % cols] = batch[u];
    }
  }
}

// Logits of a chunk's entries for every query, times β, into prob (kQ × chunk; the template's
// extra queries are zero rows of the query array, so their logits are 0 and their sums unused).
// 16-bit keys: a warp per 16-entry m tile, mma.m16n8k16 over the E columns (A: the keys, B: the
// raw queries, zero-padded to whole tiles); fragment layouts as in coreset_attention.cuh.
template <typename scalar_t, typename T, int kQ>
__device__ __forceinline__ void decode_logits_mma(const scalar_t* query_s, const scalar_t* keys_s, T* prob,
                                                  int key_row, int e, int len, int chunk, T beta) {
  constexpr int kWarps = kDecodeThreads / 32, kTilesN = DecodeShape<scalar_t, kQ>::kQueryRows / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const uint32_t* key_words = reinterpret_cast<const uint32_t*>(keys_s);
  const uint32_t* query_words = reinterpret_cast<const uint32_t*>(query_s);
  const int row_words = key_row / 2, k_steps = (e + 15) / 16;
  for (int m0 = warp * 16; m0 < len; m0 += kWarps * 16) {
    float acc[kTilesN][4] = {};
    const uint32_t* rows = key_words + (m0 + group) * row_words + quad;
    for (int kk = 0; kk < k_steps; ++kk) {
      const uint32_t a[4] = {rows[kk * 8], rows[8 * row_words + kk * 8], rows[kk * 8 + 4],
                             rows[8 * row_words + kk * 8 + 4]};
#pragma unroll
      for (int n = 0; n < kTilesN; ++n) {
        const uint32_t* b = query_words + (n * 8 + group) * row_words + kk * 8 + quad;
        mma_16x8x16<scalar_t>(acc[n], a, b[0], b[4]);
      }
    }
    // acc[n][2h + j]: entry m0 + group + 8h, query 8n + 2 quad + j
#pragma unroll
    for (int n = 0; n < kTilesN; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int s = m0 + group + 8 * h, i = 8 * n + 2 * quad + j;
          if (i < kQ && s < len) prob[i * chunk + s] = static_cast<T>(acc[n][2 * h + j]) * beta;
        }
      }
    }
  }
}

// Wider keys: a warp per entry, lanes over the E columns, every query's dot product at once
// (the key is read once), then one shuffle sum per query. query_s holds the queries times β.
template <typename scalar_t, typename T, int kQ>
__device__ __forceinline__ void decode_logits_simt(const T* query_s, const scalar_t* keys_s, T* prob, int key_row,
                                                   int e, int len, int chunk) {
  constexpr int kWarps = kDecodeThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int s = warp; s < len; s += kWarps) {
    T dot[kQ] = {};
    for (int c = lane; c < e; c += 32) {
      const T k = static_cast<T>(load_acc(keys_s[s * key_row + c]));
#pragma unroll
      for (int i = 0; i < kQ; ++i) dot[i] += query_s[i * e + c] * k;
    }
#pragma unroll
    for (int i = 0; i < kQ; ++i) {
      const T sum = warp_sum(dot[i]);
      if (lane == 0) prob[i * chunk + s] = sum;
    }
  }
}

// acc (queries × D) = acc · rescale + Σ_s prob[i][s] V̂[s]. A warp per 4 vectors of 16 bytes of
// columns; lane = 4 · entry group + vector: the 8 entry groups take every 8th entry, each
// thread holds its vector's sums for all kQ queries, and a fixed butterfly over the groups
// (deterministic) adds them.
template <typename T, int kQ>
__device__ __forceinline__ void decode_values(const T* prob, const T* values_s, const T* rescale, T* acc,
                                              int value_row, int dv, int queries, int len, int chunk) {
  constexpr int kWarps = kDecodeThreads / 32, kVec = 16 / sizeof(T);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, entry_group = lane / 4;
  const int vectors = (dv + kVec - 1) / kVec;
  for (int v0 = warp * 4; v0 < vectors; v0 += kWarps * 4) {  // warp-uniform: the butterfly needs every lane
    const int vec = v0 + lane % 4;
    T part[kQ][kVec] = {};
    if (vec < vectors) {
      for (int s = entry_group; s < len; s += 8) {
        alignas(16) T v[kVec];
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(values_s + s * value_row + vec * kVec);
#pragma unroll
        for (int i = 0; i < kQ; ++i) {
          const T p = prob[i * chunk + s];
#pragma unroll
          for (int j = 0; j < kVec; ++j) part[i][j] += p * v[j];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kQ; ++i) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        for (int offset = 4; offset < 32; offset <<= 1) part[i][j] += __shfl_xor_sync(0xffffffffu, part[i][j], offset);
      }
    }
    if (vec < vectors) {
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
        if (i % 8 != entry_group || i >= queries) continue;  // the queries of this lane's group
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int c = vec * kVec + j;
          if (c < dv) acc[i * dv + c] = acc[i * dv + c] * rescale[i] + part[i][j];
        }
      }
    }
  }
}

// grid G * cluster (clusters of `cluster` CTAs along x when cluster > 1), block kDecodeThreads,
// shared memory p.layout.bytes; kQ >= p.queries.
template <typename scalar_t, typename T, int kQ>
__global__ void __launch_bounds__(kDecodeThreads) coreset_decode(DecodeParams<scalar_t, T> p) {
  using Shape = DecodeShape<scalar_t, kQ>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DecodeLayout& l = p.layout;
  scalar_t* keys_s = reinterpret_cast<scalar_t*>(smem_raw + l.keys);  // chunk × key_row
  T* values_s = reinterpret_cast<T*>(smem_raw + l.values);           // chunk × value_row
  T* weights_s = reinterpret_cast<T*>(smem_raw + l.weights);         // chunk
  T* prob_s = reinterpret_cast<T*>(smem_raw + l.prob);               // kQ × chunk: logits, then e^{z - m}
  T* acc_s = reinterpret_cast<T*>(smem_raw + l.acc);                 // queries × D: Σ e^{z - m} V̂
  T* max_s = reinterpret_cast<T*>(smem_raw + l.state);               // kQ: running maximum m
  T* den_s = max_s + kQ;                                             // kQ: Σ e^{z - m} w
  T* rescale_s = den_s + kQ;                                         // kQ: e^{m_old - m_new}
  T* total_s = rescale_s + kQ;                                       // kQ: the cluster's denominator
  T* factor_s = reinterpret_cast<T*>(smem_raw + l.factor);           // kQ × cluster: e^{m_rank - top}
  constexpr int kWarps = kDecodeThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g = blockIdx.x / p.cluster, rank = blockIdx.x % p.cluster;
  const int64_t b = g / p.kv_heads, h = g % p.kv_heads;
  // (indices within a CTA's arrays fit 32 bits: at most kDecodeMaxQueries × kDecodeMaxDim, or a
  // chunk that fits shared memory)
  const int queries = static_cast<int>(p.queries), ei = static_cast<int>(p.e), dvi = static_cast<int>(p.dv);
  const int chunk = static_cast<int>(p.chunk), outputs = queries * dvi;
  const int key_row = static_cast<int>(l.key_row), value_row = static_cast<int>(l.value_row);

  const int64_t span_first = rank * p.span;
  const int64_t span_last = span_first + p.span < p.entries ? span_first + p.span : p.entries;
  // Copies a chunk's keys, values and weights to shared memory, asynchronously where aligned.
  auto stage_chunk = [&](int64_t first, int len) {
    const scalar_t* keys = p.keys + b * p.key_stride[0] + h * p.key_stride[1] + first * p.key_stride[2];
    const T* values = p.values + b * p.value_stride[0] + h * p.value_stride[1] + first * p.value_stride[2];
    const T* weights = p.weights + b * p.weight_stride[0] + h * p.weight_stride[1] + first * p.weight_stride[2];
    stage_rows(keys_s, key_row, keys, p.key_stride[2], len, ei, p.vector_keys);
    stage_rows(values_s, value_row, values, p.value_stride[2], len, dvi, p.vector_values);
    for (int s = threadIdx.x; s < len; s += kDecodeThreads) copy_async_element(weights_s + s, weights + s * p.weight_stride[2]);
  };
  auto chunk_length = [&](int64_t first) {
    return static_cast<int>(span_last - first < chunk ? span_last - first : chunk);
  };
  // the first chunk's copies go out before the setup below, which overlaps their latency
  if (span_first < span_last) stage_chunk(span_first, chunk_length(span_first));

  const scalar_t* query = p.query + g * p.queries * p.e;
  if constexpr (Shape::kMma) {
    // raw queries (β multiplies the logits), zero rows and columns up to whole mma tiles; the
    // keys' padding columns are zeroed once, as the copies never write them
    scalar_t* query_s = reinterpret_cast<scalar_t*>(smem_raw + l.query);
    const scalar_t zero = store_as<scalar_t, float>(0.0f);
    stage_rows(query_s, key_row, query, ei, queries, ei, p.vector_query);
    for (int o = threadIdx.x; o < (Shape::kQueryRows - queries) * key_row; o += kDecodeThreads) {
      query_s[queries * key_row + o] = zero;
    }
    const int pad = static_cast<int>(round_up(ei, 16)) - ei;
    if (pad > 0) {
      for (int o = threadIdx.x; o < queries * pad; o += kDecodeThreads) {
        query_s[(o / pad) * key_row + ei + o % pad] = zero;
      }
      for (int o = threadIdx.x; o < static_cast<int>(round_up(chunk, 16)) * pad; o += kDecodeThreads) {
        keys_s[(o / pad) * key_row + ei + o % pad] = zero;
      }
    }
  } else {
    T* query_s = reinterpret_cast<T*>(smem_raw + l.query);
    for (int o = threadIdx.x; o < kQ * ei; o += kDecodeThreads) {
      query_s[o] = o < queries * ei ? static_cast<T>(load_acc(query[o])) * static_cast<T>(p.beta) : T(0);
    }
  }
  for (int i = threadIdx.x; i < kQ; i += kDecodeThreads) max_s[i] = -INFINITY, den_s[i] = 0;
  for (int o = threadIdx.x; o < outputs; o += kDecodeThreads) acc_s[o] = 0;

  for (int64_t first = span_first; first < span_last; first += chunk) {
    const int len = chunk_length(first);
    if (first != span_first) {
      __syncthreads();  // the previous chunk's arrays are no longer read
      stage_chunk(first, len);
    }
    copy_async_wait();
    __syncthreads();

    if constexpr (Shape::kMma) {
      decode_logits_mma<scalar_t, T, kQ>(reinterpret_cast<const scalar_t*>(smem_raw + l.query), keys_s, prob_s,
                                         key_row, ei, len, chunk, static_cast<T>(p.beta));
    } else {
      decode_logits_simt<scalar_t, T, kQ>(reinterpret_cast<const T*>(smem_raw + l.query), keys_s, prob_s, key_row,
                                          ei, len, chunk);
    }
    __syncthreads();

    // per query (a warp each): the new maximum, e^{z - m}, the rescaled denominator
    for (int i = warp; i < queries; i += kWarps) {
      T* prob = prob_s + i * chunk;
      T top = max_s[i];
      for (int s = lane; s < len; s += 32) top = prob[s] > top ? prob[s] : top;
      top = warp_max(top);
      T den = 0;
      for (int s = lane; s < len; s += 32) {
        const T e_z = exp(prob[s] - top);
        prob[s] = e_z;
        den += e_z * weights_s[s];
      }
      den = warp_sum(den);
      if (lane == 0) {
        const T rescale = max_s[i] > -INFINITY ? exp(max_s[i] - top) : T(0);
        rescale_s[i] = rescale;
        den_s[i] = den_s[i] * rescale + den;
        max_s[i] = top;
      }
    }
    __syncthreads();
    decode_values<T, kQ>(prob_s, values_s, rescale_s, acc_s, value_row, dvi, queries, len, chunk);
  }
  __syncthreads();

  const T* vmin = p.value_min ? p.value_min + g * p.dv : nullptr;
  const T* vmax = p.value_max ? p.value_max + g * p.dv : nullptr;
  scalar_t* out = p.out + g * p.queries * p.dv;
  if (p.cluster == 1) {
    for (int o = threadIdx.x; o < outputs; o += kDecodeThreads) {
      out[o] = store_as<scalar_t, T>(finish(acc_s[o], den_s[o / dvi], vmin, vmax, p.center_values, o % dvi));
    }
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The cluster's spans: rescale every rank's partial results to the global maximum and sum them
  // in rank order. Rank k finishes outputs [k · share, (k + 1) · share).
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int ranks = static_cast<int>(p.cluster);
  cluster.sync();  // every rank's partial results are complete
  for (int t = threadIdx.x; t < queries * ranks; t += kDecodeThreads) {
    factor_s[t] = cluster.map_shared_rank(max_s, t % ranks)[t / ranks];
  }
  __syncthreads();
  for (int i = warp; i < queries; i += kWarps) {
    T top = -INFINITY;
    for (int k = lane; k < ranks; k += 32) top = factor_s[i * ranks + k] > top ? factor_s[i * ranks + k] : top;
    top = warp_max(top);
    T den = 0;
    for (int k = lane; k < ranks; k += 32) {
      const T m = factor_s[i * ranks + k];
      const T factor = m > -INFINITY ? exp(m - top) : T(0);  // an empty span weighs 0
      factor_s[i * ranks + k] = factor;
      den += factor * cluster.map_shared_rank(den_s, k)[i];
    }
    den = warp_sum(den);
    if (lane == 0) total_s[i] = den;
  }
  __syncthreads();
  const int share = (outputs + ranks - 1) / ranks;
  const int own_first = static_cast<int>(rank) * share;
  const int own_last = own_first + share < outputs ? own_first + share : outputs;
  for (int o = own_first + static_cast<int>(threadIdx.x); o < own_last; o += kDecodeThreads) {
    const int i = o / dvi;
    T part[kDecodeMaxCluster];
#pragma unroll
    for (int k = 0; k < kDecodeMaxCluster; ++k) {  // every remote load in flight before the sum
      if (k < ranks) part[k] = cluster.map_shared_rank(acc_s, k)[o];
    }
    T num = 0;
#pragma unroll
    for (int k = 0; k < kDecodeMaxCluster; ++k) {
      if (k < ranks) num += factor_s[i * ranks + k] * part[k];
    }
    out[o] = store_as<scalar_t, T>(finish(num, total_s[i], vmin, vmax, p.center_values, o % dvi));
  }
  cluster.sync();  // no rank leaves while another still reads its shared memory
#else
  __trap();  // the host launches clusters only on sm_90 and newer
#endif
}

}  // namespace kernels
}  // namespace wildcat

// Fast path of compress_kv's stages 2 and 3 (compress.cuh) for 16-bit keys and values with
// E = D ∈ {64, 128}, on sm_90: a thread-block cluster holds one bin's keys in shared memory.
//
// Why: the general pivot kernel runs a bin on one CTA, so a bin larger than one SM's shared
// memory (bins = 16 from N = 32k) re-reads its keys from global memory at every pivot step, and its
// weighted sums run as a separate kernel that reads the kernel rows back. Here the bin's points are
// split over the CTAs of a cluster (up to 16), each CTA copies its slice of keys once (16-byte
// cp.async, swizzled so that the per-point reads are free of bank conflicts), keeps its kernel rows
// in shared memory and its residuals in registers, and the pivot of every step is the argmax over
// the cluster's per-CTA candidates, which every CTA pushes into every CTA's inbox (st.async,
// counted by an mbarrier), so that no step reads another CTA's shared memory. After the last step
// each CTA forms its slice's weighted value sums (double, as the general kernel does) and writes
// them as one chunk of compress_kv's `partial` workspace, so stages 4 and 5 are shared. Each CTA also
// writes its slice's value bounds, from the staged values (or from global memory where it staged
// none), so that the statistics kernel need not read V on this path.
//
// The per-point arithmetic is the general pivot kernel's (same centring and norms, same order of
// the sums, same random stream) but for the squared distances of the kernel rows: m^2 |k_p - k_l|^2
// from the 16-bit keys' differences, one subtraction and one fused multiply-add per element, where
// the general kernel forms |x_p - x_l|^2 from centred, scaled coordinates. The two agree up to
// rounding, so the same seed picks the same pivots but where two scores tie to rounding (every
// group of the benchmark suite agreed, benchmarks/NOTES.md, session 10); the split of the weighted
// sums into chunks differs too.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "compress.cuh"
#include "device_helpers.cuh"

namespace wildcat {
namespace kernels {

constexpr int kResidentMaxThreads = 256;
constexpr int kResidentMaxSlots = 16;   // kernel rows held per point (slots per bin)
static_assert(kResidentMaxSlots <= kSequentialMaxSlots, "the resident kernel takes one pivot per step");
constexpr int kResidentMaxCluster = 16;  // 8 is portable; 16 needs the non-portable opt-in (H100 has it)
constexpr int kResidentSlotBlock = 8;    // weighted sums: slots accumulated per pass

// kPts consecutive points per thread: 2 (E = 64 and 128), or 4 at E = 64 for bins longer than 8
// CTAs of 512 points (up to 16 CTAs of 1,024: 128 KB of 16-bit keys per CTA).
template <int kE, int kPts>
struct ResidentShape {
  static_assert(kE == 64 || kE == 128, "the resident path serves E = 64 and E = 128");
  static_assert(kPts == 2 || (kE == 64 && kPts == 4), "2 points per thread, or 4 at E = 64");
  static constexpr int kPoints = kPts;
  static constexpr int kSliceMax = kResidentMaxThreads * kPoints;
  static constexpr int kPieces = kE / 8;  // 16-byte pieces per key row
};

// A warp's candidate for the next pivot, met with the other warps' in shared memory.
struct ResidentCandidate {
  float score;
  int32_t index;     // in the bin; -1: none
  float residual;    // the candidate's residual after this step: d_p of the next one
  int32_t unused;
};

// What a step needs of a CTA's candidate, pushed into every CTA's inbox (st.async), so that no CTA
// reads another's shared memory during the steps: the candidate, its 16-bit key and its older
// kernel rows R_j, j < the step's index; at step 0 also the CTA's largest s.
struct ResidentRecordHead {
  float score;
  int32_t index;   // in the bin; -1: none
  float residual;  // the candidate's residual: d_p of the step
  int32_t unused;
  double s_max;    // the CTA's largest s (step 0: s_ref is the cluster's)
  double unused2;
};
__host__ __device__ constexpr size_t resident_record_bytes(int e) {
  return sizeof(ResidentRecordHead) + 2 * static_cast<size_t>(e) + sizeof(float) * kResidentMaxSlots;
}

template <typename scalar_t>
struct ResidentParams {
  const scalar_t* keys;       // (G, N, E)
  const scalar_t* values;     // (G, N, E): D = E
  const float* key_mean;      // (G, E)
  const float* query_norm;    // (G) or null
  const int64_t* lengths;     // (G) keys per group, or null: N
  int64_t n, num_bins, rank, slots_max, length_max;
  int slice;                  // points per CTA: a multiple of 32 · kPoints; the weighted sums' chunk
  int cluster;                // CTAs per bin
  double beta;
  TauMode tau;
  float tol;
  SeedRef seed;
  double* sq_norm;            // (G*C, length_max): s_l
  double* kinv;               // (G*C, slots_max, slots_max)
  int64_t* pivots;            // (G*C, slots_max): local indices
  int32_t* counts;            // (G*C): pivots taken; -1 for a bin kept exactly
  double* max_sq_norm;        // (G*C): s_ref
  double* partial;            // (G*C, cluster, slots_max, E + 1): Σ_l R_j(l) e^{(s_l - s_ref)/2} [v_l | 1]
  double* value_min;          // (G*C, cluster, E): each CTA's slice's value bounds (stats finalize
  double* value_max;          // reduces them per group, in place of the statistics kernel)
};

// Shared memory: each warp's copy of the step's pivot key first, so that the distance loop reads
// it at fixed offsets from one base; the key slice (reused for the value slice), the kernel rows,
// the points' scale factors, then the small arrays. All offsets are 16-byte multiples.
struct ResidentLayout {
  size_t pivot_key, keys, rows, scale, w, kinv, mean, sums, inbox, kinv_next, inbox_full, record, warp_candidates, reduce,
      bytes;
};

__host__ __device__ inline size_t resident_align16(size_t x) { return (x + 15) / 16 * 16; }

__host__ __device__ inline ResidentLayout resident_layout(int e, int slice, int64_t slots_max, int cluster) {
  ResidentLayout l{};
  size_t at = 0;
  l.pivot_key = at, at += resident_align16(sizeof(float) * e * (kResidentMaxThreads / 32));  // [warp][e]
  l.keys = at, at += resident_align16(static_cast<size_t>(slice) * e * 2);  // keys, then values
  l.rows = at, at += resident_align16(sizeof(float) * slots_max * slice);
  l.scale = at, at += resident_align16(sizeof(double) * slice);
  l.w = at, at += resident_align16(sizeof(double) * kResidentMaxThreads);  // the weighted sums' weights, per thread
  l.kinv = at, at += resident_align16(sizeof(double) * slots_max * slots_max);
  l.mean = at, at += resident_align16(sizeof(float) * e);
  l.sums = at, at += resident_align16(sizeof(double) * kResidentSlotBlock * (e + 1));
  // the inbox ([step parity][rank]) and L's second buffer are used only by the steps (and L's copy
  // back after them), and the weighted sums' point factors and weights only after them: where they
  // fit, they take their place, the inbox first
  const size_t inbox_bytes = 2 * static_cast<size_t>(cluster) * resident_record_bytes(e);
  const size_t kinv_bytes = resident_align16(sizeof(double) * slots_max * slots_max);
  const size_t free_bytes = l.kinv - l.scale;
  if (inbox_bytes <= free_bytes) {
    l.inbox = l.scale;
  } else {
    l.inbox = at, at += inbox_bytes;
  }
  if (inbox_bytes + kinv_bytes <= free_bytes) {
    l.kinv_next = l.scale + inbox_bytes;
  } else if (inbox_bytes > free_bytes && kinv_bytes <= free_bytes) {
    l.kinv_next = l.scale;
  } else {
    l.kinv_next = at, at += kinv_bytes;
  }
  l.inbox_full = at, at += resident_align16(sizeof(uint64_t) * 2);
  l.record = at, at += resident_record_bytes(e);  // this CTA's, staged for the push
  // [step parity][warp]: warp 0 reads a step's candidates after the block barrier, and the next
  // step's are written before any later barrier (the inbox orders them, which racecheck does not see)
  l.warp_candidates = at, at += resident_align16(sizeof(ResidentCandidate) * 2 * (kResidentMaxThreads / 32));
  l.reduce = at, at += resident_align16(sizeof(double) * (4 + kResidentMaxThreads / 32));
  l.bytes = at;
  return l;
}

// Argmax over a warp; every lane gets the result.
__device__ __forceinline__ ArgMax resident_warp_argmax(ArgMax mine) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    ArgMax other;
    other.score = __shfl_xor_sync(0xffffffffu, mine.score, offset);
    other.index = __shfl_xor_sync(0xffffffffu, mine.index, offset);
    mine = better(mine, other);
  }
  return mine;
}

// Block-wide maximum for a runtime block size (a multiple of 32); every thread gets the result.
__device__ inline double resident_block_max(double mine, double* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double other = __shfl_xor_sync(0xffffffffu, mine, offset);
    mine = other > mine ? other : mine;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) scratch[warp] = mine;
  __syncthreads();
  double result = scratch[0];
  for (int w = 1; w < warps; ++w) result = scratch[w] > result ? scratch[w] : result;
  __syncthreads();
  return result;
}

// grid G * C * cluster (clusters of `cluster` CTAs along x), block slice / kPts threads. Two points
// per thread at E = 64 ask for two CTAs per SM (at most 128 registers): the steps are bound by
// latency, so the warps of a second CTA fill the first one's waits.
template <typename scalar_t, int kE, int kPts>
__global__ void __launch_bounds__(kResidentMaxThreads, kE == 64 && kPts == 2 ? 2 : 1)
    resident_bin_kernel(ResidentParams<scalar_t> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using Shape = ResidentShape<kE, kPts>;
  constexpr int kPieces = Shape::kPieces;
  cg::cluster_group cluster = cg::this_cluster();
  const int ranks = p.cluster;
  // a cluster barrier where there is a cluster; one CTA needs only its own
  const auto step_barrier = [&] {
    if (ranks > 1) {
      cluster.sync();
    } else {
      __syncthreads();
    }
  };
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t gb = blockIdx.x / ranks;
  const int64_t g = gb / p.num_bins, b = gb % p.num_bins;
  const int64_t valid = group_length(p.lengths, g, p.n);
  const int64_t length = balanced_size(valid, p.num_bins, b);
  const int64_t slots = balanced_size(p.rank, p.num_bins, b);
  const int64_t start = balanced_start(valid, p.num_bins, b);
  const int slice = p.slice;
  const int first = rank * slice;  // this CTA's points: [first, first + own) of the bin
  const int own = static_cast<int>(length - first < slice ? (length > first ? length - first : 0) : slice);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
  const int swizzle = tid & 7;  // rows of thread tid sit in pieces k ^ swizzle

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const ResidentLayout lay = resident_layout(kE, slice, p.slots_max, ranks);
  uint4* keys_s = reinterpret_cast<uint4*>(smem_raw + lay.keys);
  float* rows_s = reinterpret_cast<float*>(smem_raw + lay.rows);
  double* scale_s = reinterpret_cast<double*>(smem_raw + lay.scale);
  double* w_s = reinterpret_cast<double*>(smem_raw + lay.w);
  // L of step i (the inverse Cholesky factor of the pivots' kernel matrix) in kinv_s for even i,
  // in the second buffer for odd i: each step reads one and writes the other, so no warp's update
  // waits for another warp's bordering
  double* kinv_s = reinterpret_cast<double*>(smem_raw + lay.kinv);
  double* kinv_next_s = reinterpret_cast<double*>(smem_raw + lay.kinv_next);
  float* mean_s = reinterpret_cast<float*>(smem_raw + lay.mean);
  float* kp_s = reinterpret_cast<float*>(smem_raw + lay.pivot_key) + warp * kE;  // this warp's copy of the step's pivot key
  double* sums_s = reinterpret_cast<double*>(smem_raw + lay.sums);
  constexpr size_t kRecordBytes = resident_record_bytes(kE);
  static_assert(kRecordBytes % 16 == 0, "records travel in 16-byte pieces");
  unsigned char* inbox = smem_raw + lay.inbox;
  uint64_t* inbox_full = reinterpret_cast<uint64_t*>(smem_raw + lay.inbox_full);
  unsigned char* record_s = smem_raw + lay.record;
  const auto record_at = [&](int parity, int source) { return inbox + (parity * ranks + source) * kRecordBytes; };
  ResidentCandidate* warp_candidates = reinterpret_cast<ResidentCandidate*>(smem_raw + lay.warp_candidates);
  // [0] the CTA's largest centred norm (read by the cluster), [1] its largest s (pushed with its
  // first record), [2] the cluster's largest centred norm; then one double per warp for block maxima
  double* stats = reinterpret_cast<double*>(smem_raw + lay.reduce);
  double* max_scratch = stats + 4;

  const scalar_t* values = p.values + (g * p.n + start + first) * kE;
  const uint4* value_pieces = reinterpret_cast<const uint4*>(values);
  // The slice's value bounds from the warps' bounds per column (lo_s, hi_s: [warp][column], written
  // before the call): after a block barrier, the warps meet in a fixed order per column.
  const auto write_warp_bounds = [&](const float* lo_s, const float* hi_s) {
    __syncthreads();
    for (int c = tid; c < kE; c += blockDim.x) {
      float low = INFINITY, high = -INFINITY;
      for (int w = 0; w < warps; ++w) {
        low = fminf(lo_s[w * kE + c], low);
        high = fmaxf(hi_s[w * kE + c], high);
      }
      p.value_min[(gb * ranks + rank) * kE + c] = low;
      p.value_max[(gb * ranks + rank) * kE + c] = high;
    }
  };
  // The value bounds of this slice (§2.1) for the statistics' finalize, which reduces them per group,
  // where no weighted sums stage the values (they fold the bounds as they load them, below): read
  // from global memory. Each thread folds one piece column over every (threads / pieces)-th row;
  // then the lanes of a warp, then the warps, meet. Float holds 16-bit values exactly; fminf and
  // fmaxf skip NaN as the statistics kernel's comparisons do (one FMNMX each, where a comparison
  // and a select took two instructions), so NaN never enters.
  const auto write_value_bounds = [&] {
    static_assert(sizeof(double) * kResidentSlotBlock * (kE + 1) >= sizeof(float) * 2 * (kResidentMaxThreads / 32) * kE,
                  "the warps' bounds fit the weighted sums' staging");
    float* lo_s = reinterpret_cast<float*>(sums_s);  // free: no weighted sums on this path
    float* hi_s = lo_s + (kResidentMaxThreads / 32) * kE;
    const int k = tid % kPieces, row_groups = static_cast<int>(blockDim.x) / kPieces;
    float lo[8], hi[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) lo[j] = INFINITY, hi[j] = -INFINITY;
    for (int l = tid / kPieces; l < own; l += row_groups) {
      float v[8];
      unpack8(value_pieces[l * kPieces + k], v, scalar_t{});
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        lo[j] = fminf(v[j], lo[j]);
        hi[j] = fmaxf(v[j], hi[j]);
      }
    }
    for (int offset = kPieces; offset < 32; offset <<= 1) {  // the lanes that hold the same piece
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float a = __shfl_xor_sync(0xffffffffu, lo[j], offset), b = __shfl_xor_sync(0xffffffffu, hi[j], offset);
        lo[j] = fminf(a, lo[j]);
        hi[j] = fmaxf(b, hi[j]);
      }
    }
    if (lane < kPieces) {
#pragma unroll
      for (int j = 0; j < 8; ++j) lo_s[warp * kE + 8 * k + j] = lo[j], hi_s[warp * kE + 8 * k + j] = hi[j];
    }
    write_warp_bounds(lo_s, hi_s);
  };
  if (length <= slots) {  // kept exactly (§2.4): the decision is the whole cluster's
    if (rank == 0 && threadIdx.x == 0) p.counts[gb] = -1;
    write_value_bounds();
    return;
  }

  // Copy this slice's keys (16-byte pieces; row l's piece k lands in piece k ^ ((l / kPts) & 7));
  // the rows past `own` up to the threads' last point are zero, so that the passes over the
  // points load every thread's rows without a test (their results are never used).
  const scalar_t* keys = p.keys + (g * p.n + start + first) * kE;
  for (int idx = tid; idx < own * kPieces; idx += blockDim.x) {
    const int l = idx / kPieces, k = idx % kPieces;
    copy_async_16(shared_address(keys_s + l * kPieces + (k ^ ((l / kPts) & 7))), keys + static_cast<int64_t>(idx) * 8);
  }
  for (int idx = own * kPieces + tid; idx < static_cast<int>(blockDim.x) * kPts * kPieces; idx += blockDim.x) {
    keys_s[idx] = make_uint4(0, 0, 0, 0);
  }
  for (int c = tid; c < kE; c += blockDim.x) mean_s[c] = p.key_mean[g * kE + c];
  for (int idx = tid; idx < p.slots_max * p.slots_max; idx += blockDim.x) kinv_s[idx] = kinv_next_s[idx] = 0.0;
  // inbox_full[b] completes a phase when this CTA has armed it (one arrival with the bytes to
  // expect) and every CTA's record of the step has landed; the other CTAs' pushes may come first.
  // A CTA alone does not use it.
  if (tid == 0) {
    for (int b = 0; b < 2; ++b) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(shared_address(&inbox_full[b]))
                   : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // before the cluster barrier below
  }
  copy_async_wait();
  __syncthreads();

  const int l0 = tid * kPts;  // this thread's points l0 .. l0 + kPts - 1 (valid below `own`)
  // The CTA's candidate for step `step` from each thread's best point (and that point's residual):
  // the warps' bests meet in shared memory and warp 0 takes theirs, stages the record (the key and
  // the candidate's kernel rows of steps before `step`) and pushes it into every CTA's inbox for
  // the step's parity with st.async, counted by that CTA's inbox_full. A CTA alone stages the
  // record in its inbox instead (st.async addresses the shared memory of a cluster of two or more),
  // and the block barrier at the step's start hands it to every warp.
  const auto publish_candidate = [&](ArgMax mine, float mine_residual, int step) {
    const ArgMax top = resident_warp_argmax(mine);
    ResidentCandidate* candidates = warp_candidates + (step & 1) * (kResidentMaxThreads / 32);
    if (mine.index == top.index && mine.index >= 0) {
      candidates[warp] = ResidentCandidate{top.score, static_cast<int32_t>(top.index), mine_residual, 0};
    }
    if (lane == 0 && top.index < 0) candidates[warp] = ResidentCandidate{-INFINITY, -1, 0.0f, 0};
    __syncthreads();
    if (tid < 32) {
      const ResidentCandidate c = lane < warps ? candidates[lane] : ResidentCandidate{-INFINITY, -1, 0.0f, 0};
      const ArgMax cta = resident_warp_argmax(ArgMax{c.score, c.index});
      unsigned char* staged = ranks > 1 ? record_s : record_at(step & 1, 0);
      ResidentRecordHead* head = reinterpret_cast<ResidentRecordHead*>(staged);
      if (c.index == cta.index && c.index >= 0) *head = ResidentRecordHead{c.score, c.index, c.residual, 0, stats[1], 0.0};
      if (lane == 0 && cta.index < 0) *head = ResidentRecordHead{-INFINITY, -1, 0.0f, 0, stats[1], 0.0};
      if (cta.index >= 0) {
        const int l = static_cast<int>(cta.index) - first;
        uint4* key = reinterpret_cast<uint4*>(staged + sizeof(ResidentRecordHead));
        float* older = reinterpret_cast<float*>(staged + sizeof(ResidentRecordHead) + 2 * kE);
        if (lane < kPieces) key[lane] = keys_s[l * kPieces + (lane ^ ((l / kPts) & 7))];
        if (lane < step) older[lane] = rows_s[lane * slice + l];
      }
      __syncwarp();
      if (ranks == 1) return;
      constexpr int kRecordPieces = static_cast<int>(kRecordBytes / 16);
      const unsigned slot = shared_address(record_at(step & 1, rank));  // ours, in every inbox
      const unsigned full = shared_address(&inbox_full[step & 1]);
      for (int chunk = lane; chunk < ranks * kRecordPieces; chunk += 32) {
        const unsigned to_rank = static_cast<unsigned>(chunk / kRecordPieces), piece = chunk % kRecordPieces;
        const uint4 v = reinterpret_cast<const uint4*>(record_s)[piece];
        unsigned to, to_full;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(to) : "r"(slot + 16 * piece), "r"(to_rank));
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(to_full) : "r"(full), "r"(to_rank));
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(to),
                     "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(to_full)
                     : "memory");
      }
    }
  };
  // f(c, values[kPts][8]) over the pieces of this thread's points, in column order.
  auto for_each_piece = [&](auto&& f) {
#pragma unroll 2
    for (int k = 0; k < kPieces; ++k) {
      float x[kPts][8];
#pragma unroll
      for (int q = 0; q < kPts; ++q) {
        unpack8(keys_s[(l0 + q) * kPieces + (k ^ swizzle)], x[q], scalar_t{});
      }
      f(k * 8, x);
    }
  };

  // Centred norms; the bin's largest over the cluster sets the temperature (§2.5).
  double norm2[kPts] = {};
  for_each_piece([&](int c0, float (&x)[kPts][8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float mean = mean_s[c0 + j];
#pragma unroll
      for (int q = 0; q < kPts; ++q) {
        const float centred = x[q][j] - mean;
        norm2[q] += static_cast<double>(centred) * static_cast<double>(centred);
      }
    }
  });
  double local = 0;
#pragma unroll
  for (int q = 0; q < kPts; ++q) local = l0 + q < own && norm2[q] > local ? norm2[q] : local;
  local = resident_block_max(local, max_scratch);
  if (tid == 0) stats[0] = local;
  step_barrier();
  if (tid < 32) {
    double v = lane < ranks ? *cluster.map_shared_rank(&stats[0], lane) : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) {
      const double o = __shfl_xor_sync(0xffffffffu, v, offset);
      v = o > v ? o : v;
    }
    if (tid == 0) stats[2] = v;
  }
  __syncthreads();
  const double key_norm = sqrt(stats[2]);
  const double rq = p.query_norm != nullptr ? static_cast<double>(p.query_norm[g]) : key_norm;
  const float m_t = static_cast<float>(key_scale<double>(p.beta, rq, key_norm, length, p.tau));

  // s_l = |m (k_l - mean)|^2 = m^2 |k_l - mean|^2 in double, from the norms above instead of a
  // second pass over the keys (the general kernel squares the rounded float coordinates m (k_l -
  // mean): the same up to rounding); then the first pivot's scores (log d = 0).
  double s[kPts];
  const double m2 = static_cast<double>(m_t) * static_cast<double>(m_t);
#pragma unroll
  for (int q = 0; q < kPts; ++q) s[q] = norm2[q] * m2;
  const uint64_t seed = load_seed(p.seed);
  float residual[kPts];
  ArgMax best{-INFINITY, -1};
  local = 0;
  {
    uint64_t quad = ~0ull;
    Philox4 bits{};
#pragma unroll
    for (int q = 0; q < kPts; ++q) {
      residual[q] = 1.0f;
      if (l0 + q >= own) continue;
      p.sq_norm[gb * p.length_max + first + l0 + q] = s[q];
      local = s[q] > local ? s[q] : local;
      const uint64_t pos = static_cast<uint64_t>(start + first + l0 + q);
      if ((pos >> 2) != quad) quad = pos >> 2, bits = pivot_noise_bits(seed, static_cast<uint64_t>(g), 0u, quad);
      const float score = static_cast<float>(s[q]) - vlog(exponential_variate<float>(bits.v[pos & 3]));
      best = better(best, ArgMax{score, first + l0 + q});
    }
  }
  local = resident_block_max(local, max_scratch);
  if (tid == 0) stats[1] = local;
  publish_candidate(best, 1.0f, 0);

  // The exponential variates E of the next step's scores depend on the position and the step only,
  // so they are drawn while this step's records are in flight (before the inbox wait), where the
  // warps would otherwise stall. A point whose residual falls to tol or below,
  // and a thread's point past the slice's end, has one drawn and left unused.
  float next_noise[kPts];
  const auto draw_noise = [&](int step) {
    uint64_t quad = ~0ull;
    Philox4 bits{};
#pragma unroll
    for (int q = 0; q < kPts; ++q) {
      const uint64_t pos = static_cast<uint64_t>(start + first + l0 + q);
      if ((pos >> 2) != quad) {
        quad = pos >> 2;
        bits = pivot_noise_bits(seed, static_cast<uint64_t>(g), static_cast<uint32_t>(step), quad);
      }
      next_noise[q] = exponential_variate<float>(bits.v[pos & 3]);
    }
  };
  int count = 0;
  // the cluster's largest s, from the first step's records; zero stands when that step finds no
  // pivot (every score NaN), so max_sq_norm is still written from a defined value
  double s_ref = 0.0;
  for (int i = 0; i < slots; ++i) {
    // Every CTA's record of this step lands in the inbox of parity i & 1: tid 0 arms the count
    // (its phase i / 2) and every warp waits for it; the next step's exponential variates are drawn
    // first.
    if (i + 1 < slots) draw_noise(i + 1);
    if (ranks == 1) {
      __syncthreads();  // a CTA alone: its record, staged in its inbox by warp 0, is written
    } else {
      const unsigned full = shared_address(&inbox_full[i & 1]);
      if (tid == 0) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(full),
                     "r"(static_cast<unsigned>(ranks * kRecordBytes))
                     : "memory");
      }
      uint32_t done = 0;
      do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(full), "r"(static_cast<unsigned>((i >> 1) & 1))
            : "memory");
      } while (done == 0);
    }
    // Every warp takes the cluster's argmax, its own copy of the pivot's key and the bordering's
    // inputs from the records, so that no warp waits on another within a step.
    const ResidentRecordHead rec = lane < ranks ? *reinterpret_cast<const ResidentRecordHead*>(record_at(i & 1, lane))
                                              : ResidentRecordHead{-INFINITY, -1, 0.0f, 0, 0.0, 0.0};
    const int piv = static_cast<int>(resident_warp_argmax(ArgMax{rec.score, rec.index}).index);
    // no candidate: every residual <= tol (early stop), or at i = 0 every score NaN (non-finite
    // keys); the same on every warp of every CTA
    if (piv < 0) break;
    const int owner = piv / slice;
    const unsigned char* owner_record = record_at(i & 1, owner);
    if (lane < kPieces) unpack8(reinterpret_cast<const uint4*>(owner_record + sizeof(ResidentRecordHead))[lane], kp_s + lane * 8, scalar_t{});
    if (i == 0) {
      double v = lane < ranks ? rec.s_max : 0.0;
      for (int offset = 16; offset > 0; offset >>= 1) {
        const double o = __shfl_xor_sync(0xffffffffu, v, offset);
        v = o > v ? o : v;
      }
      s_ref = v;
    }
    const float d_p = __shfl_sync(0xffffffffu, rec.residual, owner);  // the pivot's residual
    __syncwarp();  // this warp's copy of the key is written
    count = i + 1;
    if (rank == 0 && tid == 0) p.pivots[gb * p.slots_max + i] = piv;

    // R_i(l) = exp(-|x_p - x_l|^2 / 2) with |x_p - x_l|^2 = m^2 |k_p - k_l|^2: the centring
    // cancels, and the difference of two 16-bit keys is exact in float unless their magnitudes are
    // 2^16 (bfloat16) or 2^13 (float16) apart, so each element costs one subtraction and one fused
    // multiply-add (no cancellation; exactly 0 distance for a copy of the pivot).
    float dist[kPts] = {};
    for_each_piece([&](int c0, float (&x)[kPts][8]) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float kp = kp_s[c0 + j];
#pragma unroll
        for (int q = 0; q < kPts; ++q) {
          const float diff = x[q][j] - kp;
          dist[q] += diff * diff;
        }
      }
    });
    const float exponent_scale = -0.5f * m_t * m_t;

    // The bordering, in every warp from the same inputs in the same order (so the same g
    // everywhere): g = (L a, -1) / sqrt(d_p) with a_j = R_j(p) from the owner's record; lane a
    // holds g_a, a <= i < 32.
    const double* kinv_cur = i & 1 ? kinv_next_s : kinv_s;
    double* kinv_new = i & 1 ? kinv_s : kinv_next_s;
    const double inv_sqrt_dp = 1.0 / sqrt(static_cast<double>(d_p));
    static_assert(kResidentMaxSlots <= 32, "lane a holds g_a");
    double g = lane == i ? -inv_sqrt_dp : 0.0;
    if (lane < i) {
      const float* older = reinterpret_cast<const float*>(owner_record + sizeof(ResidentRecordHead) + 2 * kE);
      double acc = 0;
      for (int j = 0; j < i; ++j) acc += kinv_cur[lane * p.slots_max + j] * static_cast<double>(older[j]);
      g = acc * inv_sqrt_dp;
    }
    const float g_t = static_cast<float>(g);
    // L_{i+1} = L_i + g g^T into the other buffer, read by the next step's bordering after
    // publish_candidate's barrier (L_i's row and column i are still zero). Whole rounds of the
    // block, so that every lane takes part in the shuffles.
    const int n = i + 1;
    for (int base = 0; base < n * n; base += blockDim.x) {
      const int idx = base + tid, a = idx / n, c = idx % n;
      const double g_a = __shfl_sync(0xffffffffu, g, a & 31), g_c = __shfl_sync(0xffffffffu, g, c);
      if (idx < n * n) kinv_new[a * p.slots_max + c] = kinv_cur[a * p.slots_max + c] + g_a * g_c;
    }
    // The kernel row and the residuals: y = g_i R_i(l) + sum_j g_j R_j(l), in that order.
    // m = 0 (a zero query norm) makes every kernel entry 1; the product would be inf * 0 = NaN
    // where 16-bit differences overflow float.
    float kernel[kPts], y[kPts];
    const float g_last = __shfl_sync(0xffffffffu, g_t, i);
#pragma unroll
    for (int q = 0; q < kPts; ++q) {
      kernel[q] = m_t > 0.0f ? vexp(dist[q] * exponent_scale) : 1.0f;
      y[q] = g_last * kernel[q];
    }
    for (int j = 0; j < i; ++j) {
      const float g_j = __shfl_sync(0xffffffffu, g_t, j);
#pragma unroll
      for (int q = 0; q < kPts; ++q) {
        if (l0 + q < own) y[q] += g_j * rows_s[j * slice + l0 + q];
      }
    }
    const bool last = i + 1 == slots;
    best = ArgMax{-INFINITY, -1};
    float best_residual = 0.0f;
#pragma unroll
    for (int q = 0; q < kPts; ++q) {
      const int l = l0 + q;
      if (l >= own) continue;
      rows_s[i * slice + l] = kernel[q];
      float d = residual[q] - y[q] * y[q];
      d = (first + l == piv || d < 0.0f) ? 0.0f : d;
      residual[q] = d;
      if (!last && d > p.tol) {
        const float score = vlog(normal_floor(d) / next_noise[q]) + static_cast<float>(s[q]);
        const ArgMax mine{score, first + l};
        if (better(best, mine).index == mine.index) best = mine, best_residual = d;
      }
    }
    if (last) break;
    publish_candidate(best, best_residual, i + 1);
  }
  if (count & 1) {  // L of the last step is in the second buffer, which the weighted sums reuse
    __syncthreads();
    for (int idx = tid; idx < count * count; idx += blockDim.x) {
      const int a = idx / count, c = idx % count;
      kinv_s[a * p.slots_max + c] = kinv_next_s[a * p.slots_max + c];
    }
  }

  // Weighted sums of this slice: Σ_l R_j(l) e^{(s_l - s_ref)/2} [v_l | 1], in double, by blocks of
  // kResidentSlotBlock slots, on the FP64 tensor cores. Each lane forms its own A element, the
  // product w_j(l) = R_j(l) e^{(s_l - s_ref)/2} of its slot and point (zero past `count`), rather
  // than staging the products in shared memory behind two block barriers per 128 points (NOTES.md,
  // session 9). Every product is still formed once. With 1, 2, 4 or 8 warps each warp meets the
  // same points in the same order as before, so the value sums are unchanged; other warp counts,
  // and the weights' sums, add in another fixed order.
  if (count > 0 && own > 0) {
    __syncthreads();  // the key slice is no longer read: the value slice takes its place
    // Tile nt's column n is value column n · kTiles + nt, so that a lane's B elements of a step
    // (its slot's columns) are whole 16-byte pieces of one row, read by one load each; row l's
    // piece k lands in piece k ^ value_swizzle(l), which puts the pieces that the 8 lanes of a
    // quarter warp read (2 slots of 4 rows) in distinct banks: a bank group spans 8 pieces, so at
    // E = 128 (a lane's pieces 4j + h and 4j + 2 + h) the swizzle takes values 0, 1, 4, 5.
    constexpr int kBlock = kResidentSlotBlock, kTiles = kE / 8, kLanePieces = kPieces / 8;
    static_assert(kBlock == 8, "m8n8k4 steps: 8 slots by 4 points");
    const auto value_swizzle = [](int l) { return kPieces == 8 ? 2 * (l & 3) : (l & 1) | ((l & 2) << 1); };
    for (int idx = tid; idx < own * kPieces; idx += blockDim.x) {
      const int l = idx / kPieces, k = idx % kPieces;
      copy_async_16(shared_address(keys_s + l * kPieces + (k ^ value_swizzle(l))), values + static_cast<int64_t>(idx) * 8);
    }
#pragma unroll
    for (int q = 0; q < kPts; ++q) {
      if (l0 + q < own) scale_s[l0 + q] = exp((s[q] - s_ref) / 2);
    }
    copy_async_wait();
    __syncthreads();
    const int slot = lane / 4, step_point = lane % 4;
    double* out = p.partial + ((gb * ranks + rank) * p.slots_max) * (kE + 1);
    // One block of slots; the first also folds the slice's value bounds (§2.1) for the statistics'
    // finalize, which reduces them per group, from the values its loads bring: lane columns
    // slot · kTiles + t, then the lanes of a slot, then the warps. Float holds 16-bit values
    // exactly; fminf and fmaxf skip NaN as the statistics kernel's comparisons do, so NaN never
    // enters.
    const auto slot_block = [&](int jb, auto with_bounds) {
      double acc[kTiles][2] = {};  // this warp's sums D(slot, n) of tile nt, n = 2 (lane % 4) + h
      double weight = 0;  // Σ w_j(l) of slot jb + slot over this lane's points
      float lo[kTiles], hi[kTiles];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) lo[t] = INFINITY, hi[t] = -INFINITY;
      const bool live = jb + slot < count;
      const float* slot_rows = rows_s + (jb + slot) * slice;
      // Steps of four points, dealt to the warps in turn: A(slot, point) are the products, B(point,
      // n) the values.
      for (int l4 = 4 * warp; l4 < own; l4 += 4 * warps) {
        const int row = l4 + step_point;
        const bool in = row < own;
        const double a = live && in ? static_cast<double>(slot_rows[row]) * scale_s[row] : 0.0;
        weight += a;
        float v[kTiles];
#pragma unroll
        for (int h = 0; h < kLanePieces; ++h) {
          const uint4 raw = in ? keys_s[row * kPieces + ((slot * kLanePieces + h) ^ value_swizzle(row))] : make_uint4(0, 0, 0, 0);
          unpack8(raw, v + 8 * h, scalar_t{});
        }
        if constexpr (decltype(with_bounds)::value) {
          if (in) {
#pragma unroll
            for (int t = 0; t < kTiles; ++t) {
              lo[t] = fminf(v[t], lo[t]);
              hi[t] = fmaxf(v[t], hi[t]);
            }
          }
        }
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) dmma_m8n8k4(acc[nt][0], acc[nt][1], a, static_cast<double>(v[nt]));
      }
      if constexpr (decltype(with_bounds)::value) {
        float* lo_s = reinterpret_cast<float*>(sums_s);  // free until this block's sums (the size is asserted above)
        float* hi_s = lo_s + (kResidentMaxThreads / 32) * kE;
        for (int offset = 1; offset < 4; offset <<= 1) {  // the lanes of a slot
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            const float a = __shfl_xor_sync(0xffffffffu, lo[t], offset), b = __shfl_xor_sync(0xffffffffu, hi[t], offset);
            lo[t] = fminf(a, lo[t]);
            hi[t] = fmaxf(b, hi[t]);
          }
        }
        if (step_point == 0) {
#pragma unroll
          for (int t = 0; t < kTiles; ++t) lo_s[warp * kE + slot * kTiles + t] = lo[t], hi_s[warp * kE + slot * kTiles + t] = hi[t];
        }
        write_warp_bounds(lo_s, hi_s);
      }
      __syncthreads();  // the previous block's sums and weights (or this one's bounds) are read out
      w_s[tid] = weight;
      for (int w = 0; w < warps; ++w) {  // fixed-order sums over the warps
        if (warp == w) {
#pragma unroll
          for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              double* cell = &sums_s[slot * (kE + 1) + (2 * step_point + h) * kTiles + nt];
              *cell = w == 0 ? acc[nt][h] : *cell + acc[nt][h];
            }
          }
        }
        __syncthreads();
      }
      if (tid < kBlock) {  // the lanes of slot tid: lane / 4 == tid in every warp, in thread order
        double total = 0;
        for (int w = 0; w < warps; ++w) {
#pragma unroll
          for (int k = 0; k < 4; ++k) total += w_s[w * 32 + tid * 4 + k];
        }
        sums_s[tid * (kE + 1) + kE] = total;
      }
      __syncthreads();
      const int rows_here = count - jb < kBlock ? count - jb : kBlock;
      for (int o = tid; o < rows_here * (kE + 1); o += blockDim.x) out[jb * (kE + 1) + o] = sums_s[o];
    };
    slot_block(0, std::true_type{});
    for (int jb = kBlock; jb < count; jb += kBlock) slot_block(jb, std::false_type{});
  } else {
    write_value_bounds();  // no values staged: no pivot taken, or no points here
  }
  if (rank == 0 && tid == 0) {
    p.counts[gb] = count;
    p.max_sq_norm[gb] = s_ref;
    const int64_t pivot0 = count > 0 ? p.pivots[gb * p.slots_max] : 0;
    for (int64_t i = count; i < slots; ++i) p.pivots[gb * p.slots_max + i] = pivot0;
  }
  __syncthreads();  // kinv_s is complete
  if (rank == 0) {
    double* kinv = p.kinv + gb * p.slots_max * p.slots_max;
    for (int idx = tid; idx < p.slots_max * p.slots_max; idx += blockDim.x) kinv[idx] = kinv_s[idx];
  }
  step_barrier();  // no CTA leaves before the cluster's last remote read (the norms') and pushes are done
#else
  __trap();  // the host takes this path only on sm_90 and newer
#endif
}

}  // namespace kernels
}  // namespace wildcat

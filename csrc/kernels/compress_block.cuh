// Block pivoting on the GPU (ALGORITHM.md §7): bins of more than 16 slots choose their pivots in
// rounds of 32 draws with rejection, so a bin's points are swept once per round instead of once
// per pivot, and each sweep forms the kernel rows of all the round's pivots at once.
//
// One thread-block cluster per bin (one CTA where the bins alone fill the GPU), persistent over
// the rounds, so the number of rounds can depend on the data without a host synchronisation:
//   - every CTA owns a run of the bin's points, aligned to the Philox quads of 4 positions, and
//     sweeps them: the rows of the round's new pivots, the residual updates, then the 32 draws of
//     the next round (Gumbel-max, one Philox call per quad and draw);
//   - the leader CTA reduces the 32 draws over the cluster (distributed shared memory), accepts or
//     rejects them one after the other, and publishes the pivots and their g vectors through
//     global memory for the next sweep.
// The arithmetic per point is the one-step kernel's (compress.cuh), operation for operation, except
// s = m² |k − mean|², taken from the norm pass (the same to a relative 1e-7), and
// the draws and acceptance tests follow the CPU code (csrc/ops/cpu/pivoted_cholesky.h). The
// acceptance works on the draws' Schur complement given the older pivots, a 32 × 32 matrix in
// double eliminated one accepted pivot at a time (the CPU borders L and updates the later draws at
// every pivot; the two are the same recurrences), and the round's g vectors come from the
// triangular factor of those eliminations. Rounding therefore differs from the CPU's in double and
// in the draws' float residuals, and a group whose acceptance test or argmax ties to rounding can
// take other pivots: the same seed gives the same pivots in almost every group (test_cuda.py asks
// for 99%). Stages 3-5 of compress.cuh (weighted sums, finalize, write_group) read the same
// workspace as after the one-step kernel.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "block_pivoting.h"
#include "compress.cuh"

namespace wildcat {
namespace kernels {

constexpr int kBlockRowsStaged = 64;  // older g coefficients per staging pass, where the row cache cannot hold them all

template <typename scalar_t, typename T>
struct BlockPivotParams {
  const scalar_t* points;     // (G, N, E): keys, or rp_nystrom's points
  const float* key_mean;      // (G, E); null: the points are used as given (rp_nystrom)
  const T* query_norm;        // (G) or null (R_q = R_k)
  const int64_t* lengths;     // (G) keys per group, or null: N
  int64_t n, e, num_bins, rank, slots_max, length_max;
  int cluster;                // CTAs per bin
  int cached_rows;            // older kernel rows at the draws kept in shared memory by the leader
  bool round_in_smem;         // the round's L_old R and g vectors in shared memory, else round_ws
  double* round_ws;           // (G*C, 2, kBlockDraws, slots_max)
  double beta;
  TauMode tau;
  T tol;
  SeedRef seed;
  bool sample_all;            // rp_nystrom: sample even when rank >= length
  bool vector_points;         // rows of whole 16-byte pieces from a 16-byte aligned base: read by pieces
  T* residual;                // (G*C, length_max)
  T* score_base;              // (G*C, length_max): log d + s of the round's draws
  double* sq_norm;            // (G*C, length_max)
  T* rows;                    // (G*C, slots_max, length_max)
  double* kinv;               // (G*C, slots_max, slots_max), zero-initialised
  double* g_table;            // (G*C, slots_max, slots_max): row i holds slot i's g_0 … g_i
  int64_t* pivots;            // (G*C, slots_max)
  int32_t* counts;            // (G*C)
  double* max_sq_norm;        // (G*C)
};

template <typename T>
struct BlockDraw {
  T score;
  int32_t index;  // in the bin; -1: none
};

template <typename T>
__device__ __forceinline__ BlockDraw<T> better_draw(BlockDraw<T> a, BlockDraw<T> b) {
  // larger score wins; ties go to the smaller index (the CPU's first maximum)
  if (b.index >= 0 && (a.index < 0 || b.score > a.score || (b.score == a.score && b.index < a.index))) return b;
  return a;
}

// The leader's decision of a round, read by the cluster.
struct BlockRoundState {
  int32_t first, fresh, done, unused;
};

// Shared memory offsets (bytes, 16-byte aligned); the same on every CTA of a cluster.
struct BlockLayout {
  size_t draws, warp_draws, state, stats, mean, coords, g_old, g_new, fresh_pivots, draw_index, draw_start,
      draw_residual, draw_uniform, slot_draw, draw_kernel, column, pivot_inv_root, alive, round, cached, bytes;
};

__host__ __device__ inline size_t block_align16(size_t x) { return (x + 15) / 16 * 16; }

template <typename T>
__host__ __device__ inline BlockLayout block_layout(int64_t e, int64_t slots_max, bool round_in_smem, int cached_rows,
                                                    int threads) {
  constexpr int B = kBlockDraws;
  BlockLayout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += block_align16(bytes);
    return here;
  };
  l.draws = take(sizeof(BlockDraw<T>) * B);
  l.warp_draws = take(sizeof(BlockDraw<T>) * B * (threads / 32));
  l.state = take(sizeof(BlockRoundState));
  l.stats = take(sizeof(double) * 2);
  l.mean = take(sizeof(T) * e);
  l.coords = take(sizeof(T) * (e + 1) * B);  // sweep: new pivots [c][i]; leader: draws [j][c]
  // sweep: older rows' g coefficients; leader: the draws' Schur complement (B × B double)
  const size_t g_old_bytes = sizeof(T) * kBlockRowsStaged * B, schur_bytes = sizeof(double) * B * B;
  l.g_old = take(g_old_bytes > schur_bytes ? g_old_bytes : schur_bytes);
  l.g_new = take(sizeof(T) * B * B);
  l.fresh_pivots = take(sizeof(int64_t) * B);
  l.draw_index = take(sizeof(int32_t) * B);
  l.draw_start = take(sizeof(T) * B);
  l.draw_residual = take(sizeof(T) * B);
  l.draw_uniform = take(sizeof(T) * B);
  l.slot_draw = take(sizeof(int32_t) * B);
  l.draw_kernel = take(sizeof(T) * B * B);
  l.column = take(sizeof(double) * B);
  l.pivot_inv_root = take(sizeof(double) * B);
  l.alive = take(sizeof(int32_t) * B);
  l.round = take(round_in_smem ? sizeof(double) * 2 * B * slots_max : 0);
  l.cached = take(sizeof(T) * static_cast<size_t>(cached_rows) * B);
  l.bytes = at;
  return l;
}

template <typename scalar_t, typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, 1) block_pivot_kernel(BlockPivotParams<scalar_t, T> p) {
  constexpr int B = kBlockDraws;
  constexpr int kWarps = kThreads / 32;
  const int ranks = p.cluster;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const auto cluster_barrier = [&] {
    if (ranks > 1) {
      cluster.sync();
    } else {
      __syncthreads();
    }
  };
  // `ptr` in the shared memory of CTA `r` of the cluster
  const auto remote = [&](auto* ptr, int r) { return ranks > 1 ? cluster.map_shared_rank(ptr, r) : ptr; };
#else
  // before sm_90 the host launches one CTA per bin
  const int rank = 0;
  const auto cluster_barrier = [] { __syncthreads(); };
  const auto remote = [](auto* ptr, int) { return ptr; };
#endif
  const int64_t gb = blockIdx.x / ranks;
  const int64_t g = gb / p.num_bins, b = gb % p.num_bins;
  const int64_t valid = group_length(p.lengths, g, p.n);
  const int64_t length = balanced_size(valid, p.num_bins, b);
  const int64_t slots = balanced_size(p.rank, p.num_bins, b);
  const int64_t start = balanced_start(valid, p.num_bins, b);
  const int64_t e = p.e, lmax = p.length_max, smax = p.slots_max;
  if (!uses_block_pivoting(slots)) return;  // the one-step kernel's bin
  if (length <= slots && !p.sample_all) {   // kept exactly (§2.4): the whole cluster's decision
    if (rank == 0 && threadIdx.x == 0) p.counts[gb] = -1;
    return;
  }
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int e32 = static_cast<int>(e);  // the staging loops' index width (E is bounded by shared memory)

  // This CTA's points: whole Philox quads (positions 4q … 4q + 3 of the group), so that one call
  // gives a quad's noise; [lo, hi) in the bin.
  const int64_t quad_first = start >> 2, quads = ((start + length - 1) >> 2) - quad_first + 1;
  const int64_t quads_per_rank = (quads + ranks - 1) / ranks;
  const int64_t quad_lo = quad_first + rank * quads_per_rank;
  const int64_t quad_hi = quad_lo + quads_per_rank < quad_first + quads ? quad_lo + quads_per_rank : quad_first + quads;
  const int64_t lo_raw = quad_lo * 4 - start, hi_raw = quad_hi * 4 - start;
  const int64_t lo = lo_raw < 0 ? 0 : (lo_raw > length ? length : lo_raw);
  const int64_t hi = hi_raw > length ? length : (hi_raw < lo ? lo : hi_raw);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BlockLayout lay = block_layout<T>(e, smax, p.round_in_smem, p.cached_rows, kThreads);
  BlockDraw<T>* draws = reinterpret_cast<BlockDraw<T>*>(smem_raw + lay.draws);
  BlockDraw<T>* warp_draws = reinterpret_cast<BlockDraw<T>*>(smem_raw + lay.warp_draws);
  BlockRoundState* state = reinterpret_cast<BlockRoundState*>(smem_raw + lay.state);
  double* stats = reinterpret_cast<double*>(smem_raw + lay.stats);
  T* mean = reinterpret_cast<T*>(smem_raw + lay.mean);
  T* coords = reinterpret_cast<T*>(smem_raw + lay.coords);
  T* g_new = reinterpret_cast<T*>(smem_raw + lay.g_new);
  T* g_old = reinterpret_cast<T*>(smem_raw + lay.g_old);
  int64_t* fresh_pivots = reinterpret_cast<int64_t*>(smem_raw + lay.fresh_pivots);
  int32_t* draw_index = reinterpret_cast<int32_t*>(smem_raw + lay.draw_index);
  T* draw_start = reinterpret_cast<T*>(smem_raw + lay.draw_start);
  T* draw_residual = reinterpret_cast<T*>(smem_raw + lay.draw_residual);
  T* draw_uniform = reinterpret_cast<T*>(smem_raw + lay.draw_uniform);
  int32_t* slot_draw = reinterpret_cast<int32_t*>(smem_raw + lay.slot_draw);
  T* draw_kernel = reinterpret_cast<T*>(smem_raw + lay.draw_kernel);
  double* schur = reinterpret_cast<double*>(smem_raw + lay.g_old);  // the leader's, between sweeps
  double* column = reinterpret_cast<double*>(smem_raw + lay.column);
  double* pivot_inv_root = reinterpret_cast<double*>(smem_raw + lay.pivot_inv_root);
  int32_t* alive = reinterpret_cast<int32_t*>(smem_raw + lay.alive);
  // the leader's per-round matrices: old_r[j][c] = (L_old R_old(:, c_j))_c and fresh_g[q][c], g of
  // the round's q-th pivot
  double* old_r = p.round_in_smem ? reinterpret_cast<double*>(smem_raw + lay.round)
                                  : p.round_ws + (blockIdx.x / ranks) * 2 * B * p.slots_max;
  double* fresh_g = old_r + B * p.slots_max;
  T* row_cache = reinterpret_cast<T*>(smem_raw + lay.cached);

  const scalar_t* keys = p.points + (g * p.n + start) * e;
  T* residual = p.residual + gb * lmax;
  T* score_base = p.score_base + gb * lmax;
  double* sq_norm = p.sq_norm + gb * lmax;
  T* rows = p.rows + gb * smax * lmax;
  double* kinv = p.kinv + gb * smax * smax;
  double* g_table = p.g_table + gb * smax * smax;
  int64_t* pivots = p.pivots + gb * smax;
  const uint64_t seed = load_seed(p.seed);
  const bool centred = p.key_mean != nullptr;

  for (int64_t c = tid; c < e; c += kThreads) mean[c] = centred ? static_cast<T>(p.key_mean[g * e + c]) : T(0);
  __syncthreads();
  // Coordinates c0 … c0 + kBatch − 1 of point l of the bin, as T (0 past e), read from the keys as
  // given: a thread reads its own point's row, a 16-byte piece at a time where rows allow it.
  // `whole` (a std::bool_constant) true says that c0 + kBatch <= e: no coordinate is tested.
  constexpr int kBatch = 8;  // coordinates loaded together, then their arithmetic
  const auto load_keys = [&](int64_t l, int64_t c0, T (&xs)[kBatch], auto whole) {
    const scalar_t* row = keys + l * e + c0;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if constexpr (kBatch % kVec == 0) {
      if (p.vector_points && (whole || c0 + kBatch <= e)) {
#pragma unroll
        for (int v = 0; v < kBatch / kVec; ++v) {
          T piece[kVec];
          unpack_piece<scalar_t>(__ldg(reinterpret_cast<const uint4*>(row) + v), piece);
#pragma unroll
          for (int u = 0; u < kVec; ++u) xs[v * kVec + u] = piece[u];
        }
        return;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) xs[u] = whole || c0 + u < e ? static_cast<T>(to_acc(row[u])) : T(0);
  };
  // store(i, load(i)) for i < count over the CTA, kBatch loads in flight per thread: a loop of
  // single global loads would wait for each in turn (each sweep and acceptance stages a few
  // thousand entries, about 1 µs per round trip). 32-bit indices: a 64-bit division by a runtime
  // divisor costs about a hundred instructions.
  const auto gather = [&](int count, auto load, auto store) {
    using V = decltype(load(0));
    for (int i0 = tid; i0 < count; i0 += kBatch * kThreads) {
      V v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (i0 + u * kThreads < count) v[u] = load(i0 + u * kThreads);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (i0 + u * kThreads < count) store(i0 + u * kThreads, v[u]);
      }
    }
  };
  // the same, centred and scaled: x = (k − mean) m
  const auto load_coords = [&](int64_t l, int64_t c0, T m_t, T (&xs)[kBatch], auto whole) {
    load_keys(l, c0, xs, whole);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) xs[u] = whole || c0 + u < e ? mul_rn(xs[u] - mean[c0 + u], m_t) : T(0);
  };

  // Cluster-wide maximum of one double per CTA (every CTA gets it, in rank order).
  const auto cluster_max = [&](double mine, int slot) {
    mine = block_max<kThreads>(mine, reinterpret_cast<double*>(warp_draws));
    if (tid == 0) stats[slot] = mine;
    cluster_barrier();
    double all = 0;
    for (int r = 0; r < ranks; ++r) {
      const double v = *remote(&stats[slot], r);
      all = v > all ? v : all;
    }
    return all;
  };

  // Centred norms, the bin's largest, the temperature (§2.5): the one-step kernel's arithmetic.
  double norm_max = 0;
  for (int64_t l = lo + tid; l < hi; l += kThreads) {
    double norm2 = 0;
    for (int64_t c0 = 0; c0 < e; c0 += 4 * kBatch) {  // four batches' loads in flight at once
      T xs[4][kBatch];
#pragma unroll
      for (int v = 0; v < 4; ++v) load_coords(l, c0 + v * kBatch, T(1), xs[v], std::false_type{});
#pragma unroll
      for (int v = 0; v < 4; ++v) {
#pragma unroll
        for (int u = 0; u < kBatch; ++u) norm2 += static_cast<double>(xs[v][u]) * static_cast<double>(xs[v][u]);
      }
    }
    sq_norm[l] = norm2;  // |k_l − mean|², scaled to s_l below
    norm_max = norm2 > norm_max ? norm2 : norm_max;
  }
  const double key_norm = sqrt(cluster_max(norm_max, 0));
  double m = 1.0;
  if (centred) {
    const double rq = p.query_norm != nullptr ? static_cast<double>(p.query_norm[g]) : key_norm;
    m = key_scale<double>(p.beta, rq, key_norm, length, p.tau);
  }
  const T m_t = static_cast<T>(m);
  // a point's coordinate from the (read-only) input keys, for points of other CTAs
  const auto x_input = [&](int64_t l, int64_t c) -> T { return mul_rn(static_cast<T>(to_acc(keys[l * e + c])) - mean[c], m_t); };

  // s_l = |m (k_l − mean)|² = m² |k_l − mean|², from the norm pass (each thread its own points)
  // rather than a second pass over the keys; the CPU squares the rounded float coordinates, the
  // same to rounding (a relative 1e-7)
  const double m2 = static_cast<double>(m_t) * static_cast<double>(m_t);
  double s_max = 0;
  for (int64_t l = lo + tid; l < hi; l += kThreads) {
    const double s = sq_norm[l] * m2;
    sq_norm[l] = s;
    s_max = s > s_max ? s : s_max;
    residual[l] = T(1);
  }
  s_max = cluster_max(s_max, 1);
  if (rank == 0 && tid == 0) p.max_sq_norm[gb] = s_max;
  __syncthreads();

  // ---- sweep: rows and residual updates of the pivots [first, first + fresh) ----
  const auto sweep = [&](int first, int fresh) {
    for (int i = tid; i < fresh; i += kThreads) fresh_pivots[i] = __ldcg(pivots + first + i);
    __syncthreads();
    gather(  // coords[c][i]: the new pivots' points
        e32 * B, [&](int idx) { return idx % B < fresh ? x_input(fresh_pivots[idx % B], idx / B) : T(0); },
        [&](int idx, T v) { coords[idx] = v; });
    // the g coefficients load as doubles and round to T as they are stored, so that a gather's
    // loads are all in flight before the first conversion waits on one
    gather(  // g_new[m][i]: slot first + i's coefficient of slot first + m (m <= i)
        B * B, [&](int idx) {
          const int64_t mm = idx / B, i = idx % B;
          return i < fresh && mm <= i ? __ldcg(g_table + (first + i) * smax + first + mm) : 0.0;
        },
        [&](int idx, double v) { g_new[idx] = static_cast<T>(v); });
    // g_stage[m][i]: slot first + i's coefficient of the older slot m0 + m. All older slots at once
    // in the leader's row cache where they fit (it is idle outside the acceptance), else passes of
    // kBlockRowsStaged through g_old, each behind two block barriers per block of points.
    const bool old_in_cache = first <= p.cached_rows;
    T* const g_stage = old_in_cache ? row_cache : g_old;
    const int per_pass = old_in_cache ? (first > 0 ? first : 1) : kBlockRowsStaged;
    const int passes = (first + per_pass - 1) / per_pass;
    const auto stage_old = [&](int m0) {
      const int count = first - m0 < per_pass ? first - m0 : per_pass;
      gather(
          count * B, [&](int idx) {
            const int64_t mm = idx / B, i = idx % B;
            return i < fresh ? __ldcg(g_table + (first + i) * smax + m0 + mm) : 0.0;
          },
          [&](int idx, double v) { g_stage[idx] = static_cast<T>(v); });
    };
    if (passes == 1) stage_old(0);
    __syncthreads();
    // The points' work for the first 8 · kGroups pivots of the round (kGroups = ⌈fresh / 8⌉), so
    // that no loop over the pivots tests `fresh` per group of 8. Pivots past `fresh` have zero
    // coordinates and coefficients; their rows are formed and dropped.
    const auto sweep_points = [&](auto groups) {
      constexpr int P = 8 * decltype(groups)::value;
      // |x_l − x_p|² of coordinate c for the P pivots: exactly 0 for a key equal to the pivot
      const auto add_coordinate = [&](int64_t c, T x, T (&kernel)[P]) {
        const T* xp = coords + c * B;
#pragma unroll
        for (int i = 0; i < P; ++i) {
          const T diff = x - xp[i];
          kernel[i] += diff * diff;
        }
      };
      for (int64_t base = lo; base < hi; base += kThreads) {  // the same trip count in every thread
        const int64_t l = base + tid;
        const bool active = l < hi;
        T y[P];
        if (active) {
          T kernel[P];
#pragma unroll
          for (int i = 0; i < P; ++i) kernel[i] = T(0);
          int64_t c0 = 0;
          for (; c0 + kBatch <= e; c0 += kBatch) {  // whole batches of coordinates, then the rest
            T xs[kBatch];
            load_coords(l, c0, m_t, xs, std::true_type{});
#pragma unroll
            for (int u = 0; u < kBatch; ++u) add_coordinate(c0 + u, xs[u], kernel);
          }
          if (c0 < e) {
            T xs[kBatch];
            load_coords(l, c0, m_t, xs, std::false_type{});
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
              if (c0 + u < e) add_coordinate(c0 + u, xs[u], kernel);
            }
          }
          // the rows go out now, so that the kernel values hold no registers through the older
          // rows' loop; the round's earlier rows read them back below
          int64_t at = first * lmax + l;
#pragma unroll
          for (int i = 0; i < P; ++i, at += lmax) {
            const T kernel_i = vexp(kernel[i] * T(-0.5));
            y[i] = g_new[i * B + i] * kernel_i;  // the pivot's own term first, as in one step
            if (i < fresh) rows[at] = kernel_i;
          }
        }
        for (int pass = 0; pass < passes; ++pass) {  // older rows, in slot order
          const int m0 = pass * per_pass;
          if (passes > 1) {
            __syncthreads();
            stage_old(m0);
            __syncthreads();
          }
          const int count = first - m0 < per_pass ? first - m0 : per_pass;
          if (active) {
            int64_t at = m0 * lmax + l;  // rows[m0 + mm][l], advanced a row at a time
            int mm0 = 0;
            for (; mm0 + kBatch <= count; mm0 += kBatch) {  // kBatch rows' loads in flight
              T rs[kBatch];
#pragma unroll
              for (int u = 0; u < kBatch; ++u, at += lmax) rs[u] = rows[at];
#pragma unroll
              for (int u = 0; u < kBatch; ++u) {
                const T* gm = g_stage + (mm0 + u) * B;
#pragma unroll
                for (int i = 0; i < P; ++i) y[i] += gm[i] * rs[u];
              }
            }
            for (; mm0 < count; ++mm0, at += lmax) {
              const T r = rows[at];
              const T* gm = g_stage + mm0 * B;
#pragma unroll
              for (int i = 0; i < P; ++i) y[i] += gm[i] * r;
            }
          }
        }
        if (active) {
          // this round's earlier rows, in slot order, read back 8 at a time; g_new is 0 above the
          // diagonal and in the columns past `fresh`, so rows past `fresh` (read as 0) add nothing
          // to the y that count
          int64_t at = first * lmax + l;
#pragma unroll
          for (int mm0 = 0; mm0 < P; mm0 += 8) {
            T earlier[8];
#pragma unroll
            for (int u = 0; u < 8; ++u, at += lmax) earlier[u] = mm0 + u < fresh ? rows[at] : T(0);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
#pragma unroll
              for (int i = mm0 + u + 1; i < P; ++i) y[i] += g_new[(mm0 + u) * B + i] * earlier[u];
            }
          }
          T d = residual[l];
#pragma unroll
          for (int i = 0; i < P; ++i) {
            if (i < fresh) {
              d = d - y[i] * y[i];
              d = (l == fresh_pivots[i] || d < T(0)) ? T(0) : d;
            }
          }
          residual[l] = d;
        }
      }
    };
    static_assert(B == 32, "the sweep dispatches on groups of 8 of the round's 32 draws");
    switch ((fresh + 7) / 8) {
      case 1: sweep_points(std::integral_constant<int, 1>{}); break;
      case 2: sweep_points(std::integral_constant<int, 2>{}); break;
      case 3: sweep_points(std::integral_constant<int, 3>{}); break;
      default: sweep_points(std::integral_constant<int, 4>{}); break;
    }
    __syncthreads();  // coords, g_new and the staged coefficients are reused
  };

  // ---- draws: this CTA's 32 candidates of round `round` ----
  const auto draw = [&](int64_t round) {
    // each point's log d + s (-inf at or below tol), once per round
    for (int64_t l = lo + tid; l < hi; l += kThreads) {
      const T d = residual[l];
      score_base[l] = d > p.tol ? vlog(normal_floor(d)) + static_cast<T>(sq_norm[l]) : T(-INFINITY);
    }
    __syncthreads();
    // Draws kDrawGroup at a time: one pass over this thread's quads per group, each quad's log d + s
    // loaded once for the group (a running best for all 32 draws would hold 64 registers); then
    // the group's warp maxima, reduced side by side, with draw j's ending on lane j.
    constexpr int kDrawGroup = 8;
    BlockDraw<T> mine{T(0), -1};
#pragma unroll 1
    for (int j0 = 0; j0 < B; j0 += kDrawGroup) {
      BlockDraw<T> best[kDrawGroup];
#pragma unroll
      for (int u = 0; u < kDrawGroup; ++u) best[u] = BlockDraw<T>{T(0), -1};
      for (int64_t q = quad_lo + tid; q < quad_hi; q += kThreads) {
        T base[4];
        bool any = false;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const int64_t l = q * 4 + w - start;
          base[w] = l >= lo && l < hi ? score_base[l] : T(-INFINITY);
          any = any || base[w] > T(-INFINITY);
        }
        if (!any) continue;
#pragma unroll
        for (int u = 0; u < kDrawGroup; ++u) {
          const Philox4 bits = pivot_noise_bits(seed, static_cast<uint64_t>(g), block_draw_step(round, j0 + u),
                                                static_cast<uint64_t>(q));
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            if (base[w] > T(-INFINITY)) {
              const T score = base[w] - vlog(exponential_variate<T>(bits.v[w]));
              best[u] = better_draw(best[u], BlockDraw<T>{score, static_cast<int32_t>(q * 4 + w - start)});
            }
          }
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
        for (int u = 0; u < kDrawGroup; ++u) {
          BlockDraw<T> o;
          o.score = __shfl_xor_sync(0xffffffffu, best[u].score, offset);
          o.index = __shfl_xor_sync(0xffffffffu, best[u].index, offset);
          best[u] = better_draw(best[u], o);
        }
      }
#pragma unroll
      for (int u = 0; u < kDrawGroup; ++u) {
        if (lane == j0 + u) mine = best[u];
      }
    }
    warp_draws[warp * B + lane] = mine;
    __syncthreads();
    if (tid < B) {
      BlockDraw<T> v{T(0), -1};
      for (int w = 0; w < kWarps; ++w) v = better_draw(v, warp_draws[w * B + tid]);
      draws[tid] = v;
    }
  };

  // ---- the leader: acceptance of round `round`'s draws; returns through `state` ----
  // Draw j's residual given the older pivots and the round's pivots accepted before it is the
  // diagonal of the draws' Schur complement, E = G(C, C) − R_old(:, C)ᵀ L_old R_old(:, C), after
  // eliminating those pivots: accepting draw j with residual d_j takes E −= E(:, j) E(j, :) / d_j,
  // which is what bordering it into L and updating the later draws does (pivoted_cholesky.h). So
  // the acceptance runs on 32 × 32 entries in double, two block barriers per accepted pivot; the
  // eliminated columns are the factor C of the round (C(q, q) = sqrt(d), below it the columns), and
  // g of the round's pivot q is row q of C⁻¹ applied to [−L_old R_old(:, p) | I], negated.
  const auto accept = [&](int64_t round, int count) {
    if (tid < B) {
      BlockDraw<T> v{T(0), -1};
      for (int r = 0; r < ranks; ++r) v = better_draw(v, *remote(&draws[tid], r));
      draw_index[tid] = v.index;
      draw_start[tid] = v.index >= 0 ? __ldcg(residual + v.index) : T(0);
      draw_residual[tid] = draw_start[tid];  // 0 for an empty draw: rejected
      alive[tid] = 1;
      const Philox4 bits = pivot_noise_bits(seed, static_cast<uint64_t>(g), block_accept_step(round, tid),
                                            static_cast<uint64_t>(start >> 2));
      draw_uniform[tid] = open_uniform<T>(bits.v[start & 3]);
    }
    __syncthreads();
    if (draw_index[0] < 0) {  // no residual above tol anywhere: early stop (all draws are empty)
      if (tid == 0) *state = BlockRoundState{count, 0, 1, 0};
      return;
    }
    gather(  // coords[j][c], rows of e + 1: the draws' points
        B * e32, [&](int idx) { return draw_index[idx / e32] >= 0 ? x_input(draw_index[idx / e32], idx % e32) : T(0); },
        [&](int idx, T v) { coords[(idx / e32) * (e32 + 1) + idx % e32] = v; });
    const int first = count;
    const int cached = first < p.cached_rows ? first : p.cached_rows;  // rows held in row_cache
    gather(  // row_cache[m][j] = R_m(c_j)
        cached * B, [&](int idx) { return draw_index[idx % B] >= 0 ? __ldcg(rows + (idx / B) * lmax + draw_index[idx % B]) : T(0); },
        [&](int idx, T v) { row_cache[idx] = v; });
    __syncthreads();
    // draw_kernel[j][k] = G(x_{c_j}, x_{c_k}), formed as the sweep forms R_j(c_k)
    for (int idx = tid; idx < B * B; idx += kThreads) {
      const int j = idx / B, k = idx % B;
      T dist = 0;
      for (int64_t c = 0; c < e; ++c) {
        const T diff = coords[k * (e + 1) + c] - coords[j * (e + 1) + c];
        dist += diff * diff;
      }
      draw_kernel[idx] = vexp(dist * T(-0.5));
    }
    // R_m(c_k) of an older slot m < first: from the cache or global memory (0 for an empty draw, as
    // in the cache; none reaches here today, since the draws are all empty or none is)
    const auto row_at_draw = [&](int mm, int k) -> T {
      if (mm < cached) return row_cache[mm * B + k];
      return draw_index[k] >= 0 ? __ldcg(rows + mm * lmax + draw_index[k]) : T(0);
    };
    // old_r[j][c] = (L_old R_old(:, c_j))_c: a thread per row c of L_old and half of the draws. L_old
    // comes in blocks of B rows staged through fresh_g (free until the acceptance ends), every
    // thread loading at once; L is symmetric, so row m's entries serve as column m's.
    for (int m0 = 0; m0 < first; m0 += B) {
      const int rows_here = first - m0 < B ? first - m0 : B;
      __syncthreads();  // the previous block is used up
      gather(
          rows_here * first, [&](int idx) { return __ldcg(kinv + (m0 + idx / first) * smax + idx % first); },
          [&](int idx, double v) { fresh_g[(idx / first) * smax + idx % first] = v; });
      // the block's rows at the draws, converted to double once (in schur's room, free until
      // the Schur complement): every thread would otherwise convert the same 16 per row
      for (int idx = tid; idx < rows_here * B; idx += kThreads) schur[idx] = static_cast<double>(row_at_draw(m0 + idx / B, idx % B));
      __syncthreads();
      for (int w = tid; w < 2 * first; w += kThreads) {
        const int c = w % first, half = (w / first) * (B / 2);
        double acc[B / 2];
#pragma unroll
        for (int j = 0; j < B / 2; ++j) acc[j] = m0 == 0 ? 0.0 : old_r[(half + j) * smax + c];
        for (int mm = 0; mm < rows_here; ++mm) {
          const double l_mc = fresh_g[mm * smax + c];
#pragma unroll
          for (int j = 0; j < B / 2; ++j) acc[j] += l_mc * schur[mm * B + half + j];
        }
#pragma unroll
        for (int j = 0; j < B / 2; ++j) old_r[(half + j) * smax + c] = acc[j];
      }
    }
    __syncthreads();
    // schur[k][l] = G(c_k, c_l) − R_old(:, c_k)ᵀ old_r[l]: each thread takes one draw k and
    // B² / kThreads of the l, kThreads / B apart, summed side by side (kThreads / B threads share k)
    constexpr int kSchurPerThread = B * B / kThreads;
    static_assert(B * B % kThreads == 0, "the draws' Schur complement is dealt evenly to the threads");
    {
      const int k = tid % B, l0 = tid / B;
      double acc[kSchurPerThread];
#pragma unroll
      for (int u = 0; u < kSchurPerThread; ++u) {
        const int l = l0 + u * (kThreads / B);
        acc[u] = static_cast<double>(draw_kernel[k * B + l]);
      }
      for (int mm = 0; mm < first; ++mm) {
        const double r_mk = static_cast<double>(row_at_draw(mm, k));
#pragma unroll
        for (int u = 0; u < kSchurPerThread; ++u) acc[u] -= r_mk * old_r[(l0 + u * (kThreads / B)) * smax + mm];
      }
#pragma unroll
      for (int u = 0; u < kSchurPerThread; ++u) schur[k * B + l0 + u * (kThreads / B)] = acc[u];
    }
    __syncthreads();
    // Acceptance in draw order; every thread takes the same decision from shared memory.
    for (int j = 0; j < B && count < slots; ++j) {
      const T dj = draw_residual[j];
      if (!(dj > p.tol && draw_uniform[j] * draw_start[j] < dj)) continue;  // rejected
      const int q = count - first;
      // column j of the eliminated matrix, scaled: C(·, q); the later draws' residuals lose its
      // square as the sweep's points lose y² (rounded to T, clamped at 0, 0 for the pivot itself)
      const double inv_root = 1.0 / sqrt(static_cast<double>(dj));
      if (tid < B) {
        const int k = tid;
        const double col = alive[k] ? schur[k * B + j] * inv_root : 0.0;
        column[k] = col;
        if (k > j) {
          const T y = static_cast<T>(col);
          T d = draw_residual[k] - y * y;
          d = (draw_index[k] == draw_index[j] || d < T(0)) ? T(0) : d;
          draw_residual[k] = d;
        }
        if (k == j) {
          alive[k] = 0;
          slot_draw[q] = j;
          pivot_inv_root[q] = inv_root;
        }
      }
      __syncthreads();
      // E −= C(·, q) C(·, q)ᵀ over the live draws; column j keeps C(·, q) for the live ones
      for (int idx = tid; idx < B * B; idx += kThreads) {
        const int k = idx / B, l = idx % B;
        if (!alive[k]) continue;
        if (l == j) {
          schur[idx] = column[k];
        } else if (alive[l]) {
          schur[idx] -= column[k] * column[l];
        }
      }
      ++count;
      __syncthreads();
    }
    const int fresh_count = count - first;
    // X = C⁻¹ (lower triangular), column q by thread q; fresh_g[r][first + q] = −X(r, q), g's
    // coefficient of the round's slot q in the round's pivot r (0 above the diagonal). The sum
    // Σ_{q<=t<r} C(r, t) X(t, q) runs in four chains.
    if (tid < fresh_count) {
      const int q = tid;
      for (int r = 0; r < fresh_count; ++r) {
        double x = 0;
        if (r == q) {
          x = pivot_inv_root[q];
        } else if (r > q) {
          const double* c_r = schur + slot_draw[r] * B;
          double acc[4] = {};
          int t = q;
          for (; t + 4 <= r; t += 4) {
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[u] += c_r[slot_draw[t + u]] * fresh_g[(t + u) * smax + first + q];
          }
          for (; t < r; ++t) acc[0] += c_r[slot_draw[t]] * fresh_g[t * smax + first + q];
          x = ((acc[0] + acc[1]) + (acc[2] + acc[3])) * pivot_inv_root[r];  // fresh_g holds −X
        }
        fresh_g[r * smax + first + q] = -x;
      }
    }
    __syncthreads();
    // older slots: g_r(m) = Σ_q X(r, q) old_r[c_q](m)
    for (int idx = tid; idx < fresh_count * first; idx += kThreads) {
      const int r = idx / first, mm = idx % first;
      double acc = 0;
      for (int q = 0; q <= r; ++q) acc -= fresh_g[r * smax + first + q] * old_r[slot_draw[q] * smax + mm];
      fresh_g[r * smax + mm] = acc;
    }
    __syncthreads();
    for (int idx = tid; idx < fresh_count * count; idx += kThreads) {
      const int r = idx / count, c = idx % count;
      if (c <= first + r) g_table[(first + r) * smax + c] = fresh_g[r * smax + c];
    }
    for (int r = tid; r < fresh_count; r += kThreads) pivots[first + r] = draw_index[slot_draw[r]];
    // L += Σ_r g_r g_rᵀ (rows and columns below count): a warp per 4 rows and 128 columns, a lane
    // per 4 columns 32 apart; products added in r order, so L stays exactly symmetric
    const int row_blocks = (count + 3) / 4, col_blocks = (count + 127) / 128;
    for (int wb = warp; wb < row_blocks * col_blocks; wb += kWarps) {
      const int r0 = (wb / col_blocks) * 4, c0 = (wb % col_blocks) * 128 + lane;
      double acc[4][4] = {};
      for (int r = 0; r < fresh_count; ++r) {
        const double* gr = fresh_g + r * smax;
        double a[4], b[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          a[u] = r0 + u < count ? gr[r0 + u] : 0.0;
          b[u] = c0 + 32 * u < count ? gr[c0 + 32 * u] : 0.0;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[u][v] += a[u] * b[v];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          if (r0 + u < count && c0 + 32 * v < count) kinv[(r0 + u) * smax + c0 + 32 * v] += acc[u][v];
        }
      }
    }
    if (tid == 0) *state = BlockRoundState{first, fresh_count, 0, 0};
  };

  int count = 0, first = 0, fresh = 0;
  bool done = false;
  for (int64_t round = 0;; ++round) {
    if (fresh > 0) sweep(first, fresh);
    if (done || count >= slots) break;
    draw(round);
    __threadfence();  // residuals and rows, read by the leader
    cluster_barrier();
    if (rank == 0) accept(round, count);
    __threadfence();  // pivots and g, read by the sweeps
    cluster_barrier();
    const BlockRoundState st = *remote(state, 0);
    first = st.first;
    fresh = st.fresh;
    done = st.done != 0;
    count = first + fresh;
  }
  cluster_barrier();  // no CTA leaves while another may still read its shared memory
  if (rank == 0 && tid == 0) {
    p.counts[gb] = count;
    const int64_t first_pivot = count > 0 ? pivots[0] : 0;
    for (int64_t i = count; i < slots; ++i) pivots[i] = first_pivot;
  }
}

}  // namespace kernels
}  // namespace wildcat

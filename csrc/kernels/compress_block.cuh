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
//     rejects them one after the other, borders G_SS^-1 for each accepted pivot, and publishes the
//     pivots and their g vectors through global memory for the next sweep.
// The arithmetic per point is the one-step kernel's (compress.cuh), operation for operation, and
// the draws and acceptance tests follow the CPU code (csrc/ops/cpu/pivoted_cholesky.h). The
// bordering's L a is associated differently (L_old R at the draws once per round, then the round's
// g vectors; the CPU multiplies by an L updated at every pivot), so g differs in the last bits of
// double, and a group whose acceptance test or argmax ties to rounding can take other pivots: the
// same seed gives the same pivots in almost every group (test_cuda.py asks for 99%). Stages 3-5 of
// compress.cuh (weighted sums, finalize, write_group) read the same workspace as after the
// one-step kernel.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "block_pivoting.h"
#include "compress.cuh"

namespace wildcat {
namespace kernels {

constexpr int kBlockRowsStaged = 64;  // g coefficients of older rows staged per pass of a sweep

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
  scalar_t* keys_t;           // (G*C, E, length_max): the bin's keys transposed
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
  size_t draws, warp_draws, state, stats, mean, coords, g_new, g_old, fresh_pivots, draw_index, draw_start,
      draw_residual, draw_uniform, slot_draw, draw_kernel, a, g, t, round, cached, bytes;
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
  l.coords = take(sizeof(T) * (e + 1) * B);  // sweep: new pivots [c][i]; leader: draws [j][c]; keys tiles
  l.g_new = take(sizeof(T) * B * B);
  l.g_old = take(sizeof(T) * kBlockRowsStaged * B);
  l.fresh_pivots = take(sizeof(int64_t) * B);
  l.draw_index = take(sizeof(int32_t) * B);
  l.draw_start = take(sizeof(T) * B);
  l.draw_residual = take(sizeof(T) * B);
  l.draw_uniform = take(sizeof(T) * B);
  l.slot_draw = take(sizeof(int32_t) * B);
  l.draw_kernel = take(sizeof(T) * B * B);
  l.a = take(sizeof(double) * (slots_max + 1));
  l.g = take(sizeof(double) * (slots_max + 1));
  l.t = take(sizeof(double) * B);
  l.round = take(round_in_smem ? sizeof(double) * 2 * B * slots_max : 0);
  l.cached = take(sizeof(T) * static_cast<size_t>(cached_rows) * B);
  l.bytes = at;
  return l;
}

template <typename scalar_t, typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 1) block_pivot_kernel(BlockPivotParams<scalar_t, T> p) {
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
  double* a_d = reinterpret_cast<double*>(smem_raw + lay.a);
  double* g_d = reinterpret_cast<double*>(smem_raw + lay.g);
  double* t_d = reinterpret_cast<double*>(smem_raw + lay.t);
  // the leader's per-round matrices: old_r[j][c] = (L_old R_old(:, c_j))_c and fresh_g[q][c], g of
  // the round's q-th pivot
  double* old_r = p.round_in_smem ? reinterpret_cast<double*>(smem_raw + lay.round)
                                  : p.round_ws + (blockIdx.x / ranks) * 2 * B * p.slots_max;
  double* fresh_g = old_r + B * p.slots_max;
  T* row_cache = reinterpret_cast<T*>(smem_raw + lay.cached);

  const scalar_t* keys = p.points + (g * p.n + start) * e;
  scalar_t* keys_t = p.keys_t + gb * e * lmax;
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
  // This CTA's keys transposed (E × length_max): the sweeps read consecutive points from
  // consecutive threads. Tiles of 32 points through shared memory (`coords` holds 32 × E) keep
  // both the reads and the writes coalesced.
  constexpr int kBatch = 8;  // global loads issued together (each waits ~1 µs)
  scalar_t* tile = reinterpret_cast<scalar_t*>(coords);  // sizeof(scalar_t) <= sizeof(T)
  for (int64_t base = lo; base < hi; base += B) {
    const int64_t count = hi - base < B ? hi - base : B;
    __syncthreads();
    // rows padded to e + 1 (no bank conflicts); kBatch loads in flight per thread
    for (int64_t idx0 = tid; idx0 < count * e; idx0 += kBatch * kThreads) {
      scalar_t v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t idx = idx0 + u * kThreads;
        if (idx < count * e) v[u] = keys[base * e + idx];
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t idx = idx0 + u * kThreads;
        if (idx < count * e) tile[(idx / e) * (e + 1) + idx % e] = v[u];
      }
    }
    __syncthreads();
    for (int64_t idx = tid; idx < count * e; idx += kThreads) {
      const int64_t c = idx / count, l = idx % count;
      keys_t[c * lmax + base + l] = tile[l * (e + 1) + c];
    }
  }
  __syncthreads();
  const auto key_at = [&](int64_t l, int64_t c) -> T { return static_cast<T>(to_acc(keys_t[c * lmax + l])); };

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
    for (int64_t c = 0; c < e; ++c) {
      const T centred_value = key_at(l, c) - mean[c];
      norm2 += static_cast<double>(centred_value) * static_cast<double>(centred_value);
    }
    norm_max = norm2 > norm_max ? norm2 : norm_max;
  }
  const double key_norm = sqrt(cluster_max(norm_max, 0));
  double m = 1.0;
  if (centred) {
    const double rq = p.query_norm != nullptr ? static_cast<double>(p.query_norm[g]) : key_norm;
    m = key_scale<double>(p.beta, rq, key_norm, length, p.tau);
  }
  const T m_t = static_cast<T>(m);
  const auto x_at = [&](int64_t l, int64_t c) -> T { return (key_at(l, c) - mean[c]) * m_t; };
  // a point's coordinate from the (read-only) input keys, for points of other CTAs
  const auto x_input = [&](int64_t l, int64_t c) -> T { return (static_cast<T>(to_acc(keys[l * e + c])) - mean[c]) * m_t; };

  double s_max = 0;
  for (int64_t l = lo + tid; l < hi; l += kThreads) {
    double s = 0;
    for (int64_t c = 0; c < e; ++c) {
      const double x = static_cast<double>(x_at(l, c));
      s += x * x;
    }
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
    for (int64_t idx = tid; idx < e * B; idx += kThreads) {
      const int64_t c = idx / B, i = idx % B;
      coords[idx] = i < fresh ? x_input(fresh_pivots[i], c) : T(0);
    }
    // g_new[m][i]: slot first + i's coefficient of slot first + m (m <= i)
    for (int idx = tid; idx < B * B; idx += kThreads) {
      const int mm = idx / B, i = idx % B;
      g_new[idx] = i < fresh && mm <= i ? static_cast<T>(__ldcg(g_table + (first + i) * smax + first + mm)) : T(0);
    }
    const int passes = (first + kBlockRowsStaged - 1) / kBlockRowsStaged;
    // g_old[m][i]: slot first + i's coefficient of the older slot m0 + m
    const auto stage_old = [&](int m0) {
      const int count = first - m0 < kBlockRowsStaged ? first - m0 : kBlockRowsStaged;
      for (int idx = tid; idx < count * B; idx += kThreads) {
        const int mm = idx / B, i = idx % B;
        g_old[idx] = i < fresh ? static_cast<T>(__ldcg(g_table + (first + i) * smax + m0 + mm)) : T(0);
      }
    };
    if (passes == 1) stage_old(0);
    __syncthreads();
    for (int64_t base = lo; base < hi; base += kThreads) {  // the same trip count in every thread
      const int64_t l = base + tid;
      const bool active = l < hi;
      T kernel[B], y[B];
      if (active) {
#pragma unroll
        for (int i = 0; i < B; ++i) kernel[i] = T(0);
        for (int64_t c0 = 0; c0 < e; c0 += kBatch) {  // kBatch loads in flight, then their arithmetic
          T xs[kBatch];
#pragma unroll
          for (int u = 0; u < kBatch; ++u) xs[u] = c0 + u < e ? x_at(l, c0 + u) : T(0);
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            if (c0 + u < e) {
              const T* xp = coords + (c0 + u) * B;
#pragma unroll
              for (int i0 = 0; i0 < B; i0 += 8) {
                if (i0 < fresh) {
#pragma unroll
                  for (int i = i0; i < i0 + 8; ++i) {
                    const T diff = xs[u] - xp[i];  // |x_l - x_p|^2: exactly 0 for a key equal to the pivot
                    kernel[i] += diff * diff;
                  }
                }
              }
            }
          }
        }
#pragma unroll
        for (int i = 0; i < B; ++i) {
          kernel[i] = vexp(kernel[i] * T(-0.5));
          y[i] = g_new[i * B + i] * kernel[i];  // the pivot's own term first, as in one step
        }
      }
      for (int pass = 0; pass < passes; ++pass) {  // older rows, in slot order
        const int m0 = pass * kBlockRowsStaged;
        if (passes > 1) {
          __syncthreads();
          stage_old(m0);
          __syncthreads();
        }
        const int count = first - m0 < kBlockRowsStaged ? first - m0 : kBlockRowsStaged;
        if (active) {
          for (int mm0 = 0; mm0 < count; mm0 += kBatch) {
            T rs[kBatch];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) rs[u] = mm0 + u < count ? rows[(m0 + mm0 + u) * lmax + l] : T(0);
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
              if (mm0 + u < count) {
                const T* gm = g_old + (mm0 + u) * B;
#pragma unroll
                for (int i0 = 0; i0 < B; i0 += 8) {
                  if (i0 < fresh) {
#pragma unroll
                    for (int i = i0; i < i0 + 8; ++i) y[i] += gm[i] * rs[u];
                  }
                }
              }
            }
          }
        }
      }
      if (active) {
        // this round's earlier rows, in slot order (g_new is 0 above the diagonal)
#pragma unroll
        for (int mm = 0; mm < B - 1; ++mm) {
          if (mm + 1 < fresh) {
#pragma unroll
            for (int i = mm + 1; i < B; ++i) y[i] += g_new[mm * B + i] * kernel[mm];
          }
        }
        T d = residual[l];
#pragma unroll
        for (int i = 0; i < B; ++i) {
          if (i < fresh) {
            rows[(first + i) * lmax + l] = kernel[i];
            d = d - y[i] * y[i];
            d = (l == fresh_pivots[i] || d < T(0)) ? T(0) : d;
          }
        }
        residual[l] = d;
      }
    }
    __syncthreads();  // coords, g_new and g_old are reused
  };

  // ---- draws: this CTA's 32 candidates of round `round` ----
  const auto draw = [&](int64_t round) {
    // each point's log d + s (-inf at or below tol), once per round
    for (int64_t l = lo + tid; l < hi; l += kThreads) {
      const T d = residual[l];
      score_base[l] = d > p.tol ? vlog(normal_floor(d)) + static_cast<T>(sq_norm[l]) : T(-INFINITY);
    }
    __syncthreads();
    // One draw at a time over this thread's quads (a running best per draw would hold 64
    // registers), then the warp's best on lane j.
    BlockDraw<T> mine{T(0), -1};
#pragma unroll 1
    for (int j = 0; j < B; ++j) {
      BlockDraw<T> best{T(0), -1};
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
        const Philox4 bits = pivot_noise_bits(seed, static_cast<uint64_t>(g), block_draw_step(round, j),
                                              static_cast<uint64_t>(q));
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          if (base[w] > T(-INFINITY)) {
            const T score = base[w] - vlog(exponential_variate<T>(bits.v[w]));
            best = better_draw(best, BlockDraw<T>{score, static_cast<int32_t>(q * 4 + w - start)});
          }
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        BlockDraw<T> o;
        o.score = __shfl_xor_sync(0xffffffffu, best.score, offset);
        o.index = __shfl_xor_sync(0xffffffffu, best.index, offset);
        best = better_draw(best, o);
      }
      if (lane == j) mine = best;
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
  const auto accept = [&](int64_t round, int count) {
    if (tid < B) {
      BlockDraw<T> v{T(0), -1};
      for (int r = 0; r < ranks; ++r) v = better_draw(v, *remote(&draws[tid], r));
      draw_index[tid] = v.index;
      draw_start[tid] = v.index >= 0 ? __ldcg(residual + v.index) : T(0);
      draw_residual[tid] = draw_start[tid];  // 0 for an empty draw: rejected
      const Philox4 bits = pivot_noise_bits(seed, static_cast<uint64_t>(g), block_accept_step(round, tid),
                                            static_cast<uint64_t>(start >> 2));
      draw_uniform[tid] = open_uniform<T>(bits.v[start & 3]);
    }
    __syncthreads();
    if (draw_index[0] < 0) {  // no residual above tol anywhere: early stop (all draws are empty)
      if (tid == 0) *state = BlockRoundState{count, 0, 1, 0};
      return;
    }
    for (int64_t idx = tid; idx < B * e; idx += kThreads) {  // coords[j][c], rows of e + 1: the draws' points
      const int64_t j = idx / e, c = idx % e;
      coords[j * (e + 1) + c] = draw_index[j] >= 0 ? x_input(draw_index[j], c) : T(0);
    }
    const int first = count;
    const int cached = first < p.cached_rows ? first : p.cached_rows;  // rows held in row_cache
    for (int idx = tid; idx < cached * B; idx += kThreads) {  // row_cache[m][j] = R_m(c_j)
      const int mm = idx / B, j = idx % B;
      row_cache[idx] = draw_index[j] >= 0 ? __ldcg(rows + mm * lmax + draw_index[j]) : T(0);
    }
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
    __syncthreads();
    // R_m(c_k) for any slot m < count: older rows from the cache or global memory, this round's
    // from the draws' kernel
    const auto row_at_draw = [&](int mm, int k) -> T {
      if (mm >= first) return draw_kernel[slot_draw[mm - first] * B + k];
      if (mm < cached) return row_cache[mm * B + k];
      return __ldcg(rows + mm * lmax + draw_index[k]);
    };
    // old_r = L_old R_old(:, C): a thread per row c of L_old (read once from global memory), all
    // draws at once in two halves of 16 accumulators
    for (int c = tid; c < first; c += kThreads) {
#pragma unroll 1
      for (int half = 0; half < B; half += B / 2) {
        double acc[B / 2] = {};
        for (int mm = 0; mm < first; ++mm) {
          const double l_cm = __ldcg(kinv + c * smax + mm);
#pragma unroll
          for (int j = 0; j < B / 2; ++j) acc[j] += l_cm * static_cast<double>(row_at_draw(mm, half + j));
        }
#pragma unroll
        for (int j = 0; j < B / 2; ++j) old_r[(half + j) * smax + c] = acc[j];
      }
    }
    __syncthreads();
    for (int j = 0; j < B && count < slots; ++j) {
      const T dj = draw_residual[j];
      if (!(dj > p.tol && draw_uniform[j] * draw_start[j] < dj)) continue;  // rejected
      const int i = count, q = i - first;
      // bordering (as one step): g = (L a, -1) / sqrt(d_p), a_m = R_m(p), with
      // L = L_old + Σ_{this round's q' < q} g_q' g_q'ᵀ: L a = old_r[j] + Σ_q' g_q' (g_q' · a)
      for (int mm = tid; mm < i; mm += kThreads) a_d[mm] = static_cast<double>(row_at_draw(mm, j));
      if (tid == 0) slot_draw[q] = j;
      __syncthreads();
      for (int qq = warp; qq < q; qq += kWarps) {  // a warp per earlier pivot of the round
        double acc = 0;
        for (int c = lane; c <= first + qq; c += 32) acc += fresh_g[qq * smax + c] * a_d[c];
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (lane == 0) t_d[qq] = acc;
      }
      __syncthreads();
      const double inv_sqrt_dp = 1.0 / sqrt(static_cast<double>(dj));
      for (int c = tid; c < i; c += kThreads) {
        double acc = c < first ? old_r[j * smax + c] : 0.0;
        for (int qq = c < first ? 0 : c - first; qq < q; ++qq) acc += t_d[qq] * fresh_g[qq * smax + c];
        g_d[c] = acc * inv_sqrt_dp;
      }
      if (tid == 0) g_d[i] = -inv_sqrt_dp;
      __syncthreads();
      for (int mm = tid; mm <= i; mm += kThreads) {
        g_table[i * smax + mm] = g_d[mm];
        fresh_g[q * smax + mm] = g_d[mm];
      }
      if (tid == 0) pivots[i] = draw_index[j];
      // the later draws' residuals, updated as the sweep updates the points'
      if (tid > j && tid < B) {
        const int k = tid;
        T y = static_cast<T>(g_d[i]) * draw_kernel[j * B + k];
        for (int mm = 0; mm < i; ++mm) y += static_cast<T>(g_d[mm]) * row_at_draw(mm, k);
        T d = draw_residual[k] - y * y;
        d = (draw_index[k] == draw_index[j] || d < T(0)) ? T(0) : d;
        draw_residual[k] = d;
      }
      ++count;
      __syncthreads();
    }
    // L += Σ_q g_q g_qᵀ over the round's pivots (rows and columns below count)
    const int fresh_count = count - first;
    for (int idx = tid; idx < count * count; idx += kThreads) {
      const int r = idx / count, c = idx % count;
      double acc = 0;  // g_q has entries up to slot first + q
      const int from = (r > c ? r : c) - first;
      for (int qq = from > 0 ? from : 0; qq < fresh_count; ++qq) acc += fresh_g[qq * smax + r] * fresh_g[qq * smax + c];
      kinv[r * smax + c] += acc;
    }
    if (tid == 0) *state = BlockRoundState{first, count - first, 0, 0};
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

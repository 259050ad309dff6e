// Randomly pivoted Cholesky for one bin on the CPU (ALGORITHM.md §2.7, and §7 for the block
// pivoting of bins with more than 16 slots), torch-free.
//
// The bordered form of the algorithm: the kernel rows R_i(l) = G(x_{p_i}, x_l) are stored, and the
// inverse L = G_SS^-1 grows by one row and column per step. The residual update
// y_l = Σ_{j<=i} g_j R_j(l) then works from exact kernel values, and the Nyström weights are
// W_G = L R, so rounding does not accumulate through a chain of factor columns (measured: half the
// float32 error of the column form, benchmarks/NOTES.md). L is small (steps × steps) and kept in
// double; the per-point arrays stay in T so the loops over points vectorize.
//
// Layouts are point-minor (points transposed to dim × n, R as steps × n) so every inner loop is an
// axpy over points with no horizontal reductions; a step walks the points in chunks that keep its
// temporaries in L1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../kernels/block_pivoting.h"
#include "../../kernels/fastmath.h"
#include "../../kernels/philox.h"

namespace wildcat {
namespace cpu {

// Where a bin's noise comes from: the group's stream and the global position of its first point.
struct NoiseStream {
  uint64_t seed;
  uint64_t group;
  int64_t offset;
};

template <typename T>
class PivotedCholesky {
 public:
  // Up to `steps` pivots among n points given transposed, xt[c * n + l] (already scaled): one per
  // step (§2.7), or in rounds for more than kernels::kSequentialMaxSlots steps (§7). Stops early
  // when no point has residual above tol. xt is read during the call only.
  void run(const T* xt, int64_t n, int64_t dim, int64_t steps, const NoiseStream& noise, T tol) {
    xt_ = xt;
    n_ = n;
    dim_ = dim;
    steps_ = steps;
    count_ = 0;
    sq_norm_.resize(n);
    residual_.assign(n, T(1));
    score_.resize(n);
    exp_noise_.resize(n);
    rows_.assign(steps * n, T(0));
    kinv_.assign(steps * steps, 0.0);
    factor_.assign(steps * steps, T(0));
    pivots_.assign(steps, 0);
    border_.resize(steps);
    g_.resize(steps);

    // s_l = |x_l|^2 in double: the weights take exp((s_l - s_p) / 2), which turns an absolute
    // error in s into a relative error of the weight.
    sq_norm64_.assign(n, 0.0);
    for (int64_t c = 0; c < dim; ++c) {
      const T* xc = xt + c * n;
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) sq_norm64_[l] += static_cast<double>(xc[l]) * static_cast<double>(xc[l]);
    }
    for (int64_t l = 0; l < n; ++l) sq_norm_[l] = static_cast<T>(sq_norm64_[l]);

    if (kernels::uses_block_pivoting(steps)) {
      run_rounds(noise, tol);
    } else {
      run_steps(noise, tol);
    }
    // Unused slots repeat the first pivot: a valid index whose weight will be 0.
    for (int64_t i = count_; i < steps; ++i) pivots_[i] = pivots_[0];
    xt_ = nullptr;
  }

  int64_t count() const { return count_; }
  int64_t pivot(int64_t slot) const { return pivots_[slot]; }
  // R_i(l) = G(x_{p_i}, x_l) for i < count(), contiguous over l; zero rows after.
  const T* row(int64_t i) const { return rows_.data() + i * n_; }
  // (G_SS^-1)_{ab}, zero outside count() × count().
  double kinv(int64_t a, int64_t b) const { return kinv_[a * steps_ + b]; }
  // s_l = |x_l|^2, accumulated in double.
  const std::vector<double>& sq_norms() const { return sq_norm64_; }

 private:
  static constexpr int64_t kChunk = 256;
  static constexpr int kDraws = kernels::kBlockDraws;
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  static constexpr T kTiny = std::numeric_limits<T>::min();

  // §2.7: one pivot per step, sampled from the residual left by the step before.
  void run_steps(const NoiseStream& noise, T tol) {
    const int64_t n = n_;
    const T* s = sq_norm_.data();
    T* d = residual_.data();
    T* score = score_.data();
    const T* e_noise = exp_noise_.data();
    fill_noise(noise, 0);
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) score[l] = s[l] - kernels::vlog(e_noise[l]);  // log d = 0

    for (int64_t i = 0; i < steps_; ++i) {
      const int64_t p = argmax(score, n);
      if (p < 0) break;  // every residual <= tol: the bin is represented (early stop)
      for (int64_t m = 0; m < i; ++m) border_[m] = rows_[m * n + p];
      add_pivot(p, d[p]);

      if (i + 1 < steps_) fill_noise(noise, static_cast<uint32_t>(i + 1));
      for (int64_t l0 = 0; l0 < n; l0 += kChunk) {
        const int64_t len = std::min(kChunk, n - l0);
        update_points(i, l0, len);
        const T* dc = d + l0;
        const T* sc = s + l0;
        const T* ec = e_noise + l0;
        T* scorec = score + l0;
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
          // log(d) + s - log(E) of the next step, as log(d / E) + s: one logarithm. Computed for
          // every point and then selected, so the loop has no branch and vectorizes.
          const T next = kernels::vlog(std::max(dc[l], kTiny) / ec[l]) + sc[l];
          scorec[l] = dc[l] > tol ? next : kNegInf;
        }
      }
      d[p] = T(0);
      score[p] = kNegInf;
    }
  }

  // §7: rounds of kDraws draws from the residual at the round's start, each accepted with
  // probability (its residual given the pivots accepted so far) / (its residual when drawn); then
  // one sweep over the points forms the rows of all the round's pivots.
  void run_rounds(const NoiseStream& noise, T tol) {
    const int64_t n = n_;
    const T* s = sq_norm_.data();
    T* d = residual_.data();
    T* base = score_.data();
    const T* e_noise = exp_noise_.data();
    draw_score_.resize(n);
    T* score = draw_score_.data();
    // R_m(c_k) for the round's pivots m, whose rows the sweep forms only after the round:
    // round_rows[(m - first) * kDraws + k], filled for the draws k after the one accepted as m.
    T round_rows[kDraws * kDraws];

    for (int64_t t = 0; count_ < steps_; ++t) {
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) {  // log d + s, shared by the round's draws
        const T next = kernels::vlog(std::max(d[l], kTiny)) + s[l];
        base[l] = d[l] > tol ? next : kNegInf;
      }
      const int64_t offset = noise.offset;
      const int64_t first = count_;
      // Draws are taken only as the acceptance reaches them (a round that fills the bin early
      // skips the rest, each a full pass over the points); draw j's residual then catches up with
      // the round's pivots accepted before it, in their order: the same arithmetic as updating
      // every later draw at each acceptance.
      for (int j = 0; j < kDraws && count_ < steps_; ++j) {
        fill_noise(noise, kernels::block_draw_step(t, j));
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) score[l] = base[l] - kernels::vlog(e_noise[l]);
        const int64_t c = argmax(score, n);
        // Only the first draw can find no point: every draw has the same candidates.
        if (c < 0) return;  // every residual <= tol: early stop
        const kernels::Philox4 bits = kernels::pivot_noise_bits(
            noise.seed, noise.group, kernels::block_accept_step(t, j), static_cast<uint64_t>(offset >> 2));
        const T uniform = kernels::open_uniform<T>(bits.v[offset & 3]);
        const T drawn_from = d[c];
        T now = drawn_from;
        for (int64_t i = first; i < count_; ++i) {  // as update_points updates the points'
          const int64_t p = pivots_[i];
          const T* gi = factor_.data() + i * steps_;
          T* ri = round_rows + (i - first) * kDraws;
          ri[j] = kernel(p, c);
          T y = gi[i] * ri[j];
          for (int64_t m = 0; m < i; ++m) {
            y += gi[m] * (m < first ? rows_[m * n + c] : round_rows[(m - first) * kDraws + j]);
          }
          now = c == p ? T(0) : std::max(T(0), now - y * y);
        }
        if (!(now > tol && uniform * drawn_from < now)) continue;
        const int64_t i = count_;
        for (int64_t m = 0; m < first; ++m) border_[m] = rows_[m * n + c];
        for (int64_t m = first; m < i; ++m) border_[m] = round_rows[(m - first) * kDraws + j];
        add_pivot(c, now);
      }

      // The sweep: per chunk of points, the round's pivots in order, so that the chunk's rows and
      // residuals stay in L1 between them.
      for (int64_t l0 = 0; l0 < n; l0 += kChunk) {
        const int64_t len = std::min(kChunk, n - l0);
        for (int64_t i = first; i < count_; ++i) update_points(i, l0, len);
      }
      for (int64_t i = first; i < count_; ++i) d[pivots_[i]] = T(0);
    }
  }

  // Pivot p of residual dp takes slot count(), given a_m = R_m(p) for m < count() in border_:
  // bordering g = (L a, -1) / sqrt(d_p), L += g gᵀ; g is kept in T (row count() of factor_) for
  // the residual updates.
  void add_pivot(int64_t p, T dp) {
    const int64_t i = count_;
    const int64_t steps = steps_;
    const double inv_sqrt_dp = 1.0 / std::sqrt(static_cast<double>(dp));
    for (int64_t a = 0; a < i; ++a) {
      double acc = 0;
      for (int64_t j = 0; j < i; ++j) acc += kinv_[a * steps + j] * static_cast<double>(border_[j]);
      g_[a] = acc * inv_sqrt_dp;
    }
    g_[i] = -inv_sqrt_dp;
    T* g_t = factor_.data() + i * steps;
    for (int64_t a = 0; a <= i; ++a) {
      for (int64_t b = 0; b <= i; ++b) kinv_[a * steps + b] += g_[a] * g_[b];
      g_t[a] = static_cast<T>(g_[a]);
    }
    pivots_[i] = p;
    count_ = i + 1;
  }

  // Row i over points [l0, l0 + len) and the residual update there: R_i(l) = G(x_{p_i}, x_l),
  // y_l = g_i R_i(l) + Σ_{m<i} g_m R_m(l) with g of slot i, d_l ← max(0, d_l − y_l²).
  void update_points(int64_t i, int64_t l0, int64_t len) {
    const int64_t n = n_;
    const int64_t p = pivots_[i];
    T dist[kChunk], y[kChunk];
    // R_i(l) = G(x_p, x_l) = exp(-|x_p - x_l|^2 / 2). Summing squared differences, not
    // x_p·x_l - s_p/2 - s_l/2, avoids cancellation for nearby points (measured: half the
    // float32 error) and gives exactly 1 for a key equal to the pivot.
    std::fill(dist, dist + len, T(0));
    for (int64_t c = 0; c < dim_; ++c) {
      const T xpc = xt_[c * n + p];
      const T* xc = xt_ + c * n + l0;
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) {
        const T diff = xc[l] - xpc;
        dist[l] += diff * diff;
      }
    }
    const T* g_t = factor_.data() + i * steps_;
    T* ric = rows_.data() + i * n + l0;
    const T gi = g_t[i];
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) {
      ric[l] = kernels::vexp(dist[l] * T(-0.5));
      y[l] = gi * ric[l];
    }
    for (int64_t m = 0; m < i; ++m) {
      const T gm = g_t[m];
      const T* rm = rows_.data() + m * n + l0;
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) y[l] += gm * rm[l];
    }
    T* dc = residual_.data() + l0;
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) dc[l] = std::max(T(0), dc[l] - y[l] * y[l]);
  }

  // G(x_p, x_l) of one pair, summed as update_points sums it, so that a draw's residual in a
  // round is the one the sweep then gives the point.
  T kernel(int64_t p, int64_t l) const {
    T dist = 0;
    for (int64_t c = 0; c < dim_; ++c) {
      const T diff = xt_[c * n_ + l] - xt_[c * n_ + p];
      dist += diff * diff;
    }
    return kernels::vexp(dist * T(-0.5));
  }

  // First index of the largest score; -1 when every score is -inf.
  static int64_t argmax(const T* score, int64_t n) {
    T best = kNegInf;
#pragma omp simd reduction(max : best)
    for (int64_t l = 0; l < n; ++l) best = std::max(best, score[l]);
    if (!(best > kNegInf)) return -1;
    for (int64_t l = 0; l < n; ++l) {
      if (score[l] == best) return l;
    }
    return -1;
  }

  // E_l ~ Exp(1) of Philox step `step` for every point of the bin (csrc/kernels/philox.h).
  void fill_noise(const NoiseStream& noise, uint32_t step) {
    const int64_t first = noise.offset;
    const int64_t last = noise.offset + n_;  // exclusive
    const int64_t quad_first = first >> 2;
    const int64_t quads = ((last + 3) >> 2) - quad_first;
    words_.resize(quads * 4);
    uint32_t* w = words_.data();
#pragma omp simd
    for (int64_t q = 0; q < quads; ++q) {
      const kernels::Philox4 bits = kernels::pivot_noise_bits(noise.seed, noise.group, step,
                                                              static_cast<uint64_t>(quad_first + q));
      w[4 * q + 0] = bits.v[0];
      w[4 * q + 1] = bits.v[1];
      w[4 * q + 2] = bits.v[2];
      w[4 * q + 3] = bits.v[3];
    }
    const uint32_t* wb = w + (first - quad_first * 4);
    T* e = exp_noise_.data();
#pragma omp simd
    for (int64_t l = 0; l < n_; ++l) e[l] = kernels::exponential_variate<T>(wb[l]);
  }

  const T* xt_ = nullptr;
  int64_t n_ = 0, dim_ = 0, steps_ = 0, count_ = 0;
  // score_ holds the next step's scores (§2.7) or, in rounds, log d + s; draw_score_ a draw's.
  std::vector<T> sq_norm_, residual_, score_, draw_score_, exp_noise_, rows_;
  // factor_: row i holds g of slot i, rounded to T, for the residual updates (L = Σ_i g gᵀ).
  // border_: a_m = R_m(p) of the pivot being added.
  std::vector<T> factor_, border_;
  std::vector<double> sq_norm64_, kinv_, g_;
  std::vector<uint32_t> words_;
  std::vector<int64_t> pivots_;
};

}  // namespace cpu
}  // namespace wildcat

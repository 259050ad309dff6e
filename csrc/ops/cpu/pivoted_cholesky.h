// Randomly pivoted Cholesky for one bin on the CPU (ALGORITHM.md §2.7), torch-free.
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
  // Up to `steps` pivots among n points given transposed, xt[c * n + l] (already scaled). Stops
  // early when no point has residual above tol.
  void run(const T* xt, int64_t n, int64_t dim, int64_t steps, const NoiseStream& noise, T tol) {
    n_ = n;
    steps_ = steps;
    count_ = 0;
    sq_norm_.resize(n);
    residual_.assign(n, T(1));
    score_.resize(n);
    exp_noise_.resize(n);
    rows_.assign(steps * n, T(0));
    kinv_.assign(steps * steps, 0.0);
    pivots_.assign(steps, 0);
    std::vector<double> g(steps);
    std::vector<T> g_t(steps);
    T* s = sq_norm_.data();
    T* d = residual_.data();
    T* score = score_.data();
    const T* e_noise = exp_noise_.data();

    // s_l = |x_l|^2 in double: the weights take exp((s_l - s_p) / 2), which turns an absolute
    // error in s into a relative error of the weight.
    sq_norm64_.assign(n, 0.0);
    for (int64_t c = 0; c < dim; ++c) {
      const T* xc = xt + c * n;
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) sq_norm64_[l] += static_cast<double>(xc[l]) * static_cast<double>(xc[l]);
    }
    for (int64_t l = 0; l < n; ++l) s[l] = static_cast<T>(sq_norm64_[l]);
    fill_noise(noise, 0);
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) score[l] = s[l] - kernels::vlog(e_noise[l]);  // log d = 0

    T dist[kChunk], y[kChunk];
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t p = argmax(score, n);
      if (p < 0) break;  // every residual <= tol: the bin is represented (early stop)
      pivots_[i] = p;
      count_ = i + 1;
      // bordering: g = (L a, -1) / sqrt(d_p) with a_j = R_j(p); L += g gᵀ
      const double inv_sqrt_dp = 1.0 / std::sqrt(static_cast<double>(d[p]));
      for (int64_t a = 0; a < i; ++a) {
        double acc = 0;
        for (int64_t j = 0; j < i; ++j) acc += kinv_[a * steps + j] * static_cast<double>(rows_[j * n + p]);
        g[a] = acc * inv_sqrt_dp;
      }
      g[i] = -inv_sqrt_dp;
      for (int64_t a = 0; a <= i; ++a) {
        for (int64_t b = 0; b <= i; ++b) kinv_[a * steps + b] += g[a] * g[b];
        g_t[a] = static_cast<T>(g[a]);
      }

      const bool last = i + 1 == steps;
      if (!last) fill_noise(noise, static_cast<uint32_t>(i + 1));
      T* ri = rows_.data() + i * n;
      for (int64_t l0 = 0; l0 < n; l0 += kChunk) {
        const int64_t len = std::min(kChunk, n - l0);
        // R_i(l) = G(x_p, x_l) = exp(-|x_p - x_l|^2 / 2). Summing squared differences, not
        // x_p·x_l - s_p/2 - s_l/2, avoids cancellation for nearby points (measured: half the
        // float32 error) and gives exactly 1 for a key equal to the pivot.
        std::fill(dist, dist + len, T(0));
        for (int64_t c = 0; c < dim; ++c) {
          const T xpc = xt[c * n + p];
          const T* xc = xt + c * n + l0;
#pragma omp simd
          for (int64_t l = 0; l < len; ++l) {
            const T diff = xc[l] - xpc;
            dist[l] += diff * diff;
          }
        }
        T* ric = ri + l0;
        const T gi = g_t[i];
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
          ric[l] = kernels::vexp(dist[l] * T(-0.5));
          y[l] = gi * ric[l];
        }
        for (int64_t j = 0; j < i; ++j) {  // y = Σ_j g_j R_j
          const T gj = g_t[j];
          const T* rj = rows_.data() + j * n + l0;
#pragma omp simd
          for (int64_t l = 0; l < len; ++l) y[l] += gj * rj[l];
        }
        T* dc = d + l0;
        T* scorec = score + l0;
        const T* sc = s + l0;
        const T* ec = e_noise + l0;
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
          const T dl = std::max(T(0), dc[l] - y[l] * y[l]);
          dc[l] = dl;
          // log(d) + s - log(E) of the next step, as log(d / E) + s: one logarithm. Computed for
          // every point and then selected, so the loop has no branch and vectorizes.
          const T next = kernels::vlog(std::max(dl, kTiny) / ec[l]) + sc[l];
          scorec[l] = dl > tol ? next : kNegInf;
        }
      }
      d[p] = T(0);
      score[p] = kNegInf;
      if (last) break;
    }
    // Unused slots repeat the first pivot: a valid index whose weight will be 0.
    for (int64_t i = count_; i < steps; ++i) pivots_[i] = pivots_[0];
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
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  static constexpr T kTiny = std::numeric_limits<T>::min();

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

  // E_l ~ Exp(1) of step `step` for every point of the bin (csrc/kernels/philox.h).
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

  int64_t n_ = 0, steps_ = 0, count_ = 0;
  std::vector<T> sq_norm_, residual_, score_, exp_noise_, rows_;
  std::vector<double> sq_norm64_, kinv_;
  std::vector<uint32_t> words_;
  std::vector<int64_t> pivots_;
};

}  // namespace cpu
}  // namespace wildcat

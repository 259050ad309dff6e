// Randomly pivoted Cholesky for one bin on the CPU (ALGORITHM.md §2.7), torch-free.
//
// The factor is kept in its classic column form F (F_j(l) for pivot step j) rather than the
// bordered inverse of the reference: F_i(l) = (G(p_i, l) - Σ_{j<i} F_j(l) F_j(p_i)) / sqrt(d_p)
// needs one pass over the points per step, and the Nyström weights follow from F alone
// (W_G = T^-T Fᵀ with T the factor's rows at the pivots), so no r × N matrix of kernel rows or
// weights is ever formed.
//
// Layouts are point-minor (points transposed to dim × n, F as steps × n) so every inner loop is an
// axpy over points that the compiler vectorizes, with no horizontal reductions; a step walks the
// points in chunks that keep its temporaries in L1.
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
    count_ = 0;
    sq_norm_.assign(n, T(0));
    residual_.assign(n, T(1));
    score_.resize(n);
    exp_noise_.resize(n);
    factor_.assign(steps * n, T(0));
    pivots_.assign(steps, 0);
    T* s = sq_norm_.data();
    T* d = residual_.data();
    T* score = score_.data();
    const T* e_noise = exp_noise_.data();

    // The squared norms accumulate exactly like the kernel-row products below (same order, same
    // operations), so a key equal to a pivot gets exponent exactly 0 and residual exactly 0.
    for (int64_t c = 0; c < dim; ++c) {
      const T* xc = xt + c * n;
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) s[l] += xc[l] * xc[l];
    }
    fill_noise(noise, 0);
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) score[l] = s[l] - kernels::vlog(e_noise[l]);  // log d = 0

    T row[kChunk], corr[kChunk];
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t p = argmax(score, n);
      if (p < 0) break;  // every residual <= tol: the bin is represented (early stop)
      pivots_[i] = p;
      count_ = i + 1;
      const T half_sp = s[p] / 2;
      const T inv_sqrt_dp = T(1) / std::sqrt(d[p]);
      const bool last = i + 1 == steps;
      if (!last) fill_noise(noise, static_cast<uint32_t>(i + 1));
      T* fi = factor_.data() + i * n;
      for (int64_t l0 = 0; l0 < n; l0 += kChunk) {
        const int64_t len = std::min(kChunk, n - l0);
        std::fill(row, row + len, T(0));
        std::fill(corr, corr + len, T(0));
        for (int64_t c = 0; c < dim; ++c) {  // row = X x_p
          const T xpc = xt[c * n + p];
          const T* xc = xt + c * n + l0;
#pragma omp simd
          for (int64_t l = 0; l < len; ++l) row[l] += xpc * xc[l];
        }
        for (int64_t j = 0; j < i; ++j) {  // corr = F_{<i}(l) · F_{<i}(p)
          const T fjp = factor_[j * n + p];
          const T* fj = factor_.data() + j * n + l0;
#pragma omp simd
          for (int64_t l = 0; l < len; ++l) corr[l] += fjp * fj[l];
        }
        T* sc = s + l0;
        T* dc = d + l0;
        T* scorec = score + l0;
        T* fic = fi + l0;
        const T* ec = e_noise + l0;
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
          const T kernel = std::min(T(1), kernels::vexp(row[l] - half_sp - sc[l] / 2));
          const T f = (kernel - corr[l]) * inv_sqrt_dp;
          fic[l] = f;
          const T dl = std::max(T(0), dc[l] - f * f);
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
  // F_j(l) for j < count(), contiguous over l.
  const T* factor_column(int64_t j) const { return factor_.data() + j * n_; }
  // T[i][j] = F_j(p_i), lower triangular (j <= i).
  T pivot_factor(int64_t i, int64_t j) const { return factor_[j * n_ + pivots_[i]]; }
  const std::vector<T>& sq_norms() const { return sq_norm_; }

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

  int64_t n_ = 0, count_ = 0;
  std::vector<T> sq_norm_, residual_, score_, exp_noise_, factor_;
  std::vector<uint32_t> words_;
  std::vector<int64_t> pivots_;
};

// Solves Tᵀ Y = B in place for the lower-triangular T of a factorisation (count × count) and
// B (count × cols, row-major): backward substitution over the pivots.
template <typename T>
void solve_transposed_factor(const PivotedCholesky<T>& chol, T* b, int64_t cols) {
  const int64_t k = chol.count();
  for (int64_t i = k - 1; i >= 0; --i) {
    T* row = b + i * cols;
    for (int64_t j = i + 1; j < k; ++j) {
      const T t = chol.pivot_factor(j, i);
      const T* yj = b + j * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) row[c] -= t * yj[c];
    }
    const T inv = T(1) / chol.pivot_factor(i, i);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] *= inv;
  }
}

}  // namespace cpu
}  // namespace wildcat

// Randomly pivoted Cholesky for one bin on the CPU (ALGORITHM.md §2.7), torch-free.
//
// The factor is kept in its classic column form F (n × steps, F_j(l) for pivot step j) rather than
// the bordered inverse of the reference: F_i(l) = (G(p_i, l) - Σ_{j<i} F_j(l) F_j(p_i)) / sqrt(d_p)
// needs one dot product per point and step, and the Nyström weights follow from F alone
// (W_G = T^-T Fᵀ with T the factor's rows at the pivots), so no r × N matrix of kernel rows or
// weights is ever formed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../kernels/philox.h"

namespace wildcat {
namespace cpu {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Where a bin's noise comes from: the group's stream and the global position of its first point.
struct NoiseStream {
  uint64_t seed;
  uint64_t group;
  int64_t offset;
};

template <typename T>
class PivotedCholesky {
 public:
  // Up to `steps` pivots among the n points x (n × dim, row-major, already scaled). Stops early when
  // no point has residual above tol.
  void run(const T* x, int64_t n, int64_t dim, int64_t steps, const NoiseStream& noise, T tol) {
    n_ = n;
    steps_ = steps;
    count_ = 0;
    sq_norm_.resize(n);
    residual_.assign(n, T(1));
    score_.resize(n);
    log_noise_.resize(n);
    factor_.assign(n * steps, T(0));
    pivots_.assign(steps, 0);

    // The squared norms go through the same dot product as the kernel rows below, so a key equal
    // to a pivot gets exponent exactly 0 and residual exactly 0.
    for (int64_t l = 0; l < n; ++l) sq_norm_[l] = dot(x + l * dim, x + l * dim, dim);
    fill_noise(noise, 0);
    for (int64_t l = 0; l < n; ++l) score_[l] = sq_norm_[l] - log_noise_[l];  // log d = 0

    const T neg_inf = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < steps; ++i) {
      int64_t p = -1;
      T best = neg_inf;
      for (int64_t l = 0; l < n; ++l) {
        if (score_[l] > best) {
          best = score_[l];
          p = l;
        }
      }
      if (p < 0) break;  // every residual <= tol: the bin is represented (early stop)
      pivots_[i] = p;
      count_ = i + 1;
      const T* xp = x + p * dim;
      const T* fp = factor_.data() + p * steps;
      const T half_sp = sq_norm_[p] / 2;
      const T inv_sqrt_dp = T(1) / std::sqrt(residual_[p]);
      const bool last = i + 1 == steps;
      if (!last) fill_noise(noise, static_cast<uint32_t>(i + 1));
      for (int64_t l = 0; l < n; ++l) {
        T* fl = factor_.data() + l * steps;
        const T kernel = std::min(T(1), std::exp(dot(x + l * dim, xp, dim) - half_sp - sq_norm_[l] / 2));
        const T f = (kernel - dot(fl, fp, i)) * inv_sqrt_dp;
        fl[i] = f;
        const T d = std::max(T(0), residual_[l] - f * f);
        residual_[l] = d;
        score_[l] = d > tol ? std::log(d) + sq_norm_[l] - log_noise_[l] : neg_inf;
      }
      residual_[p] = T(0);
      score_[p] = neg_inf;
      if (last) break;
    }
    // Unused slots repeat the first pivot: a valid index whose weight will be 0.
    for (int64_t i = count_; i < steps; ++i) pivots_[i] = pivots_[0];
  }

  int64_t count() const { return count_; }
  int64_t pivot(int64_t slot) const { return pivots_[slot]; }
  const std::vector<int64_t>& pivots() const { return pivots_; }
  // F_j(l) for j < count().
  const T* factor_row(int64_t l) const { return factor_.data() + l * steps_; }
  // T[i][j] = F_j(p_i), lower triangular (j <= i).
  T pivot_factor(int64_t i, int64_t j) const { return factor_[pivots_[i] * steps_ + j]; }
  const std::vector<T>& sq_norms() const { return sq_norm_; }

 private:
  void fill_noise(const NoiseStream& noise, uint32_t step) {
    const int64_t first = noise.offset;
    const int64_t last = noise.offset + n_;  // exclusive
    for (int64_t quad = first >> 2; quad * 4 < last; ++quad) {
      const kernels::Philox4 bits = kernels::pivot_noise_bits(noise.seed, noise.group, step,
                                                              static_cast<uint64_t>(quad));
      for (int w = 0; w < 4; ++w) {
        const int64_t pos = quad * 4 + w;
        if (pos >= first && pos < last) log_noise_[pos - first] = kernels::log_exponential<T>(bits.v[w]);
      }
    }
  }

  int64_t n_ = 0, steps_ = 0, count_ = 0;
  std::vector<T> sq_norm_, residual_, score_, log_noise_, factor_;
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

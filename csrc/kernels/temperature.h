// Per-bin temperature and key scaling (ALGORITHM.md §2.5-2.6), shared by CPU and CUDA.
#pragma once

#include "common.h"

namespace wildcat {
namespace kernels {

enum class TauMode : int { kLambert = 0, kConstant = 1 };

// 2 rho_0 of the closed-form temperature (the paper's Algorithm 2).
constexpr double kTwoRho0 = 6.383202050647408;
// tau^2 = (R_k / R_q) * kConstantTau2 in the constant variant.
constexpr double kConstantTau2 = 3.94582;

// Principal branch W0(z) for z >= 0 by Halley's iteration from log1p(z). The argument here is
// b / (2 rho_0) with b >= 2, i.e. z >= 0.31; eight steps reach double precision on [0, 1e300].
template <typename T>
WILDCAT_HD T lambert_w0(T z) {
  T w = std::log1p(z);
  for (int it = 0; it < 8; ++it) {
    const T ew = std::exp(w);
    const T f = w * ew - z;
    const T wp1 = w + T(1);
    w = w - f / (ew * wp1 - (w + T(2)) * f / (T(2) * wp1));
  }
  return w;
}

// The factor m of x = m (k - mean k) for one bin. beta: softmax scale; query_norm: R_q; key_norm:
// R_k, the largest centred-key norm of the bin; length: the bin's length n.
// m = sqrt(beta) / tau with tau^2 = (R_k / R_q) c. Returns 0 when R_q or R_k is 0 (all keys of the
// bin equal, or all queries zero): the kernel is then constant and one pivot represents the bin
// exactly, which is also the limit of the formula.
template <typename T>
WILDCAT_HD T key_scale(T beta, T query_norm, T key_norm, int64_t length, TauMode mode) {
  if (!(query_norm > T(0)) || !(key_norm > T(0))) return T(0);
  T c;
  if (mode == TauMode::kLambert) {
    const T gamma = beta * query_norm * key_norm;
    const T b = std::log(static_cast<T>(length)) / gamma + T(2);
    c = b / (T(2) * lambert_w0(b / static_cast<T>(kTwoRho0)));
  } else {
    c = static_cast<T>(kConstantTau2);
  }
  // beta / tau^2 = beta * R_q / (R_k * c)
  return std::sqrt(beta * query_norm / (key_norm * c));
}

}  // namespace kernels
}  // namespace wildcat

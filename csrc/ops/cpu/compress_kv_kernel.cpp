// CPU implementations of rp_nystrom and compress_kv (ALGORITHM.md §2).
//
// Work is split into independent (group, bin) tasks run by at::parallel_for; each task runs its
// pivot loop sequentially. Results do not depend on the number of threads: every task writes its
// own slots and no reduction crosses tasks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "../outputs.h"
#include "pivoted_cholesky.h"

namespace wildcat {
namespace cpu {
namespace {

// Per-group statistics of §2.1-2.3 over the group's n valid keys: key mean (accumulated in
// double: only the centring uses it, but it should not depend on N's rounding) and value bounds.
// A group without keys has mean 0 and bounds [0, 0], so its (empty) attention output is 0.
template <typename T>
void group_statistics(const T* keys, const T* values, int64_t n, int64_t e, int64_t dv, T* key_mean,
                      T* value_min, T* value_max) {
  if (n == 0) {
    std::fill(key_mean, key_mean + e, T(0));
    std::fill(value_min, value_min + dv, T(0));
    std::fill(value_max, value_max + dv, T(0));
    return;
  }
  std::vector<double> sum(e, 0.0);
  for (int64_t l = 0; l < n; ++l) {
    for (int64_t c = 0; c < e; ++c) sum[c] += static_cast<double>(keys[l * e + c]);
  }
  for (int64_t c = 0; c < e; ++c) key_mean[c] = static_cast<T>(sum[c] / static_cast<double>(n));
  for (int64_t c = 0; c < dv; ++c) {
    value_min[c] = values[c];
    value_max[c] = values[c];
  }
  for (int64_t l = 1; l < n; ++l) {
    for (int64_t c = 0; c < dv; ++c) {
      value_min[c] = std::min(value_min[c], values[l * dv + c]);
      value_max[c] = std::max(value_max[c], values[l * dv + c]);
    }
  }
}

struct CompressParams {
  int64_t n, e, dv, rank, num_bins, kept;
  double beta;
  bool has_query_norm;
  kernels::TauMode tau;
  bool center_values;
  double tol;
  uint64_t seed;
};

// One (group, bin) task: writes the bin's slots of core_indices and, per slot, its compressed
// values and weight (D + 1 doubles, `scaled`) up to the factor e^{log_scale} (see write_group).
// `valid` is the group's key count (N, or its entry of `lengths`): the bins split the first
// `valid` keys, while the slot layout is the static one of min(rank, N) slots.
template <typename T>
void compress_bin(const CompressParams& p, int64_t group, int64_t bin, int64_t valid, const T* keys,
                  const T* values, const T* key_mean, const T* value_offset, T query_norm, double* scaled,
                  double* log_scale, int64_t* core_indices) {
  const int64_t length = kernels::balanced_size(valid, p.num_bins, bin);
  const int64_t start = kernels::balanced_start(valid, p.num_bins, bin);
  const int64_t slots = kernels::balanced_size(p.rank, p.num_bins, bin);
  const int64_t first_slot = kernels::balanced_start(p.kept, p.num_bins, bin);
  const int64_t e = p.e, dv = p.dv;
  const int64_t cols = dv + 1;  // compressed values | weights
  keys += start * e;
  values += start * dv;
  scaled += first_slot * cols;
  log_scale += first_slot;
  core_indices += first_slot;

  if (length <= slots) {  // the bin keeps its keys exactly (§2.4)
    for (int64_t l = 0; l < length; ++l) {
      for (int64_t c = 0; c < dv; ++c) {
        scaled[l * cols + c] = static_cast<double>(values[l * dv + c]) -
                               (value_offset ? static_cast<double>(value_offset[c]) : 0.0);
      }
      scaled[l * cols + dv] = 1.0;
      core_indices[l] = start + l;
    }
    // Slots the bin cannot fill (a group shorter than N): zero weight and value, and the index
    // of a kept key, so that the slot's logit never exceeds those of the real entries.
    const int64_t room = kernels::balanced_size(p.kept, p.num_bins, bin);
    for (int64_t l = length; l < room; ++l) core_indices[l] = length > 0 ? start : 0;
    return;
  }

  // §2.2, 2.5, 2.6: centred keys (transposed for the pivot loop), the bin's key norm,
  // temperature and scaled points
  // The temperature is a per-bin scalar: computed in double, as every error in m scales all of
  // x and so every exp((s_l - s_p) / 2).
  std::vector<T> xt(e * length);
  double key_norm2 = 0;
  for (int64_t l = 0; l < length; ++l) {
    double norm2 = 0;
    for (int64_t c = 0; c < e; ++c) {
      const T centred = keys[l * e + c] - key_mean[c];
      xt[c * length + l] = centred;
      norm2 += static_cast<double>(centred) * static_cast<double>(centred);
    }
    key_norm2 = std::max(key_norm2, norm2);
  }
  const double key_norm = std::sqrt(key_norm2);
  const double rq = p.has_query_norm ? static_cast<double>(query_norm) : key_norm;
  const T m = static_cast<T>(kernels::key_scale<double>(p.beta, rq, key_norm, length, p.tau));
  for (T& v : xt) v *= m;

  PivotedCholesky<T> chol;
  chol.run(xt.data(), length, e, slots, NoiseStream{p.seed, static_cast<uint64_t>(group), start},
           static_cast<T>(p.tol));
  const int64_t k = chol.count();
  const std::vector<double>& s = chol.sq_norms();

  // §2.8: V̂ = diag(e^{-s_p/2}) L Σ_l R(:, l) e^{s_l/2} v_l and w likewise with v_l = 1. The
  // exponents are shifted by the bin's largest s so that no factor overflows; the shift cancels
  // between the two factors. The sum over points is accumulated in double: L's condition number
  // amplifies its rounding, and float32 sums here measured 3-5x the error of the oracle's
  // float32 matrix products (benchmarks/NOTES.md).
  const double s_ref = *std::max_element(s.begin(), s.end());
  std::vector<double> rhs(k * cols, 0.0);
  std::vector<double> value(dv);
  for (int64_t l = 0; l < length; ++l) {
    const double point_scale = std::exp((s[l] - s_ref) / 2);
    for (int64_t col = 0; col < dv; ++col) value[col] = static_cast<double>(values[l * dv + col]);
    for (int64_t j = 0; j < k; ++j) {
      const double c = static_cast<double>(chol.row(j)[l]) * point_scale;
      double* out = rhs.data() + j * cols;
#pragma omp simd
      for (int64_t col = 0; col < dv; ++col) out[col] += c * value[col];
      out[dv] += c;
    }
  }
  if (value_offset) {  // Σ_l c_l (v_l - v_c) = Σ_l c_l v_l - v_c Σ_l c_l
    for (int64_t j = 0; j < k; ++j) {
      double* row = rhs.data() + j * cols;
      for (int64_t col = 0; col < dv; ++col) row[col] -= static_cast<double>(value_offset[col]) * row[dv];
    }
  }
  std::vector<double> compressed(k * cols, 0.0);  // L rhs
  for (int64_t a = 0; a < k; ++a) {
    double* out = compressed.data() + a * cols;
    for (int64_t j = 0; j < k; ++j) {
      const double kinv = chol.kinv(a, j);
      const double* in = rhs.data() + j * cols;
      for (int64_t col = 0; col < cols; ++col) out[col] += kinv * in[col];
    }
  }

  for (int64_t i = 0; i < slots; ++i) {
    core_indices[i] = start + chol.pivot(i);
    if (i < k) {  // after an early stop: zero weight, zero value (`scaled` is zeroed)
      std::copy(compressed.begin() + i * cols, compressed.begin() + (i + 1) * cols, scaled + i * cols);
      log_scale[i] = (s_ref - s[chol.pivot(i)]) / 2;
    }
  }
}

// §2.8's overflow guard. Slot i's values and weight are scaled[i] · e^{log_scale[i]}, and the
// factor e^{(s_ref - s_p)/2} overflows float32 once β R_q R_k is in the hundreds (float64 in the
// tens of thousands). A factor common to all of a group's values and weights cancels in the
// estimator, so the group is shifted down by e^{-shift} just enough that its largest entry, summed
// over the group's slots, stays in T's range; groups that need no shift get the plain products.
template <typename T>
void write_group(const double* scaled, const double* log_scale, int64_t kept, int64_t dv, T* core_values,
                 T* core_weights) {
  const int64_t cols = dv + 1;
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < kept; ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      const double x = std::abs(scaled[i * cols + c]);
      if (x > 0) top = std::max(top, std::log(x) + log_scale[i]);
    }
  }
  const double limit = std::log(static_cast<double>(std::numeric_limits<T>::max())) - std::log(2.0 * kept);
  const double shift = top > limit ? top - limit : 0.0;
  for (int64_t i = 0; i < kept; ++i) {
    const double factor = std::exp(log_scale[i] - shift);
    for (int64_t c = 0; c < cols; ++c) {
      const T y = static_cast<T>(kernels::scaled_product(scaled[i * cols + c], log_scale[i] - shift, factor));
      (c < dv ? core_values[i * dv + c] : core_weights[i]) = y;
    }
  }
}

template <typename T>
void compress_all(const CompressParams& p, int64_t groups, const at::Tensor& keys, const at::Tensor& values,
                  const std::optional<at::Tensor>& query_norm, const int64_t* lengths, at::Tensor& core_values,
                  at::Tensor& core_weights, at::Tensor& core_indices, at::Tensor& value_min,
                  at::Tensor& value_max) {
  const T* k = keys.const_data_ptr<T>();
  const T* v = values.const_data_ptr<T>();
  const T* qn = query_norm ? query_norm->const_data_ptr<T>() : nullptr;
  T* vmin = value_min.mutable_data_ptr<T>();
  T* vmax = value_max.mutable_data_ptr<T>();
  std::vector<T> key_mean(groups * p.e), value_offset(p.center_values ? groups * p.dv : 0);
  auto valid = [&](int64_t g) { return lengths ? lengths[g] : p.n; };
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      group_statistics(k + g * p.n * p.e, v + g * p.n * p.dv, valid(g), p.e, p.dv, &key_mean[g * p.e],
                       vmin + g * p.dv, vmax + g * p.dv);
      if (p.center_values) {
        for (int64_t c = 0; c < p.dv; ++c) {
          value_offset[g * p.dv + c] = (vmin[g * p.dv + c] + vmax[g * p.dv + c]) / 2;
        }
      }
    }
  });
  T* cv = core_values.mutable_data_ptr<T>();
  T* cw = core_weights.mutable_data_ptr<T>();
  int64_t* ci = core_indices.mutable_data_ptr<int64_t>();
  const int64_t cols = p.dv + 1;
  std::vector<double> scaled(groups * p.kept * cols, 0.0), log_scale(groups * p.kept, 0.0);
  at::parallel_for(0, groups * p.num_bins, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / p.num_bins, b = task % p.num_bins;
      compress_bin<T>(p, g, b, valid(g), k + g * p.n * p.e, v + g * p.n * p.dv, &key_mean[g * p.e],
                      p.center_values ? &value_offset[g * p.dv] : nullptr, qn ? qn[g] : T(0),
                      &scaled[g * p.kept * cols], &log_scale[g * p.kept], ci + g * p.kept);
    }
  });
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      write_group<T>(&scaled[g * p.kept * cols], &log_scale[g * p.kept], p.kept, p.dv, cv + g * p.kept * p.dv,
                     cw + g * p.kept);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_kv_cpu(
    const at::Tensor& keys, const at::Tensor& values, int64_t rank, int64_t num_bins,
    std::optional<double> scale, const std::optional<at::Tensor>& query_norm,
    const std::optional<at::Tensor>& seed, std::string_view tau, bool center_values, double tol,
    const std::optional<at::Tensor>& lengths) {
  detail::check_compress_kv_args(keys, values, rank, num_bins, scale, query_norm, seed, tau, tol, lengths);
  detail::check_lengths_values(lengths, keys.size(-2));
  at::AutoDispatchBelowADInplaceOrView guard;  // internal ATen calls are not differentiated
  detail::CompressOutputs out(keys, values, rank);
  const int64_t groups = out.groups, n = out.n, e = out.e, dv = out.dv;
  if (n > 0 && groups > 0) {
    const auto acc = detail::accumulate_type(keys.scalar_type());
    const at::Tensor k = out.keys3.to(acc).contiguous();
    const at::Tensor v = values.reshape({groups, n, dv}).to(acc).contiguous();
    std::optional<at::Tensor> qn;
    if (query_norm) qn = query_norm->reshape({groups}).to(acc).contiguous();
    std::optional<at::Tensor> valid;
    if (lengths) valid = lengths->reshape({groups}).contiguous();
    const int64_t* valid_ptr = valid ? valid->const_data_ptr<int64_t>() : nullptr;
    const CompressParams params{n, e, dv, rank, num_bins, out.kept, detail::resolve_scale(scale, e),
                                qn.has_value(), detail::parse_tau(tau), center_values, tol,
                                detail::host_seed(seed)};
    if (acc == at::kDouble) {
      compress_all<double>(params, groups, k, v, qn, valid_ptr, out.core_values, out.core_weights, out.core_indices,
                           out.value_min, out.value_max);
    } else {
      compress_all<float>(params, groups, k, v, qn, valid_ptr, out.core_values, out.core_weights, out.core_indices,
                          out.value_min, out.value_max);
    }
  }
  return out.finish();
}

template <typename T>
void rp_nystrom_group(const T* x, int64_t n, int64_t dim, int64_t kept, uint64_t seed, uint64_t group,
                      T tol, int64_t* pivots, T* kinv, T* rows) {
  std::vector<T> xt(dim * n);
  for (int64_t l = 0; l < n; ++l) {
    for (int64_t c = 0; c < dim; ++c) xt[c * n + l] = x[l * dim + c];
  }
  PivotedCholesky<T> chol;
  chol.run(xt.data(), n, dim, kept, NoiseStream{seed, group, 0}, tol);
  const int64_t k = chol.count();
  for (int64_t i = 0; i < kept; ++i) pivots[i] = chol.pivot(i);
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b) kinv[a * kept + b] = static_cast<T>(chol.kinv(a, b));
    std::copy(chol.row(a), chol.row(a) + n, rows + a * n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rp_nystrom_cpu(
    const at::Tensor& points, int64_t rank, const std::optional<at::Tensor>& seed, double tol) {
  detail::check_rp_nystrom_args(points, rank, seed, tol);
  const uint64_t seed_value = detail::host_seed(seed);
  at::AutoDispatchBelowADInplaceOrView guard;  // internal ATen calls are not differentiated
  const int64_t d = points.dim();
  const auto lead = points.sizes().slice(0, d - 2);
  const int64_t n = points.size(-2), dim = points.size(-1);
  const int64_t groups = c10::multiply_integers(lead);
  const int64_t kept = std::min(rank, n);
  const auto acc = detail::accumulate_type(points.scalar_type());
  at::Tensor pivots = at::zeros({groups, kept}, points.options().dtype(at::kLong));
  at::Tensor kinv = at::zeros({groups, kept, kept}, points.options().dtype(acc));
  at::Tensor rows = at::zeros({groups, kept, n}, points.options().dtype(acc));
  if (n > 0 && groups > 0) {
    const at::Tensor x = points.reshape({groups, n, dim}).to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "wildcat_rp_nystrom_cpu", [&] {
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
          rp_nystrom_group<scalar_t>(xs + g * n * dim, n, dim, kept, seed_value,
                                     static_cast<uint64_t>(g), static_cast<scalar_t>(tol),
                                     pivots.mutable_data_ptr<int64_t>() + g * kept,
                                     kinv.mutable_data_ptr<scalar_t>() + g * kept * kept,
                                     rows.mutable_data_ptr<scalar_t>() + g * kept * n);
        }
      });
    });
  }
  return {pivots.reshape(detail::with_tail(lead, {kept})), kinv.reshape(detail::with_tail(lead, {kept, kept})),
          rows.reshape(detail::with_tail(lead, {kept, n}))};
}

}  // namespace
}  // namespace cpu
}  // namespace wildcat

TORCH_LIBRARY_IMPL(wildcat, CPU, m) {
  m.impl("rp_nystrom", TORCH_FN(wildcat::cpu::rp_nystrom_cpu));
  m.impl("compress_kv", TORCH_FN(wildcat::cpu::compress_kv_cpu));
}

#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace wildcat {
namespace detail {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "wildcat.", op, ": ", name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "wildcat.", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

void check_scale(const char* op, const std::optional<double>& scale) {
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, "wildcat.", op,
                      ": scale must be a finite positive number, got ", *scale);
  }
}

void check_tol(const char* op, double tol) {
  TORCH_CHECK_VALUE(std::isfinite(tol) && tol >= 0 && tol < 1, "wildcat.", op,
                    ": tol must be in [0, 1), got ", tol);
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

double resolve_scale(const std::optional<double>& scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

kernels::TauMode parse_tau(std::string_view tau) {
  if (tau == "lambert") return kernels::TauMode::kLambert;
  if (tau == "constant") return kernels::TauMode::kConstant;
  TORCH_CHECK_VALUE(false, "wildcat: tau must be 'lambert' or 'constant', got '", std::string(tau),
                    "'");
  return kernels::TauMode::kLambert;
}

void check_seed(const char* op, const std::optional<at::Tensor>& seed, const at::Tensor& like) {
  if (!seed.has_value()) return;
  const at::Tensor& s = *seed;
  TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, "wildcat.", op, ": seed must be an int64 tensor, got ",
                   s.scalar_type());
  TORCH_CHECK_VALUE(s.numel() == 1, "wildcat.", op, ": seed must hold one element, got shape ", s.sizes());
  TORCH_CHECK(s.device().is_cpu() || s.device() == like.device(), "wildcat.", op, ": seed is on ",
              s.device(), "; it must be on the CPU or on ", like.device());
}

uint64_t host_seed(const std::optional<at::Tensor>& seed) {
  if (!seed.has_value()) return 0;
  TORCH_INTERNAL_ASSERT(seed->device().is_cpu());
  return static_cast<uint64_t>(seed->item<int64_t>());
}

void check_rp_nystrom_args(const at::Tensor& points, int64_t rank,
                           const std::optional<at::Tensor>& seed, double tol) {
  const char* op = "rp_nystrom";
  TORCH_CHECK_VALUE(points.dim() >= 2, "wildcat.rp_nystrom: points must have shape (..., N, E), got ",
                    points.sizes());
  check_float(op, "points", points);
  TORCH_CHECK_VALUE(points.size(-1) >= 1, "wildcat.rp_nystrom: points need E >= 1 features, got ",
                    points.sizes());
  TORCH_CHECK_VALUE(rank >= 1, "wildcat.rp_nystrom: rank must be >= 1, got ", rank);
  check_seed(op, seed, points);
  check_tol(op, tol);
}

void check_compress_kv_args(const at::Tensor& keys, const at::Tensor& values, int64_t rank,
                            int64_t num_bins, const std::optional<double>& scale,
                            const std::optional<at::Tensor>& query_norm,
                            const std::optional<at::Tensor>& seed, std::string_view tau, double tol,
                            const std::optional<at::Tensor>& lengths) {
  const char* op = "compress_kv";
  TORCH_CHECK_VALUE(keys.dim() >= 2, "wildcat.compress_kv: keys must have shape (..., N, E), got ",
                    keys.sizes());
  TORCH_CHECK_VALUE(values.dim() == keys.dim(),
                    "wildcat.compress_kv: values must have shape (..., N, D) with the rank of keys ",
                    keys.sizes(), ", got ", values.sizes());
  check_float(op, "keys", keys);
  check_float(op, "values", values);
  TORCH_CHECK_TYPE(keys.scalar_type() == values.scalar_type(), "wildcat.compress_kv: keys are ",
                   keys.scalar_type(), " but values are ", values.scalar_type(),
                   "; they must have one dtype");
  check_same_device(op, "values", values, "keys", keys);
  const int64_t d = keys.dim();
  TORCH_CHECK_VALUE(keys.sizes().slice(0, d - 2) == values.sizes().slice(0, d - 2),
                    "wildcat.compress_kv: leading dims of keys ", keys.sizes(), " and values ",
                    values.sizes(), " must match");
  TORCH_CHECK_VALUE(keys.size(-2) == values.size(-2), "wildcat.compress_kv: keys have N = ",
                    keys.size(-2), " but values have N = ", values.size(-2));
  TORCH_CHECK_VALUE(keys.size(-1) >= 1 && values.size(-1) >= 1,
                    "wildcat.compress_kv: keys and values need E, D >= 1, got keys ", keys.sizes(),
                    " and values ", values.sizes());
  TORCH_CHECK_VALUE(rank >= 1, "wildcat.compress_kv: r (rank) must be >= 1, got ", rank);
  TORCH_CHECK_VALUE(num_bins >= 1, "wildcat.compress_kv: num_bins must be >= 1, got ", num_bins);
  const int64_t n = keys.size(-2);
  if (n > 0) {
    TORCH_CHECK_VALUE(num_bins <= n, "wildcat.compress_kv: num_bins must be <= N = ", n,
                      " (every bin needs a key), got ", num_bins);
    TORCH_CHECK_VALUE(rank >= num_bins, "wildcat.compress_kv: r (rank) must be >= num_bins = ",
                      num_bins, " (every bin needs a coreset slot), got ", rank);
  }
  check_scale(op, scale);
  check_seed(op, seed, keys);
  parse_tau(tau);
  check_tol(op, tol);
  if (query_norm.has_value()) {
    const at::Tensor& qn = *query_norm;
    check_float(op, "query_norm", qn);
    check_same_device(op, "query_norm", qn, "keys", keys);
    TORCH_CHECK_VALUE(qn.sizes() == keys.sizes().slice(0, d - 2),
                      "wildcat.compress_kv: query_norm must have the leading dims of keys ",
                      keys.sizes().slice(0, d - 2), ", got ", qn.sizes());
  }
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK_TYPE(len.scalar_type() == at::kLong, "wildcat.compress_kv: lengths must be an int64 tensor, got ",
                     len.scalar_type());
    check_same_device(op, "lengths", len, "keys", keys);
    TORCH_CHECK_VALUE(len.sizes() == keys.sizes().slice(0, d - 2),
                      "wildcat.compress_kv: lengths must have the leading dims of keys ",
                      keys.sizes().slice(0, d - 2), ", got ", len.sizes());
  }
}

void check_lengths_values(const std::optional<at::Tensor>& lengths, int64_t n) {
  if (!lengths.has_value() || lengths->numel() == 0 || !lengths->device().is_cpu()) return;
  const int64_t lo = lengths->min().item<int64_t>(), hi = lengths->max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi <= n, "wildcat.compress_kv: lengths must lie in [0, N = ", n,
                    "], got values in [", lo, ", ", hi, "]");
}

void check_coreset_attention_args(const at::Tensor& query, const at::Tensor& core_keys,
                                  const at::Tensor& core_values, const at::Tensor& core_weights,
                                  const std::optional<double>& scale,
                                  const std::optional<at::Tensor>& value_min,
                                  const std::optional<at::Tensor>& value_max, bool center_values) {
  const char* op = "coreset_attention";
  TORCH_CHECK_VALUE(query.dim() >= 2, "wildcat.coreset_attention: query must have shape (..., M, E), got ",
                    query.sizes());
  const int64_t d = query.dim();
  TORCH_CHECK_VALUE(core_keys.dim() == d,
                    "wildcat.coreset_attention: core_keys must have shape (..., r, E) with the rank of query ",
                    query.sizes(), ", got ", core_keys.sizes());
  TORCH_CHECK_VALUE(core_values.dim() == d,
                    "wildcat.coreset_attention: core_values must have shape (..., r, D) with the rank of query ",
                    query.sizes(), ", got ", core_values.sizes());
  TORCH_CHECK_VALUE(core_weights.dim() == d - 1,
                    "wildcat.coreset_attention: core_weights must have shape (..., r), got ",
                    core_weights.sizes());
  check_float(op, "query", query);
  check_float(op, "core_keys", core_keys);
  check_float(op, "core_values", core_values);
  check_float(op, "core_weights", core_weights);
  TORCH_CHECK_TYPE(query.scalar_type() == core_keys.scalar_type(),
                   "wildcat.coreset_attention: query is ", query.scalar_type(), " but core_keys are ",
                   core_keys.scalar_type(), "; they must have one dtype");
  check_same_device(op, "core_keys", core_keys, "query", query);
  check_same_device(op, "core_values", core_values, "query", query);
  check_same_device(op, "core_weights", core_weights, "query", query);

  // Leading dims match exactly, except the head dim (-3), where query heads may be a multiple of
  // kv heads (grouped-query attention).
  const auto q_lead = query.sizes().slice(0, d - 2);
  const auto k_lead = core_keys.sizes().slice(0, d - 2);
  bool lead_ok = true;
  for (int64_t i = 0; i < d - 2; ++i) {
    if (i == d - 3) {
      lead_ok = lead_ok && k_lead[i] >= 1 && q_lead[i] % k_lead[i] == 0;
    } else {
      lead_ok = lead_ok && q_lead[i] == k_lead[i];
    }
  }
  TORCH_CHECK_VALUE(lead_ok, "wildcat.coreset_attention: leading dims of query ", query.sizes(),
                    " and core_keys ", core_keys.sizes(),
                    " must match, except query heads (dim -3) may be a multiple of kv heads");
  TORCH_CHECK_VALUE(core_values.sizes().slice(0, d - 1) == core_keys.sizes().slice(0, d - 1),
                    "wildcat.coreset_attention: core_values ", core_values.sizes(),
                    " must match core_keys ", core_keys.sizes(), " in every dim but the last");
  TORCH_CHECK_VALUE(core_weights.sizes() == core_keys.sizes().slice(0, d - 1),
                    "wildcat.coreset_attention: core_weights must have shape ",
                    core_keys.sizes().slice(0, d - 1), ", got ", core_weights.sizes());
  TORCH_CHECK_VALUE(query.size(-1) == core_keys.size(-1), "wildcat.coreset_attention: query has E = ",
                    query.size(-1), " but core_keys have E = ", core_keys.size(-1));
  TORCH_CHECK_VALUE(query.size(-1) >= 1 && core_values.size(-1) >= 1,
                    "wildcat.coreset_attention: query and core_values need E, D >= 1");
  check_scale(op, scale);

  std::vector<int64_t> bound_shape(core_values.sizes().begin(), core_values.sizes().end());
  bound_shape.erase(bound_shape.end() - 2);  // (..., D)
  for (const auto& [name, bound] : {std::pair{"value_min", &value_min}, std::pair{"value_max", &value_max}}) {
    if (!bound->has_value()) continue;
    const at::Tensor& t = **bound;
    check_float(op, name, t);
    check_same_device(op, name, t, "query", query);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(bound_shape), "wildcat.coreset_attention: ", name,
                      " must have shape ", at::IntArrayRef(bound_shape), ", got ", t.sizes());
  }
  TORCH_CHECK_VALUE(!center_values || (value_min.has_value() && value_max.has_value()),
                    "wildcat.coreset_attention: center_values=True needs value_min and value_max");
}

}  // namespace detail
}  // namespace wildcat

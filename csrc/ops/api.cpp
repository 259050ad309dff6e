// The public C++ API of include/wildcat/wildcat.h: typed dispatcher calls, so C++ callers reach
// the same kernels (and the same argument checks) as torch.ops.wildcat.* from Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "wildcat/wildcat.h"

namespace wildcat {
namespace ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rp_nystrom(const at::Tensor& points, int64_t rank,
                                                          const std::optional<at::Tensor>& seed,
                                                          double tol) {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("wildcat::rp_nystrom", "")
                              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                  const at::Tensor&, int64_t, const std::optional<at::Tensor>&, double)>();
  return op.call(points, rank, seed, tol);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_kv(
    const at::Tensor& keys, const at::Tensor& values, int64_t rank, int64_t num_bins,
    std::optional<double> scale, const std::optional<at::Tensor>& query_norm,
    const std::optional<at::Tensor>& seed, const std::string& tau, bool center_values, double tol,
    const std::optional<at::Tensor>& lengths) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("wildcat::compress_kv", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, int64_t, int64_t, std::optional<double>,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, std::string_view,
              bool, double, const std::optional<at::Tensor>&)>();
  return op.call(keys, values, rank, num_bins, scale, query_norm, seed, tau, center_values, tol, lengths);
}

at::Tensor coreset_attention(const at::Tensor& query, const at::Tensor& core_keys,
                             const at::Tensor& core_values, const at::Tensor& core_weights,
                             std::optional<double> scale, const std::optional<at::Tensor>& value_min,
                             const std::optional<at::Tensor>& value_max, bool center_values) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("wildcat::coreset_attention", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, std::optional<double>,
                                               const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, bool)>();
  return op.call(query, core_keys, core_values, core_weights, scale, value_min, value_max,
                 center_values);
}

}  // namespace ops

at::Tensor seed_tensor(int64_t seed) { return at::scalar_tensor(seed, at::TensorOptions().dtype(at::kLong)); }

CompressedKV compress_kv(const at::Tensor& keys, const at::Tensor& values, const Options& options,
                         const std::optional<at::Tensor>& query_norm) {
  auto [core_keys, core_values, core_weights, core_indices, value_min, value_max] =
      ops::compress_kv(keys, values, options.rank_, options.num_bins_, options.scale_, query_norm,
                       seed_tensor(options.seed_), options.tau_, options.center_values_, options.tol_);
  return {core_keys, core_values, core_weights, core_indices, value_min, value_max};
}

at::Tensor coreset_attention(const at::Tensor& query, const CompressedKV& kv, const Options& options) {
  return ops::coreset_attention(query, kv.core_keys, kv.core_values, kv.core_weights, options.scale_,
                                kv.value_min, kv.value_max, options.center_values_);
}

at::Tensor query_norm_per_kv_head(const at::Tensor& query, int64_t kv_heads) {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("wildcat::query_norm", "")
                              .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(query, kv_heads);
}

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const Options& options) {
  TORCH_CHECK_VALUE(query.dim() == key.dim(), "wildcat.attention: query ", query.sizes(), " and key ",
                    key.sizes(), " must have the same rank");
  if (query.dim() >= 3) {
    TORCH_CHECK_VALUE(query.sizes().slice(0, query.dim() - 3) == key.sizes().slice(0, key.dim() - 3),
                      "wildcat.attention: batch dims of query ", query.sizes(), " and key ", key.sizes(),
                      " must match");
  }
  const int64_t kv_heads = key.dim() >= 3 ? key.size(-3) : 1;
  const at::Tensor q_norm = query_norm_per_kv_head(query, kv_heads);
  return coreset_attention(query, compress_kv(key, value, options, q_norm), options);
}

bool cuda_built() {
#ifdef WILDCAT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace wildcat

// wildcat::query_norm on the CPU (and the CUDA fallback): ATen reductions.
#include "query_norm.h"

#include <torch/library.h>

namespace wildcat {
namespace detail {

void check_query_norm_args(const at::Tensor& query, int64_t kv_heads) {
  TORCH_CHECK_VALUE(query.dim() >= 2, "wildcat.query_norm: query must have shape (..., M, E), got ", query.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(query.scalar_type()), "wildcat.query_norm: query must be floating point, got ",
                    query.scalar_type());
  if (query.dim() >= 3) {
    TORCH_CHECK_VALUE(kv_heads >= 1 && query.size(-3) % kv_heads == 0, "wildcat.query_norm: query heads ",
                      query.size(-3), " must be a multiple of kv_heads, got kv_heads = ", kv_heads);
  }
}

std::vector<int64_t> query_norm_shape(const at::Tensor& query, int64_t kv_heads) {
  if (query.dim() < 3) return {};
  std::vector<int64_t> shape(query.sizes().begin(), query.sizes().end() - 3);
  shape.push_back(kv_heads);
  return shape;
}

at::Tensor query_norm_aten(const at::Tensor& query, int64_t kv_heads) {
  check_query_norm_args(query, kv_heads);
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // dtype= reads the input once; .to() first would write a copy of every query
  at::Tensor norms = at::linalg_vector_norm(query, 2, {-1}, false, acc);
  norms = query.size(-2) == 0 ? at::zeros(norms.sizes().slice(0, norms.dim() - 1), norms.options())
                              : std::get<0>(norms.max(-1));
  if (query.dim() < 3 || kv_heads == query.size(-3)) return norms;
  std::vector<int64_t> grouped(norms.sizes().begin(), norms.sizes().end());
  grouped.back() = kv_heads;
  grouped.push_back(query.size(-3) / kv_heads);
  return std::get<0>(norms.reshape(grouped).max(-1));
}

}  // namespace detail
}  // namespace wildcat

TORCH_LIBRARY_IMPL(wildcat, CPU, m) {
  m.impl("query_norm", TORCH_FN(wildcat::detail::query_norm_aten));
}

// The query norm per kv head (op wildcat::query_norm) in ATen operations: the CPU kernel, and the
// CUDA one for inputs its fast kernel does not take.
#pragma once

#include <ATen/ATen.h>

namespace wildcat {
namespace detail {

void check_query_norm_args(const at::Tensor& query, int64_t kv_heads);

// Output shape: query.shape[:-3] + (kv_heads,), or () for a rank-2 query.
std::vector<int64_t> query_norm_shape(const at::Tensor& query, int64_t kv_heads);

at::Tensor query_norm_aten(const at::Tensor& query, int64_t kv_heads);

}  // namespace detail
}  // namespace wildcat

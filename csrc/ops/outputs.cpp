#include "outputs.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>

#include "checks.h"

namespace wildcat {
namespace detail {

std::vector<int64_t> with_tail(at::IntArrayRef lead, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape(lead.begin(), lead.end());
  shape.insert(shape.end(), tail);
  return shape;
}

CompressOutputs::CompressOutputs(const at::Tensor& keys, const at::Tensor& values, int64_t rank, bool zero_fill,
                                 bool keys_from_kernel)
    : lead_(keys.sizes().slice(0, keys.dim() - 2)) {
  groups = c10::multiply_integers(lead_);
  n = keys.size(-2);
  e = keys.size(-1);
  dv = values.size(-1);
  kept = std::min(rank, n);
  const auto acc = keys.options().dtype(accumulate_type(keys.scalar_type()));
  keys3 = keys.reshape({groups, n, e});
  const auto make = [&](std::initializer_list<int64_t> tail, const at::TensorOptions& options) {
    const auto shape = with_tail(lead_, tail);
    return zero_fill || n == 0 || groups == 0 ? at::zeros(shape, options) : at::empty(shape, options);
  };
  if (keys_from_kernel) core_keys = make({kept, e}, keys.options());
  core_values = make({kept, dv}, acc);
  core_weights = make({kept}, acc);
  core_indices = make({kept}, keys.options().dtype(at::kLong));
  value_min = make({dv}, acc);
  value_max = make({dv}, acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> CompressOutputs::finish() const {
  at::Tensor keys_out = core_keys;
  if (!keys_out.defined()) {
    const at::Tensor index = core_indices.reshape({groups, kept, 1}).expand({groups, kept, e});
    keys_out = keys3.gather(1, index).reshape(with_tail(lead_, {kept, e}));
  }
  return {keys_out, core_values, core_weights, core_indices, value_min, value_max};
}

}  // namespace detail
}  // namespace wildcat

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

CompressOutputs::CompressOutputs(const at::Tensor& keys, const at::Tensor& values, int64_t rank, bool zero_fill)
    : lead_(keys.sizes().slice(0, keys.dim() - 2)) {
  groups = c10::multiply_integers(lead_);
  n = keys.size(-2);
  e = keys.size(-1);
  dv = values.size(-1);
  kept = std::min(rank, n);
  const auto acc = keys.options().dtype(accumulate_type(keys.scalar_type()));
  keys3 = keys.reshape({groups, n, e});
  const auto make = [&](at::IntArrayRef shape, const at::TensorOptions& options) {
    return zero_fill || n == 0 || groups == 0 ? at::zeros(shape, options) : at::empty(shape, options);
  };
  core_values = make({groups, kept, dv}, acc);
  core_weights = make({groups, kept}, acc);
  core_indices = make({groups, kept}, keys.options().dtype(at::kLong));
  value_min = make({groups, dv}, acc);
  value_max = make({groups, dv}, acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> CompressOutputs::finish() const {
  const at::Tensor core_keys = keys3.gather(1, core_indices.unsqueeze(-1).expand({groups, kept, e}));
  return {core_keys.reshape(with_tail(lead_, {kept, e})), core_values.reshape(with_tail(lead_, {kept, dv})),
          core_weights.reshape(with_tail(lead_, {kept})), core_indices.reshape(with_tail(lead_, {kept})),
          value_min.reshape(with_tail(lead_, {dv})), value_max.reshape(with_tail(lead_, {dv}))};
}

}  // namespace detail
}  // namespace wildcat

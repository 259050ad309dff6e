// Output allocation and shaping shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <tuple>
#include <vector>

namespace wildcat {
namespace detail {

// lead + tail, the shape of an output that keeps an input's leading dims.
std::vector<int64_t> with_tail(at::IntArrayRef lead, std::initializer_list<int64_t> tail);

// compress_kv's outputs, with the keys' leading dims (G = their product groups, contiguous, so
// kernels index them per group) and zeroed: early-stopped slots and empty sequences need nothing
// more. `zero_fill` false leaves them uninitialised where there is something to compute (the CUDA
// kernels write every entry; each fill is a kernel launch, and at short lengths the host's
// launches bound the call). `keys_from_kernel` allocates the core keys too, for a kernel to copy;
// otherwise finish() gathers them.
struct CompressOutputs {
  CompressOutputs(const at::Tensor& keys, const at::Tensor& values, int64_t rank, bool zero_fill = true,
                  bool keys_from_kernel = false);

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish() const;

  int64_t groups, n, e, dv, kept;
  at::Tensor keys3;  // the keys viewed as (G, N, E)
  at::Tensor core_keys, core_values, core_weights, core_indices, value_min, value_max;

 private:
  at::DimVector lead_;
};

}  // namespace detail
}  // namespace wildcat

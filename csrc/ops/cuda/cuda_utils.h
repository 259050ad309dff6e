// Helpers shared by the CUDA glue: torch → CUDA scalar types, the seed, launch checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "../../kernels/compress.cuh"

namespace wildcat {
namespace cuda {

// The CUDA type of a torch scalar type (layout-identical) and its accumulation type.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
  using acc = float;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
  using acc = float;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
  using acc = float;
};
template <>
struct CudaType<double> {
  using type = double;
  using acc = double;
};

template <typename scalar_t>
const typename CudaType<scalar_t>::type* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

// A seed on the GPU is read by the kernel (graph replays see new values); a CPU seed is read here
// without any device synchronisation.
inline kernels::SeedRef seed_ref(const std::optional<at::Tensor>& seed) {
  if (!seed.has_value()) return {nullptr, 0};
  if (seed->is_cuda()) return {seed->const_data_ptr<int64_t>(), 0};
  return {nullptr, static_cast<uint64_t>(seed->item<int64_t>())};
}

// Runtime queries about a kernel, and host searches over a launch's shape, cost microseconds of
// host time each, and short calls are bound by the host (benchmarks/NOTES.md, N = 4,096): their
// answers are kept per device, kernel and `size` (a size or a tuple of them; 0 where none
// applies). One table per call site, behind a lock.
template <typename Value, typename Size, typename Compute>
Value memoized(const void* kernel, const Size& size, Compute&& compute) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, Size>, Value> memo;
  const auto key = std::make_tuple(static_cast<int>(c10::cuda::current_device()), kernel, size);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = memo.find(key);
  if (found != memo.end()) return found->second;
  const Value value = compute();
  memo.emplace(key, value);
  return value;
}

// Raises a kernel's dynamic shared memory limit to at least `bytes`. The limit only ever rises
// (the largest size asked for so far stays allowed), so each device and kernel is set once per
// new maximum.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> allowed;
  const auto key = std::make_pair(static_cast<int>(c10::cuda::current_device()), reinterpret_cast<const void*>(kernel));
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& limit = allowed[key];
  if (bytes <= limit) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  limit = bytes;
}

// Whether `kernel`'s code has its thread-block-cluster paths (compiled from sm_90 PTX or newer).
// The device's compute capability alone does not say it: a build for an older architecture runs on
// an sm_90 GPU through its PTX, JIT-compiled with those paths left out.
template <typename Kernel>
bool has_cluster_code(Kernel kernel) {
  if (at::cuda::getCurrentDeviceProperties()->major < 9) return false;
  return memoized<bool>(reinterpret_cast<const void*>(kernel), 0, [&] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    return attributes.ptxVersion >= 90;
  });
}

// An op call's scratch arrays, carved from one allocation: each at::empty is a dispatcher round trip
// of host time, and short calls are bound by the host (benchmarks/NOTES.md, N = 4,096). Arrays are
// declared with `add`; `allocate` then makes one byte tensor and points every declared pointer into
// it. Keep that tensor alive until the kernels that use it are enqueued (the caching allocator
// orders its reuse after them on the stream).
class Scratch {
 public:
  template <typename V>
  void add(V*& pointer, int64_t count) {
    const size_t offset = bytes_;
    bytes_ += (sizeof(V) * static_cast<size_t>(count) + kAlign - 1) / kAlign * kAlign;
    assign_.push_back([&pointer, offset](unsigned char* base) { pointer = reinterpret_cast<V*>(base + offset); });
  }

  at::Tensor allocate(const at::TensorOptions& device) {
    at::Tensor buffer = at::empty({static_cast<int64_t>(bytes_)}, device.dtype(at::kByte));
    unsigned char* base = static_cast<unsigned char*>(buffer.mutable_data_ptr());
    for (const auto& assign : assign_) assign(base);
    return buffer;
  }

 private:
  static constexpr size_t kAlign = 256;  // every array starts as aligned as a fresh allocation's cache lines
  std::vector<std::function<void(unsigned char*)>> assign_;
  size_t bytes_ = 0;
};

inline size_t max_shared_memory() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

}  // namespace cuda
}  // namespace wildcat

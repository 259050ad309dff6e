// CUDA glue of coreset_attention (kernels in csrc/kernels/coreset_attention.cuh).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../../kernels/coreset_attention.cuh"
#include "../../kernels/coreset_decode.cuh"
#include "../checks.h"
#include "cuda_utils.h"

namespace wildcat {
namespace cuda {
namespace {

constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t, typename T>
kernels::AttentionParams<typename CudaType<scalar_t>::type, T> attention_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const std::optional<at::Tensor>& vmin, const std::optional<at::Tensor>& vmax, bool center_values, double beta,
    int64_t q_heads, int64_t kv_heads, at::Tensor& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  kernels::AttentionParams<cuda_t, T> p{};
  p.query = device_ptr<scalar_t>(q);
  p.keys = device_ptr<scalar_t>(k);
  p.values = v.const_data_ptr<T>();
  p.weights = w.const_data_ptr<T>();
  p.value_min = vmin ? vmin->const_data_ptr<T>() : nullptr;
  p.value_max = vmax ? vmax->const_data_ptr<T>() : nullptr;
  p.center_values = center_values;
  p.beta = beta;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.m = q.size(-2);
  p.r = k.size(-2);
  p.e = q.size(-1);
  p.dv = v.size(-1);
  p.out = reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>());
  return p;
}

std::optional<at::Tensor> as_type(const std::optional<at::Tensor>& t, at::ScalarType type) {
  if (!t) return std::nullopt;
  return t->to(type).contiguous();
}

// The general kernel in accumulation type T (converted coreset tensors live until the launch).
template <typename scalar_t, typename T>
void launch_simt(const at::Tensor& q, const at::Tensor& k, const at::Tensor& values, const at::Tensor& weights,
                 const std::optional<at::Tensor>& value_min, const std::optional<at::Tensor>& value_max,
                 bool center_values, double beta, int64_t bh, int64_t q_heads, int64_t kv_heads, at::Tensor& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  const auto type = c10::CppTypeToScalarType<T>::value;
  const at::Tensor v = values.to(type).contiguous(), w = weights.to(type).contiguous();
  const std::optional<at::Tensor> lo = as_type(value_min, type), hi = as_type(value_max, type);
  const auto p = attention_params<scalar_t, T>(q, k, v, w, lo, hi, center_values, beta, q_heads, kv_heads, out);
  const int64_t blocks = (q.size(-2) + kernels::kSimtWarps * kernels::kSimtQueriesPerWarp - 1) /
                         (kernels::kSimtWarps * kernels::kSimtQueriesPerWarp);
  TORCH_CHECK_VALUE(blocks <= kMaxGridY, "wildcat.coreset_attention: too many queries for one CUDA launch: M = ",
                    q.size(-2));
  const size_t smem = kernels::simt_smem_bytes<T>(q.size(-1), v.size(-1));
  auto kernel = kernels::coreset_attention_simt<cuda_t, T>;
  allow_shared_memory(kernel, smem);
  kernel<<<dim3(bh, blocks), kernels::kSimtWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The entries as (B, Hkv, r, ·) with a contiguous last dim, in type `type` (no copy when they are).
at::Tensor entries_view(const at::Tensor& t, at::ScalarType type) {
  const at::Tensor typed = t.scalar_type() == type ? t : t.to(type);
  return typed.stride(-1) == 1 ? typed : typed.contiguous();
}

// Few queries per kv head (decoding): the entries of every kv head split over many CTAs
// (csrc/kernels/coreset_decode.cuh). q (B, Hq, M, E) contiguous; k, values (B, Hkv, r, ·) and
// weights (B, Hkv, r) may be strided views.
template <typename scalar_t, typename T>
void launch_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& values, const at::Tensor& weights,
                   const std::optional<at::Tensor>& value_min, const std::optional<at::Tensor>& value_max,
                   bool center_values, double beta, int64_t batch, int64_t q_heads, int64_t kv_heads, at::Tensor& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  const auto type = c10::CppTypeToScalarType<T>::value;
  const at::Tensor keys = entries_view(k, q.scalar_type());
  const at::Tensor v = entries_view(values, type), w = entries_view(weights, type);
  const std::optional<at::Tensor> lo = as_type(value_min, type), hi = as_type(value_max, type);
  const int64_t groups = batch * kv_heads, queries = q_heads / kv_heads * q.size(-2), r = k.size(-2);
  // about eight CTAs per SM, each a chunk of kDecodeMinChunk..kDecodeMaxChunk entries (staged in
  // shared memory): the work is latency-bound (a few MB), so it wants many warps in flight
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target = std::max<int64_t>(1, (8 * sms + groups - 1) / groups);
  const int64_t chunk = std::clamp<int64_t>((r + target - 1) / target, kernels::kDecodeMinChunk, kernels::kDecodeMaxChunk);
  const int64_t splits = (r + chunk - 1) / chunk;
  // per (group, split, query): the maximum, the denominator and the D numerators
  at::Tensor part = at::empty({groups * splits * queries * (values.size(-1) + 2)}, q.options().dtype(type));
  kernels::DecodeParams<cuda_t, T> p{};
  p.query = device_ptr<scalar_t>(q);
  p.keys = device_ptr<scalar_t>(keys);
  p.values = v.const_data_ptr<T>();
  p.weights = w.const_data_ptr<T>();
  for (int d = 0; d < 3; ++d) {
    p.key_stride[d] = keys.stride(d);
    p.value_stride[d] = v.stride(d);
    p.weight_stride[d] = w.stride(d);
  }
  p.value_min = lo ? lo->const_data_ptr<T>() : nullptr;
  p.value_max = hi ? hi->const_data_ptr<T>() : nullptr;
  p.center_values = center_values;
  p.beta = beta;
  p.kv_heads = kv_heads;
  p.queries = queries;
  p.entries = r;
  p.e = q.size(-1);
  p.dv = values.size(-1);
  p.chunk = chunk;
  p.splits = splits;
  p.part_max = part.mutable_data_ptr<T>();
  p.part_den = p.part_max + groups * splits * queries;
  p.part_num = p.part_den + groups * splits * queries;
  p.out = reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = kernels::decode_smem_bytes<T>(queries, p.e, p.dv, chunk);
  auto split_kernel = kernels::coreset_decode_split<cuda_t, T>;
  allow_shared_memory(split_kernel, smem);
  split_kernel<<<groups * splits, kernels::kDecodeThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t combine_smem = kernels::decode_combine_smem_bytes<T>(splits, p.dv);
  auto combine_kernel = kernels::coreset_decode_combine<cuda_t, T>;
  allow_shared_memory(combine_kernel, combine_smem);
  combine_kernel<<<groups * queries, kernels::kCombineThreads, combine_smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void attend_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& values, const at::Tensor& weights,
                  const std::optional<at::Tensor>& value_min, const std::optional<at::Tensor>& value_max,
                  bool center_values, double beta, int64_t batch, int64_t q_heads, int64_t kv_heads, at::Tensor& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  const int64_t m = q.size(-2), e = q.size(-1), r = k.size(-2), dv = values.size(-1);
  const int64_t bh = batch * q_heads;
  constexpr bool wide = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
  using Acc = std::conditional_t<wide, double, float>;  // float32 accumulates in double, as below

  if (q_heads / kv_heads * m <= kernels::kDecodeMaxQueries && e <= kernels::kDecodeMaxDim &&
      dv <= kernels::kDecodeMaxDim && r > 0 &&
      kernels::decode_smem_bytes<Acc>(q_heads / kv_heads * m, e, dv, kernels::kDecodeMaxChunk) <= max_shared_memory() &&
      kernels::decode_combine_smem_bytes<Acc>((r + kernels::kDecodeMaxChunk - 1) / kernels::kDecodeMaxChunk, dv) <=
          max_shared_memory()) {
    launch_decode<scalar_t, Acc>(q, k, values, weights, value_min, value_max, center_values, beta, batch, q_heads,
                                 kv_heads, out);
    return;
  }

  // The tensor-core path multiplies P V̂ in TF32, whose 10-bit mantissa is below bfloat16's
  // output rounding but as coarse as float16's: float16 measured up to 2.1x the float32 oracle's
  // error there (benchmarks/NOTES.md), so it takes the general kernel.
  if constexpr (std::is_same_v<cuda_t, __nv_bfloat16>) {
    const bool dim64 = e == 64 && dv == 64, dim128 = e == 128 && dv == 128;
    const size_t smem = dim64 ? kernels::mma_smem_bytes<64>(r) : kernels::mma_smem_bytes<128>(r);
    // the fast kernel loads query pairs as 32-bit words
    const bool aligned = reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16 == 0;
    if ((dim64 || dim128) && aligned && smem <= max_shared_memory()) {
      const at::Tensor v = values.to(at::kFloat).contiguous(), w = weights.to(at::kFloat).contiguous();
      const std::optional<at::Tensor> lo = as_type(value_min, at::kFloat), hi = as_type(value_max, at::kFloat);
      auto p = attention_params<scalar_t, float>(q, k, v, w, lo, hi, center_values, beta, q_heads, kv_heads, out);
      // enough query tiles per CTA that the coreset is staged a few times per SM, not per tile
      const int64_t tiles = (m + kernels::kMmaTileRows - 1) / kernels::kMmaTileRows;
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      p.tiles_per_cta = std::max<int64_t>(1, tiles * bh / (sms * 2));
      p.tiles_per_cta = std::max(p.tiles_per_cta, (tiles + kMaxGridY - 1) / kMaxGridY);
      const dim3 grid(bh, (tiles + p.tiles_per_cta - 1) / p.tiles_per_cta);
      auto kernel = dim64 ? kernels::coreset_attention_mma<cuda_t, 64> : kernels::coreset_attention_mma<cuda_t, 128>;
      allow_shared_memory(kernel, smem);
      kernel<<<grid, kernels::kMmaWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  TORCH_CHECK_VALUE(e <= kernels::kSimtMaxDim && dv <= kernels::kSimtMaxDim,
                    "wildcat.coreset_attention: CUDA supports E, D <= ", kernels::kSimtMaxDim, ", got E = ", e,
                    ", D = ", dv);
  // float32 (and float64) inputs accumulate in double where shared memory allows: float32 sums
  // measured as large an error as the float32 oracle's, with its tail above twice
  // (benchmarks/NOTES.md); 16-bit inputs are bounded by their output rounding and keep float.
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    if (kernels::simt_smem_bytes<double>(e, dv) <= max_shared_memory()) {
      launch_simt<scalar_t, double>(q, k, values, weights, value_min, value_max, center_values, beta, bh, q_heads,
                                    kv_heads, out);
      return;
    }
    constexpr bool is_double = std::is_same_v<scalar_t, double>;
    TORCH_CHECK_VALUE(!is_double, "wildcat.coreset_attention: float64 with E = ", e, ", D = ", dv,
                      " needs more shared memory than this GPU has; use float32");
  }
  launch_simt<scalar_t, float>(q, k, values, weights, value_min, value_max, center_values, beta, bh, q_heads,
                               kv_heads, out);
}

at::Tensor coreset_attention_cuda(const at::Tensor& query, const at::Tensor& core_keys, const at::Tensor& core_values,
                                  const at::Tensor& core_weights, std::optional<double> scale,
                                  const std::optional<at::Tensor>& value_min, const std::optional<at::Tensor>& value_max,
                                  bool center_values) {
  detail::check_coreset_attention_args(query, core_keys, core_values, core_weights, scale, value_min, value_max,
                                       center_values);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t d = query.dim();
  const int64_t m = query.size(-2), e = query.size(-1), r = core_keys.size(-2), dv = core_values.size(-1);
  const int64_t q_heads = d >= 3 ? query.size(-3) : 1;
  const int64_t kv_heads = d >= 3 ? core_keys.size(-3) : 1;
  const int64_t batch = d >= 3 ? c10::multiply_integers(query.sizes().slice(0, d - 3)) : 1;
  std::vector<int64_t> out_shape(query.sizes().begin(), query.sizes().end());
  out_shape.back() = dv;
  at::Tensor out = at::empty({batch, q_heads, m, dv}, query.options());
  if (out.numel() == 0) return out.view(out_shape);
  const at::Tensor q = query.reshape({batch, q_heads, m, e}).contiguous();
  const at::Tensor k = core_keys.reshape({batch, kv_heads, r, e});
  const at::Tensor v = core_values.reshape({batch, kv_heads, r, dv});
  const at::Tensor w = core_weights.reshape({batch, kv_heads, r});
  std::optional<at::Tensor> lo, hi;
  if (value_min) lo = value_min->reshape({batch, kv_heads, dv});
  if (value_max) hi = value_max->reshape({batch, kv_heads, dv});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "wildcat_coreset_attention_cuda", [&] {
    attend_typed<scalar_t>(q, k, v, w, lo, hi, center_values, detail::resolve_scale(scale, e), batch, q_heads,
                           kv_heads, out);
  });
  return out.view(out_shape);
}

}  // namespace
}  // namespace cuda
}  // namespace wildcat

TORCH_LIBRARY_IMPL(wildcat, CUDA, m) {
  m.impl("coreset_attention", TORCH_FN(wildcat::cuda::coreset_attention_cuda));
}

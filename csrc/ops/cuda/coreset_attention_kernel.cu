// CUDA glue of coreset_attention (kernels in csrc/kernels/coreset_attention.cuh).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../../kernels/coreset_attention.cuh"
#include "../../kernels/coreset_decode.cuh"
#include "../checks.h"
#include "cuda_utils.h"

namespace wildcat {
namespace cuda {
namespace {

constexpr int64_t kMaxGridX = 2147483647;
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

// Whether rows of `t` (B, H, S, ·) can be copied in 16-byte pieces: pointer, strides and row
// length 16-byte multiples.
bool rows_16_byte_aligned(const at::Tensor& t) {
  const int64_t size = t.element_size();
  bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.size(-1) * size % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && (t.size(d) == 1 || t.stride(d) * size % 16 == 0);
  return aligned;
}

// The decode kernel's geometry: CTAs per group (a cluster), entries per CTA, entries per
// shared-memory chunk. chunk 0: no chunk fits in shared memory.
struct DecodeGeometry {
  int64_t cluster, span, chunk;
  kernels::DecodeLayout layout;
};

template <typename cuda_t, typename T, int kQ>
DecodeGeometry decode_geometry(int64_t groups, int64_t entries, int64_t e, int64_t dv) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  // About one CTA per SM: the work is latency-bound (a few MB), so it wants every SM waiting on
  // its share at once. Clusters (sm_90) of up to the portable 8 CTAs split a group's entries,
  // at least 16 entries each.
  int64_t cluster = 1;
  if (has_cluster_code(kernels::coreset_decode<cuda_t, T, kQ>)) {
    while (cluster < kernels::kDecodeMaxCluster && groups * cluster * 2 <= prop->multiProcessorCount &&
           entries >= cluster * 2 * 16) {
      cluster *= 2;
    }
  }
  const int64_t span = (entries + cluster - 1) / cluster;
  // the largest chunk up to the span within about half an SM's shared memory (two CTAs per SM
  // when there are many groups): the layout grows by at most `per_entry` bytes per entry, plus
  // 16-entry rounding and alignment
  const size_t budget = std::min<size_t>(max_shared_memory(), 112 * 1024);
  const kernels::DecodeLayout empty = kernels::decode_layout<cuda_t, T, kQ>(e, dv, 0, cluster);
  const size_t per_entry = sizeof(cuda_t) * empty.key_row + sizeof(T) * (empty.value_row + 1 + kQ);
  const size_t slack = sizeof(cuda_t) * empty.key_row * 16 + 64;
  const int64_t fit =
      empty.bytes + slack < budget ? static_cast<int64_t>((budget - empty.bytes - slack) / per_entry) : 0;
  const int64_t chunk = std::min(span, fit);
  return {cluster, span, chunk, kernels::decode_layout<cuda_t, T, kQ>(e, dv, chunk, cluster)};
}

// Few queries per kv head (decoding): the entries of every kv head split over the CTAs of a
// cluster (csrc/kernels/coreset_decode.cuh), kQ >= Hq / Hkv · M queries per group. q (B, Hq, M, E)
// contiguous; k, values (B, Hkv, r, ·) and weights (B, Hkv, r) may be strided views. Returns
// false (launching nothing) when no chunk fits in shared memory.
template <typename scalar_t, typename T, int kQ>
bool launch_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& values, const at::Tensor& weights,
                   const std::optional<at::Tensor>& value_min, const std::optional<at::Tensor>& value_max,
                   bool center_values, double beta, int64_t batch, int64_t q_heads, int64_t kv_heads, at::Tensor& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  const int64_t groups = batch * kv_heads;
  const DecodeGeometry geometry = decode_geometry<cuda_t, T, kQ>(groups, k.size(-2), q.size(-1), values.size(-1));
  if (geometry.chunk == 0) return false;
  TORCH_CHECK_VALUE(groups * geometry.cluster <= kMaxGridX,
                    "wildcat.coreset_attention: too many kv heads for one CUDA launch: B * Hkv = ", groups);
  const auto type = c10::CppTypeToScalarType<T>::value;
  const at::Tensor keys = entries_view(k, q.scalar_type());
  const at::Tensor v = entries_view(values, type), w = entries_view(weights, type);
  const std::optional<at::Tensor> lo = as_type(value_min, type), hi = as_type(value_max, type);
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
  p.vector_query = reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16 == 0 && q.size(-1) * q.element_size() % 16 == 0;
  p.vector_keys = rows_16_byte_aligned(keys);
  p.vector_values = rows_16_byte_aligned(v);
  p.value_min = lo ? lo->const_data_ptr<T>() : nullptr;
  p.value_max = hi ? hi->const_data_ptr<T>() : nullptr;
  p.center_values = center_values;
  p.beta = beta;
  p.kv_heads = kv_heads;
  p.queries = q_heads / kv_heads * q.size(-2);
  p.entries = k.size(-2);
  p.e = q.size(-1);
  p.dv = values.size(-1);
  p.cluster = geometry.cluster;
  p.span = geometry.span;
  p.chunk = geometry.chunk;
  p.layout = geometry.layout;
  p.out = reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>());
  auto kernel = kernels::coreset_decode<cuda_t, T, kQ>;
  allow_shared_memory(kernel, geometry.layout.bytes);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(groups * geometry.cluster));
  config.blockDim = dim3(kernels::kDecodeThreads);
  config.dynamicSmemBytes = geometry.layout.bytes;
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = static_cast<unsigned>(geometry.cluster);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = geometry.cluster > 1 ? 1 : 0;  // no cluster attribute before sm_90
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  return true;
}

// The decode kernel instantiated for the next power of two of the group's query count.
template <typename scalar_t, typename T>
bool decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& values, const at::Tensor& weights,
            const std::optional<at::Tensor>& value_min, const std::optional<at::Tensor>& value_max, bool center_values,
            double beta, int64_t batch, int64_t q_heads, int64_t kv_heads, at::Tensor& out) {
  const int64_t queries = q_heads / kv_heads * q.size(-2);
  static_assert(kernels::kDecodeMaxQueries == 16, "one instantiation per power of two up to the maximum");
  auto launch = [&](auto q_count) {
    return launch_decode<scalar_t, T, decltype(q_count)::value>(q, k, values, weights, value_min, value_max,
                                                                center_values, beta, batch, q_heads, kv_heads, out);
  };
  if (queries <= 1) return launch(std::integral_constant<int, 1>{});
  if (queries <= 2) return launch(std::integral_constant<int, 2>{});
  if (queries <= 4) return launch(std::integral_constant<int, 4>{});
  if (queries <= 8) return launch(std::integral_constant<int, 8>{});
  return launch(std::integral_constant<int, 16>{});
}

// The staging units of the tensor-core kernel's shares (kernels::MmaShares, 0 or 1) whose busiest
// CTA has the least work, counted as its tiles plus one staging per head its share touches. One
// unit evens out the CTAs whose shares cross into the next head (2% of the kernel at 32 heads and
// M = 65,536); none keeps equal item counts where those fall on head boundaries already (4 heads of
// 66 tiles on 132 CTAs: 2 tiles each, where one unit gives some CTAs 3). Either is correct; the
// search walks every CTA's share twice, so the caller keeps its answer per shape (memoized).
int staging_units_for(int64_t heads, int64_t tiles, int64_t ctas) {
  auto busiest = [&](int64_t units) {
    const kernels::MmaShares shares{heads, tiles, ctas, units};
    int64_t worst = 0, first = shares.first(0);
    for (int64_t b = 0; b < ctas; ++b) {
      const int64_t last = shares.last(b);
      if (first < last) worst = std::max(worst, last - first + (last - 1) / tiles - first / tiles + 1);
      first = last;
    }
    return worst;
  };
  return busiest(1) < busiest(0) ? 1 : 0;
}

template <typename scalar_t>
void attend_typed(const at::Tensor& q, const at::Tensor& k_view, const at::Tensor& values, const at::Tensor& weights,
                  const std::optional<at::Tensor>& value_min, const std::optional<at::Tensor>& value_max,
                  bool center_values, double beta, int64_t batch, int64_t q_heads, int64_t kv_heads, at::Tensor& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  const int64_t m = q.size(-2), e = q.size(-1), r = k_view.size(-2), dv = values.size(-1);
  const int64_t bh = batch * q_heads;
  constexpr bool wide = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
  using Acc = std::conditional_t<wide, double, float>;  // float32 accumulates in double, as below

  if (q_heads / kv_heads * m <= kernels::kDecodeMaxQueries && e <= kernels::kDecodeMaxDim &&
      dv <= kernels::kDecodeMaxDim && r > 0 &&
      decode<scalar_t, Acc>(q, k_view, values, weights, value_min, value_max, center_values, beta, batch, q_heads,
                            kv_heads, out)) {
    return;
  }
  // The query-tiled kernels index the keys as packed (B, Hkv, r, E); a view (a cache's live
  // prefix, a transpose) is copied. Values and weights are converted to contiguous below.
  const at::Tensor k = k_view.contiguous();

  // The tensor-core path multiplies P V̂ in float16 (10-bit mantissa, each column scaled to
  // float16's top binade), below bfloat16's output rounding but as coarse as float16's: float16
  // outputs measured up to 2.1x the float32 oracle's error with the same mantissa in TF32
  // (benchmarks/NOTES.md), so float16 takes the general kernel.
  if constexpr (std::is_same_v<cuda_t, __nv_bfloat16>) {
    const bool dim64 = e == 64 && dv == 64, dim128 = e == 128 && dv == 128;
    const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
    // two query buffers per warp (the next block loads while this one computes) where shared
    // memory allows, else one
    auto smem_for = [&](int stages) {
      return dim64 ? kernels::mma_smem_bytes<64>(r, stages) : kernels::mma_smem_bytes<128>(r, stages);
    };
    const int stages = smem_for(2) <= max_shared_memory() ? 2 : 1;
    const size_t smem = smem_for(stages);
    // the fast kernel copies query rows in 16-byte pieces
    const bool aligned = reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16 == 0;
    if ((dim64 || dim128) && aligned && smem <= max_shared_memory()) {
      const at::Tensor v = values.to(at::kFloat).contiguous(), w = weights.to(at::kFloat).contiguous();
      const std::optional<at::Tensor> lo = as_type(value_min, at::kFloat), hi = as_type(value_max, at::kFloat);
      // the kernel reads the keys in 16-byte pieces too (a fresh allocation is aligned)
      const at::Tensor keys = reinterpret_cast<uintptr_t>(k.const_data_ptr()) % 16 == 0 ? k : k.clone();
      auto p = attention_params<scalar_t, float>(q, keys, v, w, lo, hi, center_values, beta, q_heads, kv_heads, out);
      p.batch_heads = bh;
      p.query_stages = stages;
      auto kernel = dim64 ? (center_values ? kernels::coreset_attention_mma<cuda_t, 64, true>
                                           : kernels::coreset_attention_mma<cuda_t, 64, false>)
                          : (center_values ? kernels::coreset_attention_mma<cuda_t, 128, true>
                                           : kernels::coreset_attention_mma<cuda_t, 128, false>);
      allow_shared_memory(kernel, smem);
      const int threads = 32 * (dim64 ? kernels::mma_warps<64>() : kernels::mma_warps<128>());
      // One wave: as many CTAs as fit on the GPU at once (1 per SM), each with a balanced share of
      // the (head, query tile) items (kernels::MmaShares). Whole heads per group of CTAs had left a
      // partial last wave when two CTAs fit per SM at D = 64: 288 CTAs for 264 places at 32 heads,
      // and 2.2 waves at D = 128 (benchmarks/NOTES.md, session 8).
      const int per_sm = memoized<int>(reinterpret_cast<const void*>(kernel), static_cast<int64_t>(smem), [&] {
        int fit = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, threads, smem));
        return fit;
      });
      const int64_t tile_rows = dim64 ? kernels::mma_tile_rows<64>() : kernels::mma_tile_rows<128>();
      const int64_t tiles = (m + tile_rows - 1) / tile_rows;
      const int64_t ctas = std::min<int64_t>({bh * tiles, std::max(per_sm, 1) * int64_t{device->multiProcessorCount},
                                              kMaxGridX});
      p.staging_units = memoized<int>(reinterpret_cast<const void*>(kernel), std::make_tuple(bh, tiles, ctas),
                                      [&] { return staging_units_for(bh, tiles, ctas); });
      kernel<<<static_cast<unsigned>(ctas), threads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
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

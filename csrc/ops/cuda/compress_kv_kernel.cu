// CUDA glue of compress_kv and rp_nystrom (kernels in csrc/kernels/compress.cuh).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../../kernels/compress_block.cuh"
#include "../../kernels/compress_resident.cuh"
#include "../checks.h"
#include "../outputs.h"
#include "cuda_utils.h"

namespace wildcat {
namespace cuda {
namespace {

constexpr int kPivotThreads = 512;
// Block pivoting: one CTA per SM, 512 threads at 128 registers for float state (256 at up to 255
// for double). Against two CTAs of 256 per SM it measured 7% faster at N = 4,096 and level at
// 16,384 and 65,536 (benchmarks/NOTES.md, session 12); at 65,536 the clusters that fit at once can
// leave SMs idle (32 clusters of 3 on an H200: 96 of 132 SMs).
template <typename T>
constexpr int kBlockPivotThreads = sizeof(T) == 4 ? 512 : 256;
constexpr int64_t kBlockMinTiles = 2;  // tiles of a CTA's threads below which a bin gets no more CTAs
constexpr int kWeightsThreads = 256;
constexpr int kFinalizeThreads = 256;
constexpr int64_t kWeightsChunk = 1024;  // points per CTA of the weighted sums
constexpr int64_t kStatsChunk = 2048;    // points per CTA of the group statistics
// Points per CTA of the vector statistics kernel: as many splits per group as keep the call within
// kStatsCtasPerSm CTAs per SM, within [512, 4096] points. Longer chunks amortise each CTA's closing
// combine and give the finalize fewer partials to add (N = 65,536, 32 groups: 512 -> 4,096 points
// took the statistics 140 -> 115 us, benchmarks/NOTES.md); below about 4 CTAs per SM the reads no
// longer fill the GPU, and one CTA past a multiple of the SMs costs a fifth more (17 splits: 143 us).
// The key sums therefore split by the group count and the device too: exact in double for 16-bit
// keys of ordinary range, equal to rounding otherwise, so a group's mean can differ in its last bit
// between batch sizes (the same inputs on the same device stay deterministic).
constexpr int64_t kStatsVectorChunkMin = 512, kStatsVectorChunkMax = 4096, kStatsCtasPerSm = 4;
constexpr int kStatsThreads = 256;

// Workspace of the pivot kernels for G groups of C bins (layout in compress.cuh), as arrays in the
// call's Scratch. The resident path keeps residuals and kernel rows on chip: `per_point` false
// leaves them out.
template <typename T>
struct PivotWorkspace {
  int64_t rows_count, slots_max, length_max;
  bool per_point;
  T* residual = nullptr;
  T* rows = nullptr;
  double* sq_norm = nullptr;
  double* kinv = nullptr;
  double* max_sq_norm = nullptr;
  int64_t* pivots = nullptr;
  int32_t* counts = nullptr;

  PivotWorkspace(int64_t rows_count, int64_t slots_max, int64_t length_max, bool per_point = true)
      : rows_count(rows_count), slots_max(slots_max), length_max(length_max), per_point(per_point) {}

  // Declares in `scratch` every array not already pointed elsewhere (rp_nystrom's outputs).
  void reserve(Scratch& scratch) {
    const auto add = [&](auto*& pointer, int64_t count) {
      if (pointer == nullptr) scratch.add(pointer, count);
    };
    add(sq_norm, rows_count * length_max);
    if (per_point) {
      add(residual, rows_count * length_max);
      add(rows, rows_count * slots_max * length_max);
    }
    add(kinv, rows_count * slots_max * slots_max);
    add(pivots, rows_count * slots_max);
    add(counts, rows_count);
    add(max_sq_norm, rows_count);
  }

  // Once allocated: the general pivot kernel adds into kinv (the resident one writes every entry of a
  // sampled bin), and rp_nystrom returns whole kernel rows, zero past early stops.
  void clear(cudaStream_t stream, bool zero_rows) const {
    if (per_point) {
      C10_CUDA_CHECK(cudaMemsetAsync(kinv, 0, sizeof(double) * rows_count * slots_max * slots_max, stream));
    }
    if (zero_rows) C10_CUDA_CHECK(cudaMemsetAsync(rows, 0, sizeof(T) * rows_count * slots_max * length_max, stream));
  }
};

template <typename scalar_t, typename T>
void launch_pivots(const at::Tensor& points, const float* key_mean, const T* query_norm, const int64_t* lengths,
                   int64_t groups,
                   int64_t n, int64_t e, int64_t num_bins, int64_t rank, double beta, kernels::TauMode tau,
                   double tol, kernels::SeedRef seed, bool sample_all, PivotWorkspace<T>& ws,
                   cudaStream_t stream) {
  using cuda_t = typename CudaType<scalar_t>::type;
  const size_t resident = kernels::pivot_smem_bytes<cuda_t, T>(e, ws.slots_max, ws.length_max, true);
  const bool keys_in_smem = resident <= max_shared_memory();
  const size_t smem = keys_in_smem ? resident : kernels::pivot_smem_bytes<cuda_t, T>(e, ws.slots_max, ws.length_max, false);
  kernels::PivotParams<cuda_t, T> p{};
  p.points = device_ptr<scalar_t>(points);
  p.key_mean = key_mean;
  p.query_norm = query_norm;
  p.lengths = lengths;
  p.n = n;
  p.e = e;
  p.num_bins = num_bins;
  p.rank = rank;
  p.slots_max = ws.slots_max;
  p.length_max = ws.length_max;
  p.beta = beta;
  p.tau = tau;
  p.tol = static_cast<T>(tol);
  p.seed = seed;
  p.keys_in_smem = keys_in_smem;
  at::Tensor keys_t;  // transposed keys per bin, when they do not fit shared memory
  if (!keys_in_smem) {
    keys_t = at::empty({groups * num_bins, e, ws.length_max}, points.options());
    p.keys_t = reinterpret_cast<cuda_t*>(keys_t.mutable_data_ptr<scalar_t>());
  }
  p.sample_all = sample_all;
  p.residual = ws.residual;
  p.sq_norm = ws.sq_norm;
  p.rows = ws.rows;
  p.kinv = ws.kinv;
  p.pivots = ws.pivots;
  p.counts = ws.counts;
  p.max_sq_norm = ws.max_sq_norm;
  auto kernel = kernels::pivot_kernel<cuda_t, T, kPivotThreads>;
  allow_shared_memory(kernel, smem);
  kernel<<<groups * num_bins, kPivotThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block pivoting (compress_block.cuh) for the bins of more than 16 slots: a cluster of CTAs per
// bin where the bins alone leave SMs idle (at most the portable 8, at least kBlockMinTiles tiles
// per CTA), one CTA per bin otherwise or before sm_90.
template <typename scalar_t, typename T>
void launch_block_pivots(const at::Tensor& points, const float* key_mean, const T* query_norm,
                         const int64_t* lengths, int64_t groups, int64_t n, int64_t e, int64_t num_bins, int64_t rank,
                         double beta, kernels::TauMode tau, double tol, kernels::SeedRef seed, bool sample_all,
                         PivotWorkspace<T>& ws, cudaStream_t stream) {
  using cuda_t = typename CudaType<scalar_t>::type;
  const int64_t bins_total = groups * num_bins;
  const size_t fixed = kernels::block_layout<T>(e, ws.slots_max, false, 0, kBlockPivotThreads<T>).bytes;
  TORCH_CHECK(fixed <= max_shared_memory(), "wildcat: block pivoting needs ", fixed,
              " bytes of shared memory for E = ", e, " and ", ws.slots_max, " slots per bin; the device has ",
              max_shared_memory());
  // The leader's round matrices, then as many older kernel rows at the round's draws as fit, go
  // to shared memory (the rest stays in global memory).
  const size_t budget = max_shared_memory();
  const bool round_in_smem = kernels::block_layout<T>(e, ws.slots_max, true, 0, kBlockPivotThreads<T>).bytes <= budget;
  const size_t base = kernels::block_layout<T>(e, ws.slots_max, round_in_smem, 0, kBlockPivotThreads<T>).bytes;
  const size_t per_row = sizeof(T) * kernels::kBlockDraws;
  const int cached_rows = static_cast<int>(std::min<int64_t>(ws.slots_max, (budget - base) / per_row));
  const size_t smem = kernels::block_layout<T>(e, ws.slots_max, round_in_smem, cached_rows, kBlockPivotThreads<T>).bytes;
  auto kernel = kernels::block_pivot_kernel<cuda_t, T, kBlockPivotThreads<T>>;
  allow_shared_memory(kernel, smem);
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kBlockPivotThreads<T>);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  // The largest cluster (at most the portable 8, at least kBlockMinTiles tiles per CTA) whose
  // clusters for all bins are resident at once: a bin left for a second wave doubles the time.
  int64_t cluster = 1;
  if (has_cluster_code(kernel)) {
    const int64_t widest = std::clamp<int64_t>(ws.length_max / (kBlockMinTiles * kBlockPivotThreads<T>), 1, 8);
    for (int64_t c = widest; c > 1; --c) {
      attribute.val.clusterDim.x = static_cast<unsigned>(c);
      config.gridDim = dim3(static_cast<unsigned>(c));
      config.attrs = &attribute;
      config.numAttrs = 1;
      int active = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&active, kernel, &config));
      if (active >= bins_total) {
        cluster = c;
        break;
      }
    }
  }
  at::Tensor g_table = at::empty({bins_total, ws.slots_max, ws.slots_max}, points.options().dtype(at::kDouble));
  at::Tensor score_base = at::empty({bins_total, ws.length_max}, points.options().dtype(c10::CppTypeToScalarType<T>::value));
  at::Tensor round_ws;
  if (!round_in_smem) {
    round_ws = at::empty({bins_total, 2, kernels::kBlockDraws, ws.slots_max}, points.options().dtype(at::kDouble));
  }
  kernels::BlockPivotParams<cuda_t, T> p{};
  p.points = device_ptr<scalar_t>(points);
  p.key_mean = key_mean;
  p.query_norm = query_norm;
  p.lengths = lengths;
  p.n = n;
  p.e = e;
  p.num_bins = num_bins;
  p.rank = rank;
  p.slots_max = ws.slots_max;
  p.length_max = ws.length_max;
  p.cluster = static_cast<int>(cluster);
  p.cached_rows = cached_rows;
  p.round_in_smem = round_in_smem;
  p.round_ws = round_in_smem ? nullptr : round_ws.mutable_data_ptr<double>();
  p.beta = beta;
  p.tau = tau;
  p.tol = static_cast<T>(tol);
  p.seed = seed;
  p.sample_all = sample_all;
  p.vector_points = (e * points.element_size()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(points.const_data_ptr()) % 16 == 0;
  p.residual = ws.residual;
  p.score_base = score_base.mutable_data_ptr<T>();
  p.sq_norm = ws.sq_norm;
  p.rows = ws.rows;
  p.kinv = ws.kinv;
  p.g_table = g_table.mutable_data_ptr<double>();
  p.pivots = ws.pivots;
  p.counts = ws.counts;
  p.max_sq_norm = ws.max_sq_norm;
  config.gridDim = dim3(static_cast<unsigned>(bins_total * cluster));
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  config.attrs = cluster > 1 ? &attribute : nullptr;
  config.numAttrs = cluster > 1 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

// The pivots of every sampled bin: the one-step kernel for bins of at most 16 slots, block
// pivoting for the others (each kernel skips the other's bins; balanced slot counts differ by one,
// so a call can have both).
template <typename scalar_t, typename T>
void launch_pivot_forms(const at::Tensor& points, const float* key_mean, const T* query_norm, const int64_t* lengths,
                        int64_t groups, int64_t n, int64_t e, int64_t num_bins, int64_t rank, double beta,
                        kernels::TauMode tau, double tol, kernels::SeedRef seed, bool sample_all, PivotWorkspace<T>& ws,
                        cudaStream_t stream) {
  if (!kernels::uses_block_pivoting(rank / num_bins)) {
    launch_pivots<scalar_t, T>(points, key_mean, query_norm, lengths, groups, n, e, num_bins, rank, beta, tau, tol, seed,
                               sample_all, ws, stream);
  }
  if (kernels::uses_block_pivoting(ws.slots_max)) {
    launch_block_pivots<scalar_t, T>(points, key_mean, query_norm, lengths, groups, n, e, num_bins, rank, beta, tau, tol,
                                     seed, sample_all, ws, stream);
  }
}

// The resident path (compress_resident.cuh): its CTAs per bin and points per CTA, or cluster = 0
// where it does not apply (then the general pivot and weighted-sum kernels run).
struct ResidentPlan {
  int cluster = 0, slice = 0, threads = 0, points = 0;  // points per thread
  size_t smem = 0;
};

// The resident kernel's launch configuration for `plan`, with `attribute` as its cluster shape.
template <typename cuda_t, int kE, int kPts>
cudaLaunchConfig_t resident_config(const ResidentPlan& plan, int64_t bins_total, cudaStream_t stream,
                                   cudaLaunchAttribute& attribute) {
  auto kernel = kernels::resident_bin_kernel<cuda_t, kE, kPts>;
  allow_shared_memory(kernel, plan.smem);
  if (plan.cluster > 8) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(bins_total * plan.cluster));
  config.blockDim = dim3(static_cast<unsigned>(plan.threads));
  config.dynamicSmemBytes = plan.smem;
  config.stream = stream;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

template <typename cuda_t, int kE, int kPts>
int resident_clusters_that_fit(const ResidentPlan& plan) {
  cudaLaunchAttribute attribute{};
  const cudaLaunchConfig_t config = resident_config<cuda_t, kE, kPts>(plan, 1, nullptr, attribute);
  int active = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&active, kernels::resident_bin_kernel<cuda_t, kE, kPts>, &config));
  return active;
}

template <typename cuda_t, int kE, int kPts>
void launch_resident(const ResidentPlan& plan, kernels::ResidentParams<cuda_t>& p, int64_t bins_total,
                     cudaStream_t stream) {
  cudaLaunchAttribute attribute{};
  const cudaLaunchConfig_t config = resident_config<cuda_t, kE, kPts>(plan, bins_total, stream, attribute);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernels::resident_bin_kernel<cuda_t, kE, kPts>, p));
}

// f(E, points per thread) as compile-time constants for `plan` (E = 64 or 128).
template <typename F>
auto with_resident_shape(const ResidentPlan& plan, int64_t e, F&& f) {
  if (e == 128) return f(std::integral_constant<int, 128>{}, std::integral_constant<int, 2>{});
  if (plan.points == 2) return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 4>{});
}

template <typename cuda_t>
ResidentPlan plan_resident(const at::Tensor& keys, const at::Tensor& values, int64_t e, int64_t dv,
                           int64_t slots_max, int64_t length_max) {
  ResidentPlan plan;
  if constexpr (!std::is_same_v<cuda_t, __half> && !std::is_same_v<cuda_t, __nv_bfloat16>) {
    return plan;  // 16-bit keys and values only
  } else {
    if (e != dv || (e != 64 && e != 128) || slots_max > kernels::kResidentMaxSlots) return plan;
    const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
    if (!aligned(keys) || !aligned(values)) return plan;
    // Two points per thread where the bin fits 8 portable CTAs of 512 points: twice the warps of
    // four points per thread, which hide more of each step's latency (NOTES.md, session 5);
    // longer bins at E = 64 take four (up to 16 CTAs of 1,024 points).
    const int64_t points = e == 64 && length_max > 8 * kernels::kResidentMaxThreads * 2 ? 4 : 2;
    const int64_t slice_max = kernels::kResidentMaxThreads * points;
    const int64_t cluster = (length_max + slice_max - 1) / slice_max;
    if (cluster > kernels::kResidentMaxCluster) return plan;
    const int64_t granule = 32 * points;  // whole warps of threads
    const int64_t slice = ((length_max + cluster - 1) / cluster + granule - 1) / granule * granule;
    const size_t smem =
        kernels::resident_layout(static_cast<int>(e), static_cast<int>(slice), slots_max, static_cast<int>(cluster)).bytes;
    if (smem > max_shared_memory()) return plan;
    plan.cluster = static_cast<int>(cluster);
    plan.slice = static_cast<int>(slice);
    plan.threads = static_cast<int>(slice / points);
    plan.points = static_cast<int>(points);
    plan.smem = smem;
    const bool clusters = with_resident_shape(plan, e, [&](auto dim, auto pts) {  // the kernel is sm_90 only
      return has_cluster_code(kernels::resident_bin_kernel<cuda_t, decltype(dim)::value, decltype(pts)::value>);
    });
    if (!clusters) return ResidentPlan{};
    // a cluster beyond the portable 8 CTAs is allowed only where the device can co-schedule it
    if (cluster > 8) {
      const int active = with_resident_shape(plan, e, [&](auto dim, auto pts) {
        return resident_clusters_that_fit<cuda_t, decltype(dim)::value, decltype(pts)::value>(plan);
      });
      if (active < 1) plan.cluster = 0;
    }
    return plan;
  }
}

template <typename scalar_t>
void compress_typed(const at::Tensor& keys, const at::Tensor& values, int64_t rank, int64_t num_bins,
                    double beta, const std::optional<at::Tensor>& query_norm, const int64_t* lengths,
                    kernels::SeedRef seed, kernels::TauMode tau, bool center_values, double tol,
                    detail::CompressOutputs& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  using T = typename CudaType<scalar_t>::acc;
  const int64_t groups = keys.size(0), n = keys.size(1), e = keys.size(2), dv = values.size(2);
  const int64_t kept = std::min(rank, n);
  const auto device = keys.options();
  // CUDA grid limits (offsets inside the kernels are 64-bit): a grid's x extent is below 2^31,
  // the chunks of the longest bin form the weighted sums' grid-y (at most 65,535)
  TORCH_CHECK_VALUE(groups * num_bins <= std::numeric_limits<int32_t>::max(),
                    "wildcat.compress_kv: CUDA launches at most 2^31 - 1 (group, bin) pairs, got ", groups,
                    " groups x ", num_bins, " bins");
  TORCH_CHECK_VALUE((n + num_bins - 1) / num_bins <= 65535 * kWeightsChunk,
                    "wildcat.compress_kv: a bin of at most ", 65535 * kWeightsChunk,
                    " keys on CUDA (N / num_bins), got N = ", n, " with num_bins = ", num_bins);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  T* value_min = out.value_min.mutable_data_ptr<T>();
  T* value_max = out.value_max.mutable_data_ptr<T>();

  // The plan of every stage, then one allocation for all their scratch arrays.
  // 1. statistics: rows of 16-byte pieces whose count per row divides the block take the vector
  // kernel, which reads chunks of vector_chunk rows; others the element-wise kernel over at
  // most 64 splits
  constexpr int64_t kVec = 16 / sizeof(cuda_t);
  const auto fits_block = [&](int64_t width) {
    const int64_t pieces = width / kVec;
    return width % kVec == 0 && pieces > 0 && kStatsThreads % pieces == 0;
  };
  const bool vector_stats = fits_block(e) && fits_block(dv) &&
                            reinterpret_cast<uintptr_t>(keys.const_data_ptr()) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(values.const_data_ptr()) % 16 == 0;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_splits = std::max<int64_t>(1, kStatsCtasPerSm * sms / groups);
  const int64_t vector_chunk =
      std::clamp<int64_t>((n + target_splits - 1) / target_splits, kStatsVectorChunkMin, kStatsVectorChunkMax);
  const int64_t splits =  // grid y: at most 65,535 (longer chunks beyond 268M keys per group)
      vector_stats ? std::clamp<int64_t>((n + vector_chunk - 1) / vector_chunk, 1, 65535)
                   : std::max<int64_t>(1, std::min<int64_t>(64, (n + kStatsChunk - 1) / kStatsChunk));
  const int64_t chunk = (n + splits - 1) / splits;
  // 2-3. pivots (bins kept exactly are skipped inside) and the weighted sums over chunks of points.
  // Only a sampled bin (fewer slots than points) uses the per-slot arrays, and where r >= N every bin
  // is kept exactly: then they get no slots, however large r (they would take r^2 doubles).
  const bool any_sampled = rank < n;
  const int64_t length_max = (n + num_bins - 1) / num_bins;
  const int64_t slots_max = any_sampled ? (rank + num_bins - 1) / num_bins : 0;
  const ResidentPlan plan = any_sampled ? plan_resident<cuda_t>(keys, values, e, dv, slots_max, length_max)
                                        : ResidentPlan{};
  const int64_t sums_chunk = plan.cluster > 0 ? plan.slice : kWeightsChunk;  // points per partial sum
  const int64_t chunks_max = plan.cluster > 0 ? plan.cluster : (length_max + kWeightsChunk - 1) / kWeightsChunk;
  // 4. the coreset, in column tiles
  const int64_t tile_cols = kernels::finalize_tile_cols(groups * num_bins, dv + 1, sms);
  const int64_t finalize_tiles = (dv + 1 + tile_cols - 1) / tile_cols;

  Scratch scratch;
  double *key_sum, *part_min, *part_max, *partial, *rhs, *scaled, *log_scale;
  float* key_mean;
  unsigned long long* group_top;
  // The value bounds' partials: per split of the statistics kernel, or per CTA of the resident
  // kernel, which stages the values anyway and so saves the statistics a read of V.
  const bool resident_bounds = plan.cluster > 0;
  const int64_t bound_parts = resident_bounds ? num_bins * plan.cluster : splits;
  scratch.add(key_sum, groups * splits * e);
  scratch.add(part_min, groups * bound_parts * dv);
  scratch.add(part_max, groups * bound_parts * dv);
  scratch.add(key_mean, groups * e);
  PivotWorkspace<T> ws(groups * num_bins, slots_max, length_max, /*per_point=*/plan.cluster == 0);
  ws.reserve(scratch);
  scratch.add(partial, groups * num_bins * chunks_max * slots_max * (dv + 1));
  scratch.add(rhs, groups * num_bins * finalize_tiles * slots_max * (tile_cols + 1));
  scratch.add(scaled, groups * kept * (dv + 1));  // every entry: finalize
  scratch.add(log_scale, groups * kept);
  scratch.add(group_top, groups);
  const at::Tensor scratch_buffer = scratch.allocate(device);
  ws.clear(stream, /*zero_rows=*/false);

  const kernels::StatsParams<cuda_t> sp{device_ptr<scalar_t>(keys), device_ptr<scalar_t>(values), lengths, n, e, dv, splits,
                                        chunk, !resident_bounds, key_sum, part_min, part_max};
  if (vector_stats) {
    kernels::group_stats_vector_kernel<cuda_t, kStatsThreads><<<dim3(groups, splits), kStatsThreads, 0, stream>>>(sp);
  } else {
    kernels::group_stats_partial_kernel<cuda_t><<<dim3(groups, splits), dim3(32, 8), 0, stream>>>(sp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto finalize_stats = [&](const double* sums, const double* lo, const double* hi, int64_t parts) {
    kernels::group_stats_finalize_kernel<T><<<groups, 256, 0, stream>>>(kernels::StatsFinalizeParams<T>{
        sums, lo, hi, lengths, n, e, dv, parts, key_mean, value_min, value_max, group_top});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (resident_bounds) {
    finalize_stats(key_sum, nullptr, nullptr, splits);  // the mean now, the bounds after the pivots
  } else {
    finalize_stats(key_sum, part_min, part_max, splits);
  }

  std::optional<at::Tensor> qn;
  if (query_norm) qn = query_norm->reshape({groups}).to(c10::CppTypeToScalarType<T>::value).contiguous();
  if (plan.cluster > 0) {
    if constexpr (std::is_same_v<cuda_t, __half> || std::is_same_v<cuda_t, __nv_bfloat16>) {
      kernels::ResidentParams<cuda_t> rp{};
      rp.keys = device_ptr<scalar_t>(keys);
      rp.values = device_ptr<scalar_t>(values);
      rp.key_mean = key_mean;
      rp.query_norm = qn ? qn->const_data_ptr<float>() : nullptr;
      rp.lengths = lengths;
      rp.n = n;
      rp.num_bins = num_bins;
      rp.rank = rank;
      rp.slots_max = ws.slots_max;
      rp.length_max = ws.length_max;
      rp.slice = plan.slice;
      rp.cluster = plan.cluster;
      rp.beta = beta;
      rp.tau = tau;
      rp.tol = static_cast<float>(tol);
      rp.seed = seed;
      rp.sq_norm = ws.sq_norm;
      rp.kinv = ws.kinv;
      rp.pivots = ws.pivots;
      rp.counts = ws.counts;
      rp.max_sq_norm = ws.max_sq_norm;
      rp.partial = partial;
      rp.value_min = part_min;
      rp.value_max = part_max;
      with_resident_shape(plan, e, [&](auto dim, auto pts) {
        launch_resident<cuda_t, decltype(dim)::value, decltype(pts)::value>(plan, rp, groups * num_bins, stream);
      });
      finalize_stats(nullptr, part_min, part_max, bound_parts);
    }
  } else if (any_sampled) {
    launch_pivot_forms<scalar_t, T>(keys, key_mean, qn ? qn->const_data_ptr<T>() : nullptr,
                                    lengths, groups, n, e, num_bins, rank, beta, tau, tol, seed, false, ws, stream);
    kernels::WeightsParams<cuda_t, T> wp{device_ptr<scalar_t>(values), ws.rows, ws.sq_norm, ws.max_sq_norm, ws.counts,
                                         lengths, n, dv, num_bins, ws.slots_max, ws.length_max, kWeightsChunk,
                                         chunks_max, partial};
    const bool vector_values = dv % kVec == 0 && reinterpret_cast<uintptr_t>(values.const_data_ptr()) % 16 == 0;
    const auto weights_kernel = vector_values ? kernels::weights_partial_kernel<cuda_t, T, kWeightsThreads, true>
                                              : kernels::weights_partial_kernel<cuda_t, T, kWeightsThreads, false>;
    const size_t weights_smem = kernels::weights_smem_bytes(kWeightsChunk);
    allow_shared_memory(weights_kernel, weights_smem);
    weights_kernel<<<dim3(groups * num_bins, chunks_max), kWeightsThreads, weights_smem, stream>>>(wp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    C10_CUDA_CHECK(cudaMemsetAsync(ws.counts, 0xFF, sizeof(int32_t) * groups * num_bins, stream));  // -1: exact
  }

  // 4. the coreset
  kernels::FinalizeParams<cuda_t, T> fp{device_ptr<scalar_t>(values), partial, ws.kinv, ws.sq_norm, ws.max_sq_norm,
                                        ws.pivots, ws.counts, value_min, value_max, lengths, center_values, n, dv,
                                        rank, num_bins, kept, ws.slots_max, ws.length_max, sums_chunk, chunks_max,
                                        tile_cols, rhs, scaled, log_scale, group_top,
                                        out.core_indices.mutable_data_ptr<int64_t>()};
  kernels::finalize_kernel<cuda_t, T, kFinalizeThreads>
      <<<dim3(groups * num_bins, finalize_tiles), kFinalizeThreads, 0, stream>>>(fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 5. the outputs, shifted per group where they would overflow, and the core keys
  const int64_t write_chunks = std::min<int64_t>((kept + kernels::kWriteSlots - 1) / kernels::kWriteSlots, 65535);
  kernels::write_group_kernel<cuda_t, T, kFinalizeThreads><<<dim3(groups, write_chunks), kFinalizeThreads, 0, stream>>>(
      kernels::WriteGroupParams<cuda_t, T>{scaled, log_scale, group_top, device_ptr<scalar_t>(keys),
                                           out.core_indices.const_data_ptr<int64_t>(), n, e, kept, dv,
                                           out.core_values.mutable_data_ptr<T>(),
                                           out.core_weights.mutable_data_ptr<T>(),
                                           reinterpret_cast<cuda_t*>(out.core_keys.mutable_data_ptr<scalar_t>())});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_kv_cuda(
    const at::Tensor& keys, const at::Tensor& values, int64_t rank, int64_t num_bins,
    std::optional<double> scale, const std::optional<at::Tensor>& query_norm,
    const std::optional<at::Tensor>& seed, std::string_view tau, bool center_values, double tol,
    const std::optional<at::Tensor>& lengths) {
  detail::check_compress_kv_args(keys, values, rank, num_bins, scale, query_norm, seed, tau, tol, lengths);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(keys.device());
  // the kernels write every entry, the core keys included
  detail::CompressOutputs out(keys, values, rank, /*zero_fill=*/false, /*keys_from_kernel=*/true);
  if (out.n > 0 && out.groups > 0) {
    const at::Tensor k = out.keys3.contiguous();
    const at::Tensor v = values.reshape({out.groups, out.n, out.dv}).contiguous();
    std::optional<at::Tensor> valid;
    if (lengths) valid = lengths->reshape({out.groups}).contiguous();
    const int64_t* valid_ptr = valid ? valid->const_data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "wildcat_compress_kv_cuda", [&] {
      compress_typed<scalar_t>(k, v, rank, num_bins, detail::resolve_scale(scale, out.e), query_norm, valid_ptr,
                               seed_ref(seed), detail::parse_tau(tau), center_values, tol, out);
    });
  }
  return out.finish();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rp_nystrom_cuda(const at::Tensor& points, int64_t rank,
                                                               const std::optional<at::Tensor>& seed, double tol) {
  detail::check_rp_nystrom_args(points, rank, seed, tol);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(points.device());
  const int64_t d = points.dim();
  const auto lead = points.sizes().slice(0, d - 2);
  const int64_t n = points.size(-2), e = points.size(-1);
  const int64_t groups = c10::multiply_integers(lead);
  const int64_t kept = std::min(rank, n);
  const auto acc = detail::accumulate_type(points.scalar_type());
  if (n == 0 || groups == 0) {
    return {at::zeros(detail::with_tail(lead, {kept}), points.options().dtype(at::kLong)),
            at::zeros(detail::with_tail(lead, {kept, kept}), points.options().dtype(acc)),
            at::zeros(detail::with_tail(lead, {kept, n}), points.options().dtype(acc))};
  }
  const at::Tensor x = points.reshape({groups, n, e}).contiguous();
  at::Tensor pivots, kinv, rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "wildcat_rp_nystrom_cuda", [&] {
    using T = typename CudaType<scalar_t>::acc;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    PivotWorkspace<T> ws(groups, kept, n);
    pivots = at::empty({groups, kept}, points.options().dtype(at::kLong));  // the outputs are kernel arrays
    at::Tensor kinv_double = at::empty({groups, kept, kept}, points.options().dtype(at::kDouble));
    rows = at::empty({groups, kept, n}, points.options().dtype(acc));
    ws.pivots = pivots.mutable_data_ptr<int64_t>();
    ws.kinv = kinv_double.mutable_data_ptr<double>();
    ws.rows = rows.mutable_data_ptr<T>();
    Scratch scratch;
    ws.reserve(scratch);
    const at::Tensor scratch_buffer = scratch.allocate(points.options());
    ws.clear(stream, /*zero_rows=*/true);
    launch_pivot_forms<scalar_t, T>(x, nullptr, nullptr, nullptr, groups, n, e, 1, kept, 1.0, kernels::TauMode::kLambert,
                                    tol, seed_ref(seed), /*sample_all=*/true, ws, stream);
    kinv = kinv_double.to(acc);
  });
  return {pivots.reshape(detail::with_tail(lead, {kept})), kinv.reshape(detail::with_tail(lead, {kept, kept})),
          rows.reshape(detail::with_tail(lead, {kept, n}))};
}

}  // namespace
}  // namespace cuda
}  // namespace wildcat

TORCH_LIBRARY_IMPL(wildcat, CUDA, m) {
  m.impl("rp_nystrom", TORCH_FN(wildcat::cuda::rp_nystrom_cuda));
  m.impl("compress_kv", TORCH_FN(wildcat::cuda::compress_kv_cuda));
}

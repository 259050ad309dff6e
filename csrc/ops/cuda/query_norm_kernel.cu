// wildcat::query_norm on CUDA. The ATen form (a float norm per row, then two max reductions)
// spends 0.5 ms on the 268 MB of queries at N = 65,536, H = 32, E = 64 in bf16 (benchmarks/NOTES.md):
// its reduction over 64 contiguous elements does not read at bandwidth. Here each row is read
// once in 16-byte pieces, its sum of squares formed in float (pieces in column order, then a
// fixed butterfly over the row's threads), and the group's largest sum kept by an integer atomic
// max on the float's bits (non-negative floats order as their bits; max is order-free, so the
// result is deterministic). Each thread takes the square root of its largest sum before the atomic:
// the correctly rounded root is monotonic, so the group's largest root is the root of its largest
// sum, and no separate square-root operation (a dispatch and a launch of host time) follows.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <limits>

#include "../query_norm.h"
#include "../../kernels/device_helpers.cuh"
#include "cuda_utils.h"

namespace wildcat {
namespace cuda {
namespace {

constexpr int kNormThreads = 256;
constexpr int kNormRowsPerThread = 8;  // rows each thread walks: CTAs of 256 / pieces × 8 rows

// Σ x² over the eight 16-bit values of a 16-byte piece, in memory order.
template <typename scalar_t>
__device__ __forceinline__ float square_sum8(uint4 raw, scalar_t tag) {
  float x[8];
  kernels::unpack8(raw, x, tag);
  float sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum = fmaf(x[i], x[i], sum);
  return sum;
}

// grid (query heads of all batches, row chunks); `pieces` = E / 8 threads per row, a power of two
// up to 32. out (batch · kv_heads) holds the largest row norm as float bits, zeroed first.
template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads) query_norm_kernel(const scalar_t* query, int64_t m, int pieces,
                                                                  int64_t heads_per_group, int* out) {
  const int64_t head = blockIdx.x;
  const int rows_per_pass = kNormThreads / pieces;
  const int piece = threadIdx.x % pieces;
  const uint4* rows = reinterpret_cast<const uint4*>(query + head * m * pieces * 8);
  float largest = 0;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_pass * kNormRowsPerThread;
  float sums[kNormRowsPerThread];
#pragma unroll
  for (int k = 0; k < kNormRowsPerThread; ++k) {  // every load in flight before the sums
    const int64_t row = first + k * rows_per_pass + threadIdx.x / pieces;
    sums[k] = row < m ? square_sum8(rows[row * pieces + piece], scalar_t{}) : 0.0f;
  }
#pragma unroll
  for (int k = 0; k < kNormRowsPerThread; ++k) {
    float sum = sums[k];
    for (int offset = 1; offset < pieces; offset <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    largest = sum > largest ? sum : largest;
  }
  largest = __fsqrt_rn(largest);  // round-to-nearest whatever the build's math flags
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, largest, offset);
    largest = other > largest ? other : largest;
  }
  if (threadIdx.x % 32 == 0) atomicMax(out + head / heads_per_group, __float_as_int(largest));
}

at::Tensor query_norm_cuda(const at::Tensor& query, int64_t kv_heads) {
  detail::check_query_norm_args(query, kv_heads);
  const int64_t e = query.size(-1), m = query.size(-2);
  const bool half_width = query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf;
  const int64_t pieces = e / 8;
  const bool fast = half_width && query.dim() >= 3 && e % 8 == 0 && pieces <= 32 && (pieces & (pieces - 1)) == 0 &&
                    m > 0 && query.numel() > 0;
  if (!fast) return detail::query_norm_aten(query, kv_heads);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous();
  if (reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16 != 0) return detail::query_norm_aten(query, kv_heads);
  const int64_t heads = q.numel() / (m * e);  // batch · Hq
  const int64_t heads_per_group = query.size(-3) / kv_heads;
  // zeroed by a memset on the stream, not at::zeros (a fill kernel and its dispatch: host time that
  // bounds short calls, benchmarks/NOTES.md)
  at::Tensor bits = at::empty({heads / heads_per_group}, q.options().dtype(at::kInt));
  const int64_t rows_per_cta = kNormThreads / pieces * kNormRowsPerThread;
  const int64_t chunks = (m + rows_per_cta - 1) / rows_per_cta;
  TORCH_CHECK_VALUE(heads <= std::numeric_limits<int32_t>::max() && chunks <= 65535,
                    "wildcat.query_norm: CUDA takes at most 2^31 - 1 heads and ", 65535 * rows_per_cta,
                    " queries per head, got ", heads, " and ", m);
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(chunks));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(bits.mutable_data_ptr<int>(), 0, bits.numel() * sizeof(int), stream));
  if (q.scalar_type() == at::kBFloat16) {
    query_norm_kernel<__nv_bfloat16><<<grid, kNormThreads, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(q.const_data_ptr<at::BFloat16>()), m, static_cast<int>(pieces),
        heads_per_group, bits.mutable_data_ptr<int>());
  } else {
    query_norm_kernel<__half><<<grid, kNormThreads, 0, stream>>>(
        reinterpret_cast<const __half*>(q.const_data_ptr<at::Half>()), m, static_cast<int>(pieces), heads_per_group,
        bits.mutable_data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits.view(at::kFloat).view(detail::query_norm_shape(query, kv_heads));
}

}  // namespace
}  // namespace cuda
}  // namespace wildcat

TORCH_LIBRARY_IMPL(wildcat, CUDA, m) {
  m.impl("query_norm", TORCH_FN(wildcat::cuda::query_norm_cuda));
}

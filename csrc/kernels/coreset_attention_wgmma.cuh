// The sm_90 tensor-core kernel of coreset_attention: warpgroup MMA (wgmma), the same arithmetic
// as coreset_attention_mma (coreset_attention.cuh) with fewer instructions per query row.
//
// wgmma reads its B operand (and here Q Kᵀ's A operand too) straight from shared memory, so the
// shared-memory loads of fragments and three quarters of the mma issue slots of the warp-level
// kernel go away, and the products run asynchronously: P V̂ of one chunk overlaps Q Kᵀ of the next.
// It is an sm_90a instruction: the body exists only in code built for sm_90a (setup.py builds
// compute capability 9.0 as sm_90a and defines WILDCAT_SM90A; the glue launches this kernel only
// then and only on a 9.0 device).
//
// Layout: every operand in shared memory is in the canonical no-swizzle "core matrix" layout of
// the PTX ISA: 8 rows × 16 bytes stored as 128 contiguous bytes; the core matrices of one group of
// 8 rows follow each other along K (leading byte offset 128), and groups of 8 rows are
// `stride` bytes apart. A wgmma reads whole core matrices, so the layout has no bank conflicts,
// and each 16-byte piece of a row is one cp.async.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "coreset_attention.cuh"

namespace wildcat {
namespace kernels {

constexpr int kWgmmaGroups = 2;    // warpgroups per CTA, 64 query rows each: one tile is kMmaTileRows rows
constexpr int kWgmmaChunk = 128;   // keys per online-softmax step: r <= 128 takes one
constexpr int kWgmmaStages = 3;    // query blocks per warpgroup in shared memory: two in flight while one computes
static_assert(kWgmmaGroups * 64 == kMmaTileRows, "the glue tiles queries as for the warp-level kernel");

__host__ __device__ inline int64_t wgmma_padded_rank(int64_t r) {
  return (r + kWgmmaChunk - 1) / kWgmmaChunk * kWgmmaChunk;
}

// Keys (rp × kDim), V̂ᵀ with the weights' column and 7 zero columns ((kDim + 8) × rp, float16), two
// query blocks (64 × kDim) per warpgroup, the columns' scales and inverse scales, then the
// epilogue's table of each output column.
template <int kDim>
__host__ __device__ inline size_t wgmma_smem_bytes(int64_t r) {
  const int64_t rp = wgmma_padded_rank(r);
  return rp * kDim * 2 + (kDim + 8) * rp * 2 + static_cast<size_t>(kWgmmaGroups) * kWgmmaStages * 64 * kDim * 2 +
         2 * (kDim + 8) * 4 + kDim * 16;
}

// Shared-memory matrix descriptor (PTX ISA, "matrix descriptor"): start address, leading and stride
// byte offsets, each in 16-byte units; base offset 0 and no swizzle.
__device__ __forceinline__ uint64_t wgmma_descriptor(unsigned address, unsigned leading_bytes, unsigned stride_bytes) {
  return static_cast<uint64_t>((address & 0x3FFFFu) >> 4) | static_cast<uint64_t>(leading_bytes >> 4) << 16 |
         static_cast<uint64_t>(stride_bytes >> 4) << 32;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Ties accumulators to this point of the program: the compiler may not move their reads above a
// wgmma wait that precedes it (the asm statements keep their order; plain reads would not).
template <int N>
__device__ __forceinline__ void wgmma_fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ float reciprocal_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Generic-proxy writes to shared memory (cp.async, stores) made visible to wgmma's reads.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Barriers 1 and 2 (0 is __syncthreads'), as immediates: a register id reserves all 16.
__device__ __forceinline__ void warpgroup_barrier(int group) {
  static_assert(kWgmmaGroups == 2, "one barrier per warpgroup");
  if (group == 0) {
    asm volatile("bar.sync 1, 128;\n" ::: "memory");
  } else {
    asm volatile("bar.sync 2, 128;\n" ::: "memory");
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// D (+)= A B for one warpgroup: A 64 × 16 (shared memory, or registers in the m16n8k16 A-fragment
// layout of each warp's 16 rows), B 16 × N (shared memory, K-major), D in the m16n8 accumulator
// layout of each warp's 16 rows, 8-column tile after tile. `accumulate` 0 overwrites D.
__device__ __forceinline__ void wgmma_64x64x16_bf16(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_64x128x16_bf16(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_64x72x16_f16(float (&d)[36], const uint32_t (&a)[4], uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %41, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n72k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35}, {%36, %37, %38, %39}, %40, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_64x136x16_f16(float (&d)[68], const uint32_t (&a)[4], uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %73, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n136k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67}, {%68, %69, %70, %71}, %72, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

template <int kCols>
__device__ __forceinline__ void wgmma_value_product(float (&d)[kCols / 2], const uint32_t (&a)[4], uint64_t b,
                                                    int accumulate) {
  static_assert(kCols == 72 || kCols == 136, "D = 64 or 128, plus the weights' tile");
  if constexpr (kCols == 72) {
    wgmma_64x72x16_f16(d, a, b, accumulate);
  } else {
    wgmma_64x136x16_f16(d, a, b, accumulate);
  }
}
#endif

// grid (CTAs), block 256 (two warpgroups); the CTAs share the query tiles as in
// coreset_attention_mma. Each warpgroup takes 64
// rows of every 128-row query tile of the CTA; warp w of a warpgroup owns rows 16 w .. 16 w + 15
// of its block (the accumulator rows wgmma gives it), loads them and stores their outputs.
// Everything else (staging, online softmax, epilogue) is coreset_attention_mma's.
template <typename scalar_t, int kDim>
__global__ void __launch_bounds__(kWgmmaGroups * 128, kDim == 64 ? 2 : 1)
    coreset_attention_wgmma(AttentionParams<scalar_t, float> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(sizeof(scalar_t) == 2, "16-bit queries and keys");
  constexpr int kValueCols = kDim + 8;    // V̂, then the weights, then 7 zero columns
  constexpr int kSteps = kDim / 16;       // k-steps of Q Kᵀ
  constexpr int kTiles = kDim / 8;        // 8-column tiles of the output
  constexpr int kPieces = kDim / 8;       // 16-byte pieces (core-matrix rows) of a query or key row
  constexpr int kRowGroupBytes = kPieces * 128;  // 8 rows in the core-matrix layout
  constexpr int kThreads = kWgmmaGroups * 128;
  constexpr int kBatch = 8;               // staging loads in flight per thread
  constexpr int kLanePieces = 16 * kPieces / 32;  // pieces of its warp's 16 rows each lane copies
  constexpr unsigned kBlockBytes = 64 * kDim * 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rp = static_cast<int>(wgmma_padded_rank(p.r));
  const int r = static_cast<int>(p.r);
  unsigned char* keys_s = smem_raw;                                      // (key, column) core matrices
  unsigned char* values_s = keys_s + rp * kDim * 2;                       // (column, key) core matrices
  unsigned char* blocks_s = values_s + kValueCols * rp * 2;               // [group][stage] query blocks
  float* scale_s = reinterpret_cast<float*>(blocks_s + kWgmmaGroups * kWgmmaStages * kBlockBytes);  // 2^k of each column
  float* unscale_s = scale_s + kValueCols;                                                // 2^-k
  // per output column: 2^-k, the offset added (the bounds' midpoint with center_values, else 0), lower
  // and upper bound (-inf, inf when absent)
  float4* column_s = reinterpret_cast<float4*>(unscale_s + kValueCols);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group_id = warp / 4, warp_in_group = warp % 4;
  const int group = lane / 4, quad = lane % 4;
  const unsigned keys_address = static_cast<unsigned>(__cvta_generic_to_shared(keys_s));
  const unsigned values_address = static_cast<unsigned>(__cvta_generic_to_shared(values_s));
  const unsigned blocks_address =
      static_cast<unsigned>(__cvta_generic_to_shared(blocks_s)) + group_id * kWgmmaStages * kBlockBytes;
  unsigned char* warp_rows_s = blocks_s + group_id * kWgmmaStages * kBlockBytes + warp_in_group * 2 * kRowGroupBytes;

  // The CTA's share of the (head, query tile) items, heads major: contiguous, and balanced to
  // within one item, so that one wave of CTAs covers the launch whatever the head count. Each run
  // of one head's tiles (a segment) stages that head's coreset.
  const int64_t tiles = (p.m + kMmaTileRows - 1) / kMmaTileRows;
  const int64_t items = p.batch_heads * tiles;
  const int64_t item_last = (blockIdx.x + 1) * items / gridDim.x;
  for (int64_t item = blockIdx.x * items / gridDim.x; item < item_last;) {
    const int64_t bh = item / tiles;
    const int64_t tile_first = item % tiles;
    const int64_t tile_last = tile_first + (item_last - item) < tiles ? tile_first + (item_last - item) : tiles;
    item += tile_last - tile_first;
    __syncthreads();  // every warp is done with the previous segment's coreset
    const int64_t batch = bh / p.q_heads, head = bh % p.q_heads;
    const int64_t kvh = batch * p.kv_heads + head / (p.q_heads / p.kv_heads);
    // Piece i of a lane: number c = 32 i + lane of the warp's 16 rows, in layout order (8 rows of a
    // core matrix, then the row group's next piece, then the second row group), so its place in
    // shared memory is simply 16 c bytes, and a quarter warp copies 8 rows of one 16-byte column.
    auto piece_row = [&](int i) { return (32 * i + lane) / (8 * kPieces) * 8 + lane % 8; };
    auto piece_column = [&](int i) { return (32 * i + lane) / 8 % kPieces * 8; };
    auto block_row0 = [&](int64_t tile) { return tile * kMmaTileRows + group_id * 64 + warp_in_group * 16; };
    const scalar_t* head_query = p.query + bh * p.m * kDim;
    scalar_t* head_out = p.out + bh * p.m * kDim;
    auto load_block = [&](int64_t tile, int stage) {
      const int64_t row0 = block_row0(tile);
      const unsigned base = blocks_address + stage * kBlockBytes + warp_in_group * 2 * kRowGroupBytes;
#pragma unroll
      for (int i = 0; i < kLanePieces; ++i) {
        const int64_t row = row0 + piece_row(i);
        const bool valid = row < p.m;
        copy_async_16_or_zero(base + (32 * i + lane) * 16, valid ? head_query + row * kDim + piece_column(i) : p.query,
                              valid);
      }
      asm volatile("cp.async.commit_group;\n" ::);
    };
    load_block(tile_first, 0);  // in flight while the coreset is staged

    // Stage the coreset as coreset_attention_mma does (largest magnitude of each value column and of
    // the weights, their powers of two), in the layouts above.
    const float* values = p.values + kvh * p.r * kDim;
    const float* weights = p.weights + kvh * p.r;
    const scalar_t* keys = p.keys + kvh * p.r * kDim;
    unsigned* peak_s = reinterpret_cast<unsigned*>(unscale_s);
    for (int c = threadIdx.x; c < kValueCols; c += kThreads) peak_s[c] = 0u;
    __syncthreads();
    {
      constexpr int kRowsPerPass = kThreads / kDim;
      const int col = threadIdx.x % kDim;
      float peak = 0.0f;
      for (int s = threadIdx.x / kDim; s < r; s += kRowsPerPass * kBatch) {
        float x[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j) x[j] = s + j * kRowsPerPass < r ? values[(s + j * kRowsPerPass) * kDim + col] : 0.0f;
#pragma unroll
        for (int j = 0; j < kBatch; ++j) peak = max_keep_nan(peak, fabsf(x[j]));
      }
      atomicMax(&peak_s[col], __float_as_uint(peak));
      float weight_peak = 0.0f;
      for (int s = threadIdx.x; s < r; s += kThreads) weight_peak = max_keep_nan(weight_peak, fabsf(weights[s]));
      atomicMax(&peak_s[kDim], __float_as_uint(weight_peak));
    }
    __syncthreads();
    for (int c = threadIdx.x; c < kValueCols; c += kThreads) {
      const int k = half_scale_exponent(__uint_as_float(peak_s[c]));  // read before unscale_s[c] replaces it
      scale_s[c] = ldexpf(1.0f, k);
      unscale_s[c] = ldexpf(1.0f, -k);
    }
    __syncthreads();
    // V̂ᵀ: item (column c, keys 8 g .. 8 g + 7) is one core-matrix row of 16 bytes; threads take
    // consecutive columns, so the loads are coalesced and a quarter warp stores one core matrix
    for (int item = threadIdx.x; item < kValueCols * (rp / 8); item += kThreads) {
      const int c = item % kValueCols, g = item / kValueCols;
      float x[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int s = 8 * g + j;
        x[j] = s >= r ? 0.0f : (c < kDim ? values[s * kDim + c] : (c == kDim ? weights[s] : 0.0f));
      }
      const float scale = scale_s[c];
      uint4 piece;
      piece.x = half_pair(x[0] * scale, x[1] * scale);
      piece.y = half_pair(x[2] * scale, x[3] * scale);
      piece.z = half_pair(x[4] * scale, x[5] * scale);
      piece.w = half_pair(x[6] * scale, x[7] * scale);
      *reinterpret_cast<uint4*>(values_s + ((c / 8) * (rp / 8) + g) * 128 + (c % 8) * 16) = piece;
    }
    // keys: piece number t in layout order (as the query pieces), so its place is 16 t bytes
    for (int t = threadIdx.x; t < rp * kPieces; t += kThreads * kBatch) {
      uint4 x[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int piece = t + j * kThreads;
        const int key = piece / (8 * kPieces) * 8 + piece % 8, column = piece / 8 % kPieces * 8;
        x[j] = key < r ? *reinterpret_cast<const uint4*>(keys + key * kDim + column) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int piece = t + j * kThreads;
        if (piece < rp * kPieces) *reinterpret_cast<uint4*>(keys_s + piece * 16) = x[j];
      }
    }
    for (int c = threadIdx.x; c < kDim; c += kThreads) {
      const float lo = p.value_min ? p.value_min[kvh * kDim + c] : -INFINITY;
      const float hi = p.value_max ? p.value_max[kvh * kDim + c] : INFINITY;
      column_s[c] = make_float4(unscale_s[c], p.center_values ? (lo + hi) / 2 : 0.0f, lo, hi);
    }
    fence_async_shared();  // the staged keys and values are read by wgmma
    __syncthreads();
    const float scale_log2 = fmaxf(static_cast<float>(p.beta * 1.4426950408889634), FLT_MIN);
  // operand descriptors; an offset of n bytes into an operand adds n / 16 to the start address
  const uint64_t keys_descriptor = wgmma_descriptor(keys_address, 128, kRowGroupBytes);
  const uint64_t values_descriptor = wgmma_descriptor(values_address, 128, rp * 16);

    // Software pipeline over the segment's tiles: Q Kᵀ of a block's first chunk is issued right
    // after the previous block's P V̂, so that it runs beside that block's epilogue.
    float sc[kWgmmaChunk / 2];  // logits: 8-key tile n holds sc[4 n .. 4 n + 3]
    float acc[kValueCols / 2];  // output tiles in the accumulator layout; tile kTiles column 0: Σ P w
    auto issue_logits = [&](int stage, int s0) {
      const uint64_t block_descriptor = wgmma_descriptor(blocks_address + stage * kBlockBytes, 128, kRowGroupBytes);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {  // k-step k starts 256 bytes (16 units) on
        wgmma_64x128x16_bf16(sc, block_descriptor + 16 * k, keys_descriptor + (s0 / 8) * (kRowGroupBytes / 16) + 16 * k,
                             k > 0);
      }
      wgmma_commit();
    };
    // the rows of `tile` have landed (each warp copied its own; the copies of later tiles, issued
    // after them, may stay in flight) and are visible to the async proxy of wgmma
    static_assert(kWgmmaStages == 3, "cp.async.wait_group takes an immediate: pending 0 or 1 or 2");
    auto rows_ready = [&](int64_t tile) {
      const int64_t requested = tile_first + kWgmmaStages - 1 + (tile - tile_first > 0 ? tile - tile_first - 1 : 0);
      const int64_t later = (requested < tile_last - 1 ? requested : tile_last - 1) - tile;
      if (later >= 2) {
        asm volatile("cp.async.wait_group 2;\n" ::);
      } else if (later == 1) {
        asm volatile("cp.async.wait_group 1;\n" ::);
      } else {
        asm volatile("cp.async.wait_group 0;\n" ::);
      }
      fence_async_shared();
      warpgroup_barrier(group_id);
    };
    for (int i = 1; i < kWgmmaStages && tile_first + i < tile_last; ++i) load_block(tile_first + i, i);
    rows_ready(tile_first);
    issue_logits(0, 0);

    for (int64_t tile = tile_first; tile < tile_last; ++tile) {
      const int stage = static_cast<int>((tile - tile_first) % kWgmmaStages);
      float row_max[2] = {-INFINITY, -INFINITY};
      for (int s0 = 0; s0 < rp; s0 += kWgmmaChunk) {
        wgmma_wait_all();  // this chunk's logits, and the previous chunk's P V̂
        wgmma_fence_registers(sc);
        wgmma_fence_registers(acc);
        if (s0 + kWgmmaChunk > r) {  // padding slots of a last partial chunk: -inf
          const int live = r - s0 - 2 * quad;
#pragma unroll
          for (int n = 0; n < kWgmmaChunk / 8; ++n) {
#pragma unroll
            for (int v = 0; v < 4; ++v) sc[4 * n + v] = 8 * n + (v & 1) < live ? sc[4 * n + v] : -INFINITY;
          }
        }
        // the rows' maxima over 8 independent chains (entry i is row i % 4 / 2), then combined
        float partial[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) partial[i] = sc[i];
#pragma unroll
        for (int i = 8; i < kWgmmaChunk / 2; ++i) partial[i % 8] = fmaxf(partial[i % 8], sc[i]);
        float chunk_max[2] = {fmaxf(fmaxf(partial[0], partial[1]), fmaxf(partial[4], partial[5])),
                              fmaxf(fmaxf(partial[2], partial[3]), fmaxf(partial[6], partial[7]))};
        float top[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          chunk_max[h] = fmaxf(chunk_max[h], __shfl_xor_sync(0xffffffffu, chunk_max[h], 1));
          chunk_max[h] = fmaxf(chunk_max[h], __shfl_xor_sync(0xffffffffu, chunk_max[h], 2));
          top[h] = chunk_max[h] * scale_log2;
        }
        if (s0 == 0) {
          row_max[0] = top[0];
          row_max[1] = top[1];
        } else if (__any_sync(0xffffffffu, top[0] > row_max[0] + kRescaleSlack || top[1] > row_max[1] + kRescaleSlack)) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float new_max = fmaxf(row_max[h], top[h]);
            const float correction = exp2_flush(row_max[h] - new_max);
            row_max[h] = new_max;
#pragma unroll
            for (int i = 0; i < kValueCols / 2; ++i) {
              if (i % 4 / 2 == h) acc[i] *= correction;
            }
          }
        }
        const float neg_max[2] = {-row_max[0], -row_max[1]};
        // P in float16 as A fragments (tiles 2 kk and 2 kk + 1 of the logits are the fragment of
        // the 16-key step kk), then P V̂ for the chunk (the block's first step overwrites acc),
        // left running beside the next chunk's logits
        uint32_t pa[kWgmmaChunk / 16][4];
#pragma unroll
        for (int kk = 0; kk < kWgmmaChunk / 16; ++kk) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float* t = sc + 4 * (2 * kk + half);
            pa[kk][2 * half] = half_pair(exp2_flush(fmaf(t[0], scale_log2, neg_max[0])),
                                         exp2_flush(fmaf(t[1], scale_log2, neg_max[0])));
            pa[kk][2 * half + 1] = half_pair(exp2_flush(fmaf(t[2], scale_log2, neg_max[1])),
                                             exp2_flush(fmaf(t[3], scale_log2, neg_max[1])));
          }
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kWgmmaChunk / 16; ++kk) {  // key s starts 16 s bytes on
          wgmma_value_product<kValueCols>(acc, pa[kk], values_descriptor + s0 + 16 * kk, s0 > 0 || kk > 0);
        }
        wgmma_commit();
        if (s0 + kWgmmaChunk < rp) issue_logits(stage, s0 + kWgmmaChunk);
      }
      if (tile + 1 < tile_last) {  // the next block's first logits run beside this epilogue
        rows_ready(tile + 1);
        issue_logits(stage + 1 < kWgmmaStages ? stage + 1 : 0, 0);
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // this block's P V̂
      } else {
        wgmma_wait_all();
      }
      wgmma_fence_registers(acc);
      // Σ P w of rows group and group + 8 sits in column 0 of the weights' tile, at quad 0
      float inverse[2];
      bool positive[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float den = __shfl_sync(0xffffffffu, acc[4 * kTiles + 2 * h], lane & ~3) * unscale_s[kDim];
        positive[h] = den > static_cast<float>(kDenominatorFloor);
        inverse[h] = reciprocal_approx(den);  // relative error 2^-23, far below the output's rounding
      }
      // The warp's output rows go through its rows of this block's buffer (its Q Kᵀ products are
      // done), in the layout the rows came in, then out as whole 16-byte pieces
      uint32_t* out_s = reinterpret_cast<uint32_t*>(warp_rows_s + stage * kBlockBytes);
#pragma unroll
      for (int d = 0; d < kTiles; ++d) {
        const float4 c0 = column_s[8 * d + 2 * quad], c1 = column_s[8 * d + 2 * quad + 1];
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // finish(): quotient, unscaled, plus the offset, clamped
          float y0 = positive[h] ? fmaf(acc[4 * d + 2 * h] * inverse[h], c0.x, c0.y) : c0.y;
          float y1 = positive[h] ? fmaf(acc[4 * d + 2 * h + 1] * inverse[h], c1.x, c1.y) : c1.y;
          y0 = min_keep_nan(max_keep_nan(y0, c0.z), c0.w);
          y1 = min_keep_nan(max_keep_nan(y1, c1.z), c1.w);
          // row group + 8 h of the warp's 16 rows is its row group h; column c is in piece d
          out_s[((h * kPieces + d) * 128 + group * 16 + quad * 4) / 4] =
              pack_pair(store_as<scalar_t>(y0), store_as<scalar_t>(y1));
        }
      }
      __syncwarp();
      const int64_t row0 = block_row0(tile);
#pragma unroll
      for (int i = 0; i < kLanePieces; ++i) {
        const int64_t row = row0 + piece_row(i);
        if (row < p.m) {
          *reinterpret_cast<uint4*>(head_out + row * kDim + piece_column(i)) =
              *reinterpret_cast<const uint4*>(warp_rows_s + stage * kBlockBytes + (32 * i + lane) * 16);
        }
      }
      __syncwarp();  // the lanes' reads are done before the copies of a later block land here
      if (tile + kWgmmaStages < tile_last) load_block(tile + kWgmmaStages, stage);
    }
  }
#else
  __trap();  // not built for sm_90a: the glue never launches this kernel then
#endif
}

}  // namespace kernels
}  // namespace wildcat

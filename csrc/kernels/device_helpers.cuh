// Device helpers shared by the CUDA kernels: asynchronous global-to-shared copies (cp.async, sm_80
// and later) and the exact unpacking of a 16-byte piece of eight 16-bit values to float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace wildcat {
namespace kernels {

// The shared-window address of a pointer into shared memory, as cp.async and mbarrier take it.
__device__ __forceinline__ unsigned shared_address(const void* shared) {
  return static_cast<unsigned>(__cvta_generic_to_shared(shared));
}

// 16 bytes to the shared-memory address `shared`, asynchronously (cached in L2 only).
__device__ __forceinline__ void copy_async_16(unsigned shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(global));
}

// The same; `valid` false writes zeros instead (and reads nothing).
__device__ __forceinline__ void copy_async_16_or_zero(unsigned shared, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(global), "r"(valid ? 16 : 0));
}

// One element of 4 or 8 bytes (naturally aligned), asynchronously.
template <typename E>
__device__ __forceinline__ void copy_async_element(E* shared, const E* global) {
  static_assert(sizeof(E) == 4 || sizeof(E) == 8, "cp.async copies 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(shared_address(shared)), "l"(global), "n"(sizeof(E)));
}

// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Waits for all of this thread's copies, committed or not.
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_all;\n" ::); }

// Eight 16-bit values of a 16-byte piece, as float (exact), in memory order.
__device__ __forceinline__ void unpack8(uint4 raw, float out[8], __nv_bfloat16) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void unpack8(uint4 raw, float out[8], __half) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], sizeof h);
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

}  // namespace kernels
}  // namespace wildcat

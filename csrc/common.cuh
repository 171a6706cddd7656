// Device helpers shared by the fastmask kernels: element conversion, 16-byte vector
// loads/stores, and row-group sums. CUDA headers only (no torch), see fastmask_cuda.h.
#pragma once

#include <cassert>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef FASTMASK_CPU_EMULATION  // tests/cuda_emu runs these kernels on the CPU
#include <cuda_runtime.h>
#endif

#include "fastmask_cuda.h"

// kernel<<<grid, block, 0, stream>>>(args), spelled so that the CPU emulator can replace it:
// FASTMASK_LAUNCH(grid, block, stream, kernel<T, VEC>)(args).
#ifndef FASTMASK_LAUNCH
#define FASTMASK_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

namespace fastmask {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------ element conversion
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T's precision, as a float (what a PyTorch op on T tensors would store).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// ------------------------------------------------------------------ vector load / store
// VEC consecutive elements. With VEC * sizeof(T) == 16 the copy is one 128-bit access;
// wider packs (8 fp32 modulation values next to 8 bf16 activations) are 16-byte aligned
// and split into 128-bit accesses. The caller guarantees the alignment (the bindings check
// the pointers and D % VEC == 0 before choosing a VEC > 1 instantiation).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ void load(float (&dst)[VEC], const T* __restrict__ src) {
  const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(src);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_float(p.v[i]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* __restrict__ dst, const float (&src)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int i = 0; i < VEC; ++i) p.v[i] = from_float<T>(src[i]);
  *reinterpret_cast<Pack<T, VEC>*>(dst) = p;
}

template <int VEC>
__device__ __forceinline__ void fill(float (&dst)[VEC], float v) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = v;
}

// ------------------------------------------------------------------ row chunks
// Visits, when `valid`, the chunks c = lane, lane + tpr, ... (c < chunks) of a row that this
// thread of its row group owns: the first NC through cached(i, c), where i is the chunk's
// slot in the thread's register cache (a constant once the loop is unrolled), the rest
// through uncached(c).
template <int NC, typename Cached, typename Uncached>
__device__ __forceinline__ void for_each_chunk(int lane, int tpr, int64_t chunks, bool valid, Cached&& cached,
                                               Uncached&& uncached) {
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int64_t c = lane + static_cast<int64_t>(i) * tpr;
    if (valid && c < chunks) cached(i, c);
  }
  for (int64_t c = lane + static_cast<int64_t>(NC) * tpr; valid && c < chunks; c += tpr) uncached(c);
}

// ------------------------------------------------------------------ row-group sums
// Sums each of the NV values over the `tpr` threads of a row group (see row_threads):
// groups of up to 32 threads (a power of two) are aligned lane ranges of one warp
// (butterfly shuffles, so every lane ends with the same bits); wider groups are whole warps
// (tpr a multiple of 32) combined through `smem` (NV * 32 floats) in a fixed order. Deterministic. Every thread of the block must
// call it the same number of times (no early exit): it shuffles over full warps and, for
// tpr > 32, synchronises the block.
template <int NV>
__device__ __forceinline__ void group_sum(float (&v)[NV], int tpr, float* smem) {
  const int width = tpr < kWarp ? tpr : kWarp;
  for (int off = width >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], off);
  }
  if (tpr > kWarp) {
    const int warp = threadIdx.x / kWarp;
    const int warps_per_row = tpr / kWarp;
    const int first = warp - warp % warps_per_row;
    __syncthreads();  // readers of the previous call are done with smem
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int i = 0; i < NV; ++i) smem[i * kWarp + warp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float s = 0.f;
      for (int w = 0; w < warps_per_row; ++w) s += smem[i * kWarp + first + w];
      v[i] = s;
    }
  }
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024): every thread gets it.
template <int NV>
__device__ __forceinline__ void block_sum(float (&v)[NV], float* smem) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], off);
  }
  const int warps = blockDim.x / kWarp;
  __syncthreads();
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) smem[i * kWarp + threadIdx.x / kWarp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += smem[i * kWarp + w];
    v[i] = s;
  }
}

// Grid size for a grid-stride loop over `work` items of `per_block` each.
inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t g = ceil_div(work, per_block);
  const int64_t cap = int64_t(1) << 30;
  return static_cast<unsigned>(g < 1 ? 1 : (g > cap ? cap : g));
}

}  // namespace fastmask

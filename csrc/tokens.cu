// Token ops of MaskDiT: gather of the visible tokens (+ position embedding) and unmask
// (visible tokens back in place, the mask token elsewhere, + position embedding), forward
// and backward; scatter (TREAD's put-back: kept rows into a saved stream), forward and
// backward; plus the deterministic fp32 reduction used by every backward that sums
// over the batch or over rows (reduce_middle).
//
// Layout: one group of `tpr` threads per token row (tpr = the row's 16-byte chunks, at
// most 256; several rows per 256-thread block when rows are narrow), a grid-stride loop
// over rows, one integer division per row and none per element. No atomics anywhere:
// sums over the batch go to per-split fp32 partial buffers that reduce_middle adds up in
// a fixed order, so every result is bit-identical from run to run.
#include "common.cuh"

namespace fastmask {
namespace {

struct TokenGrid {
  int tpr;             // threads per row
  int rows_per_block;  // rows handled by one block at a time
  int threads;         // tpr * rows_per_block
};

TokenGrid token_grid(int64_t chunks) {
  int tpr = chunks < 256 ? static_cast<int>(chunks) : 256;
  if (tpr < 1) tpr = 1;
  int rpb = 256 / tpr;
  if (rpb < 1) rpb = 1;
  return {tpr, rpb, tpr * rpb};
}

// The grid-stride loop over token rows of the four token kernels: this thread's lane in its
// row group, the first row of its group and the step between its rows.
struct RowLoop {
  int lane;
  int64_t first, step;
};

__device__ __forceinline__ RowLoop row_loop(int tpr, int rpb) {
  const int group = threadIdx.x / tpr;
  return {static_cast<int>(threadIdx.x) - group * tpr, static_cast<int64_t>(blockIdx.x) * rpb + group,
          static_cast<int64_t>(gridDim.x) * rpb};
}

// Chunk c of a token row, plus chunk c of its position embedding row p (fp32) when there is
// one: the sum is taken in fp32 and rounded once, when stored (as the reference's add_pos).
template <int VEC, typename T>
__device__ __forceinline__ void load_row_chunk(float (&v)[VEC], const T* __restrict__ src,
                                               const float* __restrict__ p, int64_t c) {
  load<VEC>(v, src + c * VEC);
  if (p != nullptr) {
    float q[VEC];
    load<VEC>(q, p + c * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] += q[i];
  }
}

// Row `row` = (split s, token n) of the batch-sum kernels: n and the samples [b0, b1) of s.
struct SplitRow {
  int64_t n, b0, b1;
};

__device__ __forceinline__ SplitRow split_row(int64_t row, int64_t B, int64_t N, int64_t splits) {
  const int64_t per_split = (B + splits - 1) / splits;
  const int64_t s = row / N;
  const int64_t b0 = s * per_split;
  return {row - s * N, b0, b0 + per_split < B ? b0 + per_split : B};
}

// out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]]): pos is fp32 and the sum rounds once, to T,
// like the reference. An id outside [0, N) (the caller skipped the id check) reads nothing and
// gives a row of zeros.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) gather_fwd_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                         const int64_t* __restrict__ ids,
                                                         const float* __restrict__ pos,
                                                         int64_t B, int64_t N, int64_t K, int64_t D, int tpr, int rpb) {
  const int64_t chunks = D / VEC;
  const RowLoop rl = row_loop(tpr, rpb);
  for (int64_t row = rl.first; row < B * K; row += rl.step) {
    const int64_t b = row / K;
    const int64_t n = ids[row];
    const bool ok = 0 <= n && n < N;
    const T* src = x + (b * N + (ok ? n : 0)) * D;
    const float* p = pos == nullptr ? nullptr : pos + (ok ? n : 0) * D;
    T* dst = out + row * D;
    for (int64_t c = rl.lane; c < chunks; c += tpr) {
      float v[VEC];
      fill(v, 0.f);
      if (ok) load_row_chunk(v, src, p, c);
      store<VEC>(dst + c * VEC, v);
    }
  }
}

// Row (s, n): for b in split s, grad_x[b, n] = grad_out[b, inv[b, n]] or 0 where n was
// dropped (every row written, no memset); pos_partial[s, n] = the sum over those b.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) gather_bwd_kernel(T* __restrict__ grad_x, float* __restrict__ pos_partial,
                                                         const T* __restrict__ grad_out,
                                                         const int32_t* __restrict__ inv, int64_t B, int64_t N,
                                                         int64_t K, int64_t D, int64_t splits, int tpr, int rpb) {
  const int64_t chunks = D / VEC;
  const RowLoop rl = row_loop(tpr, rpb);
  for (int64_t row = rl.first; row < splits * N; row += rl.step) {
    const SplitRow sr = split_row(row, B, N, splits);
    const int64_t n = sr.n;
    for (int64_t c = rl.lane; c < chunks; c += tpr) {
      float acc[VEC];
      fill(acc, 0.f);
      for (int64_t b = sr.b0; b < sr.b1; ++b) {
        const int32_t j = inv[b * N + n];
        float v[VEC];
        if (j >= 0) {
          load<VEC>(v, grad_out + (b * K + j) * D + c * VEC);
        } else {
          fill(v, 0.f);
        }
        store<VEC>(grad_x + (b * N + n) * D + c * VEC, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += v[i];
      }
      if (pos_partial != nullptr) store<VEC>(pos_partial + row * D + c * VEC, acc);
    }
  }
}

// out[b, n] = x_vis[b, inv[b, n]] or the mask token (+ pos[n]), every row written.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) unmask_fwd_kernel(T* __restrict__ out, const T* __restrict__ x_vis,
                                                         const int32_t* __restrict__ inv,
                                                         const T* __restrict__ mask_token,
                                                         const float* __restrict__ pos,
                                                         int64_t B, int64_t N, int64_t K, int64_t D, int tpr,
                                                         int rpb) {
  const int64_t chunks = D / VEC;
  const RowLoop rl = row_loop(tpr, rpb);
  for (int64_t row = rl.first; row < B * N; row += rl.step) {
    const int64_t b = row / N;
    const int64_t n = row - b * N;
    const int32_t j = inv[row];
    const T* src = j >= 0 ? x_vis + (b * K + j) * D : mask_token;
    const float* p = pos == nullptr ? nullptr : pos + n * D;
    T* dst = out + row * D;
    for (int64_t c = rl.lane; c < chunks; c += tpr) {
      float v[VEC];
      load_row_chunk(v, src, p, c);
      store<VEC>(dst + c * VEC, v);
    }
  }
}

// Row (s, n): for b in split s, grad_x_vis[b, inv[b, n]] = grad_out[b, n] where kept;
// mask_partial[s, n] = the sum of grad_out[b, n] over the b where n was dropped;
// pos_partial[s, n] = the sum over all b. grad_out is read once, and a kept chunk is copied
// as loaded (bits unchanged).
// Registers: two VEC-float accumulators plus the chunks of the samples the unrolled b loop
// has in flight. The loop walks pointers by fixed strides (no 64-bit index products per
// sample) and the bound (4 blocks of 256 threads per SM, so at most 64 registers) makes
// ptxas fit it without spilling; left to itself it spills on sm_90 or sm_80 (checked by
// tests/test_static_gpu.py).
template <typename T, int VEC>
__global__ void __launch_bounds__(256, 4) unmask_bwd_kernel(T* __restrict__ grad_x_vis, float* __restrict__ mask_partial,
                                                         float* __restrict__ pos_partial,
                                                         const T* __restrict__ grad_out,
                                                         const int32_t* __restrict__ inv, int64_t B, int64_t N,
                                                         int64_t K, int64_t D, int64_t splits, int tpr, int rpb) {
  const int64_t chunks = D / VEC;
  const int64_t out_step = N * D, vis_step = K * D;  // one sample of grad_out / grad_x_vis
  const RowLoop rl = row_loop(tpr, rpb);
  for (int64_t row = rl.first; row < splits * N; row += rl.step) {
    const SplitRow sr = split_row(row, B, N, splits);
    const int64_t samples = sr.b1 - sr.b0;
    const int32_t* inv_row = inv + sr.b0 * N + sr.n;
    const T* out_row = grad_out + (sr.b0 * N + sr.n) * D;
    T* vis_rows = grad_x_vis + sr.b0 * vis_step;
    for (int64_t c = rl.lane; c < chunks; c += tpr) {
      float acc_mask[VEC], acc_pos[VEC];
      fill(acc_mask, 0.f);
      fill(acc_pos, 0.f);
      const T* src = out_row + c * VEC;
      T* dst = vis_rows + c * VEC;
      const int32_t* j_end = inv_row + samples * N;
      for (const int32_t* j_of = inv_row; j_of != j_end; src += out_step, dst += vis_step, j_of += N) {
        const Pack<T, VEC> raw = *reinterpret_cast<const Pack<T, VEC>*>(src);
        const int32_t j = *j_of;
        if (j >= 0) *reinterpret_cast<Pack<T, VEC>*>(dst + static_cast<int64_t>(j) * D) = raw;
        float v[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = to_float(raw.v[k]);
        if (j < 0) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc_mask[k] += v[k];
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc_pos[k] += v[k];
      }
      store<VEC>(mask_partial + row * D + c * VEC, acc_mask);
      if (pos_partial != nullptr) store<VEC>(pos_partial + row * D + c * VEC, acc_pos);
    }
  }
}

// out[b, n] = x_kept[b, inv[b, n]] where kept, else fill[b, n] (the fill in T already; null:
// zeros): every row written, each source row read only where it survives. A copy: bits unchanged.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) scatter_fwd_kernel(T* __restrict__ out, const T* __restrict__ x_kept,
                                                          const int32_t* __restrict__ inv, const T* __restrict__ fill,
                                                          int64_t B, int64_t N, int64_t K, int64_t D, int tpr,
                                                          int rpb) {
  const int64_t chunks = D / VEC;
  const RowLoop rl = row_loop(tpr, rpb);
  Pack<T, VEC> zeros;
#pragma unroll
  for (int i = 0; i < VEC; ++i) zeros.v[i] = from_float<T>(0.f);
  for (int64_t row = rl.first; row < B * N; row += rl.step) {
    const int64_t b = row / N;
    const int32_t j = inv[row];
    const T* src = j >= 0 ? x_kept + (b * K + j) * D : (fill != nullptr ? fill + row * D : nullptr);
    T* dst = out + row * D;
    for (int64_t c = rl.lane; c < chunks; c += tpr) {
      *reinterpret_cast<Pack<T, VEC>*>(dst + c * VEC) =
          src != nullptr ? *reinterpret_cast<const Pack<T, VEC>*>(src + c * VEC) : zeros;
    }
  }
}

// Row (b, n) of grad_out, read once: where kept it goes to grad_x_kept[b, inv[b, n]] and
// grad_fill[b, n] gets zeros, elsewhere grad_fill[b, n] = grad_out[b, n] (every grad_fill row
// written, no memset). Rows of grad_x_kept no id owns: zero_orphan_rows_kernel.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) scatter_bwd_kernel(T* __restrict__ grad_x_kept, T* __restrict__ grad_fill,
                                                          const T* __restrict__ grad_out,
                                                          const int32_t* __restrict__ inv, int64_t B, int64_t N,
                                                          int64_t K, int64_t D, int tpr, int rpb) {
  const int64_t chunks = D / VEC;
  const RowLoop rl = row_loop(tpr, rpb);
  Pack<T, VEC> zeros;
#pragma unroll
  for (int i = 0; i < VEC; ++i) zeros.v[i] = from_float<T>(0.f);
  for (int64_t row = rl.first; row < B * N; row += rl.step) {
    const int64_t b = row / N;
    const int32_t j = inv[row];
    const T* src = grad_out + row * D;
    T* fill_row = grad_fill + row * D;
    T* kept_row = grad_x_kept + (b * K + (j >= 0 ? j : 0)) * D;
    for (int64_t c = rl.lane; c < chunks; c += tpr) {
      const Pack<T, VEC> raw = *reinterpret_cast<const Pack<T, VEC>*>(src + c * VEC);
      if (j >= 0) *reinterpret_cast<Pack<T, VEC>*>(kept_row + c * VEC) = raw;
      *reinterpret_cast<Pack<T, VEC>*>(fill_row + c * VEC) = j >= 0 ? zeros : raw;
    }
  }
}

// Ids outside [0, N) are skipped: no token is kept for them.
__global__ void inverse_ids_kernel(int32_t* __restrict__ inv, const int64_t* __restrict__ ids, int64_t B, int64_t N,
                                   int64_t K) {
  const int64_t total = B * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / K;
    const int64_t n = ids[i];
    if (0 <= n && n < N) inv[b * N + n] = static_cast<int32_t>(i - b * K);
  }
}

// Rows (b, k) of grad_x_vis that unmask_bwd_kernel never writes, because ids[b, k] lies
// outside [0, N) or another k of sample b names the same token: zeros (nothing else written).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) zero_orphan_rows_kernel(T* __restrict__ grad_x_vis,
                                                               const int64_t* __restrict__ ids,
                                                               const int32_t* __restrict__ inv, int64_t B, int64_t N,
                                                               int64_t K, int64_t D, int tpr, int rpb) {
  const int64_t chunks = D / VEC;
  const RowLoop rl = row_loop(tpr, rpb);
  for (int64_t row = rl.first; row < B * K; row += rl.step) {
    const int64_t b = row / K;
    const int64_t n = ids[row];
    if (0 <= n && n < N && inv[b * N + n] == row - b * K) continue;
    float zeros[VEC];
    fill(zeros, 0.f);
    for (int64_t c = rl.lane; c < chunks; c += tpr) store<VEC>(grad_x_vis + row * D + c * VEC, zeros);
  }
}

template <typename TOut>
__global__ void reduce_middle_kernel(TOut* __restrict__ out, const float* __restrict__ in, int64_t G, int64_t J,
                                     int64_t W, int64_t fan) {
  const int64_t JB = (J + fan - 1) / fan;
  const int64_t total = G * JB * W;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = i % W;
    const int64_t t = i / W;
    const int64_t jb = t % JB;
    const int64_t g = t / JB;
    const int64_t j0 = jb * fan;
    const int64_t j1 = j0 + fan < J ? j0 + fan : J;
    const float* src = in + g * J * W + w;
    float s = 0.f;
    for (int64_t j = j0; j < j1; ++j) s += src[j * W];
    out[i] = from_float<TOut>(s);
  }
}

}  // namespace

cudaError_t inverse_ids(int32_t* inv, const int64_t* ids, int64_t B, int64_t N, int64_t K, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(inv, 0xff, static_cast<size_t>(B * N) * sizeof(int32_t), stream);  // all -1
  if (err != cudaSuccess) return err;
  FASTMASK_LAUNCH(grid_for(B * K, 256), 256, stream, inverse_ids_kernel)(inv, ids, B, N, K);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t gather_tokens_fwd(T* out, const T* x, const int64_t* ids, const float* pos, int64_t B, int64_t N,
                              int64_t K, int64_t D, cudaStream_t stream) {
  const TokenGrid g = token_grid(D / VEC);
  FASTMASK_LAUNCH(grid_for(B * K, g.rows_per_block), g.threads, stream, gather_fwd_kernel<T, VEC>)(
      out, x, ids, pos, B, N, K, D, g.tpr, g.rows_per_block);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t gather_tokens_bwd(T* grad_x, float* pos_partial, const T* grad_out, const int32_t* inv, int64_t B,
                              int64_t N, int64_t K, int64_t D, int64_t splits, cudaStream_t stream) {
  const TokenGrid g = token_grid(D / VEC);
  FASTMASK_LAUNCH(grid_for(splits * N, g.rows_per_block), g.threads, stream, gather_bwd_kernel<T, VEC>)(
      grad_x, pos_partial, grad_out, inv, B, N, K, D, splits, g.tpr, g.rows_per_block);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t unmask_tokens_fwd(T* out, const T* x_vis, const int32_t* inv, const T* mask_token, const float* pos,
                              int64_t B, int64_t N, int64_t K, int64_t D, cudaStream_t stream) {
  const TokenGrid g = token_grid(D / VEC);
  FASTMASK_LAUNCH(grid_for(B * N, g.rows_per_block), g.threads, stream, unmask_fwd_kernel<T, VEC>)(
      out, x_vis, inv, mask_token, pos, B, N, K, D, g.tpr, g.rows_per_block);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t unmask_tokens_bwd(T* grad_x_vis, float* mask_partial, float* pos_partial, const T* grad_out,
                              const int64_t* ids, const int32_t* inv, int64_t B, int64_t N, int64_t K, int64_t D,
                              int64_t splits, cudaStream_t stream) {
  const TokenGrid g = token_grid(D / VEC);
  FASTMASK_LAUNCH(grid_for(splits * N, g.rows_per_block), g.threads, stream, unmask_bwd_kernel<T, VEC>)(
      grad_x_vis, mask_partial, pos_partial, grad_out, inv, B, N, K, D, splits, g.tpr, g.rows_per_block);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || B * K == 0) return err;
  FASTMASK_LAUNCH(grid_for(B * K, g.rows_per_block), g.threads, stream, zero_orphan_rows_kernel<T, VEC>)(
      grad_x_vis, ids, inv, B, N, K, D, g.tpr, g.rows_per_block);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t scatter_tokens_fwd(T* out, const T* x_kept, const int32_t* inv, const T* fill, int64_t B, int64_t N,
                               int64_t K, int64_t D, cudaStream_t stream) {
  const TokenGrid g = token_grid(D / VEC);
  FASTMASK_LAUNCH(grid_for(B * N, g.rows_per_block), g.threads, stream, scatter_fwd_kernel<T, VEC>)(
      out, x_kept, inv, fill, B, N, K, D, g.tpr, g.rows_per_block);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t scatter_tokens_bwd(T* grad_x_kept, T* grad_fill, const T* grad_out, const int64_t* ids,
                               const int32_t* inv, int64_t B, int64_t N, int64_t K, int64_t D, cudaStream_t stream) {
  const TokenGrid g = token_grid(D / VEC);
  FASTMASK_LAUNCH(grid_for(B * N, g.rows_per_block), g.threads, stream, scatter_bwd_kernel<T, VEC>)(
      grad_x_kept, grad_fill, grad_out, inv, B, N, K, D, g.tpr, g.rows_per_block);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || B * K == 0) return err;
  FASTMASK_LAUNCH(grid_for(B * K, g.rows_per_block), g.threads, stream, zero_orphan_rows_kernel<T, VEC>)(
      grad_x_kept, ids, inv, B, N, K, D, g.tpr, g.rows_per_block);
  return cudaGetLastError();
}

template <typename TOut>
cudaError_t reduce_middle(TOut* out, const float* in, int64_t G, int64_t J, int64_t W, int64_t fan,
                          cudaStream_t stream) {
  const int64_t total = G * ceil_div(J, fan) * W;
  FASTMASK_LAUNCH(grid_for(total, 256), 256, stream, reduce_middle_kernel<TOut>)(out, in, G, J, W, fan);
  return cudaGetLastError();
}

#define FASTMASK_TOKENS(T, VEC)                                                                                    \
  template cudaError_t gather_tokens_fwd<T, VEC>(T*, const T*, const int64_t*, const float*, int64_t, int64_t,     \
                                                 int64_t, int64_t, cudaStream_t);                                  \
  template cudaError_t gather_tokens_bwd<T, VEC>(T*, float*, const T*, const int32_t*, int64_t, int64_t, int64_t,   \
                                                 int64_t, int64_t, cudaStream_t);                                  \
  template cudaError_t unmask_tokens_fwd<T, VEC>(T*, const T*, const int32_t*, const T*, const float*, int64_t,     \
                                                 int64_t, int64_t, int64_t, cudaStream_t);                         \
  template cudaError_t unmask_tokens_bwd<T, VEC>(T*, float*, float*, const T*, const int64_t*, const int32_t*,      \
                                                 int64_t, int64_t, int64_t, int64_t, int64_t, cudaStream_t);         \
  template cudaError_t scatter_tokens_fwd<T, VEC>(T*, const T*, const int32_t*, const T*, int64_t, int64_t, int64_t, \
                                                  int64_t, cudaStream_t);                                           \
  template cudaError_t scatter_tokens_bwd<T, VEC>(T*, T*, const T*, const int64_t*, const int32_t*, int64_t, int64_t, \
                                                  int64_t, int64_t, cudaStream_t);

FASTMASK_TOKENS(float, 4)
FASTMASK_TOKENS(float, 1)
FASTMASK_TOKENS(__half, 8)
FASTMASK_TOKENS(__half, 1)
FASTMASK_TOKENS(__nv_bfloat16, 8)
FASTMASK_TOKENS(__nv_bfloat16, 1)

template cudaError_t reduce_middle<float>(float*, const float*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t reduce_middle<__half>(__half*, const float*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t reduce_middle<__nv_bfloat16>(__nv_bfloat16*, const float*, int64_t, int64_t, int64_t, int64_t,
                                                  cudaStream_t);

}  // namespace fastmask

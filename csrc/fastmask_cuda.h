// Host-side interface between the bindings (bindings.cpp, compiled by the host compiler
// against the torch headers) and the kernels (*.cu, compiled by nvcc against the CUDA
// headers only, which keeps nvcc fast: no torch header ever goes through nvcc).
//
// Every launcher takes raw device pointers, sizes and a stream, checks nothing (the
// bindings did), and returns the launch status. Element types are float, __half and
// __nv_bfloat16; modulation vectors (shift/scale/gate), LayerNorm statistics, partial
// sums and loss values are fp32. All sizes and offsets are int64.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace fastmask {

// ---------------------------------------------------------------- launch plans (host)
// Plans are computed here so that the bindings can size the fp32 partial buffers that
// the kernels fill; the kernels take the same numbers as arguments.

constexpr int kMaxRowThreads = 512;  // a row group never spans more than one block of this size
constexpr int kNormFwdCache = 2;     // chunks per thread held in registers, LayerNorm forward
constexpr int kNormBwdCache = 1;     // ... LayerNorm backward (more live arrays per chunk)
constexpr int kLossCache = 2;        // ... loss
constexpr int kReduceFan = 32;       // values summed per thread per pass of reduce_middle

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

// Threads per row for the kernels that reduce over a row (LayerNorm, loss), so that each
// thread holds at most `cache` 16-byte chunks: a power of two up to 32 (an aligned lane
// range of one warp: narrow rows pack several per warp), else a multiple of 32 (whole
// warps, combined through shared memory), at most kMaxRowThreads. Wider rows than that
// still work: the chunks past the register cache are re-read from memory.
inline int row_threads(int64_t chunks, int cache) {
  const int64_t need = ceil_div(chunks, cache);
  if (need <= 32) return next_pow2(need);
  const int64_t tpr = ceil_div(need, 32) * 32;
  return static_cast<int>(tpr < kMaxRowThreads ? tpr : kMaxRowThreads);
}

// Block size for a row group of tpr threads: several rows per block when rows are narrow.
inline int row_block(int tpr) { return tpr >= 128 ? tpr : tpr * (128 / tpr); }

// Rows per work unit of the norm backward kernels: each unit (a run of rows of one sample)
// writes one fp32 partial row per parameter gradient, reduced over units at the end.
// Aim for about one full wave of threads; at least 8 rows so that the partial buffers stay
// small next to the activations.
inline int64_t norm_bwd_rows_per_unit(int64_t B, int64_t L, int tpr, int sm_count) {
  const int64_t target = static_cast<int64_t>(sm_count) * 2048;
  int64_t rc = ceil_div(B * L * tpr, target);
  if (rc < 8) rc = 8;
  if (rc > L) rc = L;
  return rc < 1 ? 1 : rc;
}

// Splits of the batch for the token backward kernels that sum over the batch (grad of the
// position table, grad of the mask token): each split writes an fp32 partial [N, D].
inline int64_t token_bwd_splits(int64_t B, int64_t N, int64_t chunks, int sm_count) {
  const int64_t lanes = chunks < 256 ? chunks : 256;
  const int64_t target = static_cast<int64_t>(sm_count) * 2048;
  int64_t s = ceil_div(target, N * lanes);
  if (s > B) s = B;
  return s < 1 ? 1 : s;
}

// ---------------------------------------------------------------------- token ops
// VEC (template) is 16 / sizeof(T) for the vectorised instantiation or 1 for the scalar
// one; the bindings pick the vectorised one when D % VEC == 0 and every pointer is 16-byte
// aligned.

// inv[b, n] = k where ids[b, k] = n, else -1 (int32 map of kept positions). Ids outside
// [0, N) are skipped: no kernel reads or writes through them.
cudaError_t inverse_ids(int32_t* inv, const int64_t* ids, int64_t B, int64_t N, int64_t K, cudaStream_t stream);

template <typename T, int VEC>
cudaError_t gather_tokens_fwd(T* out, const T* x, const int64_t* ids, const float* pos, int64_t B, int64_t N,
                              int64_t K, int64_t D, cudaStream_t stream);

// grad_x [B, N, D] fully written; pos_partial [splits, N, D] fp32 (or null).
template <typename T, int VEC>
cudaError_t gather_tokens_bwd(T* grad_x, float* pos_partial, const T* grad_out, const int32_t* inv, int64_t B,
                              int64_t N, int64_t K, int64_t D, int64_t splits, cudaStream_t stream);

template <typename T, int VEC>
cudaError_t unmask_tokens_fwd(T* out, const T* x_vis, const int32_t* inv, const T* mask_token, const float* pos,
                              int64_t B, int64_t N, int64_t K, int64_t D, cudaStream_t stream);

// grad_x_vis [B, K, D] fully written (zeros at ids outside [0, N) or repeated); mask_partial
// [splits, N, D] fp32; pos_partial [splits, N, D] fp32 (or null).
template <typename T, int VEC>
cudaError_t unmask_tokens_bwd(T* grad_x_vis, float* mask_partial, float* pos_partial, const T* grad_out,
                              const int64_t* ids, const int32_t* inv, int64_t B, int64_t N, int64_t K, int64_t D,
                              int64_t splits, cudaStream_t stream);

// out [B, N, D] = fill [B, N, D] (null: zeros) with the kept rows x_kept [B, K, D] at inv's positions
// (TREAD's put-back; MicroDiT's zero fill).
template <typename T, int VEC>
cudaError_t scatter_tokens_fwd(T* out, const T* x_kept, const int32_t* inv, const T* fill, int64_t B, int64_t N,
                               int64_t K, int64_t D, cudaStream_t stream);

// grad_x_kept [B, K, D] fully written (zeros at ids outside [0, N) or repeated); grad_fill
// [B, N, D] fully written (grad_out with the kept rows zeroed).
template <typename T, int VEC>
cudaError_t scatter_tokens_bwd(T* grad_x_kept, T* grad_fill, const T* grad_out, const int64_t* ids,
                               const int32_t* inv, int64_t B, int64_t N, int64_t K, int64_t D, cudaStream_t stream);

// out[g, jb, w] = sum of in[g, j, w] over j in [jb * fan, (jb + 1) * fan), in index order
// (deterministic); with fan >= J it is the full sum out[g, w].
template <typename TOut>
cudaError_t reduce_middle(TOut* out, const float* in, int64_t G, int64_t J, int64_t W, int64_t fan,
                          cudaStream_t stream);

// ------------------------------------------------------------------------ norm ops
struct NormFwdArgs {
  void* out;             // [B, L, D] T
  void* x_new;           // [B, L, D] T, residual variant only
  float* mean;           // [B * L]
  float* rstd;           // [B * L]
  const void* x;         // [B, L, D] T
  const void* y;         // [B, L, D] T, residual variant only
  const float* gate;     // [B, D], residual variant only
  const float* shift;    // [B, D]
  const float* scale;    // [B, D]
  int64_t B, L, D;
  float eps;
};

template <typename T, int VEC, bool RESIDUAL>
cudaError_t layernorm_modulate_fwd(const NormFwdArgs& a, cudaStream_t stream);

template <typename T, int VEC>
cudaError_t gated_residual_fwd(T* out, const T* x, const T* y, const float* gate, int64_t B, int64_t L, int64_t D,
                               cudaStream_t stream);

enum class NormBwdMode : int { kLayerNorm = 0, kResidualLayerNorm = 1, kGatedResidual = 2 };

struct NormBwdArgs {
  void* grad_x;            // [B, L, D] T (grad of x; of x_new's input x for the residual variant)
  void* grad_y;            // [B, L, D] T, gated variants
  float* part_gate;        // [B, units, D], gated variants
  float* part_shift;       // [B, units, D], LayerNorm variants
  float* part_scale;       // [B, units, D], LayerNorm variants
  const void* grad_out;    // [B, L, D] T: grad of the LayerNorm output (of x + gate * y for kGatedResidual)
  const void* grad_res;    // [B, L, D] T: grad of x_new, kResidualLayerNorm only
  const void* x;           // [B, L, D] T: LayerNorm input (x, or x_new), LayerNorm variants
  const void* y;           // [B, L, D] T, gated variants
  const float* gate;       // [B, D], gated variants
  const float* scale;      // [B, D], LayerNorm variants
  const float* mean;       // [B * L], LayerNorm variants
  const float* rstd;       // [B * L], LayerNorm variants
  int64_t B, L, D;
  int64_t rows_per_unit;   // from norm_bwd_rows_per_unit
  int64_t units;           // ceil(L / rows_per_unit)
  int tpr;                 // row_threads(D / VEC, kNormBwdCache)
};

template <typename T, int VEC, NormBwdMode MODE>
cudaError_t norm_bwd(const NormBwdArgs& a, cudaStream_t stream);

// -------------------------------------------------------------------------- loss
struct LossArgs {
  void* grad_F;          // [B, N, P] T: d loss_b / d F
  float* partial;        // [B, blocks + 1, 2]: slot 0 (kept, dropped) counts, then per-block (dsm, mae) sums
  const void* F;         // [B, N, P] T
  const void* x_noisy;   // [B, N, P] TX
  const void* y;         // [B, N, P] TX
  const float* sigma;    // [B]
  const float* mask;     // [B, N] or null
  int64_t B, N, P;
  float mae_coef, sigma_data;
  bool flow;             // SiT velocity objective: c_skip = 0, c_out = 1, weight = 1, sigma unread
};

// Loss plan: a row group of loss_threads_per_token threads per token, blocks of
// loss_block_threads, loss_blocks blocks per sample (the partial buffer has blocks + 1
// slots per sample).
inline int loss_threads_per_token(int64_t P, int vec) { return row_threads(P / vec, kLossCache); }
inline int loss_block_threads(int tpr) { return tpr >= 256 ? tpr : tpr * (256 / tpr); }
inline int64_t loss_blocks(int64_t N, int64_t P, int vec) {
  const int tpr = loss_threads_per_token(P, vec);
  return ceil_div(N, loss_block_threads(tpr) / tpr);
}

// T: F_out and grad_F; TX: x_noisy and y, either T or float (fp32 data next to a bf16/fp16
// network output).
template <typename T, typename TX, int VEC>
cudaError_t dsm_mae_loss_fwd(const LossArgs& a, cudaStream_t stream);

// loss [B], terms [B, 2] from the partial buffer of dsm_mae_loss_fwd.
cudaError_t dsm_mae_loss_finish(float* loss, float* terms, const float* partial, int64_t B, int64_t blocks,
                                float mae_coef, cudaStream_t stream);

}  // namespace fastmask

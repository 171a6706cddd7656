// The MaskDiT objective (EDM denoising score matching on kept tokens + MAE on dropped
// tokens) in token space, in one pass that also writes d loss_b / d F:
//   D = c_skip * x_noisy + c_out * F
//   e_t = mean_p lambda * (D - y)^2,          dsm = sum_t kept_t e_t / max(sum_t kept_t, 1)
//   target = (x_noisy - mean) / sqrt(var_unbiased + 1e-6)  (per token)
//   m_t = mean_p (D - target)^2,              mae = sum_t drop_t m_t / max(sum_t drop_t, 1)
//   loss = dsm + mae_coef * mae;  kept_t = 1 - mask_t, drop_t = mask_t (no mask: all kept)
// a.flow (SiT's velocity objective): c_skip = 0, c_out = 1, lambda = 1 (D = F, y = x1 - x0).
// fastmask/ops/reference.py::dsm_mae_loss_terms is the oracle.
//
// Layout: one block per (sample, run of tokens); one row group of `tpr` threads per token
// (a single thread for the usual P = p*p*C = 16); the token's values stay in registers
// between the passes (sums, variance, gradient). Per-sample sums go through per-block fp32
// partials and a second tiny kernel, in a fixed order: deterministic.
#include "common.cuh"

namespace fastmask {
namespace {

constexpr float kMaeEps = 1e-6f;

// T: F and its gradient; TX: x_noisy and y (T, or fp32 next to a bf16/fp16 network output).
// FLOW (a.flow, a compile-time switch: the EDM kernel stays exactly as it was, and the flow one
// folds its constants away instead of keeping both sets of coefficients live).
template <typename T, typename TX, int VEC, bool FLOW>
__global__ void __launch_bounds__(kMaxRowThreads) dsm_mae_fwd_kernel(LossArgs a, int tpr, int64_t blocks) {
  constexpr int NC = kLossCache;
  __shared__ float smem[2 * kWarp];
  T* __restrict__ grad_F = static_cast<T*>(a.grad_F);
  const T* __restrict__ Fo = static_cast<const T*>(a.F);
  const TX* __restrict__ xn = static_cast<const TX*>(a.x_noisy);
  const TX* __restrict__ yy = static_cast<const TX*>(a.y);
  const int64_t N = a.N;
  const int64_t P = a.P;
  const int64_t chunks = P / VEC;
  const int64_t b = blockIdx.x / blocks;
  const int64_t token_block = blockIdx.x - b * blocks;
  const int group = threadIdx.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int tokens_per_block = blockDim.x / tpr;
  const bool has_mask = a.mask != nullptr;
  const float* __restrict__ mask = has_mask ? a.mask + b * N : nullptr;

  // EDM preconditioning of this sample, fp32 like the reference.
  const float sigma = FLOW ? 1.f : a.sigma[b];
  const float sd = a.sigma_data;
  const float s2 = sigma * sigma;
  const float d2 = sd * sd;
  const float c_skip = FLOW ? 0.f : d2 / (s2 + d2);
  const float c_out = FLOW ? 1.f : sigma * sd / sqrtf(s2 + d2);
  const float weight = FLOW ? 1.f : (s2 + d2) / ((sigma * sd) * (sigma * sd));

  // Kept / dropped counts of the sample (each block recounts: N floats, cheaper than a launch).
  float counts[2] = {static_cast<float>(N), 0.f};
  if (has_mask) {
    counts[0] = 0.f;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const float m = mask[n];
      counts[0] += 1.f - m;
      counts[1] += m;
    }
    block_sum(counts, smem);
  }
  const float inv_kept = 1.f / fmaxf(counts[0], 1.f);
  const float inv_drop = 1.f / fmaxf(counts[1], 1.f);
  const float inv_p = 1.f / static_cast<float>(P);

  const int64_t t = token_block * tokens_per_block + group;
  const bool valid = t < N;
  const int64_t off = valid ? (b * N + t) * P : 0;

  // d = D, r = D - y, v = x_noisy of chunk c.
  auto fetch = [&](int64_t c, float (&d)[VEC], float (&r)[VEC], float (&v)[VEC]) {
    float f[VEC], yv[VEC];
    load<VEC>(f, Fo + off + c * VEC);
    load<VEC>(v, xn + off + c * VEC);
    load<VEC>(yv, yy + off + c * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      d[k] = c_skip * v[k] + c_out * f[k];
      r[k] = d[k] - yv[k];
    }
  };

  float dv[NC][VEC], rv[NC][VEC], xv[NC][VEC];
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    fill(dv[i], 0.f);
    fill(rv[i], 0.f);
    fill(xv[i], 0.f);
  }
  float s1[2] = {0.f, 0.f};  // sum (D - y)^2, sum x_noisy
  auto add_s1 = [&](const float (&r)[VEC], const float (&v)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s1[0] += r[k] * r[k];
      s1[1] += v[k];
    }
  };
  for_each_chunk<NC>(
      lane, tpr, chunks, valid,
      [&](int i, int64_t c) {
        fetch(c, dv[i], rv[i], xv[i]);
        add_s1(rv[i], xv[i]);
      },
      [&](int64_t c) {
        float d[VEC], r[VEC], v[VEC];
        fetch(c, d, r, v);
        add_s1(r, v);
      });
  group_sum(s1, tpr, smem);

  // MAE target statistics: exact two-pass unbiased variance of x_noisy over the token.
  float mean = 0.f, inv_std = 0.f;
  if (has_mask) {
    mean = s1[1] * inv_p;
    float q[1] = {0.f};
    auto add_q = [&](const float (&v)[VEC]) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) q[0] += (v[k] - mean) * (v[k] - mean);
    };
    for_each_chunk<NC>(
        lane, tpr, chunks, valid, [&](int i, int64_t) { add_q(xv[i]); },
        [&](int64_t c) {
          float v[VEC];
          load<VEC>(v, xn + off + c * VEC);
          add_q(v);
        });
    group_sum(q, tpr, smem);
    inv_std = 1.f / sqrtf(q[0] / static_cast<float>(P - 1) + kMaeEps);
  }

  const float drop = (has_mask && valid) ? mask[t] : 0.f;
  const float kept = has_mask ? 1.f - drop : 1.f;
  // d loss / d F = c_out * (gk * (D - y) + gd * (D - target))
  const float gk = 2.f * c_out * inv_p * weight * kept * inv_kept;
  const float gd = 2.f * c_out * inv_p * a.mae_coef * drop * inv_drop;

  float s3[1] = {0.f};  // sum (D - target)^2
  auto emit = [&](int64_t c, const float (&d)[VEC], const float (&r)[VEC], const float (&v)[VEC]) {
    float g[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float dm = d[k] - (v[k] - mean) * inv_std;
      s3[0] += dm * dm;
      g[k] = gk * r[k] + gd * dm;
    }
    store<VEC>(grad_F + off + c * VEC, g);
  };
  for_each_chunk<NC>(
      lane, tpr, chunks, valid, [&](int i, int64_t c) { emit(c, dv[i], rv[i], xv[i]); },
      [&](int64_t c) {
        float d[VEC], r[VEC], v[VEC];
        fetch(c, d, r, v);
        emit(c, d, r, v);
      });
  if (has_mask) group_sum(s3, tpr, smem);

  float contrib[2] = {0.f, 0.f};  // kept * e_t, drop * m_t of this thread's token (lane 0 only)
  if (valid && lane == 0) {
    contrib[0] = kept * weight * s1[0] * inv_p;
    contrib[1] = has_mask ? drop * s3[0] * inv_p : 0.f;
  }
  block_sum(contrib, smem);
  if (threadIdx.x == 0) {
    float* p = a.partial + b * (blocks + 1) * 2;
    p[(1 + token_block) * 2 + 0] = contrib[0];
    p[(1 + token_block) * 2 + 1] = contrib[1];
    if (token_block == 0) {
      p[0] = counts[0];
      p[1] = counts[1];
    }
  }
}

__global__ void dsm_mae_finish_kernel(float* __restrict__ loss, float* __restrict__ terms,
                                      const float* __restrict__ partial, int64_t B, int64_t blocks, float mae_coef) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* p = partial + b * (blocks + 1) * 2;
    float dsm = 0.f, mae = 0.f;
    for (int64_t j = 1; j <= blocks; ++j) {
      dsm += p[2 * j];
      mae += p[2 * j + 1];
    }
    dsm /= fmaxf(p[0], 1.f);
    mae /= fmaxf(p[1], 1.f);
    terms[2 * b] = dsm;
    terms[2 * b + 1] = mae;
    loss[b] = dsm + mae_coef * mae;
  }
}

}  // namespace

template <typename T, typename TX, int VEC>
cudaError_t dsm_mae_loss_fwd(const LossArgs& a, cudaStream_t stream) {
  const int tpr = loss_threads_per_token(a.P, VEC);
  const int threads = loss_block_threads(tpr);
  const int64_t blocks = loss_blocks(a.N, a.P, VEC);
  if (a.flow) {
    FASTMASK_LAUNCH(grid_for(a.B * blocks, 1), threads, stream, dsm_mae_fwd_kernel<T, TX, VEC, true>)(a, tpr, blocks);
  } else {
    FASTMASK_LAUNCH(grid_for(a.B * blocks, 1), threads, stream, dsm_mae_fwd_kernel<T, TX, VEC, false>)(a, tpr, blocks);
  }
  return cudaGetLastError();
}

cudaError_t dsm_mae_loss_finish(float* loss, float* terms, const float* partial, int64_t B, int64_t blocks,
                                float mae_coef, cudaStream_t stream) {
  FASTMASK_LAUNCH(grid_for(B, 128), 128, stream, dsm_mae_finish_kernel)(loss, terms, partial, B, blocks, mae_coef);
  return cudaGetLastError();
}

#define FASTMASK_LOSS(T, TX, VEC) template cudaError_t dsm_mae_loss_fwd<T, TX, VEC>(const LossArgs&, cudaStream_t);
FASTMASK_LOSS(float, float, 4)
FASTMASK_LOSS(float, float, 1)
FASTMASK_LOSS(__half, __half, 8)
FASTMASK_LOSS(__half, __half, 1)
FASTMASK_LOSS(__nv_bfloat16, __nv_bfloat16, 8)
FASTMASK_LOSS(__nv_bfloat16, __nv_bfloat16, 1)
FASTMASK_LOSS(__half, float, 8)
FASTMASK_LOSS(__half, float, 1)
FASTMASK_LOSS(__nv_bfloat16, float, 8)
FASTMASK_LOSS(__nv_bfloat16, float, 1)

}  // namespace fastmask

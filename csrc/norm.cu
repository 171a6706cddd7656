// adaLN ops of a DiT block, forward and backward:
//   layernorm_modulate           out = LN(x) * (1 + scale[b]) + shift[b]
//   gated_residual               x_new = x + gate[b] * y
//   residual_layernorm_modulate  both fused: x_new rounded to T, then LN of the rounded x_new
// LayerNorm has no affine parameters; statistics, modulation and all sums are fp32.
//
// Forward: one row group of `tpr` threads per row (a few lanes of a warp for narrow rows,
// up to 512 threads for wide ones; see row_threads), the row held in registers (up to
// kNormFwdCache 16-byte chunks per thread; chunks past that are re-read), exact two-pass
// mean/variance, one read of the inputs and one write of the outputs.
//
// Backward: one row group per work unit, a run of `rows_per_unit` rows of one sample.
// The group accumulates the parameter gradients (shift, scale, gate) of its columns in
// registers over the unit's rows and writes one fp32 partial row per unit; reduce_middle
// adds the partial rows in a fixed order. No atomics: results are deterministic.
#include "common.cuh"

namespace fastmask {
namespace {

// ------------------------------------------------------------------------- forward
template <typename T, int VEC, bool RESIDUAL>
__global__ void __launch_bounds__(kMaxRowThreads) ln_modulate_fwd_kernel(NormFwdArgs a, int tpr) {
  constexpr int NC = kNormFwdCache;
  __shared__ float smem[kWarp];
  T* __restrict__ out = static_cast<T*>(a.out);
  T* __restrict__ x_new = static_cast<T*>(a.x_new);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ y = static_cast<const T*>(a.y);
  const int64_t D = a.D;
  const int64_t rows = a.B * a.L;
  const int64_t chunks = D / VEC;
  const int group = threadIdx.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int rows_per_block = blockDim.x / tpr;
  const float inv_d = 1.f / static_cast<float>(D);

  // Every thread runs the same number of iterations (rows past the end are `valid ==
  // false`), because group_sum needs the whole warp, and the whole block for tpr > 32.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < rows;
       first += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = first + group;
    const bool valid = row < rows;
    const int64_t b = valid ? row / a.L : 0;
    const int64_t off = valid ? row * D : 0;
    const float* __restrict__ shift = a.shift + b * D;
    const float* __restrict__ scale = a.scale + b * D;

    // The LayerNorm input of chunk c: x, or x_new = round_T(x + gate * y), stored on the way.
    auto fetch = [&](int64_t c, float (&v)[VEC]) {
      load<VEC>(v, x + off + c * VEC);
      if constexpr (RESIDUAL) {
        float yv[VEC], g[VEC];
        load<VEC>(yv, y + off + c * VEC);
        load<VEC>(g, a.gate + b * D + c * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = round_to<T>(v[i] + g[i] * yv[i]);
        store<VEC>(x_new + off + c * VEC, v);
      }
    };
    // Re-read of a chunk past the register cache (x_new was written by this same thread).
    auto refetch = [&](int64_t c, float (&v)[VEC]) {
      if constexpr (RESIDUAL) {
        load<VEC>(v, x_new + off + c * VEC);
      } else {
        load<VEC>(v, x + off + c * VEC);
      }
    };

    float v[NC][VEC];
#pragma unroll
    for (int i = 0; i < NC; ++i) fill(v[i], 0.f);
    float s[1] = {0.f};
    auto add_s = [&](const float (&t)[VEC]) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) s[0] += t[k];
    };
    for_each_chunk<NC>(
        lane, tpr, chunks, valid,
        [&](int i, int64_t c) {
          fetch(c, v[i]);
          add_s(v[i]);
        },
        [&](int64_t c) {
          float t[VEC];
          fetch(c, t);
          add_s(t);
        });
    group_sum(s, tpr, smem);
    const float mean = s[0] * inv_d;

    float q[1] = {0.f};
    auto add_q = [&](const float (&t)[VEC]) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = t[k] - mean;
        q[0] += d * d;
      }
    };
    for_each_chunk<NC>(
        lane, tpr, chunks, valid, [&](int i, int64_t) { add_q(v[i]); },
        [&](int64_t c) {
          float t[VEC];
          refetch(c, t);
          add_q(t);
        });
    group_sum(q, tpr, smem);
    const float rstd = rsqrtf(q[0] * inv_d + a.eps);

    auto emit = [&](int64_t c, const float (&t)[VEC]) {
      float sh[VEC], sc[VEC], o[VEC];
      load<VEC>(sh, shift + c * VEC);
      load<VEC>(sc, scale + c * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = (t[k] - mean) * rstd * (1.f + sc[k]) + sh[k];
      store<VEC>(out + off + c * VEC, o);
    };
    for_each_chunk<NC>(
        lane, tpr, chunks, valid, [&](int i, int64_t c) { emit(c, v[i]); },
        [&](int64_t c) {
          float t[VEC];
          refetch(c, t);
          emit(c, t);
        });
    if (valid && lane == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
  }
}

// out = round_T(x + gate[b] * y); one row group per row as in the token kernels.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) gated_residual_fwd_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                                 const T* __restrict__ y,
                                                                 const float* __restrict__ gate, int64_t rows,
                                                                 int64_t L, int64_t D, int tpr, int rpb) {
  const int64_t chunks = D / VEC;
  const int group = threadIdx.x / tpr;
  const int lane = threadIdx.x - group * tpr;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rpb + group; row < rows;
       row += static_cast<int64_t>(gridDim.x) * rpb) {
    const float* __restrict__ g = gate + (row / L) * D;
    const int64_t off = row * D;
    for (int64_t c = lane; c < chunks; c += tpr) {
      float xv[VEC], yv[VEC], gv[VEC];
      load<VEC>(xv, x + off + c * VEC);
      load<VEC>(yv, y + off + c * VEC);
      load<VEC>(gv, g + c * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) xv[k] += gv[k] * yv[k];
      store<VEC>(out + off + c * VEC, xv);
    }
  }
}

// ------------------------------------------------------------------------ backward
// LayerNorm part, with xhat = (x - mean) * rstd and gh = grad_out * (1 + scale):
//   grad_in = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))
//   grad_shift = sum over rows of grad_out,  grad_scale = sum over rows of grad_out * xhat
// Gated part, with tot = the gradient reaching x_new = x + gate * y:
//   grad_x = tot,  grad_y = gate * tot,  grad_gate = sum over rows of tot * y
// kResidualLayerNorm: tot = grad_x_new + grad_in;  kGatedResidual: tot = grad_out, and
// grad_x is grad_out itself: not written (a.grad_x is null).
template <typename T, int VEC, NormBwdMode MODE>
__global__ void __launch_bounds__(kMaxRowThreads) norm_bwd_kernel(NormBwdArgs a) {
  constexpr bool LN = MODE != NormBwdMode::kGatedResidual;
  constexpr bool GATED = MODE != NormBwdMode::kLayerNorm;
  constexpr int NC = kNormBwdCache;
  __shared__ float smem[2 * kWarp];
  T* __restrict__ grad_x = static_cast<T*>(a.grad_x);
  T* __restrict__ grad_y = static_cast<T*>(a.grad_y);
  const T* __restrict__ grad_out = static_cast<const T*>(a.grad_out);
  const T* __restrict__ grad_res = static_cast<const T*>(a.grad_res);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ y = static_cast<const T*>(a.y);
  const int64_t D = a.D;
  const int64_t chunks = D / VEC;
  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int groups_per_block = blockDim.x / tpr;
  const int64_t total_units = a.B * a.units;
  const float inv_d = 1.f / static_cast<float>(D);

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups_per_block; first < total_units;
       first += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t unit = first + group;
    const bool valid_unit = unit < total_units;
    const int64_t b = valid_unit ? unit / a.units : 0;
    const int64_t l0 = valid_unit ? (unit - b * a.units) * a.rows_per_unit : 0;
    const float* __restrict__ scale = LN ? a.scale + b * D : nullptr;
    const float* __restrict__ gate = GATED ? a.gate + b * D : nullptr;
    float* __restrict__ p_shift = LN ? a.part_shift + unit * D : nullptr;
    float* __restrict__ p_scale = LN ? a.part_scale + unit * D : nullptr;
    float* __restrict__ p_gate = GATED ? a.part_gate + unit * D : nullptr;

    float acc_shift[NC][VEC], acc_scale[NC][VEC], acc_gate[NC][VEC];
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      fill(acc_shift[i], 0.f);
      fill(acc_scale[i], 0.f);
      fill(acc_gate[i], 0.f);
    }

    // Uniform trip count for every thread (group_sum inside), rows past L are invalid.
    for (int64_t r = 0; r < a.rows_per_unit; ++r) {
      const int64_t l = l0 + r;
      const bool valid = valid_unit && l < a.L;
      const bool first_row = r == 0;  // the unit's partial rows are written, then added to
      const int64_t row = b * a.L + l;
      const int64_t off = valid ? row * D : 0;
      float mean = 0.f, rstd = 0.f;
      if (LN && valid) {
        mean = a.mean[row];
        rstd = a.rstd[row];
      }

      // Pass 1 (LayerNorm variants): gh, xhat, the two row sums, and the shift/scale sums.
      // Chunks past the register cache accumulate straight into the unit's partial row.
      float gh[NC][VEC], xh[NC][VEC];
      float sums[2] = {0.f, 0.f};
      auto ln_chunk = [&](int64_t c, float (&g)[VEC], float (&h)[VEC], float (&hx)[VEC]) {
        float sc[VEC];
        load<VEC>(g, grad_out + off + c * VEC);
        load<VEC>(hx, x + off + c * VEC);
        load<VEC>(sc, scale + c * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          hx[k] = (hx[k] - mean) * rstd;
          h[k] = g[k] * (1.f + sc[k]);
          sums[0] += h[k];
          sums[1] += h[k] * hx[k];
        }
      };
      if constexpr (LN) {
        // shift sums += g, scale sums += g * xhat
        auto add_ln = [&](float (&ps)[VEC], float (&pc)[VEC], const float (&g)[VEC], const float (&hx)[VEC]) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            ps[k] += g[k];
            pc[k] += g[k] * hx[k];
          }
        };
        for_each_chunk<NC>(
            lane, tpr, chunks, valid,
            [&](int i, int64_t c) {
              float g[VEC];
              ln_chunk(c, g, gh[i], xh[i]);
              add_ln(acc_shift[i], acc_scale[i], g, xh[i]);
            },
            [&](int64_t c) {
              float g[VEC], h[VEC], hx[VEC], ps[VEC], pc[VEC];
              ln_chunk(c, g, h, hx);
              if (first_row) {
                fill(ps, 0.f);
                fill(pc, 0.f);
              } else {
                load<VEC>(ps, p_shift + c * VEC);
                load<VEC>(pc, p_scale + c * VEC);
              }
              add_ln(ps, pc, g, hx);
              store<VEC>(p_shift + c * VEC, ps);
              store<VEC>(p_scale + c * VEC, pc);
            });
        group_sum(sums, tpr, smem);
      }
      const float mean_gh = sums[0] * inv_d;
      const float mean_ghx = sums[1] * inv_d;

      // Pass 2: input gradients, and the gate sums.
      auto out_chunk = [&](int64_t c, const float (&h)[VEC], const float (&hx)[VEC], float (&ag)[VEC]) {
        float tot[VEC];
        if constexpr (LN) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) tot[k] = rstd * (h[k] - mean_gh - hx[k] * mean_ghx);
        }
        if constexpr (MODE == NormBwdMode::kLayerNorm) {
          store<VEC>(grad_x + off + c * VEC, tot);
        } else {
          float gv[VEC], yv[VEC], gy[VEC];
          if constexpr (MODE == NormBwdMode::kResidualLayerNorm) {
            float gr[VEC];
            load<VEC>(gr, grad_res + off + c * VEC);
#pragma unroll
            for (int k = 0; k < VEC; ++k) tot[k] += gr[k];
          } else {
            load<VEC>(tot, grad_out + off + c * VEC);
          }
          load<VEC>(gv, gate + c * VEC);
          load<VEC>(yv, y + off + c * VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            gy[k] = gv[k] * tot[k];
            ag[k] += tot[k] * yv[k];
          }
          if constexpr (LN) store<VEC>(grad_x + off + c * VEC, tot);
          store<VEC>(grad_y + off + c * VEC, gy);
        }
      };
      for_each_chunk<NC>(
          lane, tpr, chunks, valid, [&](int i, int64_t c) { out_chunk(c, gh[i], xh[i], acc_gate[i]); },
          [&](int64_t c) {
            float h[VEC], hx[VEC], ag[VEC];
            if constexpr (LN) {
              float g[VEC];
              ln_chunk(c, g, h, hx);  // recompute gh and xhat (the row sums are final by now)
            }
            if constexpr (GATED) {
              if (first_row) {
                fill(ag, 0.f);
              } else {
                load<VEC>(ag, p_gate + c * VEC);
              }
            }
            out_chunk(c, h, hx, ag);
            if constexpr (GATED) store<VEC>(p_gate + c * VEC, ag);
          });
    }

    // The unit's partial rows for the cached columns.
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * tpr;
      if (valid_unit && c < chunks) {
        if constexpr (LN) {
          store<VEC>(p_shift + c * VEC, acc_shift[i]);
          store<VEC>(p_scale + c * VEC, acc_scale[i]);
        }
        if constexpr (GATED) store<VEC>(p_gate + c * VEC, acc_gate[i]);
      }
    }
  }
}

}  // namespace

template <typename T, int VEC, bool RESIDUAL>
cudaError_t layernorm_modulate_fwd(const NormFwdArgs& a, cudaStream_t stream) {
  const int tpr = row_threads(a.D / VEC, kNormFwdCache);
  const int threads = row_block(tpr);
  FASTMASK_LAUNCH(grid_for(a.B * a.L, threads / tpr), threads, stream, ln_modulate_fwd_kernel<T, VEC, RESIDUAL>)
  (a, tpr);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t gated_residual_fwd(T* out, const T* x, const T* y, const float* gate, int64_t B, int64_t L, int64_t D,
                               cudaStream_t stream) {
  const int64_t chunks = D / VEC;
  int tpr = chunks < 256 ? static_cast<int>(chunks) : 256;
  if (tpr < 1) tpr = 1;
  const int rpb = 256 / tpr;
  FASTMASK_LAUNCH(grid_for(B * L, rpb), tpr * rpb, stream, gated_residual_fwd_kernel<T, VEC>)
  (out, x, y, gate, B * L, L, D, tpr, rpb);
  return cudaGetLastError();
}

template <typename T, int VEC, NormBwdMode MODE>
cudaError_t norm_bwd(const NormBwdArgs& a, cudaStream_t stream) {
  const int threads = row_block(a.tpr);
  FASTMASK_LAUNCH(grid_for(a.B * a.units, threads / a.tpr), threads, stream, norm_bwd_kernel<T, VEC, MODE>)(a);
  return cudaGetLastError();
}

#define FASTMASK_NORM(T, VEC)                                                                                   \
  template cudaError_t layernorm_modulate_fwd<T, VEC, false>(const NormFwdArgs&, cudaStream_t);                \
  template cudaError_t layernorm_modulate_fwd<T, VEC, true>(const NormFwdArgs&, cudaStream_t);                 \
  template cudaError_t gated_residual_fwd<T, VEC>(T*, const T*, const T*, const float*, int64_t, int64_t,       \
                                                  int64_t, cudaStream_t);                                       \
  template cudaError_t norm_bwd<T, VEC, NormBwdMode::kLayerNorm>(const NormBwdArgs&, cudaStream_t);             \
  template cudaError_t norm_bwd<T, VEC, NormBwdMode::kResidualLayerNorm>(const NormBwdArgs&, cudaStream_t);     \
  template cudaError_t norm_bwd<T, VEC, NormBwdMode::kGatedResidual>(const NormBwdArgs&, cudaStream_t);

FASTMASK_NORM(float, 4)
FASTMASK_NORM(float, 1)
FASTMASK_NORM(__half, 8)
FASTMASK_NORM(__half, 1)
FASTMASK_NORM(__nv_bfloat16, 8)
FASTMASK_NORM(__nv_bfloat16, 1)

}  // namespace fastmask

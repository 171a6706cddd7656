"""Fused MaskDiT objective: DSM on kept tokens + MAE on dropped tokens, and dLoss/dF, one pass.

Per sample b (the MaskDiT objective; c_skip, c_out, lambda from sigma inside the kernel):
    D      = c_skip * x_noisy + c_out * F
    e_t    = lambda * mean_p (D - y)^2                    dsm = sum_t kept_t e_t / n_kept
    target = (xn_t - mean xn_t) / sqrt(var_unbiased + 1e-6)
    m_t    = mean_p (D - target)^2                        mae = sum_t drop_t m_t / n_drop
    dL/dF  = c_out * 2/P * (kept_t/n_kept * lambda (D - y) + mae_coef * drop_t/n_drop (D - target))

With FLOW (SiT's velocity objective, fastmask.models.flow): c_skip = 0, c_out = 1, lambda = 1,
so D = F is the velocity, y the target x1 - x0 and x_noisy the interpolant x_t; sigma is not read.

Token rows are short (P = p*p*C, 16 for SD latents at p = 2), so a program takes a 2-D tile
of BLOCK_T tokens x BLOCK_P values of one sample (~4K elements) instead of one row. The
counts n_kept/n_drop come from the sample's mask row (N floats, read by each program of the
sample: far less than the tile), so the gradient is written in the same pass as the loss and
the op's backward is a per-sample scale. Each program writes its (dsm, mae) partial; a second
tiny kernel adds them per sample in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import MAE_EPS
from ._utils import cdiv, interpreting, launch, placeholder

# the launchers of the backend protocol (fastmask.ops.registry); fastmask.kernels re-exports them
__all__ = ["dsm_mae_loss_fwd"]


@triton.jit
def _dsm_mae_fwd_kernel(
    F, XN, Y, SIGMA, MASK, GRAD, PART, N, P, CHUNKS, mae_coef, sigma_data, mae_eps,
    HAS_MASK: tl.constexpr, FLOW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // CHUNKS).to(tl.int64)
    t = (pid % CHUNKS) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    p = tl.arange(0, BLOCK_P)
    m = t_ok[:, None] & (p < P)[None, :]
    offs = (b * N + t)[:, None] * P + p[None, :]  # int64: B*N*P can pass 2^31

    # Scalar args may arrive as fp64 (Inductor): pin everything to fp32.
    sd = tl.full([], sigma_data, tl.float32)
    coef = tl.full([], mae_coef, tl.float32)
    if FLOW:
        c_skip = tl.full([], 0.0, tl.float32)
        c_out = tl.full([], 1.0, tl.float32)
        lam = tl.full([], 1.0, tl.float32)
    else:
        s = tl.load(SIGMA + b).to(tl.float32)
        s2 = s * s
        d2 = sd * sd
        c_skip = d2 / (s2 + d2)
        c_out = s * sd / tl.sqrt(s2 + d2)
        lam = (s2 + d2) / ((s * sd) * (s * sd))
    # ints go through tl.full: a size of 1 arrives as a constexpr (and a Python int when interpreting)
    inv_p = 1.0 / tl.full([], P, tl.float32)

    f = tl.load(F + offs, mask=m, other=0.0).to(tl.float32)
    xn = tl.load(XN + offs, mask=m, other=0.0).to(tl.float32)
    yy = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
    d = c_skip * xn + c_out * f
    diff = d - yy  # 0 in masked lanes (all three loads are 0 there)
    e = lam * tl.sum(diff * diff, axis=1) * inv_p  # [BLOCK_T]

    if HAS_MASK:
        cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            cnt += tl.load(MASK + b * N + n, mask=n < N, other=0.0)
        n_drop = tl.sum(cnt, axis=0)
        w_drop_all = 1.0 / tl.maximum(n_drop, 1.0)
        w_kept_all = 1.0 / tl.maximum(tl.full([], N, tl.float32) - n_drop, 1.0)  # clamp: a sample may drop all or none
        drop = tl.load(MASK + b * N + t, mask=t_ok, other=0.0)
        w_kept = tl.where(t_ok, 1.0 - drop, 0.0) * w_kept_all
        w_drop = drop * w_drop_all

        mean = tl.sum(xn, axis=1) * inv_p
        xc = tl.where(m, xn - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / tl.full([], P - 1, tl.float32)  # unbiased, as the reference
        target = xc / tl.sqrt(var + tl.full([], mae_eps, tl.float32))[:, None]
        dm = tl.where(m, d - target, 0.0)
        mt = tl.sum(dm * dm, axis=1) * inv_p

        dsm_part = tl.sum(w_kept * e, axis=0)
        mae_part = tl.sum(w_drop * mt, axis=0)
        grad = (2.0 * c_out * inv_p) * (
            (w_kept * lam)[:, None] * diff + (coef * w_drop)[:, None] * dm
        )
    else:
        w = 1.0 / tl.full([], N, tl.float32)
        dsm_part = tl.sum(tl.where(t_ok, e, 0.0), axis=0) * w
        mae_part = 0.0
        grad = (2.0 * c_out * inv_p * lam * w) * diff
    tl.store(GRAD + offs, grad.to(GRAD.dtype.element_ty), mask=m)
    tl.store(PART + pid.to(tl.int64) * 2, dsm_part)
    tl.store(PART + pid.to(tl.int64) * 2 + 1, mae_part)


@triton.jit
def _dsm_mae_finish_kernel(PART, LOSS, TERMS, CHUNKS, mae_coef):
    b = tl.program_id(0).to(tl.int64)
    dsm = 0.0
    mae = 0.0
    for c in range(0, CHUNKS):
        dsm += tl.load(PART + (b * CHUNKS + c) * 2)
        mae += tl.load(PART + (b * CHUNKS + c) * 2 + 1)
    tl.store(TERMS + b * 2, dsm)
    tl.store(TERMS + b * 2 + 1, mae)
    tl.store(LOSS + b, dsm + tl.full([], mae_coef, tl.float32) * mae)


def _tile(P: int) -> tuple[int, int, int]:
    BLOCK_P = triton.next_power_of_2(max(P, 1))
    # Interpreting: at most 32 tokens a tile, so the CPU tests' N = 59 spans several programs.
    BLOCK_T = max(1, min(32 if interpreting() else 128, 4096 // BLOCK_P))
    num_warps = 4 if interpreting() else max(2, min(8, (BLOCK_T * BLOCK_P) // 512))
    return BLOCK_T, BLOCK_P, num_warps


def dsm_mae_loss_fwd(F_out, x_noisy, y, sigma, mask, mae_coef: float, sigma_data: float, objective: str = "edm"):
    B, N, P = F_out.shape
    dev = F_out.device
    loss = torch.empty(B, device=dev, dtype=torch.float32)
    terms = torch.empty((B, 2), device=dev, dtype=torch.float32)
    grad = torch.empty_like(F_out)
    if B == 0:
        return loss, terms, grad
    BLOCK_T, BLOCK_P, num_warps = _tile(P)
    chunks = max(1, cdiv(N, BLOCK_T))
    part = torch.empty((B * chunks, 2), device=dev, dtype=torch.float32)
    BLOCK_N = min(1024, triton.next_power_of_2(max(N, 1)))
    launch(_dsm_mae_fwd_kernel)[(B * chunks,)](
        F_out, x_noisy, y, sigma, placeholder(F_out) if mask is None else mask, grad, part,
        N, P, chunks, float(mae_coef), float(sigma_data), MAE_EPS,
        HAS_MASK=mask is not None, FLOW=objective == "flow", BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )
    launch(_dsm_mae_finish_kernel)[(B,)](part, loss, terms, chunks, float(mae_coef), num_warps=1)
    return loss, terms, grad

"""adaLN kernels: LayerNorm + modulate, gated residual, and the fused residual + LN + modulate.

One forward kernel and one backward kernel serve the three ops (constexpr switches
HAS_LN / HAS_RES), so the fused op and its parts share every line of math.

Forward: a tile of BLOCK_R flat rows (b, l) per program, a whole row per tile so the
LayerNorm statistics come from one read; math in fp32; mean and rstd are saved in fp32 for
the backward. The residual is rounded to x's dtype before the LayerNorm reads it, as the
reference does (the next block sees the rounded stream, so the norm must too).

Backward: each program owns a chunk of rows of ONE sample b (a sample's rows are
contiguous in [B, L, D]), so the per-sample parameter gradients (shift, scale, gate)
accumulate in an fp32 register tile and leave the program as one [D] partial row; the
partials [B, chunks, D] are then summed in a fixed order. Deterministic, no atomics.

Launch plan (measured: benchmarks/tune_norm.py on an H200, bf16, MaskDiT-XL/2 shapes;
numbers in benchmarks/results/tune_norm_h200_20261204.md): tiles of 2048 elements (a whole
row of D = 1152, four rows of D = 512) with 16 elements per thread, and in the backward about
four programs per SM: a sample's rows split into round(4 * SMs / B) chunks (16 rows at
B=64, L=128). The extra fp32 partial traffic (8-17% of the op's bytes) buys the parallelism:
the LayerNorm backwards ran 1.6-2.3x faster than with 3 chunks of 16-warp programs (the plan
that kept the partials within 6% of the bytes), the gated residual's 1.15-2.2x; the forward
up to 19% faster than with 8 elements per thread (one case 5% slower: the decoder's residual
LayerNorm).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cdiv, interpreting, launch, placeholder, row_config, sum_partials, target_programs

# the launchers of the backend protocol (fastmask.ops.registry); fastmask.kernels re-exports them
__all__ = [
    "layernorm_modulate_fwd",
    "layernorm_modulate_bwd",
    "gated_residual_fwd",
    "gated_residual_bwd",
    "residual_layernorm_modulate_fwd",
    "residual_layernorm_modulate_bwd",
    "rmsnorm_modulate_fwd",
    "rmsnorm_modulate_bwd",
    "residual_rmsnorm_modulate_fwd",
    "residual_rmsnorm_modulate_bwd",
]


@triton.jit
def _norm_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, XNEW, OUT, MEAN, RSTD, n_rows, L, D, eps,
    HAS_RES: tl.constexpr, HAS_LN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    W=None, RMS: tl.constexpr = False, HAS_W: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # row * D overflows int32 at real sizes
    b = rows // L
    cols = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    vec = b[:, None] * D + cols[None, :]  # a tile may straddle two samples: index per row
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(GATE + vec, mask=m, other=0.0).to(tl.float32)
        x_new = (x + gate * y).to(XNEW.dtype.element_ty)
        tl.store(XNEW + offs, x_new, mask=m)
        x = x_new.to(tl.float32)
    if HAS_LN:
        if RMS:  # RMSNorm: no centring, rstd = rsqrt(mean(x^2) + eps)
            xc = x
        else:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(m, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + tl.full([], eps, tl.float32))  # eps may arrive as fp64
        shift = tl.load(SHIFT + vec, mask=m, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + vec, mask=m, other=0.0).to(tl.float32)
        xhat = xc * rstd[:, None]
        if HAS_W:
            xhat = xhat * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        out = xhat * (1.0 + scale) + shift
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=m)
        if not RMS:
            tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(
    GXN, GOUT, X, Y, GATE, SCALE, MEAN, RSTD, GX, GY, P_GATE, P_SHIFT, P_SCALE,
    L, D, CHUNKS, ROWS_PER_PROG,
    HAS_RES: tl.constexpr, HAS_LN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    W=None, RMS: tl.constexpr = False, HAS_W: tl.constexpr = False,
):
    pid = tl.program_id(0)
    b = (pid // CHUNKS).to(tl.int64)
    l_start = (pid % CHUNKS) * ROWS_PER_PROG
    l_end = tl.minimum(l_start + ROWS_PER_PROG, L)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_LN:
        scale1 = 1.0 + tl.load(SCALE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(GATE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for l0 in range(l_start, l_end, BLOCK_R):
        l = l0 + tl.arange(0, BLOCK_R)
        row_ok = l < l_end
        rows = b * L + l
        m = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        if HAS_LN:
            g = tl.load(GOUT + offs, mask=m, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
                xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
            acc_shift += g
            dxhat = g * scale1[None, :]
            # with a weight, both the scale's and the weight's gradients are column sums of
            # g * xhat times a per-column constant of this sample (w, 1 + scale): one accumulator
            acc_scale += g * xhat
            if HAS_W:
                dxhat = dxhat * w[None, :]
            c1 = tl.sum(dxhat * xhat, axis=1) / D
            if RMS:
                total = (dxhat - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(dxhat, axis=1) / D
                total = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_RES:
                total += tl.load(GXN + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(GX + offs, total.to(GX.dtype.element_ty), mask=m)
        else:
            # gated residual alone: grad_x is grad_x_new itself, returned as is (not copied)
            total = tl.load(GXN + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(GY + offs, (gate[None, :] * total).to(GY.dtype.element_ty), mask=m)
            acc_gate += tl.where(m, total * y, 0.0)
    part = pid.to(tl.int64) * D + cols
    if HAS_LN:
        tl.store(P_SHIFT + part, tl.sum(acc_shift, axis=0), mask=col_ok)
        # with a weight, sum(g * xhat) also makes the weight's gradient (see _bwd): one partial
        tl.store(P_SCALE + part, tl.sum(acc_scale, axis=0), mask=col_ok)
    if HAS_RES:
        tl.store(P_GATE + part, tl.sum(acc_gate, axis=0), mask=col_ok)


# ------------------------------------------------------------------------------ launchers
def _fwd(x, y, gate, shift, scale, eps, has_res: bool, has_ln: bool, rms: bool = False, weight=None,
         config: tuple[int, int] | None = None):
    """``config``: (BLOCK_R, num_warps) instead of the rule's (benchmarks/tune_norm.py sweeps it)."""
    B, L, D = x.shape
    n_rows = B * L
    dev = x.device
    x_new = torch.empty_like(x) if has_res else x
    out = torch.empty_like(x) if has_ln else x
    mean = torch.empty(n_rows, device=dev, dtype=torch.float32) if has_ln and not rms else None
    rstd = torch.empty(n_rows, device=dev, dtype=torch.float32) if has_ln else None
    if x.numel() == 0:
        return x_new, out, mean, rstd
    BLOCK_R, BLOCK_D, num_warps = _tile(D)
    if config is not None:
        BLOCK_R, num_warps = config
    dummy = placeholder(x)  # stands in for pointers a constexpr switch leaves unused
    launch(_norm_fwd_kernel)[(cdiv(n_rows, BLOCK_R),)](
        x, dummy if y is None else y, dummy if gate is None else gate,
        dummy if shift is None else shift, dummy if scale is None else scale,
        x_new if has_res else dummy, out if has_ln else dummy,
        dummy if mean is None else mean, dummy if rstd is None else rstd,
        n_rows, L, D, float(eps),
        HAS_RES=has_res, HAS_LN=has_ln, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
        **_rms_args(rms, weight, dummy),
    )
    return x_new, out, mean, rstd


def _rms_args(rms: bool, weight, dummy) -> dict:
    """The RMSNorm switches and the weight's pointer, passed on every launch (also for
    LayerNorm, as their defaults): torch.compile's wrap_triton wants every kernel argument given."""
    return dict(RMS=rms, HAS_W=weight is not None, W=dummy if weight is None else weight)


# elements per thread of a norm tile (bf16: two 16-byte vectors per tensor), fwd and bwd
ELEMS_PER_THREAD = 16


def _tile(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) of the norm kernels: the shared row tile (2048 elements,
    a whole row), with warps for ELEMS_PER_THREAD elements per thread."""
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    if not interpreting():
        num_warps = max(2, min(16, BLOCK_R * BLOCK_D // (32 * ELEMS_PER_THREAD)))
    return BLOCK_R, BLOCK_D, num_warps


def _row_chunks(B: int, L: int, BLOCK_R: int, ref: torch.Tensor):
    """(chunks per sample, rows per program) for the backward's per-sample partials: about
    four programs per SM in all (half the split-reduction target), whatever B and L are."""
    tiles = max(1, cdiv(L, BLOCK_R))
    if interpreting():
        # Two row tiles per program: the CPU tests then cover both the in-program loop and
        # several partials per sample.
        rows = 2 * BLOCK_R
    else:
        chunks = max(1, min(tiles, round(target_programs(ref) / 2 / B)))
        rows = cdiv(cdiv(L, chunks), BLOCK_R) * BLOCK_R
    return max(1, cdiv(L, rows)), rows


def _bwd(grad_x_new, grad_out, x, y, gate, scale, mean, rstd, has_res: bool, has_ln: bool, rms: bool = False,
         weight=None, config: tuple[int, int, int] | None = None):
    """``config``: (BLOCK_R, num_warps, rows per program) instead of the rule's
    (benchmarks/tune_norm.py sweeps it)."""
    ref = grad_out if has_ln else grad_x_new
    B, L, D = ref.shape
    dev = ref.device
    BLOCK_R, BLOCK_D, num_warps = _tile(D)
    chunks, rows_per_prog = _row_chunks(B, L, BLOCK_R, ref)
    if config is not None:
        BLOCK_R, num_warps, rows_per_prog = config
        chunks = cdiv(L, rows_per_prog)
    n_prog = B * chunks
    # Without the LayerNorm, x_new = x + gate * y passes its gradient to x unchanged.
    grad_x = torch.empty_like(x) if has_ln else grad_x_new
    grad_y = torch.empty_like(y) if has_res else None
    p_gate = torch.empty((n_prog, D), device=dev, dtype=torch.float32) if has_res else None
    p_shift = torch.empty((n_prog, D), device=dev, dtype=torch.float32) if has_ln else None
    p_scale = torch.empty((n_prog, D), device=dev, dtype=torch.float32) if has_ln else None
    dummy = placeholder(ref)
    if n_prog > 0 and D > 0:
        launch(_norm_bwd_kernel)[(n_prog,)](
            dummy if grad_x_new is None else grad_x_new, dummy if grad_out is None else grad_out,
            dummy if x is None else x, dummy if y is None else y, dummy if gate is None else gate,
            dummy if scale is None else scale, dummy if mean is None else mean, dummy if rstd is None else rstd,
            grad_x if has_ln else dummy, dummy if grad_y is None else grad_y,
            dummy if p_gate is None else p_gate, dummy if p_shift is None else p_shift,
            dummy if p_scale is None else p_scale,
            L, D, chunks, rows_per_prog,
            HAS_RES=has_res, HAS_LN=has_ln, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
            **_rms_args(rms, weight, dummy),
        )

    def reduce(p, dtype):
        return sum_partials(p.view(B, chunks, D), dtype)

    g_gate = reduce(p_gate, gate.dtype) if has_res else None
    g_shift = reduce(p_shift, scale.dtype) if has_ln else None
    g_scale = reduce(p_scale, scale.dtype if weight is None else torch.float32) if has_ln else None
    if rms:
        g_w = None
        if weight is not None:
            # out = xhat * w * (1 + scale[b]) + shift[b]; with S[b] = sum over the sample's rows of
            # g * xhat (fp32): grad scale[b] = S[b] * w, grad w = sum_b S[b] * (1 + scale[b])
            g_w = (g_scale * (1.0 + scale.float())).sum(0)
            g_scale = (g_scale * weight.float()).to(scale.dtype)
        return grad_x, grad_y, g_gate, g_shift, g_scale, g_w
    return grad_x, grad_y, g_gate, g_shift, g_scale


# ------------------------------------------------------------------ public launchers
def layernorm_modulate_fwd(x, shift, scale, eps: float):
    _, out, mean, rstd = _fwd(x, None, None, shift, scale, eps, has_res=False, has_ln=True)
    return out, mean, rstd


def layernorm_modulate_bwd(grad_out, x, scale, mean, rstd):
    gx, _, _, gshift, gscale = _bwd(None, grad_out, x, None, None, scale, mean, rstd, has_res=False, has_ln=True)
    return gx, gshift, gscale


def gated_residual_fwd(x, y, gate):
    x_new, _, _, _ = _fwd(x, y, gate, None, None, 0.0, has_res=True, has_ln=False)
    return x_new


def gated_residual_bwd(grad_out, y, gate):
    """(grad_x, grad_y, grad_gate); grad_x IS grad_out (the exact gradient of x + gate * y
    with respect to x), returned without a copy."""
    gx, gy, ggate, _, _ = _bwd(grad_out, None, None, y, gate, None, None, None, has_res=True, has_ln=False)
    return gx, gy, ggate


def residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps: float):
    return _fwd(x, y, gate, shift, scale, eps, has_res=True, has_ln=True)


def residual_layernorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, mean, rstd):
    return _bwd(grad_x_new, grad_out, x_new, y, gate, scale, mean, rstd, has_res=True, has_ln=True)


# RMSNorm variants (LightningDiT's norm1 / norm2 / norm_final: RMSNorm with a learned weight
# [D], eps 1e-6): the same kernels with RMS (and HAS_W) set; one rstd per row, no mean. The
# weight's gradient comes back in fp32 (per-program partials summed in a fixed order), or
# empty when there is no weight.
def _w_grad(g_w, x):
    return x.new_empty(0, dtype=torch.float32) if g_w is None else g_w


def rmsnorm_modulate_fwd(x, shift, scale, weight, eps: float):
    _, out, _, rstd = _fwd(x, None, None, shift, scale, eps, has_res=False, has_ln=True, rms=True, weight=weight)
    return out, rstd


def rmsnorm_modulate_bwd(grad_out, x, scale, weight, rstd):
    gx, _, _, gshift, gscale, gw = _bwd(None, grad_out, x, None, None, scale, None, rstd, has_res=False, has_ln=True,
                                        rms=True, weight=weight)
    return gx, gshift, gscale, _w_grad(gw, x)


def residual_rmsnorm_modulate_fwd(x, y, gate, shift, scale, weight, eps: float):
    x_new, out, _, rstd = _fwd(x, y, gate, shift, scale, eps, has_res=True, has_ln=True, rms=True, weight=weight)
    return x_new, out, rstd


def residual_rmsnorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, weight, rstd):
    gx, gy, ggate, gshift, gscale, gw = _bwd(grad_x_new, grad_out, x_new, y, gate, scale, None, rstd, has_res=True,
                                             has_ln=True, rms=True, weight=weight)
    return gx, gy, ggate, gshift, gscale, _w_grad(gw, x_new)

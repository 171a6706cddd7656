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
partials [B, chunks, D] are then summed in a fixed order. Deterministic, no atomics, and
the partial buffer is small next to the activations (chunks ~ 8 * SMs / B).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import budget_chunks, cdiv, interpreting, row_config, sum_partials, target_programs

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
    W=None, P_W=None, RMS: tl.constexpr = False, HAS_W: tl.constexpr = False,
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
        if HAS_W:
            gx_sum = tl.sum(acc_scale, axis=0)
            tl.store(P_SCALE + part, gx_sum * w, mask=col_ok)
            tl.store(P_W + part, gx_sum * scale1, mask=col_ok)
        else:
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
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    if config is not None:
        BLOCK_R, num_warps = config
    dummy = x  # stands in for pointers a constexpr switch leaves unused
    _norm_fwd_kernel[(cdiv(n_rows, BLOCK_R),)](
        x, dummy if y is None else y, dummy if gate is None else gate,
        dummy if shift is None else shift, dummy if scale is None else scale,
        x_new, out, dummy if mean is None else mean, dummy if rstd is None else rstd,
        n_rows, L, D, float(eps),
        HAS_RES=has_res, HAS_LN=has_ln, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
        **_rms_args(rms, weight, dummy),
    )
    return x_new, out, mean, rstd


def _rms_args(rms: bool, weight, dummy, p_w=None, bwd: bool = False) -> dict:
    """The RMSNorm switches; empty for LayerNorm, so those launches stay as they were."""
    if not rms:
        return {}
    args = dict(RMS=True, HAS_W=weight is not None, W=dummy if weight is None else weight)
    if bwd:
        args["P_W"] = dummy if p_w is None else p_w
    return args


def _row_chunks(B: int, L: int, BLOCK_R: int, ref: torch.Tensor, row_bytes: int = 0, part_bytes: int = 0):
    """(chunks per sample, rows per program) for the backward's per-sample partials: enough
    programs to fill the device, but few enough chunks that the partials (``part_bytes`` per
    chunk, written and read back) stay within the byte budget of the op's own traffic
    (``row_bytes`` per row) -- at short sequences (128 tokens) that budget, not the device, decides."""
    tiles = max(1, cdiv(L, BLOCK_R))
    if interpreting():
        # Two row tiles per program: the CPU tests then cover both the in-program loop and
        # several partials per sample.
        rows = 2 * BLOCK_R
    else:
        chunks = max(1, min(tiles, cdiv(target_programs(ref), B)))
        if part_bytes:
            chunks = budget_chunks(chunks, part_bytes, L * row_bytes)
        rows = cdiv(cdiv(L, chunks), BLOCK_R) * BLOCK_R
    return max(1, cdiv(L, rows)), rows


def _bwd_tile(BLOCK_R: int, BLOCK_D: int, num_warps: int) -> tuple[int, int]:
    """The backward's row tile: twice the forward's elements (up to 4096; 16 warps), so that the
    fewer programs the partial-byte budget allows still keep enough loads in flight."""
    while BLOCK_R * BLOCK_D < 4096 and BLOCK_R < 32:
        BLOCK_R *= 2
    return BLOCK_R, max(num_warps, min(16, BLOCK_R * BLOCK_D // 256))


def _bwd(grad_x_new, grad_out, x, y, gate, scale, mean, rstd, has_res: bool, has_ln: bool, rms: bool = False,
         weight=None, config: tuple[int, int, int] | None = None):
    """``config``: (BLOCK_R, num_warps, rows per program) instead of the rule's
    (benchmarks/tune_norm.py sweeps it)."""
    ref = grad_out if has_ln else grad_x_new
    B, L, D = ref.shape
    dev = ref.device
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    # (not with four fp32 partial tiles, the residual RMSNorm with a weight: at the larger tile
    # ptxas spilled on sm_80 in fp32; benchmarks/static_check.py)
    if not interpreting() and not (has_res and weight is not None):
        BLOCK_R, num_warps = _bwd_tile(BLOCK_R, BLOCK_D, num_warps)
    # per row: the [L, D] tensors the backward reads and writes; per chunk: its fp32 partial rows
    row_bytes = D * ref.element_size() * (6 if has_res and has_ln else 3)
    part_bytes = D * 4 * (2 * has_ln + has_res + (weight is not None))
    chunks, rows_per_prog = _row_chunks(B, L, BLOCK_R, ref, row_bytes, part_bytes)
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
    p_w = torch.empty((n_prog, D), device=dev, dtype=torch.float32) if weight is not None else None
    dummy = ref
    if n_prog > 0 and D > 0:
        _norm_bwd_kernel[(n_prog,)](
            dummy if grad_x_new is None else grad_x_new, dummy if grad_out is None else grad_out,
            dummy if x is None else x, dummy if y is None else y, dummy if gate is None else gate,
            dummy if scale is None else scale, dummy if mean is None else mean, dummy if rstd is None else rstd,
            grad_x, dummy if grad_y is None else grad_y,
            dummy if p_gate is None else p_gate, dummy if p_shift is None else p_shift,
            dummy if p_scale is None else p_scale,
            L, D, chunks, rows_per_prog,
            HAS_RES=has_res, HAS_LN=has_ln, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
            **_rms_args(rms, weight, dummy, p_w, bwd=True),
        )

    def reduce(p, dtype):
        return sum_partials(p.view(B, chunks, D), dtype)

    g_gate = reduce(p_gate, gate.dtype) if has_res else None
    g_shift = reduce(p_shift, scale.dtype) if has_ln else None
    g_scale = reduce(p_scale, scale.dtype) if has_ln else None
    if rms:
        g_w = sum_partials(p_w.view(1, n_prog, D), torch.float32)[0] if weight is not None else None
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

"""PyTorch reference implementations: the "equivalent PyTorch code" of every fastmask op.

These functions are the semantics of the library. They are the CPU path, the oracle that
every Triton and CUDA kernel is tested against, and (through torch autograd) the backward
of the ``torch`` backend. They are plain differentiable PyTorch so that ``torch.compile``
can fuse them when a user compiles a model on the reference backend.

Shapes (B batch, N all tokens, K kept tokens, D width, P = p*p*C values per token):
    x [B, N, D], ids_keep [B, K] int64, pos [N, D], mask [B, N] (1 = dropped).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..constants import LN_EPS, MAE_EPS, QK_NORM_EPS, RMS_EPS  # noqa: F401  (re-exported: fastmask.ops.reference.LN_EPS)


def add_pos(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x + pos`` in x's dtype, rounded once: the sum is taken in fp32 (pos is usually the fp32
    position table, x bf16 or fp16 under autocast) and rounded to x's dtype, as every backend does.
    (Rounding pos to x's dtype first, then the sum, would round twice: 1 ulp off in places.)"""
    if pos.dtype == x.dtype:
        return x + pos
    return (x.float() + pos.float()).to(x.dtype)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """x_vis[b, k] = x[b, ids_keep[b, k]] (+ pos[ids_keep[b, k]], see :func:`add_pos`)."""
    B, N, D = x.shape
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, D)
    out = torch.gather(x, 1, idx)
    if pos is not None:
        out = add_pos(out, pos.reshape(N, D)[ids_keep])
    return out


def unmask_tokens(
    x_vis: torch.Tensor,
    ids_keep: torch.Tensor,
    mask_token: torch.Tensor,
    num_tokens: int,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[b, n] = x_vis[b, j] where ids_keep[b, j] = n, else mask_token (in x_vis's dtype); plus
    pos[n] (see :func:`add_pos`)."""
    B, K, D = x_vis.shape
    out = mask_token.reshape(1, 1, D).to(x_vis.dtype).expand(B, num_tokens, D)
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, D)
    out = out.scatter(1, idx, x_vis)
    if pos is not None:
        out = add_pos(out, pos.reshape(1, num_tokens, D))
    return out


def scatter_tokens(
    x_kept: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor | None = None, num_tokens: int | None = None
) -> torch.Tensor:
    """out = fill (in x_kept's dtype) with out[b, ids_keep[b, k]] = x_kept[b, k]: the kept rows put
    back into a saved stream [B, N, D] (TREAD's route end). ``fill=None``: zeros [B, num_tokens, D]
    (MicroDiT's output-space fill). Out of place: ``fill`` is not changed."""
    B, K, D = x_kept.shape
    base = x_kept.new_zeros(B, num_tokens, D) if fill is None else fill.to(x_kept.dtype)
    return base.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), x_kept)


def attention(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal multi-head attention from the fused projection layout.

    qkv [B, L, 3, H, hd] -> out [B, L, H * hd]; softmax(q k^T * scale) v per head.
    """
    B, L, _, H, hd = qkv.shape
    if scale is None:
        scale = 1.0 / math.sqrt(hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, L, H * hd)


def attention_math(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The same as :func:`attention`, written out with an explicit softmax (test oracle)."""
    B, L, _, H, hd = qkv.shape
    if scale is None:
        scale = 1.0 / math.sqrt(hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, L, H * hd)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Each interleaved pair (x[2i], x[2i+1]) of the last dim -> (-x[2i+1], x[2i])."""
    x2 = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack((-x2[..., 1], x2[..., 0]), dim=-1).reshape(x.shape)


def attention_rope(
    qkv: torch.Tensor,
    scale: float | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = QK_NORM_EPS,
) -> torch.Tensor:
    """:func:`attention` after per-head RMSNorm and rotary embedding of q and k.

    qk-norm (q_weight, k_weight [hd], shared by the heads): x * rsqrt(mean(x^2) + eps) * w.
    RoPE (cos, sin [P, hd]): x * cos[p] + rotate_pairs(x) * sin[p], where p is the token's
    row l, or ids_keep[b, l] when ids_keep [B, L] is given (tokens dropped, positions kept).
    Norm first, then rotation, in fp32; the result is rounded to qkv's dtype.
    """
    B, L, _, H, hd = qkv.shape
    if scale is None:
        scale = 1.0 / math.sqrt(hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
    if cos is not None:
        c, s = (_acc(cos[ids_keep])[:, None], _acc(sin[ids_keep])[:, None]) if ids_keep is not None else (
            _acc(cos[:L]), _acc(sin[:L]))

    def prologue(x, w):
        y = _acc(x)
        if w is not None:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * _acc(w)
        if cos is not None:
            y = y * c + rotate_pairs(y) * s
        return y.to(x.dtype)

    out = F.scaled_dot_product_attention(prologue(q, q_weight), prologue(k, k_weight), v, scale=scale)
    return out.transpose(1, 2).reshape(B, L, H * hd)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm without affine parameters, statistics in fp32, result in x's dtype."""
    return F.layer_norm(_acc(x), (x.shape[-1],), eps=eps).to(x.dtype)


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = LN_EPS
) -> torch.Tensor:
    """LN(x) * (1 + scale[b]) + shift[b]; x [B, L, D], shift/scale [B, D]."""
    out = _modulate(F.layer_norm(_acc(x), (x.shape[-1],), eps=eps), _acc(shift), _acc(scale))
    return out.to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate[b] * y; x, y [B, L, D], gate [B, D]."""
    return (_acc(x) + _acc(gate).unsqueeze(1) * _acc(y)).to(x.dtype)


def residual_layernorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = LN_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate[b] * y; out = LN(x_new) * (1 + scale[b]) + shift[b]. Returns (x_new, out)."""
    x_new = gated_residual(x, y, gate)
    return x_new, layernorm_modulate(x_new, shift, scale, eps)


def rmsnorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None = None,
    eps: float = RMS_EPS,
) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight * (1 + scale[b]) + shift[b] (weight [D] optional);
    x [B, L, D], shift/scale [B, D]. Statistics and math in fp32, one rounding to x's dtype."""
    h = _acc(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = h * _acc(weight)
    return _modulate(h, _acc(shift), _acc(scale)).to(x.dtype)


def residual_rmsnorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = RMS_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate[b] * y; out = rmsnorm_modulate(x_new, ...). Returns (x_new, out)."""
    x_new = gated_residual(x, y, gate)
    return x_new, rmsnorm_modulate(x_new, shift, scale, weight, eps)


def swiglu(ab: torch.Tensor) -> torch.Tensor:
    """silu(a) * b with a, b the two halves of the last dim of ab [..., 2F] (a first) -> [..., F];
    fp32 math, rounded to ab's dtype."""
    a, b = _acc(ab).chunk(2, dim=-1)
    return (F.silu(a) * b).to(ab.dtype)


def dsm_mae_loss_terms(
    F_out: torch.Tensor,
    x_noisy: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigma_data: float = 0.5,
    objective: str = "edm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample DSM and MAE terms of the MaskDiT objective, in token space.

    F_out, x_noisy, y: [B, N, P] (P = p*p*C in (p_row, p_col, channel) order);
    sigma [B]; mask [B, N] with 1 at dropped tokens (None: nothing dropped).
    ``objective="edm"``: D = c_skip * x_noisy + c_out * F_out, weighted by lambda(sigma).
    ``objective="flow"``: D = F_out (the velocity), y the velocity target x1 - x0, x_noisy
    the interpolant x_t, weight 1, sigma unread (c_skip = 0, c_out = 1, lambda = 1).
    Returns (dsm [B], mae [B]) in fp32.
    """
    Fo, xn, yy, s = _acc(F_out), _acc(x_noisy), _acc(y), _acc(sigma)
    if objective == "flow":
        D = Fo
        weight = torch.ones_like(s)
    else:
        # the loss's EDM coefficients, written out as in the fused kernels (the preconditioner's
        # c_in and c_noise are model code: fastmask.models.edm.edm_coefficients)
        s2, d2 = s * s, sigma_data * sigma_data
        c_skip, c_out = d2 / (s2 + d2), s * sigma_data / torch.sqrt(s2 + d2)
        weight = (s2 + d2) / (s * sigma_data) ** 2
        D = c_skip.view(-1, 1, 1) * xn + c_out.view(-1, 1, 1) * Fo
    e = (weight.view(-1, 1, 1) * (D - yy) ** 2).mean(-1)  # [B, N]
    if mask is None:
        return e.mean(-1), torch.zeros_like(s)
    dropped = mask.to(e.dtype)
    kept = 1.0 - dropped
    dsm = (e * kept).sum(-1) / kept.sum(-1).clamp_min(1.0)
    mean = xn.mean(-1, keepdim=True)
    var = xn.var(-1, unbiased=True, keepdim=True)
    target = (xn - mean) / torch.sqrt(var + MAE_EPS)
    m = ((D - target) ** 2).mean(-1)
    mae = (m * dropped).sum(-1) / dropped.sum(-1).clamp_min(1.0)
    return dsm, mae


def dsm_mae_loss(
    F_out: torch.Tensor,
    x_noisy: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor | None = None,
    mae_coef: float = 0.1,
    sigma_data: float = 0.5,
    objective: str = "edm",
) -> torch.Tensor:
    """Per-sample loss [B]: dsm + mae_coef * mae (see :func:`dsm_mae_loss_terms`)."""
    dsm, mae = dsm_mae_loss_terms(F_out, x_noisy, y, sigma, mask, sigma_data, objective)
    return dsm + mae_coef * mae


# ------------------------------------------------------------------ the ``torch`` backend
# What the dispatcher asks of every backend module (see fastmask.ops.registry): the
# reference runs on any device and floating dtype, so it never refuses a call.
DEVICE_TYPES = ("cpu", "cuda")  # and any other device torch runs on
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def not_supported_reasons(op: str, tensors) -> list[str]:
    """Always empty: the reference is the fallback that runs every call."""
    return []

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

from ..constants import LN_EPS, MAE_EPS  # noqa: F401  (re-exported: fastmask.ops.reference.LN_EPS)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """x_vis[b, k] = x[b, ids_keep[b, k]] (+ pos[ids_keep[b, k]])."""
    B, N, D = x.shape
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, D)
    out = torch.gather(x, 1, idx)
    if pos is not None:
        out = out + pos.reshape(N, D)[ids_keep].to(out.dtype)
    return out


def unmask_tokens(
    x_vis: torch.Tensor,
    ids_keep: torch.Tensor,
    mask_token: torch.Tensor,
    num_tokens: int,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[b, n] = x_vis[b, j] where ids_keep[b, j] = n, else mask_token; plus pos[n]."""
    B, K, D = x_vis.shape
    out = mask_token.reshape(1, 1, D).to(x_vis.dtype).expand(B, num_tokens, D)
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, D)
    out = out.scatter(1, idx, x_vis)
    if pos is not None:
        out = out + pos.reshape(1, num_tokens, D).to(out.dtype)
    return out


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
# What the dispatcher asks of every backend module (see fastmask.ops.backend_protocol): the
# reference runs on any device and floating dtype, so it never refuses a call.
DEVICE_TYPES = ("cpu", "cuda")  # and any other device torch runs on
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def not_supported_reasons(op: str, tensors) -> list[str]:
    """Always empty: the reference is the fallback that runs every call."""
    return []

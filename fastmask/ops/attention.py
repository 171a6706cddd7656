"""Non-causal multi-head attention read straight from the fused qkv projection layout."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .ranges import profiled
from ._library import kernels


@torch.library.custom_op("fastmask::attention", mutates_args=())
def _attn_op(qkv: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend).attention_fwd(qkv, scale)


@_attn_op.register_fake
def _(qkv, scale, backend):
    B, L, _, H, hd = qkv.shape
    return qkv.new_empty(B, L, H * hd), qkv.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fastmask::attention_backward", mutates_args=())
def _attn_bwd_op(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str) -> Tensor:
    return kernels(backend).attention_bwd(grad_out, qkv, out, lse, scale)


@_attn_bwd_op.register_fake
def _(grad_out, qkv, out, lse, scale, backend):
    return torch.empty_like(qkv)


def _attn_setup(ctx, inputs, output):
    qkv, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.scale = scale
    ctx.backend = backend


def _attn_backward(ctx, grad_out, _glse):
    qkv, out, lse = ctx.saved_tensors
    return _attn_bwd_op(grad_out.contiguous(), qkv, out, lse, ctx.scale, ctx.backend), None, None


_attn_op.register_autograd(_attn_backward, setup_context=_attn_setup)


@profiled("attention")
def attention(qkv: Tensor, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` per head, non-causal.

    qkv [B, L, 3, H, hd] (the output of the qkv Linear, viewed; no transposes needed);
    scale defaults to 1/sqrt(hd). Returns [B, L, H * hd], ready for the output projection.
    Equivalent PyTorch code: :func:`fastmask.ops.reference.attention`.
    """
    checks.tensor("qkv", qkv, ndim=5, floating=True)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape [B, L, 3, H, head_dim], got {tuple(qkv.shape)}")
    if qkv.shape[1] == 0:
        raise ValueError("qkv: sequence length L is 0")
    hd = qkv.shape[-1]
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    backend = dispatch.select("attention", qkv)
    if backend == "torch":
        return reference.attention(qkv, scale)
    out, _ = _attn_op(qkv.contiguous(), scale, backend)
    return out

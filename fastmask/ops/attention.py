"""Non-causal multi-head attention read straight from the fused qkv projection layout."""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .registry import declare
from .ranges import profiled
from ._library import eager_function, kernels

custom_op = functools.partial(torch.library.custom_op, mutates_args=())


declare(
    "attention",
    reference=reference.attention,
    # forward -> (out [B, L, H*hd], lse [B, H, L] fp32); backward -> grad qkv. deterministic: None
    # follows torch.are_deterministic_algorithms_enabled()
    launchers=("attention_fwd(qkv, scale)", "attention_bwd(grad_out, qkv, out, lse, scale, deterministic=None)"),
    category="attention",
    example=lambda e: (f"{e.part} qkv [{e.B}, {e.L}, 3, {e.H}, {e.D // e.H}], head dim {e.D // e.H}",
                       (e.t(e.B, e.L, 3, e.H, e.D // e.H),)) if e.part != "output" else None,
)


# ``deterministic`` is resolved when attention is called and travels with the op to its
# backward: False runs the one-pass backward (dq added with fp32 atomics), True the
# bit-reproducible one.
def _attn_fwd(qkv: Tensor, scale: float, backend: str, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    return kernels(backend).attention_fwd(qkv, scale)


def _attn_bwd(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str, deterministic: bool = False
) -> Tensor:
    return kernels(backend).attention_bwd(grad_out, qkv, out, lse, scale, deterministic=deterministic)


_attn_op = custom_op("fastmask::attention")(_attn_fwd)
_attn_bwd_op = custom_op("fastmask::attention_backward")(_attn_bwd)


@_attn_op.register_fake
def _(qkv, scale, backend, deterministic=False):
    B, L, _, H, hd = qkv.shape
    return qkv.new_empty(B, L, H * hd), qkv.new_empty(B, H, L, dtype=torch.float32)


@_attn_bwd_op.register_fake
def _(grad_out, qkv, out, lse, scale, backend, deterministic=False):
    return torch.empty_like(qkv)


def _attn_setup(ctx, inputs, output):
    qkv, scale, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.scale = scale
    ctx.backend = backend
    ctx.deterministic = deterministic


def _attn_backward(ctx, grad_out, _glse, bwd=_attn_bwd_op):
    qkv, out, lse = ctx.saved_tensors
    dqkv = bwd(grad_out.contiguous(), qkv, out, lse, ctx.scale, ctx.backend, ctx.deterministic)
    return dqkv, None, None, None


_attn_op.register_autograd(_attn_backward, setup_context=_attn_setup)
_ATTN = eager_function(
    "Attention", _attn_fwd, _attn_setup, functools.partial(_attn_backward, bwd=_attn_bwd), nondifferentiable=(1,)
)


@dispatch.signature
def _attention_signature(qkv, scale):
    return (
        qkv.shape, qkv.dtype, qkv.device, scale,
    )


@profiled("attention")
def attention(qkv: Tensor, scale: float | None = None, *, deterministic: bool | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` per head, non-causal.

    qkv [B, L, 3, H, hd] (the output of the qkv Linear, viewed; no transposes needed);
    scale defaults to 1/sqrt(hd). Returns [B, L, H * hd], ready for the output projection.
    Equivalent PyTorch code: :func:`fastmask.ops.reference.attention`.

    ``deterministic``: the Triton backward is bit-identical from run to run when True, and
    faster (fewer matmuls, dq added with atomics) when False; None (the default) follows
    ``torch.are_deterministic_algorithms_enabled()``.
    """
    sig = _attention_signature(qkv, scale)
    compiling = sig is None and torch.compiler.is_compiling()
    backend = dispatch.planned("attention", sig)
    if backend is None:
        checks.tensor("qkv", qkv, ndim=5, floating=True)
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv: expected shape [B, L, 3, H, head_dim], got {tuple(qkv.shape)}")
        if qkv.shape[1] == 0:
            raise ValueError("qkv: sequence length L is 0")
        checks.nonempty("qkv", qkv, "B L 3 H head_dim")
        if scale is not None:
            checks.positive_float("scale", scale)
        backend = dispatch.plan("attention", sig, qkv)
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    if backend == "torch":
        return reference.attention(qkv, scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (qkv.contiguous(), scale, backend, bool(deterministic))
    out, _ = _attn_op(*args) if compiling else _ATTN.apply(*args)
    return out

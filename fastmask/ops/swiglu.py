"""SwiGLU activation of a gated MLP: ``silu(a) * b`` on the fused gate/up projection output."""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks, dispatch, reference
from ._library import kernels
from .ranges import profiled


@torch.library.custom_op("fastmask::swiglu", mutates_args=())
def _swiglu_op(ab: Tensor, backend: str) -> Tensor:
    return kernels(backend).swiglu_fwd(ab)


@_swiglu_op.register_fake
def _(ab, backend):
    return ab.new_empty(*ab.shape[:-1], ab.shape[-1] // 2)


@torch.library.custom_op("fastmask::swiglu_backward", mutates_args=())
def _swiglu_bwd_op(grad_out: Tensor, ab: Tensor, backend: str) -> Tensor:
    return kernels(backend).swiglu_bwd(grad_out, ab)


@_swiglu_bwd_op.register_fake
def _(grad_out, ab, backend):
    return torch.empty_like(ab)


def _setup(ctx, inputs, output):
    ab, backend = inputs
    ctx.save_for_backward(ab)
    ctx.backend = backend


def _backward(ctx, grad_out):
    (ab,) = ctx.saved_tensors
    return _swiglu_bwd_op(grad_out.contiguous(), ab, ctx.backend), None


_swiglu_op.register_autograd(_backward, setup_context=_setup)


@profiled("swiglu")
def swiglu(ab: Tensor) -> Tensor:
    """``silu(a) * b`` with ``a, b = ab.chunk(2, -1)`` (a first): ab [..., 2F] -> [..., F].

    Takes the output of the fused gate/up Linear (LightningDiT's ``w12``) as is; the backward
    recomputes the activation from ab. Equivalent PyTorch code:
    :func:`fastmask.ops.reference.swiglu`.
    """
    checks.tensor("ab", ab, floating=True)
    if ab.dim() < 1 or ab.shape[-1] % 2:
        raise ValueError(f"ab: expected an even last dim (a and b halves), got shape {tuple(ab.shape)}")
    backend = dispatch.select("swiglu", ab)
    if backend == "torch":
        return reference.swiglu(ab)
    return _swiglu_op(ab.contiguous(), backend)

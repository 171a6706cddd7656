"""SwiGLU activation of a gated MLP: ``silu(a) * b`` on the fused gate/up projection output."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .registry import declare
from .ranges import profiled
from ._library import compiled_ops, eager_function, kernels

declare(
    "swiglu",
    reference=reference.swiglu,
    launchers=("swiglu_fwd(ab)", "swiglu_bwd(grad_out, ab)"),  # ab [..., 2F] -> [..., F]; backward -> grad ab
    category="activation",
    example=lambda e: (f"{e.part} w12 output [{e.B}, {e.L}, {2 * int(2 / 3 * 4 * e.D)}] in LightningDiT-style blocks",
                       (e.t(e.B, e.L, 2 * int(2 / 3 * 4 * e.D)),)) if e.part == "encoder" else None,
)


def _swiglu_fwd(ab: Tensor, backend: str) -> Tensor:
    return kernels(backend).swiglu_fwd(ab)


def _swiglu_bwd(grad_out: Tensor, ab: Tensor, backend: str) -> Tensor:
    return kernels(backend).swiglu_bwd(grad_out, ab)


def _swiglu_fake(ab, backend):
    return ab.new_empty(*ab.shape[:-1], ab.shape[-1] // 2)


def _swiglu_bwd_fake(grad_out, ab, backend):
    return torch.empty_like(ab)


def _setup(ctx, inputs, output):
    ab, backend = inputs
    ctx.save_for_backward(ab)
    ctx.backend = backend


def _backward(ctx, grad_out, bwd):
    (ab,) = ctx.saved_tensors
    return bwd(grad_out.contiguous(), ab, ctx.backend), None


_SWIGLU_OPS = compiled_ops("swiglu", _swiglu_fwd, _swiglu_bwd, _setup, _backward, fake=_swiglu_fake,
                           fake_backward=_swiglu_bwd_fake)
_swiglu_op = _SWIGLU_OPS["cuda"]  # the custom op (the cuda backend's)
_SWIGLU = eager_function("SwiGLU", _swiglu_fwd, _setup, functools.partial(_backward, bwd=_swiglu_bwd))


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
    ab = ab.contiguous()
    return _SWIGLU_OPS[backend](ab, backend) if torch.compiler.is_compiling() else _SWIGLU.apply(ab, backend)

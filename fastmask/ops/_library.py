"""Helpers to wire an op's fast backends into autograd, two ways from one definition.

Each fast op (Triton or CUDA kernels) is written once as plain functions: ``forward`` (calls the
backend's ``<op>_fwd``), ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``.
From them come

* a ``torch.library.custom_op`` pair (forward op, backward op) with ``register_fake`` and
  ``register_autograd``: what ``torch.compile`` traces into its graph without a break; the last
  argument names the backend chosen when the op was called, so a compiled graph keeps it;
* an :func:`eager_function`, a ``torch.autograd.Function`` over the same functions: what an
  eager call runs. It skips the custom-op machinery (schema parsing, the Python dispatcher and
  its autograd wrapper: about 12 us of host time per forward and 50 us per forward + backward
  on the CPU, measured by benchmarks/host_cost.py), with the same kernels and the same numbers.

The ``torch`` backend never goes through here: it is the plain reference code, which autograd
and torch.compile handle natively.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import dispatch

NAMESPACE = "fastmask"


def kernels(backend: str):
    """The module holding ``<op>_fwd`` / ``<op>_bwd`` for ``backend``."""
    return dispatch.impl(backend)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def empty_like_none(ref: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an empty tensor stands for "no gradient"."""
    return ref.new_empty(0)


def eager_function(
    name: str,
    forward: Callable,
    setup_context: Callable,
    backward: Callable,
    nondifferentiable: tuple[int, ...] = (),
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` running ``forward`` / ``backward`` (the functions the op's
    custom_op pair is made of, with the backward calling the backend directly).

    ``nondifferentiable``: indices of outputs that carry no gradient (row statistics, loss
    terms); their incoming gradients reach ``backward`` as None, as with the custom op."""

    def fwd(ctx, *inputs):
        ctx.set_materialize_grads(False)
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        if nondifferentiable:
            ctx.mark_non_differentiable(*(out[i] for i in nondifferentiable))
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})

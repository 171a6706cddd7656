"""Helpers to wire an op's fast backends into autograd, two ways from one definition.

Each fast op (Triton or CUDA kernels) is written once as plain functions: ``forward`` (calls the
backend's ``<op>_fwd``), ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``.
From them come

* a ``torch.library.custom_op`` pair (forward op, backward op) with ``register_fake`` and
  ``register_autograd``: what ``torch.compile`` puts into its graph, without a break, for the
  ``cuda`` backend (an opaque call of its C++ body); the last
  argument names the backend chosen when the op was called, so a compiled graph keeps it;
* for the Triton backend, the same pair as ``torch.library.triton_op`` ops
  (:func:`compiled_ops` makes both kinds): torch.compile does not call such an op as a black
  box but traces its body, where every launch goes through
  :func:`fastmask.kernels._utils.launch` (``torch.library.wrap_triton`` while traced), so the
  compiled graph holds the kernels themselves and Inductor launches them from its generated
  code, without fastmask's Python per op and step;
* an :func:`eager_function`, a ``torch.autograd.Function`` over the same functions: what an
  eager call runs. It skips the custom-op machinery (schema parsing, the Python dispatcher and
  its autograd wrapper: about 12 us of host time per forward and 50 us per forward + backward
  on the CPU, measured by benchmarks/host_cost.py), with the same kernels and the same numbers.

The ``torch`` backend never goes through here: it is the plain reference code, which autograd
and torch.compile handle natively.
"""
from __future__ import annotations

import functools
import importlib
import inspect
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


def _triton_op(name: str, fn: Callable):
    """``torch.library.triton_op`` over ``fn`` (a forward or backward function that calls the
    Triton launchers): its launches are traced while torch traces the body."""
    from ..kernels import _utils as kernel_utils

    op = torch.library.triton_op(name, _TracedBody(fn), mutates_args=())  # schema: from the body's signature
    # torch finds a triton_op's kernels by reading its source (for the keys of its compile
    # caches); the launchers hide them from that reading, so they are named here: those of the
    # op family's kernel module (fastmask.ops.norm -> fastmask.kernels.norm) and the shared ones.
    registered = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if isinstance(registered, dict):
        family = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.kernels.{fn.__module__.rsplit('.', 1)[1]}")
        registered[name] = kernel_utils.jit_kernels(kernel_utils, family)
    return op


class _TracedBody:
    """A triton_op's body: ``fn`` with :func:`fastmask.kernels._utils.traced_launches` around it.
    An object, not a function: torch reads a function body's source, and every function it
    calls, to find its kernels (about 50 ms an op at import); :func:`_triton_op` names them."""

    def __init__(self, fn: Callable):
        self.body = fn
        # what torch's schema inference reads (torch 2.11 infers the schema itself, even when one
        # is given): the signature, and the globals its string annotations are resolved in
        self.__signature__ = inspect.signature(fn)
        self.__globals__ = fn.__globals__
        self.__name__, self.__qualname__, self.__module__ = fn.__name__, fn.__qualname__, fn.__module__

    def __call__(self, *args, **kwargs):
        from ..kernels import _utils as kernel_utils

        with kernel_utils.traced_launches():
            return self.body(*args, **kwargs)


def op_pair(
    name: str,
    forward: Callable,
    backward: Callable | None,
    setup_context: Callable,
    grad: Callable,
    *,
    fake: Callable | None = None,
    fake_backward: Callable | None = None,
    kind: str = "custom",
):
    """``(forward op, backward op)``: ``fastmask::<name>`` and ``fastmask::<name>_backward``,
    with the forward's autograd formula registered: ``grad(ctx, *grads, bwd=<backward op>)``
    (``grad(ctx, *grads)`` when there is no backward op, as for a backward done in PyTorch code).

    ``kind="custom"``: ``torch.library.custom_op`` ops (an opaque call under torch.compile) with
    the ``fake`` / ``fake_backward`` shape functions; ``kind="triton"``: ``triton_op`` ops named
    ``<name>_triton``, whose bodies torch.compile traces (their fakes are the bodies, run on fake
    tensors). The same plain functions serve both."""
    if kind == "custom":
        make, suffix = (lambda n, f: torch.library.custom_op(n, f, mutates_args=())), ""
    elif kind == "triton":
        make, suffix = _triton_op, "_triton"
    else:
        raise ValueError(f"kind: expected 'custom' or 'triton', got {kind!r}")
    fwd_op = make(f"{NAMESPACE}::{name}{suffix}", forward)
    bwd_op = None if backward is None else make(f"{NAMESPACE}::{name}{suffix}_backward", backward)
    if kind == "custom":
        fwd_op.register_fake(fake)
        if bwd_op is not None:
            bwd_op.register_fake(fake_backward)
    fwd_op.register_autograd(grad if bwd_op is None else functools.partial(grad, bwd=bwd_op),
                             setup_context=setup_context)
    return fwd_op, bwd_op


def compiled_ops(name: str, forward: Callable, backward: Callable | None, setup_context: Callable, grad: Callable,
                 *, fake: Callable, fake_backward: Callable | None = None) -> dict[str, object]:
    """backend -> the forward op torch.compile traces for it: ``"cuda"`` the custom op (a C++
    body, opaque to the compiler), ``"triton"`` the triton_op (its kernels go into the graph).
    See :func:`op_pair`."""
    ops = {"cuda": op_pair(name, forward, backward, setup_context, grad, fake=fake, fake_backward=fake_backward)[0]}
    if _triton_ops_possible():
        ops["triton"] = op_pair(name, forward, backward, setup_context, grad, kind="triton")[0]
    else:  # no Triton here (the backend is then never chosen), or a torch without triton_op
        ops["triton"] = ops["cuda"]
    return ops


@functools.lru_cache(maxsize=None)
def _triton_ops_possible() -> bool:
    if not hasattr(torch.library, "triton_op"):
        return False
    try:
        from .. import kernels  # noqa: F401
    except Exception:  # ImportError, a broken Triton install: the dispatcher says why elsewhere
        return False
    return True


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

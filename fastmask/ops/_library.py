"""Helpers to register an op's fast backends with torch.library.

Every fast path is a ``torch.library.custom_op`` whose last argument names the backend
that was chosen when the op was called (so a compiled graph keeps the choice it traced),
with ``register_fake`` for shapes and ``register_autograd`` for the backward, which is a
custom op of its own. The ``torch`` backend never goes through here: it is the plain
reference code, which autograd and torch.compile handle natively.
"""
from __future__ import annotations

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

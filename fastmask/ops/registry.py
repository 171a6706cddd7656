"""Every fused op declared once; each list that names ops is derived from here.

An op family module (``fastmask/ops/<family>.py``) declares each of its ops with :func:`declare`:

* ``name``: the public name, the dispatch key (``fastmask.backend(name=...)``,
  ``FASTMASK_BACKEND=name=...``) and the ``fastmask.op.<name>`` profiler range;
* ``reference``: its "equivalent PyTorch code" in :mod:`fastmask.ops.reference` (the ``torch``
  backend, the CPU path and the test oracle);
* ``launchers``: what every fast backend module provides for it, written as Python signatures,
  e.g. ``"attention_fwd(qkv, scale)"``. The Triton module (``fastmask.kernels``) and the
  CUDA module (``fastmask.cuda_ext``) implement them with exactly these parameters (a test
  compares them); a backend that leaves an op out entirely has none of its launchers, and the
  dispatcher then says it does not implement the op. Launchers take contiguous tensors and
  allocate their outputs;
* ``category``: the bucket ``fastmask profile`` adds its time to;
* ``example``: the tensors a MaskDiT training step passes to the dispatcher for this op, for
  ``fastmask info`` (fake tensors; see :class:`Example`), or None.

Derived from the declarations: ``dispatch.OPS`` and the per-op backend preference, the launcher
protocol (:func:`launchers`, :func:`signature`), the profiling categories and ``fastmask info``'s
plan. Adding a fused op therefore touches its family's files only (``ops/<family>.py``,
``kernels/<family>.py``, the reference) and ``csrc/`` with ``cuda_ext.py`` when it has a CUDA
version; see "Adding an op" in the README.
"""
from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from typing import Callable

#: what every backend module declares besides its launchers
DECLARATIONS: tuple[str, ...] = ("DEVICE_TYPES", "DTYPES", "not_supported_reasons")
#: categories of ``fastmask profile`` (ops declare one; the others come from torch's own ops)
CATEGORIES = ("matmul", "attention", "norm/modulate", "activation", "gather/unmask", "loss", "optimizer", "other")


@dataclass(frozen=True)
class Example:
    """One stage of a MaskDiT training step, for an op's ``example``: batch ``B``, tokens ``N``,
    kept tokens ``K``, this stage's length ``L`` and width ``D`` and heads ``H``, values per token
    ``P``; ``part`` is "encoder", "decoder" or "output"; ``t(*shape, dt=None)`` makes a fake
    tensor (the step's dtype unless ``dt``)."""

    part: str
    B: int
    N: int
    K: int
    L: int
    D: int
    H: int
    P: int
    t: Callable


@dataclass(frozen=True)
class OpDecl:
    name: str
    reference: Callable
    launchers: tuple[str, ...]
    category: str
    example: Callable[[Example], "tuple[str, tuple] | None"] | None = None


OPS: dict[str, OpDecl] = {}


def declare(
    name: str,
    *,
    reference: Callable,
    launchers: tuple[str, ...],
    category: str,
    example: Callable[[Example], "tuple[str, tuple] | None"] | None = None,
) -> OpDecl:
    """Declare fused op ``name`` (see the module docstring); returns the declaration."""
    if name in OPS:
        raise ValueError(f"op {name!r} is declared twice")
    if category not in CATEGORIES:
        raise ValueError(f"op {name!r}: category {category!r} is not one of {CATEGORIES}")
    for text in launchers:
        if not _parse(text)[0].startswith(name + "_"):
            raise ValueError(f"op {name!r}: launcher {text!r} must be named {name}_fwd / {name}_bwd")
    decl = OpDecl(name, reference, tuple(launchers), category, example)
    OPS[name] = decl
    return decl


def _parse(text: str) -> tuple[str, inspect.Signature]:
    """``"name(a, b, c=None)"`` -> (name, its signature); defaults are Python literals."""
    fn = ast.parse(f"def {text}: pass").body[0]
    args, defaults = fn.args.args, fn.args.defaults
    first_default = len(args) - len(defaults)
    params = [
        inspect.Parameter(
            a.arg,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=ast.literal_eval(defaults[i - first_default]) if i >= first_default else inspect.Parameter.empty,
        )
        for i, a in enumerate(args)
    ]
    return fn.name, inspect.Signature(params)


def launchers(op: str) -> tuple[str, ...]:
    """The launcher names of ``op`` (``attention`` -> ``attention_fwd``, ``attention_bwd``)."""
    return tuple(_parse(t)[0] for t in OPS[op].launchers)


def all_launchers() -> tuple[str, ...]:
    """Every launcher name of every declared op."""
    return tuple(n for op in OPS for n in launchers(op))


def signature(launcher: str) -> inspect.Signature:
    """The declared signature of a launcher (parameter names, order and defaults)."""
    for decl in OPS.values():
        for text in decl.launchers:
            name, sig = _parse(text)
            if name == launcher:
                return sig
    raise KeyError(launcher)


def categories() -> dict[str, str]:
    """op name -> its profiling category."""
    return {name: d.category for name, d in OPS.items()}

"""Named profiler ranges around the public ops (``fastmask.op.<name>``) and the block stages.

Off by default. ``FASTMASK_NVTX=1`` (read at call time) or a ``with op_ranges():`` block turns
them on: each public op then opens a ``torch.profiler.record_function`` range, and an NVTX
range where CUDA is available, so torch.profiler traces and Nsight Systems attribute time to
ops however they were imported (``from fastmask.ops import attention`` included). Off, a call
costs one flag test (the variable is read with the others by :mod:`fastmask._env`). Under
torch.compile they stay off, so compiled graphs are unchanged.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import _env

OP_PREFIX = "fastmask.op."
_forced = 0  # how many op_ranges() blocks are open
# [ranges on]: FASTMASK_NVTX=1 (as last read by fastmask._env) or an open op_ranges() block; a
# one-element list so that the ops' wrappers test one item instead of calling into _env.
_on = [False]


def _update() -> None:
    try:
        env = _env.nvtx()
    except ValueError:  # a bad value is reported where the variable is checked, not here
        env = False
    _on[0] = bool(_forced) or env


_env.on_reload(_update)
_update()


@contextlib.contextmanager
def named_range(name: str):
    """A ``record_function`` range, and an NVTX range where CUDA is available."""
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def profiled(name: str):
    """Decorator of a public op: runs it inside ``fastmask.op.<name>`` when ranges are on."""
    label = OP_PREFIX + name

    def wrap(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            if not _on[0] or torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            with named_range(label):
                return fn(*args, **kwargs)

        return op

    return wrap


@contextlib.contextmanager
def op_ranges():
    """Open a ``fastmask.op.<name>`` profiler range around every public op called in the block
    (whatever ``FASTMASK_NVTX`` says)."""
    global _forced
    _forced += 1
    _update()
    try:
        yield
    finally:
        _forced -= 1
        _update()

"""The environment variables the fastmask library reads at run time, all read here.

They are read once, when fastmask is imported, and again by :func:`reload` (public as
``fastmask.ops.reload_environment()``; the command line calls it before any work). The hot
path of an op only looks at the snapshot: no ``os.environ`` look-up per call. Inside a process,
``fastmask.backend(...)`` and ``fastmask.ops.op_ranges()`` change the same choices without
touching the environment.

=========================  =========  ==========================================================
variable                   default    effect (reader)
=========================  =========  ==========================================================
``FASTMASK_BACKEND``       ``auto``   force a backend: ``torch``, ``triton``, ``cuda``, ``auto``,
                                      or per op, ``attention=triton,gather_tokens=cuda``
                                      (:func:`fastmask.ops.dispatch.requested`)
``FASTMASK_CHECK_VALUES``  ``1``      ``0`` skips the data-dependent input checks that sync with
                                      the device (:mod:`fastmask.ops.checks`)
``FASTMASK_NVTX``          ``0``      ``1`` opens a profiler / NVTX range per block stage
                                      (``fastmask.block.*``) and per public op
                                      (``fastmask.op.*``) (:mod:`fastmask.nn.block`,
                                      :func:`fastmask.ops.op_ranges`)
``FASTMASK_ATTN_AUTOTUNE`` ``1``      ``0`` launches the attention kernels with the heuristic
                                      config instead of autotuning (:mod:`fastmask.kernels`)
``TRITON_INTERPRET``       ``0``      Triton's own switch: ``1`` runs the Triton kernels in the
                                      interpreter on CPU tensors (the CPU tests); the dispatcher
                                      and the launch configs follow it
=========================  =========  ==========================================================

Build-time variables (``FASTMASK_BUILD_CUDA``, ``FASTMASK_CUDA_ARCHS``) are read by setup.py and
csrc/build.py, which run without importing fastmask; the benchmark suite's ``FASTMASK_BENCH_*``
by benchmarks/common.py. The README's table lists them all.
"""
from __future__ import annotations

import os
from typing import Callable

# the 0/1 switches read here, with their defaults
SWITCHES = {"FASTMASK_CHECK_VALUES": "1", "FASTMASK_NVTX": "0", "FASTMASK_ATTN_AUTOTUNE": "1"}

# The snapshot: a switch maps to its bool, or to the ValueError its bad value raises when it is
# used (so that importing fastmask never fails on a bad variable; the command line reports it
# before any work through check_environment()).
_snapshot: dict[str, object] = {}
_listeners: list[Callable[[], None]] = []


def _parse_switch(name: str, default: str) -> bool | ValueError:
    """A 0/1 switch; unset or empty is ``default``; anything else is a ValueError naming it."""
    value = os.environ.get(name, "").strip() or default
    if value not in ("0", "1"):
        return ValueError(f"{name}: expected 0 or 1, got {os.environ.get(name)!r}")
    return value == "1"


def reload() -> None:
    """Read every variable above again (after a change of ``os.environ`` inside the process)
    and tell the caches that depend on them (the dispatcher's backend choices)."""
    snap: dict[str, object] = {name: _parse_switch(name, d) for name, d in SWITCHES.items()}
    snap["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    snap["FASTMASK_BACKEND"] = os.environ.get("FASTMASK_BACKEND", "")
    _snapshot.clear()
    _snapshot.update(snap)
    for fn in list(_listeners):
        fn()


def on_reload(fn: Callable[[], None]) -> None:
    """Call ``fn`` after every :func:`reload` (a cache keyed on these variables clears itself)."""
    _listeners.append(fn)


def _switch(name: str) -> bool:
    v = _snapshot[name]
    if v is True or v is False:
        return v
    raise v  # the ValueError naming the variable and its bad value


def check_environment() -> None:
    """Read the environment again and check every 0/1 switch above, so that a bad value is
    reported before any work starts (ValueError naming the variable). ``FASTMASK_BACKEND`` is
    checked by the dispatcher (:func:`fastmask.ops.dispatch.check_environment`)."""
    reload()
    for name in SWITCHES:
        _switch(name)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return _snapshot["TRITON_INTERPRET"]


def backend_spec() -> str:
    """The raw ``FASTMASK_BACKEND`` value ("" when unset); parsed by the dispatcher."""
    return _snapshot["FASTMASK_BACKEND"]


def check_values() -> bool:
    """False when ``FASTMASK_CHECK_VALUES=0`` turns the syncing input checks off."""
    return _switch("FASTMASK_CHECK_VALUES")


def nvtx() -> bool:
    """True when ``FASTMASK_NVTX=1`` asks for named profiler / NVTX ranges."""
    return _switch("FASTMASK_NVTX")


def attn_autotune() -> bool:
    """False when ``FASTMASK_ATTN_AUTOTUNE=0`` asks for the heuristic attention config."""
    return _switch("FASTMASK_ATTN_AUTOTUNE")


reload()

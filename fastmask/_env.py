"""The environment variables the fastmask library reads at run time, all read here.

Each is read when it is needed (at call time, not at import), so a test or a script may set
it in ``os.environ`` at any point before the call.

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


# the 0/1 switches read here, with their defaults
SWITCHES = {"FASTMASK_CHECK_VALUES": "1", "FASTMASK_NVTX": "0", "FASTMASK_ATTN_AUTOTUNE": "1"}


def _switch(name: str, default: str) -> bool:
    """A 0/1 switch; unset or empty is ``default``, anything else raises ValueError naming it."""
    value = os.environ.get(name, "").strip() or default
    if value not in ("0", "1"):
        raise ValueError(f"{name}: expected 0 or 1, got {os.environ.get(name)!r}")
    return value == "1"


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default) == "1"


def check_environment() -> None:
    """Read every 0/1 switch above once, so that a bad value is reported before any work
    starts (ValueError naming the variable). ``FASTMASK_BACKEND`` is checked by the dispatcher
    (:func:`fastmask.ops.dispatch.check_environment`)."""
    for name, default in SWITCHES.items():
        _switch(name, default)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return _flag("TRITON_INTERPRET", "0")


def backend_spec() -> str:
    """The raw ``FASTMASK_BACKEND`` value ("" when unset); parsed by the dispatcher."""
    return os.environ.get("FASTMASK_BACKEND", "")


def check_values() -> bool:
    """False when ``FASTMASK_CHECK_VALUES=0`` turns the syncing input checks off."""
    return _switch("FASTMASK_CHECK_VALUES", "1")


def nvtx() -> bool:
    """True when ``FASTMASK_NVTX=1`` asks for named profiler / NVTX ranges."""
    return _switch("FASTMASK_NVTX", "0")


def attn_autotune() -> bool:
    """False when ``FASTMASK_ATTN_AUTOTUNE=0`` asks for the heuristic attention config."""
    return _switch("FASTMASK_ATTN_AUTOTUNE", "1")

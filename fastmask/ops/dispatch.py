"""The one place that decides which backend runs an op.

Backends:
    ``torch``  the PyTorch reference (fastmask.ops.reference); runs everywhere.
    ``triton`` Triton kernels (fastmask.kernels); CUDA tensors, or CPU tensors when
               TRITON_INTERPRET=1 (the Triton interpreter, used by the tests).
    ``cuda``   hand-written CUDA C++ (csrc/, loaded by fastmask.cuda_ext); CUDA tensors.

Choice, in order:
    1. ``with fastmask.backend("triton"):`` (or ``backend(attention="triton", loss="cuda")``)
    2. the environment variable ``FASTMASK_BACKEND``: ``torch``, ``triton``, ``cuda``, ``auto``,
       or per op: ``attention=triton,gather_tokens=cuda``
    3. automatic: the first backend in :data:`DEFAULT_PREFERENCE` that can serve the call.

An explicitly requested backend that cannot serve a call raises :class:`BackendUnavailable`
with the reason; the automatic choice falls back to the next backend instead (and logs why
at debug level).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from types import ModuleType

import torch

log = logging.getLogger("fastmask.dispatch")

BACKENDS = ("torch", "triton", "cuda")
OPS = (
    "gather_tokens",
    "unmask_tokens",
    "attention",
    "layernorm_modulate",
    "gated_residual",
    "residual_layernorm_modulate",
    "dsm_mae_loss",
)
ENV_VAR = "FASTMASK_BACKEND"

# Automatic choice on CUDA tensors, per op: the first backend that can serve wins.
# Rule: CUDA C++ is preferred only where benchmarks/results show it faster than Triton on
# the card at hand; until such results exist for an op, Triton is the default on GPUs.
# (Kept here, next to the code that reads it; see benchmarks/README.md for the numbers.)
DEFAULT_PREFERENCE: dict[str, tuple[str, ...]] = {op: ("triton", "cuda", "torch") for op in OPS}

_SUPPORTED_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

_MODULES = {"triton": "fastmask.kernels", "cuda": "fastmask.cuda_ext"}
_module_cache: dict[str, ModuleType | str] = {}
_local = threading.local()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the call; the message says why."""


def _parse(spec: str) -> dict[str, str]:
    spec = spec.strip()
    if not spec:
        return {}
    if "=" not in spec:
        _check_backend_name(spec, ENV_VAR)
        return {"*": spec}
    out = {}
    for part in spec.split(","):
        op, _, name = part.partition("=")
        op, name = op.strip(), name.strip()
        if op not in OPS and op != "*":
            raise ValueError(f"{ENV_VAR}: unknown op {op!r}; expected one of {OPS}")
        _check_backend_name(name, ENV_VAR)
        out[op] = name
    return out


def _check_backend_name(name: str, where: str) -> None:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")


@contextlib.contextmanager
def backend(name: str | None = None, **per_op: str):
    """Force a backend for the ops run inside the block.

    ``backend("triton")`` forces all ops; ``backend(attention="torch")`` forces one op;
    ``"auto"`` restores the automatic choice. Nested blocks override outer ones.
    """
    frame = {}
    if name is not None:
        _check_backend_name(name, "backend(name)")
        frame["*"] = name
    for op, b in per_op.items():
        if op not in OPS:
            raise ValueError(f"backend(): unknown op {op!r}; expected one of {OPS}")
        _check_backend_name(b, f"backend({op}=...)")
        frame[op] = b
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(frame)
    try:
        yield
    finally:
        stack.pop()


def requested(op: str) -> str:
    """The backend asked for ``op`` by the context manager or the environment ("auto" if none)."""
    for frame in reversed(getattr(_local, "stack", None) or []):
        if op in frame:
            return frame[op]
        if "*" in frame:
            return frame["*"]
    env = _parse(os.environ.get(ENV_VAR, ""))
    return env.get(op, env.get("*", "auto"))


def load(name: str) -> ModuleType:
    """Import a backend module; raises BackendUnavailable with the import error."""
    mod = _module_cache.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(_MODULES[name])
            reason = getattr(mod, "unavailable_reason", lambda: None)()
            if reason:
                mod = reason
        except Exception as e:  # ImportError, missing driver, failed extension build ...
            mod = f"{type(e).__name__}: {e}"
        _module_cache[name] = mod
    if isinstance(mod, str):
        raise BackendUnavailable(f"fastmask backend {name!r} is not available: {mod}")
    return mod


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(name: str, op: str, tensors) -> str | None:
    """None if backend ``name`` can run ``op`` on these tensors, else the reason it cannot."""
    if name == "torch":
        return None
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    dev = tensors[0].device if tensors else torch.device("cpu")
    if name == "triton":
        if dev.type == "cpu" and not interpreting():
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        if dev.type not in ("cpu", "cuda"):
            return f"tensors are on {dev.type}, Triton runs on CUDA devices"
        if dev.type == "cuda" and interpreting():
            return "TRITON_INTERPRET=1 is set, the interpreter runs on CPU tensors only"
    elif name == "cuda":
        if dev.type != "cuda":
            return f"tensors are on {dev.type}, the CUDA extension runs on CUDA devices"
    for t in tensors:
        if t.is_floating_point() and t.dtype not in _SUPPORTED_DTYPES[name]:
            return f"dtype {t.dtype} is not supported (supported: {_SUPPORTED_DTYPES[name]})"
    try:
        mod = load(name)
    except BackendUnavailable as e:
        return str(e)
    if not hasattr(mod, f"{op}_fwd"):
        return f"backend {name!r} does not implement {op}"
    op_reason = getattr(mod, "not_supported_reasons", lambda op, ts: None)(op, tensors)
    return op_reason or None


def select(op: str, *tensors) -> str:
    """The backend that runs ``op`` on ``tensors`` (see the module docstring)."""
    want = requested(op)
    if want != "auto":
        reason = why_not(want, op, tensors)
        if reason is not None:
            raise BackendUnavailable(f"fastmask: backend {want!r} was requested for {op} but cannot run it: {reason}")
        return want
    dev = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if dev.type != "cuda":
        return "torch"
    for name in DEFAULT_PREFERENCE[op]:
        reason = why_not(name, op, tensors)
        if reason is None:
            return name
        log.debug("fastmask: %s skips backend %s: %s", op, name, reason)
    return "torch"


def impl(name: str) -> ModuleType:
    """The backend module whose ``<op>_fwd`` / ``<op>_bwd`` functions run the kernels."""
    return load(name)


def available_backends() -> dict[str, str | None]:
    """Each backend mapped to None (importable) or the reason it is not."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        if name == "torch":
            out[name] = None
            continue
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as e:
            out[name] = str(e)
    return out

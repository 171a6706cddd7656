"""The one place that decides which backend runs an op.

Backends (each module declares ``DEVICE_TYPES``, ``DTYPES`` and ``not_supported_reasons``;
the launchers it must provide are declared with each op in :mod:`fastmask.ops.registry`):
    ``torch``  the PyTorch reference (fastmask.ops.reference); runs everywhere.
    ``triton`` Triton kernels (fastmask.kernels); CUDA tensors, or CPU tensors when
               TRITON_INTERPRET=1 (the Triton interpreter, used by the tests).
    ``cuda``   hand-written CUDA C++ (csrc/, loaded by fastmask.cuda_ext); CUDA tensors.

Choice, in order:
    1. ``with fastmask.backend("triton"):`` (or ``backend(attention="triton", loss="cuda")``)
    2. the environment variable ``FASTMASK_BACKEND``: ``torch``, ``triton``, ``cuda``, ``auto``,
       or per op: ``attention=triton,gather_tokens=cuda`` (read at import and by
       :func:`reload_environment`, not per call)
    3. automatic: the first backend in :data:`DEFAULT_PREFERENCE` (else :data:`PREFERENCE_DEFAULT`)
       that can serve the call.

An explicitly requested backend that cannot serve a call raises :class:`BackendUnavailable`
listing every reason. The automatic choice falls back to the next backend instead; on CUDA
tensors each skipped backend is reported once per (op, reason) with a
:class:`BackendFallbackWarning` (a GPU run that quietly lands on the reference is slow).
:func:`record_choices` shows which backend each op actually ran on; ``fastmask info`` prints
the choice and the reasons for a model config without running it.

The public ops look their call up first (:func:`signature`): a call whose signature (shapes,
dtypes, devices, scalar arguments) was checked and dispatched before gets the same backend from
a dictionary, without running its checks or computing reasons again (:func:`plan` stores a new
signature's choice).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from types import ModuleType

import torch

from .. import _env
from . import registry

log = logging.getLogger("fastmask.dispatch")

BACKENDS = ("torch", "triton", "cuda")
#: every fused op, by name: the declarations of :mod:`fastmask.ops.registry` (filled as the op
#: family modules are imported, which ``import fastmask.ops`` does)
OPS = registry.OPS
ENV_VAR = "FASTMASK_BACKEND"

# Automatic choice on CUDA tensors, per op: the first backend that can serve wins.
# Rule: CUDA C++ is preferred only where benchmarks/results show it faster than Triton on
# the card at hand; until such results exist for an op, Triton is the default on GPUs.
# (Kept here, next to the code that reads it; see benchmarks/README.md for the numbers.)
# An op missing from the table takes the default order.
PREFERENCE_DEFAULT: tuple[str, ...] = ("triton", "cuda", "torch")
DEFAULT_PREFERENCE: dict[str, tuple[str, ...]] = {}

# One slot per backend from the start, filled at its first use: the dictionary's size never
# changes, so a compiled graph that traced a choice is not invalidated (recompiled) because
# another backend was imported later.
_module_cache: dict[str, ModuleType | str | None] = dict.fromkeys(BACKENDS)
_local = threading.local()
_warned: set[tuple[str, str]] = set()
_recorders: list[dict[str, set[str]]] = []
_open_frames = 0  # backend() blocks open in any thread (0: every request is the environment's)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the call; the message lists every reason."""


class BackendFallbackWarning(UserWarning):
    """The automatic choice skipped a fast backend for CUDA tensors (given once per op and reason)."""


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
            raise ValueError(f"{ENV_VAR}: unknown op {op!r}; expected one of {tuple(OPS)}")
        _check_backend_name(name, ENV_VAR)
        out[op] = name
    return out


def check_environment() -> None:
    """Check ``FASTMASK_BACKEND`` and the library's 0/1 switches now (ValueError naming the
    variable), so that a command reports a bad value before its work starts."""
    _env.check_environment()  # reads the environment again (and clears the cached choices)
    _parse(_env.backend_spec())


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
            raise ValueError(f"backend(): unknown op {op!r}; expected one of {tuple(OPS)}")
        _check_backend_name(b, f"backend({op}=...)")
        frame[op] = b
    global _open_frames
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(frame)
    _local.resolved = {}  # requested()'s answers for this stack
    _open_frames += 1
    try:
        yield
    finally:
        stack.pop()
        _local.resolved = {}
        _open_frames -= 1


def requested(op: str) -> str:
    """The backend asked for ``op`` by the context manager or the environment ("auto" if none)."""
    stack = getattr(_local, "stack", None)
    if stack:
        name = _from_stack(stack, op)
        if name is not None:
            return name
    return _env_choice(op)


def _env_choice(op: str) -> str:
    env = _env_request()
    return env.get(op) or env.get("*", "auto")


def _requested_eagerly(op: str) -> str:
    """:func:`requested` for an eager call while a backend() block is open: the blocks' answer
    is kept per thread until its block stack changes (never while torch.compile traces: it would
    guard on the cache)."""
    stack = getattr(_local, "stack", None)
    if not stack:  # a block open in another thread only
        return _env_choice(op)
    resolved = _local.resolved  # ("": no block of this thread names the op)
    name = resolved.get(op)
    if name is None:
        name = resolved[op] = _from_stack(stack, op) or ""
    return name or _env_choice(op)


def _from_stack(stack: list, op: str) -> str | None:
    for frame in reversed(stack):
        if op in frame:
            return frame[op]
        if "*" in frame:
            return frame["*"]
    return None


# FASTMASK_BACKEND parsed once per environment snapshot (fastmask._env), not per call; a bad
# value is kept as its ValueError and raised at the first op, as the variable is used.
_env_parsed: list = []


def _parse_env() -> None:
    try:
        parsed = _parse(_env.backend_spec())
    except ValueError as e:
        parsed = e
    _env_parsed[:] = [parsed]


def _env_request() -> dict[str, str]:
    v = _env_parsed[0]
    if isinstance(v, ValueError):
        raise v
    return v


# ---------------------------------------------------------------------- the cached choice
# The public ops validate a call's structure (shapes, dtypes, devices, scalar arguments) and
# choose its backend once per *signature*: the op, the requested backend and a tuple the op
# builds from exactly what its checks and the backends' reasons read. A later call with the same
# signature skips both (a dictionary look-up instead of ~10-40 us of Python), so the hot path
# reads no environment, computes no reasons and runs no structural check. Data-dependent checks
# (ids range, NaN sigma) are not part of it: they run per call unless trusted or switched off.
# op -> {signature (or (requested backend, signature) inside a backend() block): backend}
_plans: dict[str, dict] = {}
_PLANS_MAX = 4096  # a safety bound per op, for programs that call with ever new shapes
_NOT_PLANNED = (None, None)
_is_compiling = torch.compiler.is_compiling


def signature(op: str):
    """Decorator of ``op``'s signature function (the tuple its checks and its backend choice
    depend on: shapes, dtypes, devices, scalar arguments). The decorated function returns
    ``(signature, backend chosen before for it or None)``: one call and one dictionary look-up on
    the hot path. The signature is None under torch.compile (a traced call is checked and
    dispatched while tracing) and for arguments that are not tensors (the op's checks then say
    which argument); :func:`plan` stores a new signature's choice."""
    table = _plans.setdefault(op, {})

    def decorate(fn):
        @functools.wraps(fn)
        def lookup(*args):
            if _is_compiling():
                return _NOT_PLANNED
            try:
                sig = fn(*args)
            except AttributeError:
                return _NOT_PLANNED
            # Outside every backend() block the request is the environment's, fixed between two
            # reads of the environment (which clear the plans): the key then needs no request.
            name = table.get((_requested_eagerly(op), sig) if _open_frames else sig)
            if name is not None and _recorders:
                _chosen(op, name)
            return sig, name

        return lookup

    return decorate


def plan(op: str, signature: tuple | None, *tensors) -> str:
    """:func:`select` for a call that passed the op's checks, remembered under ``signature``
    (when there is one) for the op's :func:`signature` look-up."""
    name = select(op, *tensors)
    if signature is not None:
        table = _plans.setdefault(op, {})
        if len(table) >= _PLANS_MAX:
            table.clear()
        table[(requested(op), signature) if _open_frames else signature] = name
    return name


def clear_plans() -> None:
    """Forget every cached choice (the environment was read again, a backend was built)."""
    for table in _plans.values():
        table.clear()
    _parse_env()


_env.on_reload(clear_plans)
_parse_env()


def reload_environment() -> None:
    """Read the ``FASTMASK_*`` variables (and ``TRITON_INTERPRET``) again after a change of
    ``os.environ`` in this process, and forget the backend choices made under the old values.
    (fastmask reads them once at import; the context manager :func:`backend` is the way to
    change the choice inside a program.)"""
    _env.reload()


def _import(name: str) -> ModuleType:
    # Plain imports, so that a reader (and an editor's "go to definition") can follow them;
    # inside the function because a backend may be missing (no triton) or slow to import.
    if name == "triton":
        from .. import kernels

        return kernels
    if name == "cuda":
        from .. import cuda_ext

        return cuda_ext
    from . import reference

    return reference


def _module(name: str) -> ModuleType | str:
    """The backend module of ``name``, or why it cannot be imported (cached)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    mod = _module_cache.get(name)
    if mod is None:
        try:
            mod = _import(name)
        except Exception as e:  # ImportError, a missing driver ...
            mod = f"{name} cannot be imported ({type(e).__name__}: {e})"
        _module_cache[name] = mod
    return mod


def load(name: str) -> ModuleType:
    """Import a backend module; raises BackendUnavailable with the import error. (Whether it
    can run a call, build state included, is :func:`not_supported_reasons`' answer.)"""
    mod = _module(name)
    if isinstance(mod, str):
        raise BackendUnavailable(f"fastmask backend {name!r} is not available: {mod}")
    return mod


def not_supported_reasons(name: str, op: str, tensors) -> list[str]:
    """Every reason backend ``name`` cannot run ``op`` on ``tensors`` (empty: it can).

    The backend module's own :func:`not_supported_reasons` (device, dtypes, shapes, build
    state), or the import error when the module cannot be imported at all."""
    mod = _module(name)
    if isinstance(mod, str):
        return [mod]
    reasons = list(mod.not_supported_reasons(op, tensors))
    if name != "torch" and not hasattr(mod, f"{op}_fwd"):
        reasons.insert(0, f"backend {name!r} does not implement {op}")
    return reasons


def why_not(name: str, op: str, tensors) -> str | None:
    """None if backend ``name`` can run ``op`` on these tensors, else every reason, joined by "; "."""
    return "; ".join(not_supported_reasons(name, op, tensors)) or None


def _chosen(op: str, name: str) -> str:
    for rec in _recorders:
        rec.setdefault(op, set()).add(name)
    return name


def _fallback(op: str, name: str, reason: str) -> None:
    log.debug("fastmask: %s skips backend %s: %s", op, name, reason)
    key = (op, f"{name}: {reason}")
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(
            f"fastmask: {op} on CUDA tensors does not use the {name} backend: {reason}. "
            f"It falls back to the next backend (this is said once per reason).",
            BackendFallbackWarning,
            stacklevel=5,  # _fallback < select < op < profiled wrapper < the caller
        )


def choice(op: str, *tensors) -> tuple[str, list[tuple[str, str]]]:
    """``(backend, skipped)``: the backend :func:`select` picks for ``op`` on ``tensors``, and the
    ``(backend, reasons)`` of each one the automatic choice passed over on the way. No side
    effects; raises :class:`BackendUnavailable` for an explicit request it cannot serve."""
    want = requested(op)
    if want != "auto":
        reason = why_not(want, op, tensors)
        if reason is not None:
            raise BackendUnavailable(f"fastmask: backend {want!r} was requested for {op} but cannot run it: {reason}")
        return want, []
    dev = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if dev.type != "cuda":
        return "torch", []
    skipped = []
    for name in DEFAULT_PREFERENCE.get(op, PREFERENCE_DEFAULT):
        reason = why_not(name, op, tensors)
        if reason is None:
            return name, skipped
        skipped.append((name, reason))
    return "torch", skipped


def select(op: str, *tensors) -> str:
    """The backend that runs ``op`` on ``tensors`` (see the module docstring): warns about the
    fast backends an automatic choice skipped, and records the choice for record_choices()."""
    name, skipped = choice(op, *tensors)
    for other, reason in skipped:
        _fallback(op, other, reason)
    return _chosen(op, name)


def impl(name: str) -> ModuleType:
    """The backend module whose ``<op>_fwd`` / ``<op>_bwd`` functions run the kernels."""
    return load(name)


def available_backends() -> dict[str, str | None]:
    """Each backend mapped to None (importable and built) or the reason it is not."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        mod = _module(name)
        reason = mod if isinstance(mod, str) else getattr(mod, "unavailable_reason", lambda: None)()
        out[name] = None if reason is None else f"fastmask backend {name!r} is not available: {reason}"
    return out


@contextlib.contextmanager
def record_choices():
    """Record the backend each op ran on inside the block: yields a dict
    ``{op: {backend names select() returned}}``, filled as the ops run.

    >>> with record_choices() as ran:
    ...     loss = net.loss(x, labels).mean()
    >>> ran["attention"]   # e.g. {"triton"}

    Under torch.compile the choice is made, and recorded, when a graph is traced: record the
    first call (or an eager one) to see what a compiled model runs.
    """
    rec: dict[str, set[str]] = {}
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


# Import every backend now, not at the first call that needs one: a call traced by torch.compile
# must find the dispatcher's state settled (a backend imported while a graph is traced would
# invalidate that graph at the next call and compile it again).
for _name in BACKENDS:
    _module(_name)

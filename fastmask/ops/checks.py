"""Input validation shared by the public ops: clear ValueErrors that name the argument."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

from .. import _env

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


_trusted_depth = 0


def value_checks_enabled() -> bool:
    """Data-dependent checks (ids range/uniqueness, NaN sigma, label range) sync with the
    device; they are skipped under torch.compile, inside :func:`trusted_values` and when
    FASTMASK_CHECK_VALUES=0."""
    return not _compiling() and _trusted_depth == 0 and _env.check_values()


@contextlib.contextmanager
def trusted_values():
    """Skip the data-dependent checks inside the block: for a caller that validated its data
    once up front (the trainer checks labels at start-up and draws ids and sigmas itself), so
    that a training step makes no host sync."""
    global _trusted_depth
    _trusted_depth += 1
    try:
        yield
    finally:
        _trusted_depth -= 1


def tensor(name: str, t, ndim: int | None = None, shape: tuple | None = None, floating: bool | None = None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name}: expected shape {tuple('*' if s is None else s for s in shape)}, got {tuple(t.shape)}"
                    f" (dimension {i})"
                )
        if len(shape) != t.dim():
            raise ValueError(f"{name}: expected {len(shape)} dimensions, got shape {tuple(t.shape)}")
    if floating is True and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise ValueError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def ids(
    name: str, ids_keep: torch.Tensor, batch: int, num_tokens: int, num_kept: int | None = None, values: bool = True,
    allow_empty: bool = False,
) -> None:
    """Structure of ``ids_keep`` (a 2-d int tensor [batch, K], 0 < K <= num_tokens; K = 0 too
    with ``allow_empty``) and, with ``values``, :func:`ids_values`."""
    tensor(name, ids_keep, ndim=2)
    if ids_keep.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected an int64 (or int32) tensor, got dtype {ids_keep.dtype}")
    if ids_keep.shape[0] != batch:
        raise ValueError(f"{name}: expected batch size {batch}, got shape {tuple(ids_keep.shape)}")
    K = ids_keep.shape[1]
    if num_kept is not None and K != num_kept:
        raise ValueError(f"{name}: expected {num_kept} kept tokens per sample, got shape {tuple(ids_keep.shape)}")
    if K == 0 and not allow_empty:
        raise ValueError(f"{name}: keeps no token (K = 0); at least one token per sample must be kept")
    if K > num_tokens:
        raise ValueError(f"{name}: keeps {K} tokens of only {num_tokens}")
    if values:
        ids_values(name, ids_keep, num_tokens)


def ids_values(name: str, ids_keep: torch.Tensor, num_tokens: int) -> None:
    """Every id in [0, num_tokens) and distinct within its sample: a data-dependent check (it
    syncs with the device), skipped like the other value checks."""
    if value_checks_enabled() and ids_keep.numel():
        K = ids_keep.shape[1]
        lo, hi = int(ids_keep.min()), int(ids_keep.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"{name}: ids must lie in [0, {num_tokens}), got values in [{lo}, {hi}]")
        if K > 1 and bool((ids_keep.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError(f"{name}: a token id is repeated within a sample; ids must be distinct")


def integer(name: str, value, lo: int = 1, hi: int | None = None) -> int:
    """An int (not a bool or float) in [lo, hi] (constructor sizes, counts), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}: expected an integer {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}, "
                         f"got {value!r}")
    return int(value)


def mask_ratio(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"mask_ratio: expected a number in [0, 1), got {value!r}")
    r = float(value)
    if not (0.0 <= r < 1.0):
        raise ValueError(f"mask_ratio: expected a value in [0, 1), got {value}")
    return r


def nonempty(name: str, t: torch.Tensor, labels: str) -> None:
    """Every dimension of ``t`` is non-zero; ``labels`` names them (e.g. "B L D")."""
    names = labels.split()
    for i, n in enumerate(t.shape):
        if n == 0:
            what = names[i] if i < len(names) else f"dimension {i}"
            raise ValueError(f"{name}: {what} is 0 in shape {tuple(t.shape)}; expected a non-empty tensor")


def positive_float(name: str, value, allow_zero: bool = False) -> float:
    """A finite number > 0 (or >= 0 with ``allow_zero``), as a float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return v


def sigmas(name: str, sigma: torch.Tensor) -> None:
    """Noise levels are finite and > 0 (a data-dependent check: skipped like the other value checks)."""
    if value_checks_enabled() and sigma.numel() and not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
        bad = sigma[~(torch.isfinite(sigma) & (sigma > 0))].flatten()[0].item()
        raise ValueError(f"{name}: expected finite noise levels > 0, found {bad}")


def binary_mask(name: str, mask: torch.Tensor) -> None:
    """A mask holds only 0 and 1 (a data-dependent check: skipped like the other value checks)."""
    if value_checks_enabled() and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{name}: expected only 0 (kept) and 1 (dropped), found {bad}")


def activation_dtype(name: str, t: torch.Tensor, weight: torch.Tensor, module: str = "the module") -> None:
    """A module's input ``t`` must have its weights' dtype, or one autocast casts for it (a
    half or single float while autocast is on for its device); fp64 into fp32 weights would
    otherwise fail deep inside a matmul. Costs a dtype comparison when the dtypes agree."""
    if t.dtype == weight.dtype:
        return
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32) and torch.is_autocast_enabled(t.device.type):
        return
    raise ValueError(
        f"{name}: expected dtype {weight.dtype} (the dtype of {module}'s weights; or float16/bfloat16/float32 "
        f"under autocast), got {t.dtype}"
    )

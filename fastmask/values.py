"""Value checks shared by the training configuration and every command's flags, and the command
line's path and device helpers.

A :class:`Check` says what a setting accepts (type, range, choices, pattern) and raises
:class:`~fastmask.errors.UsageError` naming the flag, ``--set`` key or file; :func:`arg_type` makes
it an argparse type, so a flag and a config key are checked the same way. :func:`resolve_device`,
:func:`make_out_dir` and :func:`check_out_file` check a device name and output paths before any
work starts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UsageError


# --------------------------------------------------------------------------- value checks
@dataclass(frozen=True)
class Check:
    """What one setting accepts: a type (int, float, str, bool or a pair of floats), an
    optional range [lo, hi] (``lo_open``/``hi_open`` exclude an end), choices or a pattern, and
    whether None is allowed. :meth:`parse` reads a command-line string, :meth:`check` a value
    from Python or JSON; both return the value or raise ValueError saying what was expected."""

    type: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    pattern: str | None = None
    optional: bool = False
    empty: bool = False  # a str may be empty (informative text only)

    def expected(self) -> str:
        what = {int: "an integer", float: "a finite number", bool: "true or false",
                str: "a string" if self.empty else "a non-empty string",
                tuple: "a pair of numbers a,b"}[self.type]
        if self.choices:
            what = "one of " + ", ".join(map(str, self.choices))
        elif self.pattern:
            what = self.pattern_help
        if self.lo is not None or self.hi is not None:
            if self.lo is not None and self.hi is not None:
                left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
                what += f" in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
            elif self.lo is not None:
                what += f" {'>' if self.lo_open else '>='} {_num(self.lo)}"
            else:
                what += f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return what + (" (or none)" if self.optional else "")

    @property
    def pattern_help(self) -> str:
        return "auto, cpu, cuda or cuda:N" if self.pattern == DEVICE_PATTERN else f"a string matching {self.pattern}"

    def parse(self, text: str):
        """A command-line string converted and checked."""
        t = text.strip()
        if self.optional and t.lower() in ("none", "null"):  # not "": an empty value is a mistake, not none
            return None
        try:
            if self.type is bool:
                value = {"1": True, "true": True, "yes": True, "on": True,
                         "0": False, "false": False, "no": False, "off": False}[t.lower()]
            elif self.type is tuple:
                value = tuple(float(v) for v in t.split(","))
            else:
                value = self.type(t)
            return self.check(value)
        except (ValueError, KeyError):
            raise ValueError(f"expected {self.expected()}, got {text!r}") from None

    def check(self, value):
        """A Python/JSON value checked (ints are accepted for floats, lists for pairs)."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"expected {self.expected()}, got None")
        bad = ValueError(f"expected {self.expected()}, got {value!r}")
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is tuple and isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise bad
        if self.type is str and not self.empty and not value.strip():
            raise bad
        if self.type is int and self.hi is None and abs(value) > MAX_INT:  # beyond any sane count, or int64
            raise bad
        items = value if self.type is tuple else (value,)
        if self.type is tuple and (len(value) != 2 or not all(isinstance(v, (int, float)) for v in value)):
            raise bad
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise bad
            if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
                raise bad
            if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
                raise bad
        if self.choices and value not in self.choices:
            raise bad
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise bad
        return tuple(float(v) for v in value) if self.type is tuple else value


DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"
MAX_INT = 2**31 - 1  # the largest integer a setting takes unless it names its own upper end


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def arg_type(check: Check, name: str | None = None):
    """An argparse ``type=`` that parses and checks with ``check`` (argparse names the flag)."""
    import argparse

    def convert(text: str):
        try:
            return check.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name or check.type.__name__
    return convert


COUNT = Check(int, lo=1, hi=1_000_000)  # a positive count (--steps, --batch-size, --per-class ...)
RATIO = Check(float, lo=0.0, hi=1.0, hi_open=True)  # a mask ratio in [0, 1)
MAX_SAMPLES = 10_000_000  # the most samples one command draws (FID takes 50,000)
DEVICE = Check(str, pattern=DEVICE_PATTERN)


def resolve_device(name: str, flag: str = "--device"):
    """The torch device of a checked device name (auto: CUDA when there is one)."""
    import torch

    try:
        name = DEVICE.check(name)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{flag}: {name!r} was asked for but torch sees no CUDA device")
    return torch.device(name)


def make_out_dir(path, flag: str = "--out"):
    """Create the output folder ``path``; a path that cannot be a folder is a user error naming ``flag``."""
    from pathlib import Path

    if not str(path).strip():
        raise UsageError(f"{flag}: expected a folder, got an empty path")
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{flag}: {str(p)!r} is not a folder (it or a folder above it is a file)") from None
    except OSError as e:
        raise UsageError(f"{flag}: cannot create {str(p)!r}: {e.strerror or e}") from None
    return p


def check_out_file(path, flag: str, suffix: str | None = None):
    """An output file named by ``flag``, checked before any work: a non-empty path (with
    ``suffix`` if given) that is not a folder, in a folder that exists or can be created.
    Returns it as a Path (None stays None)."""
    from pathlib import Path

    if path is None:
        return None
    if not str(path).strip():
        raise UsageError(f"{flag}: expected a file name, got an empty path")
    p = Path(path)
    if suffix and p.suffix != suffix:
        raise UsageError(f"{flag}: expected a {suffix} file name, got {str(p)!r}")
    if p.is_dir():
        raise UsageError(f"{flag}: {str(p)!r} is a folder, expected a file name")
    make_out_dir(p.parent if str(p.parent) else ".", flag)
    return p

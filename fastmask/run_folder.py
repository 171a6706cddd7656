"""A training run's folder and who owns it.

``<out>/`` holds ``checkpoints/`` (the ``ckpt-<step>.safetensors`` files and ``latest.json``,
written by :mod:`fastmask.checkpoint_io`), ``log.jsonl`` (one JSON row per line) and the lock
``.fastmask.lock`` (:class:`fastmask.checkpoint_io.RunLock`). One run owns a folder, at once
(the lock) and over time (:func:`check_run_folder`); the rules are in the README, "Guarantees
of a training run", "One run per folder".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .checkpoint_io import (
    LATEST,
    TMP_SUFFIX,
    RunLock,
    checkpoint_step,
    clean_temp_files,
    resolve,
    verify_finite,
)
from .errors import UsageError


class RunFolder:
    """``out``, its ``checkpoints/`` and ``log.jsonl``. :meth:`open` takes the folder (rank 0
    only), :meth:`close` releases it."""

    def __init__(self, out):
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self.log_path = self.out / "log.jsonl"
        self.lock: RunLock | None = None

    def open(self, say: Callable[[str], None]) -> None:
        """Create the run folders, take the lock, check that both are writable, remove the
        temporary files of a killed writer and the torn last line a kill can leave in the log."""
        for folder in (self.out, self.ckpt_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"out: cannot create the folder {str(folder)!r} ({e.strerror or e})") from None
        try:
            self.lock = RunLock(self.out).acquire()
        except OSError as e:
            raise UsageError(f"out: cannot create the lock file in {str(self.out)!r} ({e.strerror or e})") from None
        for folder in (self.out, self.ckpt_dir):
            probe = folder / f".write-test.{os.getpid()}{TMP_SUFFIX}"
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
                probe.unlink()
            except OSError as e:
                raise UsageError(f"out: the folder {str(folder)!r} is not writable ({e.strerror or e})") from None
        removed = clean_temp_files(self.out) + clean_temp_files(self.ckpt_dir)
        if self.lock.stale:
            say(f"fastmask: took over the lock of a run that ended without releasing it ({self.lock.stale})")
        if removed:
            say(f"fastmask: removed {len(removed)} temporary file(s) left by an interrupted write")
        if self.log_path.exists():
            data = self.log_path.read_bytes()
            if data and not data.endswith(b"\n"):  # a kill in the middle of an append
                with open(self.log_path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def append_log(self, row: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def protected_before(self, step: int) -> list[Path]:
        """What the rotation of a checkpoint at ``step`` must keep: the newest older checkpoint
        (it was verified finite when it was written)."""
        older = [p for p in self.ckpt_dir.glob("ckpt-*.safetensors") if (checkpoint_step(p) or 0) < step]
        return [max(older, key=checkpoint_step)] if older else []

    def last_good_before(self, step: int) -> Path | None:
        """The newest checkpoint from before ``step`` whose tensors are all finite, or None."""
        cands = sorted(
            (p for p in self.ckpt_dir.glob("ckpt-*.safetensors") if (checkpoint_step(p) or step) < step),
            key=checkpoint_step,
            reverse=True,
        )
        return next((p for p in cands if verify_finite(p)), None)


def run_checkpoints(out) -> list[Path]:
    """The checkpoints (and ``latest.json``) a run left in ``<out>/checkpoints``."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    found = sorted(folder.glob("ckpt-*.safetensors"), key=lambda p: checkpoint_step(p) or 0)
    return found + ([folder / LATEST] if (folder / LATEST).exists() else [])


def check_run_folder(out, resume=None, *, flag: str = "out", how: str | None = None) -> None:
    """One run per output folder, over time as well as at once (the lock): a fresh run
    (``resume`` None) refuses a folder that already holds another run's checkpoints, and a
    resume refuses a folder holding checkpoints other than those of the run it resumes. Raises
    :class:`UsageError` naming ``flag`` and how to go on."""
    found = run_checkpoints(out)
    if not found:
        return
    newest = next((checkpoint_step(p) for p in reversed(found) if checkpoint_step(p) is not None), None)
    what = f"the checkpoints of another run (newest at step {newest})" if newest is not None else "another run's checkpoints"
    if resume is None:
        how = how or f"train(..., resume={str(out)!r})"
        raise UsageError(
            f"{flag}: {str(out)!r} already holds {what}; continue that run with {how}, or give another {flag} "
            "(a new run never writes into another run's folder)"
        )
    src = resolve(resume)
    if src.resolve().parent != (Path(out) / "checkpoints").resolve():
        raise UsageError(
            f"{flag}: {str(out)!r} already holds {what}, not those of {str(src)!r}; resume {str(src)!r} into another "
            f"{flag}, or resume the run of {str(out)!r} itself"
        )

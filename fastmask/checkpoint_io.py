"""Training checkpoints: one safetensors file per checkpoint, written atomically.

A checkpoint ``ckpt-0001000.safetensors`` holds, as tensors, the model (``model.*``), its EMA
(``ema.*``), the optimizer state (``optim.<param index>.<name>``) and the torch RNG states
(``rng.torch_cpu``, ``rng.cuda.<i>``, ``rng.numpy``); its string metadata holds the step, the
config, the optimizer's param groups and the Python/NumPy RNG scalars as JSON. One file is
one atomic unit: it is written to a temporary file in the same folder, fsync'ed, then moved in
place with ``os.replace``; ``latest.json`` (written the same way, afterwards) names the newest.
No pickle is involved, so loading a checkpoint never executes code.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import random
import secrets
import socket
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from .errors import UsageError

FORMAT = "fastmask-train-v1"
LATEST = "latest.json"


TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one, never
    a partial one: temp file in the same folder, fsync, os.replace, fsync of the folder. The
    file gets the usual permissions (0666 less the umask, i.e. 0644 by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (not possible on every OS / file system)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def clean_temp_files(folder) -> list[Path]:
    """Delete the temporary files (``.<name>.<pid>.<hex>.tmp``) that a killed writer left in
    ``folder``; call it only while holding the run folder's lock. Returns what was deleted."""
    gone = []
    folder = Path(folder)
    if folder.is_dir():
        for f in folder.glob(f".*{TMP_SUFFIX}"):
            try:
                f.unlink()
                gone.append(f)
            except OSError:
                pass
    return gone


# --------------------------------------------------------------------------- run folder lock
LOCK_NAME = ".fastmask.lock"


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process whose lock file could not be read"


class RunLock:
    """An exclusive lock on a run folder: ``flock`` on ``<folder>/.fastmask.lock``, which holds
    the pid, host and start time of the holder.

    A second run on the same folder gets a :class:`UsageError` naming the holder. The kernel
    releases a flock when its process dies, so the lock of a killed run is simply taken over;
    its leftover record is reported in :attr:`stale` (a clean release empties the record).
    On systems without ``fcntl`` no lock is taken.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.stale: str | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this file system
                os.close(fd)
                warnings.warn(f"out: cannot lock {self.path} ({e.strerror}); two runs on this folder are not prevented")
                return self
            holder = _describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise UsageError(
                f"out: the run folder {str(self.folder)!r} is in use by another fastmask run ({holder}); "
                "wait for it to finish or stop it, or choose another --out"
            ) from None
        prev = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if prev:
            self.stale = _describe_holder(prev)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record marks a clean release
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# --------------------------------------------------------------------------- RNG states
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(npst[1], dtype=np.int64))
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [npst[0], int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "python" in meta:
        v, state, gauss = meta["python"]
        random.setstate((v, tuple(state), gauss))
    if "numpy" in meta and "rng.numpy" in tensors:
        name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- optimizer
def _optim_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{idx}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in g.items()}
              for g in sd["param_groups"]]  # a device-tensor lr (a CUDA-graphed step) is saved as a number
    return tensors, groups


def _optim_from_tensors(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- save / load
def checkpoint_path(folder, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:07d}.safetensors"


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for k, v in tensors.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            return k
    return None


def checkpoint_step(path) -> int | None:
    """The step in a ``ckpt-<step>.safetensors`` file name (None for other names)."""
    name = Path(path).name
    if name.startswith("ckpt-") and name.endswith(".safetensors"):
        try:
            return int(name[5:-12])
        except ValueError:
            return None
    return None


def save_checkpoint(
    folder,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    config: dict,
    extra: dict | None = None,
    keep: int | None = None,
    protect=(),
) -> Path:
    """Write ``ckpt-<step>.safetensors`` in ``folder`` atomically, update ``latest.json``, and
    delete all but the ``keep`` newest step checkpoints, never one named in ``protect``.
    Returns the checkpoint's path.

    Raises ValueError, and writes nothing, if a weight, EMA weight or optimizer state holds a
    NaN or an infinity: a checkpoint on disk is always finite."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    meta = {"format": FORMAT, "step": str(step), "config": json.dumps(config)}
    if optimizer is not None:
        t, groups = _optim_to_tensors(optimizer)
        tensors.update(t)
        meta["optim_param_groups"] = json.dumps(groups)
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise ValueError(f"checkpoint: not written: {bad} holds NaN or infinite values at step {step}")
    t, rng_meta = rng_state()
    tensors.update(t)
    meta["rng"] = json.dumps(rng_meta)
    meta["extra"] = json.dumps(extra or {})
    path = checkpoint_path(folder, step)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    atomic_write_json(Path(folder) / LATEST, {"step": step, "file": path.name})
    if keep is not None and keep > 0:
        keep_names = {path.name} | {Path(p).name for p in protect if p is not None}
        old = sorted(Path(folder).glob("ckpt-*.safetensors"))
        for f in old[:-keep]:
            if f.name not in keep_names:
                f.unlink(missing_ok=True)
    return path


def verify_finite(path) -> bool:
    """Whether every floating-point tensor of the checkpoint file is finite (and it loads)."""
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception:
        return False
    return first_nonfinite({k: v for k, v in tensors.items() if not k.startswith("rng.")}) is None


def resolve(path) -> Path:
    """A checkpoint file from a file path, a checkpoint folder or a run folder (its
    ``checkpoints/`` sub-folder); folders resolve through ``latest.json``."""
    p = Path(path)
    if p.is_dir():
        for folder in (p, p / "checkpoints"):
            if (folder / LATEST).exists():
                try:
                    name = json.loads((folder / LATEST).read_text())["file"]
                except (ValueError, KeyError, TypeError, OSError) as e:
                    raise UsageError(f"checkpoint: {str(folder / LATEST)!r} is damaged ({type(e).__name__}: {e})") from None
                f = folder / name
                if not f.exists():
                    raise UsageError(f"checkpoint: {folder / LATEST} names {name}, which does not exist")
                return f
        raise UsageError(f"checkpoint: folder {str(p)!r} holds no {LATEST} (nor does {str(p / 'checkpoints')!r})")
    if not p.exists():
        raise UsageError(f"checkpoint: {str(p)!r} does not exist")
    return p


def _unreadable(path, e: Exception) -> UsageError:
    return UsageError(
        f"checkpoint: {str(path)!r} is not a readable safetensors checkpoint (truncated or another format?): "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    )


def read_metadata(path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a torn or foreign file
        raise _unreadable(path, e) from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"checkpoint: {str(path)!r} is not a fastmask training checkpoint (format {meta.get('format')!r})")
    out = dict(meta)
    try:
        out["step"] = int(meta["step"])
        for k in ("config", "optim_param_groups", "rng", "extra"):
            if k in meta:
                out[k] = json.loads(meta[k])
    except (KeyError, ValueError) as e:
        raise UsageError(f"checkpoint: {str(path)!r} has damaged metadata ({type(e).__name__}: {e})") from None
    return out


def load_checkpoint(path, device="cpu") -> dict:
    """{'step', 'config', 'model' (state dict), 'ema' (state dict or None), 'optimizer' (state dict
    or None), 'rng' (tensors, meta), 'extra', 'path'}."""
    path = resolve(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as e:
        raise _unreadable(path, e) from None
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    opt = None
    if "optim_param_groups" in meta:
        opt = _optim_from_tensors({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optim_param_groups"])
    rng = ({k: v.cpu() for k, v in tensors.items() if k.startswith("rng.")}, meta.get("rng", {}))
    return {
        "step": meta["step"],
        "config": meta.get("config", {}),
        "model": model,
        "ema": ema,
        "optimizer": opt,
        "rng": rng,
        "extra": meta.get("extra", {}),
        "path": path,
    }

"""The training loop: masked phase, unmasking fine-tune, EMA, checkpoints, DDP.

Phase 1 trains at ``mask_ratio`` (constant, or a linear/cosine schedule) for ``steps`` steps
(or until ``minutes`` run out); phase 2, the unmasking fine-tune, trains at ratio 0 with
``finetune_lr`` (default lr / 2) for ``finetune_steps``. One global step counter runs across
both phases.

Reproducibility. Every random draw of a step (label drop, sigma, noise, mask, the VAE
posterior eps of latents) comes from a generator seeded by (seed, step) and is drawn for the
whole global batch, each rank then taking its slice; the data order is a pure function of
(seed, epoch) (:mod:`fastmask.data`). So a run is the same after a resume (bit for bit on CPU)
and the same on 1 or N ranks (to float rounding). The RNG states of torch/Python/NumPy are
still saved in checkpoints for anything else that draws from them.

Resume. ``steps`` is the total number of phase-1 (masked) steps and ``minutes`` the phase-1
training time summed over every resume; phase 2 then runs ``finetune_steps`` steps (or up to
``finetune_minutes`` of fine-tune time, also a total). A resumed run continues towards these
totals, so ``--steps 10`` and then ``--resume --steps 20`` trains 10 more masked steps; if the
fine-tune had already run, it runs again after them.

Safety. Rank 0 locks the run folder (a second run on it is refused, naming the holder). Every
checkpoint is written atomically and only if its weights, EMA and optimizer state are finite.
The loss terms and the first step with a non-finite loss are kept on the device and read every
``log_every`` steps and before each checkpoint (no host sync per step); a non-finite loss stops
the run naming that step and the newest checkpoint from before it, verified finite and never
deleted by the rotation. SIGINT and SIGTERM finish the step and save; any other error inside
the loop saves the current state (if whole and finite) and is re-raised.

Distributed: launch with ``torchrun --nproc_per_node=N -m fastmask train ...``; the process
group uses nccl on GPUs and gloo on CPUs; only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from . import ops, step_graph
from .checkpoint_io import (
    LATEST,
    TMP_SUFFIX,
    RunLock,
    checkpoint_step,
    clean_temp_files,
    load_checkpoint,
    resolve,
    save_checkpoint,
    set_rng_state,
    verify_finite,
)
from .data import batch_indices, build_dataset, check_labels, make_sampler
from .errors import UsageError
from .latents import check_manifest as check_latent_manifest
from .models import EDMPrecond, FlowPrecond, build_model, draw_sigma, draw_t
from .presets import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the first such step and the
    last good checkpoint (verified finite, and never deleted by the rotation)."""


class TrainingInterrupted(KeyboardInterrupt):
    """A signal (SIGINT or SIGTERM) stopped training. ``signum`` is the signal, ``checkpoint``
    the file that holds the state at the stop, or None if none was saved."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(f"training stopped by signal {int(signum)}")
        self.signum, self.checkpoint = int(signum), checkpoint


# --------------------------------------------------------------------------- setup
def distributed_info(device: str = "auto"):
    """(rank, world_size, device). Initialises the process group from torchrun's environment
    variables (nccl on CUDA, gloo otherwise) unless one is already initialised."""
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} was asked for but torch sees no CUDA device")
        if device in ("auto", "cuda"):
            local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0)) % torch.cuda.device_count()
            dev = torch.device("cuda", local)
        else:
            dev = torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return rank, world, dev


def mask_ratio_at(cfg: TrainConfig, step: int, phase: int, progress: float | None = None) -> float:
    """The mask ratio of a step. The schedule's position t in [0, 1] is ``progress`` if given,
    else step / (steps - 1). A run without ``steps`` (a ``minutes`` budget) has no step count to
    divide by: the trainer passes the elapsed fraction of the time budget (:meth:`Trainer._mask_ratio`)."""
    if phase == 2:
        return 0.0
    r0 = cfg.mask_ratio
    r1 = cfg.mask_ratio if cfg.mask_ratio_end is None else cfg.mask_ratio_end
    if cfg.mask_schedule == "constant" or r0 == r1:
        return r0
    if progress is None and cfg.steps is None:
        raise ValueError("progress: a run without steps schedules its mask ratio by the elapsed fraction of minutes")
    t = min(max(float(progress), 0.0), 1.0) if progress is not None else min(step / max(cfg.steps - 1, 1), 1.0)
    if cfg.mask_schedule == "linear":
        return r0 + (r1 - r0) * t
    return r1 + (r0 - r1) * 0.5 * (1 + math.cos(math.pi * t))


def lr_at(cfg: TrainConfig, step: int, phase: int) -> float:
    base = cfg.phase_lr(phase)
    if phase == 1 and cfg.warmup_steps > 0:
        return base * min(1.0, (step + 1) / cfg.warmup_steps)
    return base


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA decay of the update after ``step`` optimizer steps: ``ema_decay``, or with
    ``ema_warmup`` min(ema_decay, (1 + step) / (10 + step)) so that a short run's EMA does not
    still hold mostly the initial weights."""
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


def step_randomness(
    seed: int,
    step: int,
    global_batch: int,
    shape: tuple[int, int, int],
    num_tokens: int,
    mask_ratio: "float | ops.TokenStrategy",
    label_dropout: float,
    latents: bool,
    device,
    t_schedule: str | None = None,
) -> dict[str, Tensor | None]:
    """All random draws of global step ``step``, for the whole global batch, from one generator
    seeded by (seed, step): label-drop flags [B], sigma [B], noise [B, C, H, W] (unit, times
    sigma later), ids_keep [B, K] (None at ratio 0) and the latent posterior eps (or None).
    With ``t_schedule`` (the flow objective) the draw in sigma's place is the time t [B]
    (key ``t``; ``sigma`` is None) and the noise is x0."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed((seed % 2**31) * 2**32 + step)
    B = global_batch
    drop = torch.rand(B, generator=g, device=dev) < label_dropout
    t = sigma = None
    if t_schedule is None:
        sigma = draw_sigma(B, generator=g, device=dev)
    else:
        t = draw_t(B, schedule=t_schedule, generator=g, device=dev)
    noise = torch.randn((B, *shape), generator=g, device=dev)
    tokens = ops.as_strategy(mask_ratio)  # a ratio: MaskDiT's random tokens (or any TokenStrategy)
    ids_keep = None if tokens.keeps_all(num_tokens) else tokens.draw(B, num_tokens, generator=g, device=dev)
    eps = torch.randn((B, *shape), generator=g, device=dev) if latents else None
    return {"drop": drop, "sigma": sigma, "t": t, "noise": noise, "ids_keep": ids_keep, "eps": eps}


class _LossModule(nn.Module):
    """The loss as a module, so that DistributedDataParallel sees the forward pass."""

    def __init__(self, precond: EDMPrecond | FlowPrecond, mae_coef: float):
        super().__init__()
        self.precond, self.mae_coef = precond, mae_coef

    def forward(self, y, labels, drop, sigma, noise, ids_keep):  # sigma: the times t under flow
        return self.precond.loss_given(
            y, labels, sigma, noise, ids_keep, mae_coef=self.mae_coef, force_drop_ids=drop, check_ids=False,
            check_sigma=False,
        )


_NO_BAD = 2**62  # "no non-finite step yet" in the on-device record of the first bad step


def _first_difference(own: dict, theirs: dict) -> str | None:
    """One line naming the first key or shape in which two state dicts differ, or None."""
    for k, v in own.items():
        if k not in theirs:
            return f"the model has {k!r} {tuple(v.shape)}, the checkpoint does not"
        if tuple(theirs[k].shape) != tuple(v.shape):
            return f"{k!r} is {tuple(theirs[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
    for k, v in theirs.items():
        if k not in own:
            return f"the checkpoint has {k!r} {tuple(v.shape)}, the model does not"
    return None


# --------------------------------------------------------------------------- trainer
class Trainer:
    """One training run. ``hooks`` (for tests and experiments): ``{"loss": f(step, loss [B]) ->
    loss [B]}`` is applied to the per-sample loss, ``{"after_step": f(trainer, step)}`` after
    every optimizer step.

    ``compile_step``: None (eager) or a dict of :func:`torch.compile` options (``{}`` for the
    defaults) for :meth:`device_step`, the forward pass, loss and bookkeeping of one step; it is
    traced with ``fullgraph=True`` and makes no host sync, so ``mode="reduce-overhead"`` can
    capture it in a CUDA graph.

    Rank 0 holds an exclusive lock on ``cfg.out`` from construction until :meth:`close` (called
    by :func:`train`), so that two runs never write into one folder.
    """

    def __init__(self, cfg: TrainConfig, *, hooks: dict | None = None, progress: bool | None = None,
                 compile_step: dict | None = None):
        cfg.validate()
        self.cfg = cfg
        self.hooks = hooks or {}
        self.rank, self.world, self.device = distributed_info(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size: the global batch {cfg.batch_size} is not divisible by {self.world} ranks")
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.log_path = self.out / "log.jsonl"
        self.progress = progress
        self._lock: RunLock | None = None
        if self.rank == 0:
            self._prepare_folder()
        try:
            self._setup(compile_step)
        except BaseException:
            self.close()
            raise

    def _prepare_folder(self) -> None:
        """Create the run folders, take the lock, check that both are writable, remove the
        temporary files of a killed writer and the torn last line a kill can leave in the log."""
        for folder in (self.out, self.ckpt_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"out: cannot create the folder {str(folder)!r} ({e.strerror or e})") from None
        try:
            self._lock = RunLock(self.out).acquire()
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
        if self._lock.stale:
            self.say(f"fastmask: took over the lock of a run that ended without releasing it ({self._lock.stale})")
        if removed:
            self.say(f"fastmask: removed {len(removed)} temporary file(s) left by an interrupted write")
        if self.log_path.exists():
            data = self.log_path.read_bytes()
            if data and not data.endswith(b"\n"):  # a kill in the middle of an append
                with open(self.log_path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def _setup(self, compile_step) -> None:
        cfg = self.cfg
        check_latent_manifest(cfg)  # a `fastmask latents` folder: its manifest must fit the config
        self.data = build_dataset(cfg)
        if len(self.data) == 0:
            raise ValueError(f"data: the data set {cfg.data!r} is empty")
        self.num_classes = self.data.num_classes if cfg.num_classes is None else cfg.num_classes
        check_labels(self.data, self.num_classes)
        torch.manual_seed(cfg.seed)
        self.net = build_model(cfg, self.data.shape, self.num_classes).to(self.device)
        if hasattr(self.net.model, "class_dropout_prob"):
            self.net.model.class_dropout_prob = cfg.label_dropout
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        cuda = self.device.type == "cuda"
        # On CUDA the lr and the EMA weight are device tensors, set before each step outside the
        # step's work, and AdamW is fused and capturable: the step can be one CUDA graph.
        self._lr_t = torch.full((), float(cfg.lr), device=self.device) if cuda else None
        self._ema_w = torch.zeros((), device=self.device) if cuda else None
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=self._lr_t if cuda else cfg.lr, betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay, **({"fused": True, "capturable": True} if cuda else {}),
        )
        self.sampler = make_sampler(len(self.data), cfg.seed)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.step = 0
        self.phase1_end: int | None = None  # the step at which the last phase 1 ended
        self.p1_steps = 0  # phase-1 (masked) steps done, over every resume
        self.elapsed = {"1": 0.0, "2": 0.0}
        self.mask_sched: dict | None = None  # the last mask ratio and the schedule position it came from
        self.last_ckpt: tuple[int, Path] | None = None
        self._interrupted = 0  # the signal number of a pending stop request
        self._aborted = False
        self._in_update = False
        self._loss_module = None
        # on-device bookkeeping, read by the host every log_every steps (no sync per step)
        dev = self.device
        acc_dtype = torch.float32 if dev.type == "mps" else torch.float64
        self._acc = torch.zeros(3, dtype=acc_dtype, device=dev)
        self._bad = torch.full((), _NO_BAD, dtype=torch.int64, device=dev)
        self._bad_val = torch.zeros((), dtype=acc_dtype, device=dev)
        self._step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self._step_fn = self.device_step
        self._compiled = compile_step is not None
        if self._compiled:
            self._step_fn = torch.compile(self.device_step, fullgraph=True, **compile_step)
        self._graphs: step_graph.StepGraphs | None = None
        self.graph_reason = self._graph_off_reason()
        if self.graph_reason is None:
            self._graphs = step_graph.StepGraphs(dev, max_graphs=3, say=self.say)
        elif cfg.cuda_graph and dev.type == "cuda":
            self.say(f"fastmask: the training step runs eagerly, not as a CUDA graph: {self.graph_reason}")
        skipped = getattr(self.data, "skipped", None)
        if skipped:
            self.say(f"fastmask: data: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
            self.log({"event": "data", "skipped_images": len(skipped), "example": str(skipped[0])})

    def _graph_off_reason(self) -> str | None:
        """Why the step is not captured as one CUDA graph (None: it is)."""
        if not self.cfg.cuda_graph:
            return "cuda_graph is off in the config"
        why = step_graph.unavailable_reason(self.device)
        if why is not None:
            return why
        if self._compiled:
            return "the step is compiled (torch.compile's own CUDA graphs: mode='reduce-overhead')"
        if self.world > 1:
            return f"distributed training ({self.world} ranks): the gradient all-reduce is not captured"
        if "loss" in self.hooks:
            return "a 'loss' hook is set (it runs Python per step)"
        return None

    def close(self) -> None:
        """Release the run folder's lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ---- checkpoints
    def state_extra(self) -> dict:
        return {
            "phase1_end": self.phase1_end,
            "phase1_steps": self.p1_steps,
            "elapsed": self.elapsed,
            "mask_schedule": self.mask_sched,  # what the last step's mask ratio was computed from
            "world_size": self.world,
            "data_shape": list(self.data.shape),
            "data_kind": self.data.kind,
            "num_classes": self.num_classes,
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current state, after checking on every rank that no
        loss so far was non-finite (raises :class:`NonFiniteLossError` otherwise). Returns None
        (and keeps every older checkpoint) if a weight or optimizer state is not finite."""
        self._sync(phase=None)
        path = None
        if self.rank == 0:
            older = [p for p in self.ckpt_dir.glob("ckpt-*.safetensors") if (checkpoint_step(p) or 0) < self.step]
            protect = [max(older, key=checkpoint_step)] if older else []  # the newest verified one
            try:
                path = save_checkpoint(
                    self.ckpt_dir,
                    model=self.net,
                    ema=self.ema,
                    optimizer=self.opt,
                    step=self.step,
                    config=self.cfg.to_dict(),
                    extra=self.state_extra(),
                    keep=self.cfg.keep_checkpoints,
                    protect=protect,
                )
            except ValueError as e:
                self.say(f"fastmask: {e}; the older checkpoints are kept")
                self.log({"event": "checkpoint_refused", "step": self.step, "reason": str(e)})
            else:
                self.last_ckpt = (self.step, path)
                self.log({"event": "checkpoint", "step": self.step, "file": str(path)})
        if self.world > 1:
            dist.barrier()
        return path

    def resume(self, path, *, allow_partial: bool = False) -> None:
        """Continue the run saved in ``path`` (a checkpoint file, or a folder resolved through
        latest.json). The checkpoint must hold the optimizer state and the EMA weights, or the
        run could not continue exactly; ``allow_partial=True`` resumes anyway, with a warning
        (fresh optimizer moments; the EMA restarts from the weights)."""
        ck = load_checkpoint(path, device="cpu")
        path = ck["path"]
        missing = [n for n, v in (("optimizer state", ck["optimizer"]), ("EMA weights", ck["ema"])) if v is None]
        if missing and not allow_partial:
            raise UsageError(
                f"resume: {str(path)!r} holds no {' and no '.join(missing)}, so the run cannot continue exactly; "
                "start a new run from its weights, or resume with allow_partial_resume=True to accept that"
            )
        if missing:
            msg = f"resume: {path} holds no {' and no '.join(missing)}; the run does not continue exactly"
            warnings.warn(msg, stacklevel=2)
            self.say(f"fastmask: warning: {msg}")
        want = list(self.data.shape)
        have = ck["extra"].get("data_shape")
        if have is not None and list(have) != want:
            raise UsageError(f"resume: {str(path)!r} was trained on data of shape {tuple(have)}, this data is {tuple(want)}")
        theirs = (ck.get("config") or {}).get("objective", "edm")  # checkpoints from before the key: EDM
        if theirs != self.cfg.objective:
            raise UsageError(f"resume: {str(path)!r} was trained with objective {theirs!r}, this run asks for "
                             f"{self.cfg.objective!r}; the weights would not continue the same training")
        diff = _first_difference(self.net.state_dict(), ck["model"])
        if diff is None and ck["ema"] is not None:
            diff = _first_difference(self.ema.state_dict(), ck["ema"])
        if diff is not None:
            raise UsageError(
                f"resume: {str(path)!r} does not fit the model (arch {self.cfg.arch}, model {self.cfg.model}): {diff}"
            )
        self.net.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"] if ck["ema"] is not None else ck["model"])
        if ck["optimizer"] is not None:
            # this run's AdamW (fused and capturable on CUDA, plain on the CPU) decides where its
            # state lives, not the saving run's: a CPU checkpoint resumes on CUDA and back
            for saved, own in zip(ck["optimizer"]["param_groups"], self.opt.param_groups):
                saved.update({k: own[k] for k in ("fused", "capturable", "foreach", "differentiable") if k in own})
            try:
                self.opt.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise UsageError(f"resume: the optimizer state in {str(path)!r} does not fit the model ({e})") from None
        set_rng_state(*ck["rng"])
        self.step = ck["step"]
        self._step_t.fill_(self.step)
        extra = ck["extra"]
        self.phase1_end = extra.get("phase1_end")
        p1 = extra.get("phase1_steps")
        self.p1_steps = int(p1) if p1 is not None else (self.phase1_end if self.phase1_end is not None else self.step)
        self.elapsed = {str(k): float(v) for k, v in extra.get("elapsed", self.elapsed).items()}
        self.mask_sched = extra.get("mask_schedule")
        self.last_ckpt = (self.step, path)
        if self.phase1_end is not None:
            # phase 1 ended before; a larger step count or time budget continues it (after a
            # fine-tune that had begun, that fine-tune then runs again in full afterwards)
            self.phase1_end = None
            if self._phase_done(1) or self._time_up(1):
                self.phase1_end = extra.get("phase1_end")
            else:
                self.say(f"fastmask: continuing phase 1 from {self.p1_steps} masked steps to the new budget")
        self.log({"event": "resume", "step": self.step, "file": str(path)})

    # ---- logging
    def log(self, row: dict) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def say(self, msg: str) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    # ---- the loop
    def _wrap(self, phase: int):
        """The (DDP-wrapped) loss module for a phase. The MaskDiT mask token is unused at ratio
        0, so it is frozen there (DDP insists that every trainable parameter gets a gradient)."""
        net = self.net.model
        end = self.cfg.mask_ratio if self.cfg.mask_schedule == "constant" else self.cfg.mask_ratio_end
        ratios_zero = phase == 2 or max(self.cfg.mask_ratio, end or 0.0) == 0
        if hasattr(net, "mask_token"):
            net.mask_token.requires_grad_(not ratios_zero)
        module = _LossModule(self.net, self.cfg.mae_coef)
        if self.world > 1:
            varying = self.cfg.mask_schedule != "constant" and phase == 1
            module = nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=varying,
            )
        self._loss_module = module

    def _phase_done(self, phase: int) -> bool:
        cfg = self.cfg
        if phase == 1:
            return cfg.steps is not None and self.p1_steps >= cfg.steps
        return self.step >= self.phase1_end + cfg.finetune_steps

    def _time_up(self, phase: int) -> bool:
        cap = self.cfg.minutes if phase == 1 else self.cfg.finetune_minutes
        return cap is not None and self.elapsed[str(phase)] >= cap * 60

    def _install_handlers(self):
        """SIGINT and SIGTERM: the first finishes the step and saves, a second aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        prev = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            if self._interrupted:  # second signal: stop right now, without saving a half-done step
                for s, h in prev.items():
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
                self._aborted = True
                raise TrainingInterrupted(signum, None)
            self._interrupted = signum
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.say(f"fastmask: {name}: finishing this step, saving a checkpoint (send it again to abort)")

        for s in prev:
            signal.signal(s, on_signal)
        return prev

    def run(self) -> dict:
        """Train both phases from the current state; returns a summary.

        What ``steps``, ``minutes`` and the phases mean, also after a resume: ``steps`` is the
        total number of phase-1 (masked) steps and ``minutes`` the total phase-1 training
        time, both counted over every resume (whichever comes first); phase 2 then runs
        ``finetune_steps`` steps (or ``finetune_minutes`` of fine-tune time, also a total).
        A resume continues towards these totals: ``--steps 10`` and later ``--resume --steps
        20`` trains 10 more masked steps. If the fine-tune had already run, it runs again after
        them (up to its step count; its time budget is a total)."""
        prev = self._install_handlers()
        try:
            if self.phase1_end is not None and (self._phase_done(2) or self._time_up(2) or self.cfg.finetune_steps == 0):
                self.say(
                    f"fastmask: nothing to train: the run is at step {self.step} (phase 1 ended at step "
                    f"{self.phase1_end}, finetune_steps={self.cfg.finetune_steps}); raise finetune_steps to train on"
                )
            if self.phase1_end is None:
                self._run_phase(1)
                if self.cfg.finetune_steps > 0:
                    self.save()
            self._run_phase(2)
            if self.last_ckpt is None or self.last_ckpt[0] != self.step:
                self.save()
        except NonFiniteLossError:
            raise
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", None) or self._interrupted or signal.SIGINT
            if self._aborted:
                last = f"; the last checkpoint is {self.last_ckpt[1]}" if self.last_ckpt else ""
                self.say(f"fastmask: aborted during step {self.step}{last}")
                raise TrainingInterrupted(signum, None) from None
            # a stop request is agreed on by every rank (at a log boundary), so all of them save
            path = self._save_after_stop(f"interrupted at step {self.step}", collective=bool(self._interrupted))
            raise TrainingInterrupted(signum, path) from None
        except Exception as e:
            self._save_after_stop(f"{type(e).__name__} at step {self.step}")
            raise
        finally:
            for s, h in prev.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        return self.summary()

    def _save_after_stop(self, why: str, collective: bool = False) -> Path | None:
        """Save the current state after a stop or an error, if that state is whole (the error
        did not strike inside the optimizer/EMA update) and finite. On several ranks only for
        a ``collective`` stop that every rank reached at the same step (a signal), since the
        save waits for all of them."""
        if self._in_update or (self.world > 1 and not collective):
            self.say(f"fastmask: {why}: no checkpoint saved (the state may be torn); the last one is "
                     f"{self.last_ckpt[1] if self.last_ckpt else 'none'}")
            return None
        if self.last_ckpt is not None and self.last_ckpt[0] == self.step and self.last_ckpt[1].exists():
            self.say(f"fastmask: {why}: the checkpoint {self.last_ckpt[1]} holds this state")
            return self.last_ckpt[1]
        try:
            path = self.save()
        except NonFiniteLossError as e:
            self.say(f"fastmask: {why}: no checkpoint saved: {e}")
            return None
        if path is not None:
            self.say(f"fastmask: {why}: saved {path}")
        return path

    def summary(self) -> dict:
        return {
            "steps": self.step,
            "phase1_steps": self.p1_steps,
            "phase2_steps": self.step - self.p1_steps,
            "train_seconds": dict(self.elapsed),
            "train_seconds_total": sum(self.elapsed.values()),
            "checkpoint": str(self.last_ckpt[1]) if self.last_ckpt else None,
            "world_size": self.world,
            "device": str(self.device),
            "step_graph": "on" if self._graphs is not None else f"off: {self.graph_reason}",
        }

    def _run_phase(self, phase: int) -> None:
        cfg = self.cfg
        if phase == 2 and cfg.finetune_steps == 0:
            return
        self._wrap(phase)
        self.net.train()
        offset = self.step - self.p1_steps if phase == 1 else 0  # fine-tune steps before a continued phase 1
        total = (cfg.steps + offset if cfg.steps is not None else None) if phase == 1 else (
            (self.phase1_end or 0) + cfg.finetune_steps
        )
        if not self._phase_done(phase) and not self._time_up(phase):
            self.say(
                f"fastmask: phase {phase} ({'mask ratio ' + str(cfg.mask_ratio) if phase == 1 else 'unmasking fine-tune'})"
                f" from step {self.step}" + (f" to {total}" if total else f" for {cfg.minutes:.2f} min")
            )
            self.log({"event": "phase", "phase": phase, "step": self.step})
        from tqdm import tqdm

        disable = self.rank != 0 or (self.progress is False) or (self.progress is None and not sys.stderr.isatty())
        bar = tqdm(total=total, initial=self.step, desc=f"phase {phase}", disable=disable, dynamic_ncols=True)
        t_interval, n = time.perf_counter(), 0
        try:
            while not self._phase_done(phase):
                if self.world == 1 and (self._interrupted or self._time_up(phase)):
                    break
                t0 = time.perf_counter()
                self._train_step(phase)
                self.elapsed[str(phase)] += time.perf_counter() - t0
                n += 1
                if "after_step" in self.hooks:
                    self.hooks["after_step"](self, self.step)
                bar.update(1)
                log_now = self.step % cfg.log_every == 0 or self._phase_done(phase)
                ckpt_now = bool(cfg.ckpt_every) and self.step % cfg.ckpt_every == 0 and not self._phase_done(phase)
                stop = False
                if log_now:
                    stop, loss, ips = self._sync(phase, n, time.perf_counter() - t_interval)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
                    t_interval, n = time.perf_counter(), 0
                if ckpt_now:
                    self.save()
                if stop:
                    break
            if n:  # the partial interval before a time cap or a stop request
                self._sync(phase, n, time.perf_counter() - t_interval)
        finally:
            bar.close()
        if self._interrupted:
            raise KeyboardInterrupt
        if phase == 1:
            self.phase1_end = self.step

    def _sync(self, phase: int | None, n: int = 0, seconds: float = 0.0):
        """The one host sync of an interval: reads (and on several ranks all-reduces) the summed
        loss terms, the first non-finite step and the stop requests; raises
        :class:`NonFiniteLossError` if a loss was not finite; logs the interval if ``n``.
        Returns (stop, mean loss, images per second)."""
        dev = self._acc.device
        flags = torch.tensor([float(bool(self._interrupted)), float(phase is not None and self._time_up(phase))],
                             dtype=self._acc.dtype)
        maxed = torch.cat([(-self._bad).to(self._acc.dtype).view(1), flags.to(dev)])
        summed = self._acc.clone()
        if self.world > 1:
            dist.all_reduce(summed)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
            summed /= self.world
        vals = torch.cat([summed, maxed, self._bad_val.view(1).to(summed.dtype)]).tolist()
        bad = int(-vals[3])
        if bad != _NO_BAD:
            raise self._nonfinite(bad, vals[6] if int(self._bad.item()) == bad else float("nan"))
        stop = bool(vals[4]) or bool(vals[5])
        if vals[4] and not self._interrupted:
            self._interrupted = signal.SIGINT
        loss = ips = float("nan")
        if n and phase is not None:
            loss, dsm, mae = (v / n for v in vals[:3])
            ips = n * self.cfg.batch_size / max(seconds, 1e-9)
            self._acc.zero_()
            self.log(
                {
                    "step": self.step,
                    "phase": phase,
                    "loss": loss,
                    "dsm": dsm,
                    "mae": mae,
                    "mask_ratio": self.mask_sched["ratio"] if phase == 1 and self.mask_sched else 0.0,
                    "lr": lr_at(self.cfg, self._sched_step(phase) - 1, phase),
                    "img_per_s": ips,
                    "elapsed_s": sum(self.elapsed.values()),
                }
            )
        return stop, loss, ips

    def _nonfinite(self, bad: int, value: float) -> NonFiniteLossError:
        phase = 1 if self.phase1_end is None or bad < self.phase1_end else 2
        sched = bad - (self.step - self.p1_steps) if phase == 1 else bad
        good = None
        if self.rank == 0:
            cands = sorted(
                (p for p in self.ckpt_dir.glob("ckpt-*.safetensors") if (checkpoint_step(p) or bad) < bad),
                key=checkpoint_step,
                reverse=True,
            )
            good = next((p for p in cands if verify_finite(p)), None)
        last = (
            f"the last good checkpoint is {good} (step {checkpoint_step(good)}, verified finite)"
            if good is not None
            else "no finite checkpoint from before that step exists"
        )
        return NonFiniteLossError(
            f"training stopped: the loss is {value} at step {bad} (phase {phase}, mask ratio "
            f"{(self.mask_sched or {}).get('ratio') if phase == 1 and self.cfg.steps is None else mask_ratio_at(self.cfg, sched, phase)}, lr {lr_at(self.cfg, sched, phase):g}); {last}. "
            "Lower the lr or set grad_clip, then resume from that checkpoint."
        )

    def device_step(self, y, labels, drop, sigma, noise, ids_keep, step_t, bad, bad_val, acc):
        """The device work of one step before the backward pass: the loss (returned as the batch
        mean, to differentiate) and the bookkeeping that replaces a per-step host sync: the
        summed loss terms ``acc`` and the first step whose loss was not finite (``bad``, with
        its value ``bad_val``). Traceable by ``torch.compile(fullgraph=True)``."""
        loss, dsm, mae = self._loss_module(y, labels, drop, sigma, noise, ids_keep)
        if "loss" in self.hooks:
            loss = self.hooks["loss"](int(self.step), loss)
        mean = loss.mean()
        vals = torch.stack([mean.detach(), dsm.detach().float().mean(), mae.detach().float().mean()]).to(acc.dtype)
        first = (bad == _NO_BAD) & ~torch.isfinite(vals[0])
        bad = torch.where(first, step_t, bad)
        bad_val = torch.where(first, vals[0], bad_val)
        return mean, bad, bad_val, acc + vals

    def _train_step(self, phase: int) -> None:
        cfg, dev = self.cfg, self.device
        step = self.step
        ratio = self._mask_ratio(phase)
        lr = lr_at(cfg, self._sched_step(phase), phase)
        net = self.net.model
        rnd = step_randomness(
            cfg.seed,
            step,
            cfg.batch_size,
            self.data.shape,
            net.num_patches,
            self.net.token_strategy(ratio),  # TREAD rounds K its own way
            cfg.label_dropout,
            self.data.kind == "latents",
            dev,
            cfg.t_schedule if cfg.objective == "flow" else None,
        )
        level = rnd["t"] if cfg.objective == "flow" else rnd["sigma"]
        per = cfg.batch_size // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        idx = batch_indices(self.sampler, step, cfg.batch_size, self.rank, self.world)
        eps = rnd["eps"][sl] if rnd["eps"] is not None else None
        y, labels = self.data.batch(idx, eps=eps.cpu() if eps is not None else None)
        y = y.to(dev, non_blocking=True)
        labels = labels.to(dev, non_blocking=True) if self.num_classes > 0 else None
        ids_keep = rnd["ids_keep"][sl] if rnd["ids_keep"] is not None else None
        self._set_hyperparameters(lr, ema_decay_at(cfg, self.step))
        if not self._compiled:  # eager or one CUDA graph: the same function either way
            inputs = {"y": y, "labels": labels, "drop": rnd["drop"][sl], "sigma": level[sl],
                      "noise": rnd["noise"][sl], "ids_keep": ids_keep}
            self._in_update = True
            if self._graphs is not None:
                key = (tuple(y.shape), None if ids_keep is None else tuple(ids_keep.shape), labels is None)
                self._graphs.run(key, self._whole_step, inputs)
            else:
                self._whole_step(**inputs)
            self.step += 1
            self.p1_steps += phase == 1
            self._step_t += 1
            self._in_update = False
            return
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        if self._compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA-graph outputs may be reused
        with ctx, ops.checks.trusted_values():  # labels checked at start-up, ids and sigmas drawn here
            mean, bad, bad_val, acc = self._step_fn(
                y, labels, rnd["drop"][sl], level[sl], rnd["noise"][sl], ids_keep,
                self._step_t, self._bad, self._bad_val, self._acc,
            )
        if self._compiled:  # keep the running state out of the CUDA-graph memory pool
            bad, bad_val, acc = bad.clone(), bad_val.clone(), acc.clone()
        self._bad, self._bad_val, self._acc = bad, bad_val, acc
        self.opt.zero_grad(set_to_none=True)
        mean.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self._in_update = True
        self.opt.step()
        self._update_ema()
        self.step += 1
        self.p1_steps += phase == 1
        self._step_t += 1
        self._in_update = False

    def _set_hyperparameters(self, lr: float, decay: float) -> None:
        """The step's lr and EMA decay: into device tensors on CUDA (read by the captured step),
        as Python numbers elsewhere."""
        if self._lr_t is not None:
            self._lr_t.fill_(lr)
            self._ema_w.fill_(1.0 - decay)
        for g in self.opt.param_groups:
            g["lr"] = self._lr_t if self._lr_t is not None else lr  # a resume may have replaced it
        self._ema_weight = self._ema_w if self._ema_w is not None else 1.0 - decay

    def _whole_step(self, y, labels, drop, sigma, noise, ids_keep) -> None:
        """Forward, backward, gradient clipping, AdamW and the EMA update of one step, every
        effect in place (what :class:`fastmask.step_graph.StepGraphs` captures)."""
        amp = self.amp and self.device.type == "cuda"
        # the autocast cast cache must not outlive a capture
        ctx = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=self._graphs is None) if amp else \
            contextlib.nullcontext()
        with ctx, ops.checks.trusted_values():  # labels checked at start-up, ids and sigmas drawn here
            mean, bad, bad_val, acc = self.device_step(
                y, labels, drop, sigma, noise, ids_keep, self._step_t, self._bad, self._bad_val, self._acc
            )
        self._bad.copy_(bad)
        self._bad_val.copy_(bad_val)
        self._acc.copy_(acc)
        self.opt.zero_grad(set_to_none=True)
        mean.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self._update_ema(self._ema_weight)

    def _mask_ratio(self, phase: int) -> float:
        """The mask ratio of the next step, recorded (``self.mask_sched``, saved in checkpoints).
        A run with ``steps`` schedules by phase-1 steps; a minutes-only run by the elapsed fraction
        of its phase-1 time budget. That elapsed time is saved and restored, so a resumed run
        continues the schedule from exactly where it stopped."""
        cfg = self.cfg
        progress = None
        if phase == 1 and cfg.steps is None and cfg.minutes is not None:
            progress = min(self.elapsed["1"] / (cfg.minutes * 60), 1.0) if cfg.minutes > 0 else 1.0
        ratio = mask_ratio_at(cfg, self._sched_step(phase), phase, progress)
        self.mask_sched = {"by": "steps" if progress is None else "minutes", "step": self._sched_step(phase),
                           "progress": progress, "ratio": ratio}
        return ratio

    def _sched_step(self, phase: int) -> int:
        """The step the schedules (mask ratio, lr warm-up) see: phase-1 steps in phase 1."""
        return self.p1_steps if phase == 1 else self.step

    @torch.no_grad()
    def _update_ema(self, weight=None) -> None:
        """EMA towards the weights by ``weight`` (1 - decay; a device tensor in a graphed step),
        by default that of the current step."""
        ema_p = list(self.ema.parameters())
        p = [q.detach() for q in self.net.parameters()]
        if weight is None:
            weight = 1.0 - ema_decay_at(self.cfg, self.step)
        if isinstance(weight, Tensor):  # one 0-d weight per tensor: a lone tensor would be read as a number (a sync)
            weight = [weight] * len(ema_p)
        torch._foreach_lerp_(ema_p, p, weight)


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


def train(cfg: TrainConfig, *, resume=None, hooks: dict | None = None, progress: bool | None = None,
          allow_partial_resume: bool = False, compile_step: dict | None = None):
    """Train according to ``cfg`` (resuming from a checkpoint file/folder if given); returns the
    :class:`Trainer` (its ``net``, ``ema`` and ``summary()``). The run folder's lock is held
    until this returns or raises. A fresh run (``resume`` None) refuses an ``out`` folder that
    already holds another run's checkpoints (:func:`check_run_folder`)."""
    check_run_folder(cfg.out, resume)
    trainer = Trainer(cfg, hooks=hooks, progress=progress, compile_step=compile_step)
    try:
        if trainer.rank == 0:  # again under the lock: a run may have finished in between
            check_run_folder(cfg.out, resume)
        if resume is not None:
            trainer.resume(resume, allow_partial=allow_partial_resume)
        trainer.run()
    finally:
        trainer.close()
    return trainer

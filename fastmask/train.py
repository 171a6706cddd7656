"""The training loop: masked phase, unmasking fine-tune, EMA, checkpoints, DDP.

:func:`train` runs one training run; :func:`training_loop` is its loop, top to bottom (the
phases, the steps, logging, checkpoints, stop conditions). :class:`Trainer` holds the run's
state: its data, model, EMA and optimizer, checkpoints and log. Beside it:
:mod:`fastmask.train_step` (one step: draws, batch, loss, backward, AdamW, EMA; eager, one CUDA
graph or compiled), :mod:`fastmask.phases` (phase and step arithmetic, the schedules),
:mod:`fastmask.run_folder` (the run folder: lock, log, checkpoint listing) and
:mod:`fastmask.checkpoint_io` (the checkpoint files).

Reproducibility. Every random draw of a step (label drop, sigma, noise, mask, the VAE
posterior eps of latents, SPRINT's path-drop flags) comes from a generator seeded by (seed, step) and is drawn for the
whole global batch, each rank then taking its slice; the data order is a pure function of
(seed, epoch) (:mod:`fastmask.data`). So a run is the same after a resume (bit for bit on CPU)
and the same on 1 or N ranks (to float rounding). The RNG states of torch/Python/NumPy are
still saved in checkpoints for anything else that draws from them.

What a run guarantees (exact resume; what ``steps``, ``minutes`` and the phases mean over
resumes; one run per folder; finite checkpoints; non-finite losses; signals and errors): the
README, "Guarantees of a training run". The loss terms and the first step with a non-finite
loss stay on the device and are read every ``log_every`` steps and before each checkpoint (no
host sync per step).

Distributed: launch with ``torchrun --nproc_per_node=N -m fastmask train ...``; the process
group uses nccl on GPUs and gloo on CPUs; only rank 0 writes files.
"""
from __future__ import annotations

import copy
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint_io import checkpoint_step, load_checkpoint, save_checkpoint, set_rng_state
from .data import build_dataset, check_labels, make_sampler
from .errors import UsageError
from .latents import check_manifest as check_latent_manifest
from .models import build_model
from .phases import Phases, ema_decay_at, lr_at, mask_ratio_at  # noqa: F401  (the schedules: public here too)
from .presets import TrainConfig
from .run_folder import RunFolder, check_run_folder, run_checkpoints  # noqa: F401  (public here too)
from .train_step import NO_BAD, TrainingStep, step_randomness  # noqa: F401  (step_randomness: public here too)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the first such step and the
    last good checkpoint (verified finite, and never deleted by the rotation)."""


class TrainingInterrupted(KeyboardInterrupt):
    """A signal (SIGINT or SIGTERM) stopped training. ``signum`` is the signal, ``checkpoint``
    the file that holds the state at the stop, or None if none was saved."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(f"training stopped by signal {int(signum)}")
        self.signum, self.checkpoint = int(signum), checkpoint


# --------------------------------------------------------------------------- the run
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


def training_loop(tr: Trainer) -> dict:
    """Train both phases from the trainer's state (a new run's or a resumed one's); returns
    ``tr.summary()``. Each step is :meth:`Trainer._train_step`; every ``log_every`` steps
    :meth:`Trainer._sync` reads the device once (loss sums, the first non-finite step, stop
    requests) and logs the interval; every ``ckpt_every`` steps, at the end of phase 1 and at
    the end, a checkpoint. What ``steps``, ``minutes`` and the phases mean over resumes: the
    README, "Steps, minutes and phases on resume"."""
    from tqdm import tqdm

    cfg, ph = tr.cfg, tr.phases
    with SaveOnStop(tr):
        if ph.phase1_end is not None and (ph.done(2) or ph.time_up(2) or cfg.finetune_steps == 0):
            tr.say(
                f"fastmask: nothing to train: the run is at step {ph.step} (phase 1 ended at step "
                f"{ph.phase1_end}, finetune_steps={cfg.finetune_steps}); raise finetune_steps to train on"
            )
        for phase in (1, 2):
            # Phase start: phase 1 unless it has ended, phase 2 if there is a fine-tune.
            if (phase == 1 and ph.phase1_end is not None) or (phase == 2 and cfg.finetune_steps == 0):
                continue
            tr._wrap(phase)
            tr.net.train()
            total = ph.end(phase)
            if not ph.done(phase) and not ph.time_up(phase):
                what = "mask ratio " + str(cfg.mask_ratio) if phase == 1 else "unmasking fine-tune"
                tr.say(f"fastmask: phase {phase} ({what}) from step {ph.step}"
                       + (f" to {total}" if total else f" for {cfg.minutes:.2f} min"))
                tr.log({"event": "phase", "phase": phase, "step": ph.step})
            quiet = tr.rank != 0 or tr.progress is False or (tr.progress is None and not sys.stderr.isatty())
            bar = tqdm(total=total, initial=ph.step, desc=f"phase {phase}", disable=quiet, dynamic_ncols=True)
            t_interval, n = time.perf_counter(), 0
            try:
                while not ph.done(phase):
                    # Stop on a signal or at the time budget (on several ranks: agreed on in _sync).
                    if tr.world == 1 and (tr._interrupted or ph.time_up(phase)):
                        break
                    # One step.
                    t0 = time.perf_counter()
                    tr._train_step(phase)
                    ph.elapsed[str(phase)] += time.perf_counter() - t0
                    n += 1
                    if "after_step" in tr.hooks:
                        tr.hooks["after_step"](tr, ph.step)
                    bar.update(1)
                    # Log the interval (the one host read of it), checkpoint, stop.
                    log_now = ph.step % cfg.log_every == 0 or ph.done(phase)
                    ckpt_now = bool(cfg.ckpt_every) and ph.step % cfg.ckpt_every == 0 and not ph.done(phase)
                    stop = False
                    if log_now:
                        stop, loss, ips = tr._sync(phase, n, time.perf_counter() - t_interval)
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
                        t_interval, n = time.perf_counter(), 0
                    if ckpt_now:
                        tr.save()
                    if stop:
                        break
                if n:  # the partial interval before a time cap or a stop request
                    tr._sync(phase, n, time.perf_counter() - t_interval)
            finally:
                bar.close()
            if tr._interrupted:
                raise KeyboardInterrupt
            # Phase end.
            if phase == 1:
                ph.phase1_end = ph.step
                if cfg.finetune_steps > 0:
                    tr.save()
        if tr.last_ckpt is None or tr.last_ckpt[0] != ph.step:
            tr.save()
    return tr.summary()


class SaveOnStop:
    """Signals and save-on-error around the training loop, one context manager.

    Inside it SIGINT and SIGTERM (in the main thread) ask the loop to finish the step and stop
    (``trainer._interrupted``); a second one aborts at once, without saving a half-done step.
    On the way out the previous handlers come back, and a stop (a signal, or a KeyboardInterrupt
    from anywhere) saves the state and becomes :class:`TrainingInterrupted` naming that
    checkpoint; a :class:`NonFiniteLossError` passes as it is; any other error first saves the
    state, if it is whole and finite, then passes."""

    def __init__(self, trainer: Trainer):
        self.tr = trainer
        self.prev: dict = {}

    def __enter__(self) -> SaveOnStop:
        if threading.current_thread() is threading.main_thread():
            self.prev = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            for s in self.prev:
                signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        tr = self.tr
        if tr._interrupted:  # second signal: stop right now, without saving a half-done step
            self._restore()
            tr._aborted = True
            raise TrainingInterrupted(signum, None)
        tr._interrupted = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        tr.say(f"fastmask: {name}: finishing this step, saving a checkpoint (send it again to abort)")

    def _restore(self) -> None:
        for s, h in self.prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    def __exit__(self, kind, e, tb) -> bool:
        tr = self.tr
        try:
            if kind is None or issubclass(kind, NonFiniteLossError):
                return False
            if issubclass(kind, KeyboardInterrupt):
                signum = getattr(e, "signum", None) or tr._interrupted or signal.SIGINT
                if tr._aborted:
                    last = f"; the last checkpoint is {tr.last_ckpt[1]}" if tr.last_ckpt else ""
                    tr.say(f"fastmask: aborted during step {tr.step}{last}")
                    raise TrainingInterrupted(signum, None) from None
                # a stop request is agreed on by every rank (at a log boundary), so all of them save
                path = self._save(f"interrupted at step {tr.step}", collective=bool(tr._interrupted))
                raise TrainingInterrupted(signum, path) from None
            if issubclass(kind, Exception):
                self._save(f"{kind.__name__} at step {tr.step}")
            return False
        finally:
            self._restore()

    def _save(self, why: str, collective: bool = False) -> Path | None:
        """Save the current state after a stop or an error, if that state is whole (the error
        did not strike inside the optimizer/EMA update) and finite. On several ranks only for
        a ``collective`` stop that every rank reached at the same step (a signal), since the
        save waits for all of them."""
        tr = self.tr
        if tr._in_update or (tr.world > 1 and not collective):
            tr.say(f"fastmask: {why}: no checkpoint saved (the state may be torn); the last one is "
                   f"{tr.last_ckpt[1] if tr.last_ckpt else 'none'}")
            return None
        if tr.last_ckpt is not None and tr.last_ckpt[0] == tr.step and tr.last_ckpt[1].exists():
            tr.say(f"fastmask: {why}: the checkpoint {tr.last_ckpt[1]} holds this state")
            return tr.last_ckpt[1]
        try:
            path = tr.save()
        except NonFiniteLossError as err:
            tr.say(f"fastmask: {why}: no checkpoint saved: {err}")
            return None
        if path is not None:
            tr.say(f"fastmask: {why}: saved {path}")
        return path


# --------------------------------------------------------------------------- trainer
def _phase_attr(name: str) -> property:
    """A trainer attribute that lives in its :class:`fastmask.phases.Phases`."""
    return property(lambda self: getattr(self.phases, name), lambda self, v: setattr(self.phases, name, v),
                    doc=f"``phases.{name}``")


class Trainer(TrainingStep):
    """One training run: its folder, data, model, EMA and optimizer, checkpoints and log (the
    step itself: :class:`fastmask.train_step.TrainingStep`; the loop: :func:`training_loop`).

    ``hooks`` (for tests and experiments): ``{"loss": f(step, loss [B]) -> loss [B]}`` is applied
    to the per-sample loss, ``{"after_step": f(trainer, step)}`` after every optimizer step.

    ``compile_step``: None (eager) or a dict of :func:`torch.compile` options (``{}`` for the
    defaults) for :meth:`device_step`, the forward pass, loss and bookkeeping of one step; it is
    traced with ``fullgraph=True`` and makes no host sync, so ``mode="reduce-overhead"`` can
    capture it in a CUDA graph.

    Rank 0 holds an exclusive lock on ``cfg.out`` from construction until :meth:`close` (called
    by :func:`train`), so that two runs never write into one folder.
    """

    step = _phase_attr("step")
    p1_steps = _phase_attr("p1_steps")
    phase1_end = _phase_attr("phase1_end")
    elapsed = _phase_attr("elapsed")
    mask_sched = _phase_attr("mask_sched")

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
        self.folder = RunFolder(cfg.out)
        self.out, self.ckpt_dir, self.log_path = self.folder.out, self.folder.ckpt_dir, self.folder.log_path
        self.progress = progress
        if self.rank == 0:
            self.folder.open(self.say)
        try:
            self._setup(compile_step)
        except BaseException:
            self.close()
            raise

    @property
    def _lock(self):
        return self.folder.lock

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
        self.sampler = make_sampler(len(self.data), cfg.seed)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.phases = Phases(cfg)
        self.last_ckpt: tuple[int, Path] | None = None
        self._interrupted = 0  # the signal number of a pending stop request
        self._aborted = False
        self._init_step(compile_step)
        skipped = getattr(self.data, "skipped", None)
        if skipped:
            self.say(f"fastmask: data: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
            self.log({"event": "data", "skipped_images": len(skipped), "example": str(skipped[0])})

    def close(self) -> None:
        """Release the run folder's lock (idempotent)."""
        self.folder.close()

    def run(self) -> dict:
        """Train both phases from the current state (:func:`training_loop`); returns a summary."""
        return training_loop(self)

    # ---- checkpoints
    def state_extra(self) -> dict:
        return {
            **self.phases.state(),
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
            protect = self.folder.protected_before(self.step)  # the newest verified one
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
        self._check_resumable(ck, allow_partial)
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
        self._step_t.fill_(ck["step"])
        continued = self.phases.restore(ck["step"], ck["extra"])
        self.last_ckpt = (self.step, path)
        if continued:
            self.say(f"fastmask: continuing phase 1 from {self.p1_steps} masked steps to the new budget")
        self.log({"event": "resume", "step": self.step, "file": str(path)})

    def _check_resumable(self, ck: dict, allow_partial: bool) -> None:
        """Refuse a checkpoint this run cannot continue from (:class:`UsageError` naming why)."""
        path = ck["path"]
        missing = [n for n, v in (("optimizer state", ck["optimizer"]), ("EMA weights", ck["ema"])) if v is None]
        if missing and not allow_partial:
            raise UsageError(
                f"resume: {str(path)!r} holds no {' and no '.join(missing)}, so the run cannot continue exactly; "
                "start a new run from its weights, or resume with allow_partial_resume=True to accept that"
            )
        if missing:
            msg = f"resume: {path} holds no {' and no '.join(missing)}; the run does not continue exactly"
            warnings.warn(msg, stacklevel=3)
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

    # ---- logging and the host's read of the device
    def log(self, row: dict) -> None:
        if self.rank == 0:
            self.folder.append_log(row)

    def say(self, msg: str) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def _sync(self, phase: int | None, n: int = 0, seconds: float = 0.0):
        """The one host sync of an interval: reads (and on several ranks all-reduces) the summed
        loss terms, the first non-finite step and the stop requests; raises
        :class:`NonFiniteLossError` if a loss was not finite; logs the interval if ``n``.
        Returns (stop, mean loss, images per second)."""
        dev = self._acc.device
        flags = torch.tensor([float(bool(self._interrupted)), float(phase is not None and self.phases.time_up(phase))],
                             dtype=self._acc.dtype)
        maxed = torch.cat([(-self._bad).to(self._acc.dtype).view(1), flags.to(dev)])
        summed = self._acc.clone()
        if self.world > 1:
            dist.all_reduce(summed)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
            summed /= self.world
        vals = torch.cat([summed, maxed, self._bad_val.view(1).to(summed.dtype)]).tolist()
        bad = int(-vals[3])
        if bad != NO_BAD:
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
                    "lr": lr_at(self.cfg, self.phases.sched_step(phase) - 1, phase),
                    "img_per_s": ips,
                    "elapsed_s": sum(self.elapsed.values()),
                }
            )
        return stop, loss, ips

    def _nonfinite(self, bad: int, value: float) -> NonFiniteLossError:
        phase, ratio, lr = self.phases.at(bad)
        good = self.folder.last_good_before(bad) if self.rank == 0 else None
        last = (
            f"the last good checkpoint is {good} (step {checkpoint_step(good)}, verified finite)"
            if good is not None
            else "no finite checkpoint from before that step exists"
        )
        return NonFiniteLossError(
            f"training stopped: the loss is {value} at step {bad} (phase {phase}, mask ratio {ratio}, lr {lr:g}); "
            f"{last}. Lower the lr or set grad_clip, then resume from that checkpoint."
        )

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


# --------------------------------------------------------------------------- helpers
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

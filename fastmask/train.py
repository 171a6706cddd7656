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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from . import ops
from .checkpoint_io import load_checkpoint, save_checkpoint, set_rng_state
from .data import batch_indices, build_dataset, make_sampler
from .latents import check_manifest as check_latent_manifest
from .models import EDMPrecond, build_model, draw_sigma
from .presets import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last good
    checkpoint (which is left untouched)."""


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


def mask_ratio_at(cfg: TrainConfig, step: int, phase: int) -> float:
    if phase == 2:
        return 0.0
    r0 = cfg.mask_ratio
    r1 = cfg.mask_ratio if cfg.mask_ratio_end is None else cfg.mask_ratio_end
    if cfg.mask_schedule == "constant" or r0 == r1:
        return r0
    t = min(step / max((cfg.steps or 1) - 1, 1), 1.0)
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
    mask_ratio: float,
    label_dropout: float,
    latents: bool,
    device,
) -> dict[str, Tensor | None]:
    """All random draws of global step ``step``, for the whole global batch, from one generator
    seeded by (seed, step): label-drop flags [B], sigma [B], noise [B, C, H, W] (unit, times
    sigma later), ids_keep [B, K] (None at ratio 0) and the latent posterior eps (or None)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed((seed % 2**31) * 2**32 + step)
    B = global_batch
    drop = torch.rand(B, generator=g, device=dev) < label_dropout
    sigma = draw_sigma(B, generator=g, device=dev)
    noise = torch.randn((B, *shape), generator=g, device=dev)
    ids_keep = None
    if mask_ratio > 0:
        ids_keep, _, _ = ops.random_mask(B, num_tokens, mask_ratio, generator=g, device=dev)
    eps = torch.randn((B, *shape), generator=g, device=dev) if latents else None
    return {"drop": drop, "sigma": sigma, "noise": noise, "ids_keep": ids_keep, "eps": eps}


class _LossModule(nn.Module):
    """The loss as a module, so that DistributedDataParallel sees the forward pass."""

    def __init__(self, precond: EDMPrecond, mae_coef: float):
        super().__init__()
        self.precond, self.mae_coef = precond, mae_coef

    def forward(self, y, labels, sigma, noise, ids_keep):
        return self.precond.loss_given(y, labels, sigma, noise, ids_keep, mae_coef=self.mae_coef)


# --------------------------------------------------------------------------- trainer
class Trainer:
    """One training run. ``hooks`` (for tests and experiments): ``{"loss": f(step, loss [B]) ->
    loss [B]}`` is applied to the per-sample loss, ``{"after_step": f(trainer, step)}`` after
    every optimizer step."""

    def __init__(self, cfg: TrainConfig, *, hooks: dict | None = None, progress: bool | None = None):
        cfg.validate()
        self.cfg = cfg
        self.hooks = hooks or {}
        self.rank, self.world, self.device = distributed_info(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size: the global batch {cfg.batch_size} is not divisible by {self.world} ranks")
        check_latent_manifest(cfg)  # a `fastmask latents` folder: its manifest must fit the config
        self.data = build_dataset(cfg)
        if len(self.data) == 0:
            raise ValueError(f"data: the data set {cfg.data!r} is empty")
        self.num_classes = self.data.num_classes if cfg.num_classes is None else cfg.num_classes
        torch.manual_seed(cfg.seed)
        self.net = build_model(cfg, self.data.shape, self.num_classes).to(self.device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.sampler = make_sampler(len(self.data), cfg.seed)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.log_path = self.out / "log.jsonl"
        self.step = 0
        self.phase1_end: int | None = None
        self.elapsed = {"1": 0.0, "2": 0.0}
        self.last_ckpt: tuple[int, Path] | None = None
        self.progress = progress
        self._interrupted = False
        self._aborted = False
        self._loss_module = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    # ---- checkpoints
    def state_extra(self) -> dict:
        return {
            "phase1_end": self.phase1_end,
            "elapsed": self.elapsed,
            "world_size": self.world,
            "data_shape": list(self.data.shape),
            "data_kind": self.data.kind,
            "num_classes": self.num_classes,
        }

    def save(self) -> Path | None:
        path = None
        if self.rank == 0:
            path = save_checkpoint(
                self.ckpt_dir,
                model=self.net,
                ema=self.ema,
                optimizer=self.opt,
                step=self.step,
                config=self.cfg.to_dict(),
                extra=self.state_extra(),
                keep=self.cfg.keep_checkpoints,
            )
            self.last_ckpt = (self.step, path)
            self.log({"event": "checkpoint", "step": self.step, "file": str(path)})
        if self.world > 1:
            dist.barrier()
        return path

    def resume(self, path) -> None:
        ck = load_checkpoint(path, device="cpu")
        self.net.load_state_dict(ck["model"])
        if ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        else:
            self.ema.load_state_dict(ck["model"])
        if ck["optimizer"] is not None:
            self.opt.load_state_dict(ck["optimizer"])
        set_rng_state(*ck["rng"])
        self.step = ck["step"]
        extra = ck["extra"]
        self.phase1_end = extra.get("phase1_end")
        self.elapsed = {str(k): float(v) for k, v in extra.get("elapsed", self.elapsed).items()}
        self.last_ckpt = (self.step, ck["path"])
        self.log({"event": "resume", "step": self.step, "file": str(ck["path"])})

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
            return cfg.steps is not None and self.step >= cfg.steps
        return self.step >= self.phase1_end + cfg.finetune_steps

    def _time_up(self, phase: int) -> bool:
        cap = self.cfg.minutes if phase == 1 else self.cfg.finetune_minutes
        return cap is not None and self.elapsed[str(phase)] >= cap * 60

    def run(self) -> dict:
        """Train both phases from the current state; returns a summary."""
        handler_installed = False
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame):
                if self._interrupted:  # second Ctrl-C: stop right now, without saving a half-done step
                    signal.signal(signal.SIGINT, prev if callable(prev) else signal.default_int_handler)
                    self._aborted = True
                    raise KeyboardInterrupt
                self._interrupted = True
                self.say("fastmask: Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to abort)")

            signal.signal(signal.SIGINT, on_sigint)
            handler_installed = True
        try:
            if self.phase1_end is None:
                self._run_phase(1)
                if self.cfg.finetune_steps > 0:
                    self.save()
            self._run_phase(2)
        except KeyboardInterrupt:
            if self._aborted:
                self.say(f"fastmask: aborted during step {self.step}; the last checkpoint is {self.last_ckpt}")
                raise
            self.say(f"fastmask: interrupted at step {self.step}; saving a checkpoint")
            self.save()
            raise
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, prev)
        if self.last_ckpt is None or self.last_ckpt[0] != self.step:
            self.save()
        return self.summary()

    def summary(self) -> dict:
        p1 = self.phase1_end if self.phase1_end is not None else self.step
        return {
            "steps": self.step,
            "phase1_steps": p1,
            "phase2_steps": self.step - p1,
            "train_seconds": dict(self.elapsed),
            "train_seconds_total": sum(self.elapsed.values()),
            "checkpoint": str(self.last_ckpt[1]) if self.last_ckpt else None,
            "world_size": self.world,
            "device": str(self.device),
        }

    def _run_phase(self, phase: int) -> None:
        cfg = self.cfg
        if phase == 2 and cfg.finetune_steps == 0:
            return
        self._wrap(phase)
        self.net.train()
        total = cfg.steps if phase == 1 else (self.phase1_end or 0) + cfg.finetune_steps
        if phase == 1 and cfg.steps is None:
            total = None
        if not self._phase_done(phase):
            self.say(
                f"fastmask: phase {phase} ({'mask ratio ' + str(cfg.mask_ratio) if phase == 1 else 'unmasking fine-tune'})"
                f" from step {self.step}" + (f" to {total}" if total else f" for {cfg.minutes:.2f} min")
            )
            self.log({"event": "phase", "phase": phase, "step": self.step})
        from tqdm import tqdm

        disable = self.rank != 0 or (self.progress is False) or (self.progress is None and not sys.stderr.isatty())
        bar = tqdm(total=total, initial=self.step, desc=f"phase {phase}", disable=disable, dynamic_ncols=True)
        acc = torch.zeros(4, dtype=torch.float64)
        acc_t0, acc_n = time.perf_counter(), 0
        try:
            while not self._phase_done(phase):
                t0 = time.perf_counter()
                stats = self._train_step(phase)
                if stats is None:  # interrupted or out of time
                    break
                self.elapsed[str(phase)] += time.perf_counter() - t0
                acc += stats
                acc_n += 1
                if "after_step" in self.hooks:
                    self.hooks["after_step"](self, self.step)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self._phase_done(phase):
                    loss, ips = self._log_interval(phase, acc, acc_n, time.perf_counter() - acc_t0)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
                    acc.zero_()
                    acc_t0, acc_n = time.perf_counter(), 0
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not self._phase_done(phase):
                    self.save()
            if acc_n:  # the partial interval before a time cap or Ctrl-C
                self._log_interval(phase, acc, acc_n, time.perf_counter() - acc_t0)
        finally:
            bar.close()
        if self._interrupted:
            raise KeyboardInterrupt
        if phase == 1:
            self.phase1_end = self.step

    def _log_interval(self, phase: int, acc: Tensor, n: int, seconds: float) -> tuple[float, float]:
        cfg = self.cfg
        loss, dsm, mae = (acc[:3] / n).tolist()
        ips = n * cfg.batch_size / max(seconds, 1e-9)
        self.log(
            {
                "step": self.step,
                "phase": phase,
                "loss": loss,
                "dsm": dsm,
                "mae": mae,
                "mask_ratio": mask_ratio_at(cfg, self.step - 1, phase),
                "lr": lr_at(cfg, self.step - 1, phase),
                "img_per_s": ips,
                "elapsed_s": sum(self.elapsed.values()),
            }
        )
        return loss, ips

    def _train_step(self, phase: int):
        cfg, dev = self.cfg, self.device
        step = self.step
        ratio = mask_ratio_at(cfg, step, phase)
        lr = lr_at(cfg, step, phase)
        for g in self.opt.param_groups:
            g["lr"] = lr
        net = self.net.model
        rnd = step_randomness(
            cfg.seed,
            step,
            cfg.batch_size,
            self.data.shape,
            net.num_patches,
            ratio,
            cfg.label_dropout,
            self.data.kind == "latents",
            dev,
        )
        per = cfg.batch_size // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        idx = batch_indices(self.sampler, step, cfg.batch_size, self.rank, self.world)
        eps = rnd["eps"][sl] if rnd["eps"] is not None else None
        y, labels = self.data.batch(idx, eps=eps.cpu() if eps is not None else None)
        y = y.to(dev, non_blocking=True)
        if self.num_classes > 0:
            labels = torch.where(rnd["drop"][sl], torch.full_like(labels, -1, device=dev), labels.to(dev))
        else:
            labels = None
        ids_keep = rnd["ids_keep"][sl] if rnd["ids_keep"] is not None else None
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            loss, dsm, mae = self._loss_module(y, labels, rnd["sigma"][sl], rnd["noise"][sl], ids_keep)
        if "loss" in self.hooks:
            loss = self.hooks["loss"](step, loss)
        mean = loss.mean()
        # one all-reduce per step: the global mean loss terms plus the stop flags of all ranks
        vals = torch.stack([mean.detach().float(), dsm.detach().float().mean(), mae.detach().float().mean()])
        flags = torch.tensor([float(self._interrupted), float(self._time_up(phase))], device=vals.device)
        flags = torch.cat([vals.double(), flags.double()])
        if self.world > 1:
            dist.all_reduce(flags)
            flags[:3] /= self.world
        flags = flags.cpu()
        if flags[3] > 0:
            self._interrupted = True
            return None
        if flags[4] > 0:
            return None
        if not math.isfinite(flags[0].item()):
            last = (
                f"the last good checkpoint is {self.last_ckpt[1]} (step {self.last_ckpt[0]})"
                if self.last_ckpt
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"training stopped: the loss is {flags[0].item()} at step {step} (phase {phase}, mask ratio "
                f"{ratio}, lr {lr:g}); {last}. Lower the lr or set grad_clip, then resume from that checkpoint."
            )
        self.opt.zero_grad(set_to_none=True)
        mean.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return torch.cat([flags[:3], flags.new_zeros(1)])

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_p = list(self.ema.parameters())
        p = [q.detach() for q in self.net.parameters()]
        torch._foreach_lerp_(ema_p, p, 1.0 - ema_decay_at(self.cfg, self.step))


def train(cfg: TrainConfig, *, resume=None, hooks: dict | None = None, progress: bool | None = None):
    """Train according to ``cfg`` (resuming from a checkpoint file/folder if given); returns the
    :class:`Trainer` (its ``net``, ``ema`` and ``summary()``)."""
    trainer = Trainer(cfg, hooks=hooks, progress=progress)
    if resume is not None:
        trainer.resume(resume)
    trainer.run()
    return trainer

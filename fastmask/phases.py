"""Where a training run stands, and the schedules that follow from it.

Phase 1 trains at the mask ratio (constant, or a linear/cosine schedule) for ``steps`` steps or
``minutes``; phase 2, the unmasking fine-tune, at ratio 0 with ``finetune_lr`` for
``finetune_steps`` steps or ``finetune_minutes``. One global step counter runs across both
phases. How these totals carry over a resume: README, "Guarantees of a training run", "Steps,
minutes and phases on resume".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .presets import TrainConfig


def mask_ratio_at(cfg: TrainConfig, step: int, phase: int, progress: float | None = None) -> float:
    """The mask ratio of a step. The schedule's position t in [0, 1] is ``progress`` if given,
    else step / (steps - 1). A run without ``steps`` (a ``minutes`` budget) has no step count to
    divide by: the trainer passes the elapsed fraction of the time budget (:meth:`Phases.mask_ratio`)."""
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


@dataclass
class Phases:
    """The step counters and training time of a run, saved in every checkpoint."""

    cfg: TrainConfig
    step: int = 0  # optimizer steps, both phases
    p1_steps: int = 0  # phase-1 (masked) steps done, over every resume
    phase1_end: int | None = None  # the step at which the last phase 1 ended
    elapsed: dict = field(default_factory=lambda: {"1": 0.0, "2": 0.0})  # training seconds per phase
    mask_sched: dict | None = None  # the last mask ratio and the schedule position it came from

    def sched_step(self, phase: int) -> int:
        """The step the schedules (mask ratio, lr warm-up) see: phase-1 steps in phase 1."""
        return self.p1_steps if phase == 1 else self.step

    def done(self, phase: int) -> bool:
        if phase == 1:
            return self.cfg.steps is not None and self.p1_steps >= self.cfg.steps
        return self.step >= self.phase1_end + self.cfg.finetune_steps

    def time_up(self, phase: int) -> bool:
        cap = self.cfg.minutes if phase == 1 else self.cfg.finetune_minutes
        return cap is not None and self.elapsed[str(phase)] >= cap * 60

    def end(self, phase: int) -> int | None:
        """The global step at which ``phase`` ends (None: at the end of its time budget)."""
        if phase == 2:
            return (self.phase1_end or 0) + self.cfg.finetune_steps
        offset = self.step - self.p1_steps  # fine-tune steps before a continued phase 1
        return self.cfg.steps + offset if self.cfg.steps is not None else None

    def advance(self, phase: int) -> None:
        self.step += 1
        self.p1_steps += phase == 1

    def mask_ratio(self, phase: int) -> float:
        """The mask ratio of the next step, recorded (:attr:`mask_sched`, saved in checkpoints).
        A run with ``steps`` schedules by phase-1 steps; a minutes-only run by the elapsed fraction
        of its phase-1 time budget. That elapsed time is saved and restored, so a resumed run
        continues the schedule from exactly where it stopped."""
        cfg = self.cfg
        progress = None
        if phase == 1 and cfg.steps is None and cfg.minutes is not None:
            progress = min(self.elapsed["1"] / (cfg.minutes * 60), 1.0) if cfg.minutes > 0 else 1.0
        ratio = mask_ratio_at(cfg, self.sched_step(phase), phase, progress)
        self.mask_sched = {"by": "steps" if progress is None else "minutes", "step": self.sched_step(phase),
                           "progress": progress, "ratio": ratio}
        return ratio

    def at(self, step: int) -> tuple[int, object, float]:
        """(phase, mask ratio, lr) of an earlier global step of this run (for an error message)."""
        phase = 1 if self.phase1_end is None or step < self.phase1_end else 2
        sched = step - (self.step - self.p1_steps) if phase == 1 else step
        if phase == 1 and self.cfg.steps is None:
            ratio = (self.mask_sched or {}).get("ratio")
        else:
            ratio = mask_ratio_at(self.cfg, sched, phase)
        return phase, ratio, lr_at(self.cfg, sched, phase)

    def state(self) -> dict:
        return {
            "phase1_end": self.phase1_end,
            "phase1_steps": self.p1_steps,
            "elapsed": self.elapsed,
            "mask_schedule": self.mask_sched,  # what the last step's mask ratio was computed from
        }

    def restore(self, step: int, extra: dict) -> bool:
        """Take the state of a checkpoint at ``step`` (``extra``: its :meth:`state`). Returns
        whether a phase 1 that had ended continues, towards a larger step count or time budget
        (after a fine-tune that had begun, that fine-tune then runs again in full afterwards)."""
        self.step = step
        self.phase1_end = extra.get("phase1_end")
        p1 = extra.get("phase1_steps")
        self.p1_steps = int(p1) if p1 is not None else (self.phase1_end if self.phase1_end is not None else self.step)
        self.elapsed = {str(k): float(v) for k, v in extra.get("elapsed", self.elapsed).items()}
        self.mask_sched = extra.get("mask_schedule")
        if self.phase1_end is None:
            return False
        self.phase1_end = None
        if self.done(1) or self.time_up(1):
            self.phase1_end = extra.get("phase1_end")
            return False
        return True

"""``fastmask train --compare dit,maskdit,...``: model families trained for the same wall-clock
time on the same data, evaluated the same way, in one table.

The first family trains as the config says (its step counts and minute caps). Every later one
gets the first one's measured training time phase by phase: the masked phase's seconds as its
``minutes`` and the fine-tune's as its ``finetune_minutes``; a family that trains on every token
(``dit``) gets both as one phase. Everything else (data, model config, batch, lr, seed,
sampler, guidance) is the same for all, except what a family registers as its own training
defaults (:attr:`fastmask.models.Architecture.train_defaults`, e.g. its published ratio).

Each family's run lives in ``<out>/<family>/``: checkpoints, log.jsonl, samples.png, the samples
as ``samples.npz`` in the layout ``fastmask sample --npz`` writes (``arr_0`` uint8 [N, H, W, C],
``labels``), so other classifiers can judge them too, and its metrics.json. ``<out>/compare.json``
and ``<out>/compare.md`` hold the table: steps done, seconds per step and its ratio to dense
DiT's, and (digits) classifier accuracy and Frechet distance with and without guidance.
"""
from __future__ import annotations

import copy
from pathlib import Path

from .checkpoint_io import atomic_write_bytes, atomic_write_json
from .evaluate import DigitClassifier
from .models import ARCHITECTURES
from .presets import TrainConfig
from .report import _sample_and_measure, say, training_metrics
from .train import check_run_folder, train

FOREVER = 10**9  # a step count no time-capped phase reaches


def parse_families(spec: str) -> list[str]:
    """``"dit,maskdit"`` -> ["dit", "maskdit"]: known, distinct names, else ValueError."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise ValueError("--compare: expected a comma-separated list of model families, e.g. dit,maskdit")
    for n in names:
        if n not in ARCHITECTURES:
            raise ValueError(f"--compare: unknown model family {n!r}; expected some of {list(ARCHITECTURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--compare: a family is named twice in {spec!r}")
    return names


def family_config(cfg: TrainConfig, family: str, seconds: dict | None = None) -> TrainConfig:
    """``cfg`` for ``family`` in ``<out>/<family>``; with the first run's ``seconds`` per phase
    ({"1": s1, "2": s2}), capped by that time instead of step counts."""
    c = copy.deepcopy(cfg)
    c.arch, c.out, c.eval_unguided = family, str(Path(cfg.out) / family), True
    c.preset = f"{cfg.preset} (--compare: {family})"
    for key, value in ARCHITECTURES[family].train_defaults.items():
        setattr(c, key, value)
    if not ARCHITECTURES[family].masks:
        c.mask_ratio, c.mask_schedule, c.mask_ratio_end = 0.0, "constant", None
    if seconds is not None:
        s1, s2 = float(seconds.get("1", 0.0)), float(seconds.get("2", 0.0))
        c.steps = None
        if ARCHITECTURES[family].masks and s2 > 0:
            c.minutes, c.finetune_steps, c.finetune_minutes = s1 / 60, FOREVER, s2 / 60
        else:
            c.minutes, c.finetune_steps, c.finetune_minutes = (s1 + s2) / 60, 0, None
    c.validate()
    return c


def check_folders(cfg: TrainConfig, families: list[str]) -> None:
    """Refuse, before any work, a family folder that holds another run (one run per folder)."""
    for family in families:
        check_run_folder(Path(cfg.out) / family, None, flag="--out", how="another --out")


def compare(cfg: TrainConfig, families: list[str], *, progress: bool | None = None, command: str = "") -> int:
    """Train and evaluate each family (see the module docstring); returns the exit code."""
    rows, seconds, clf = [], None, None
    for family in families:
        fc = family_config(cfg, family, seconds)
        say(f"fastmask: --compare: {family} -> {fc.out}"
            + ("" if seconds is None else f" ({(fc.minutes + (fc.finetune_minutes or 0)):.2f} min, as {families[0]})"))
        trainer = train(fc, progress=progress)
        summary = trainer.summary()
        if seconds is None:
            seconds = summary["train_seconds"]
        if trainer.rank != 0:
            continue
        if clf is None and fc.evaluate and fc.data == "digits":
            clf = DigitClassifier(seed=fc.seed).fit(trainer.data.images, trainer.data.labels)
        rep = _sample_and_measure(trainer, fc, Path(fc.out), clf, npz=True)
        metrics = {"command": command, "family": family, "config": fc.to_dict(),
                   "training": training_metrics(summary, fc), "samples": rep}
        atomic_write_json(Path(fc.out) / "metrics.json", metrics)
        rows.append(_row(family, fc, metrics))
    if not rows:
        return 0
    base = next((r for r in rows if r["family"] == "dit"), None)
    for r in rows:
        r["step_time_vs_dit"] = r["seconds_per_step"] / base["seconds_per_step"] if base else None
    out = Path(cfg.out)
    atomic_write_json(out / "compare.json", {"command": command, "families": families, "rows": rows})
    atomic_write_bytes(out / "compare.md", ("\n".join(table(rows)) + "\n").encode())
    for line in table(rows):
        say(line)
    say(f"fastmask: --compare: wrote {out}/compare.json and compare.md")
    return 0


def _row(family: str, fc: TrainConfig, metrics: dict) -> dict:
    tr, rep = metrics["training"], metrics["samples"]
    u = rep.get("unguided", {})
    return {
        "family": family, "mask_ratio": fc.mask_ratio if ARCHITECTURES[family].masks else 0.0,
        "steps": tr["steps"], "phase1_steps": tr["phase1_steps"], "phase2_steps": tr["phase2_steps"],
        "train_seconds": tr["train_seconds_total"],
        "seconds_per_step": tr["train_seconds_total"] / max(tr["steps"], 1),
        "accuracy": rep.get("accuracy"), "frechet_distance": rep.get("frechet_distance"),
        "accuracy_unguided": u.get("accuracy"), "frechet_distance_unguided": u.get("frechet_distance"),
        "guidance": rep.get("guidance"), "out": fc.out,
    }


def table(rows: list[dict]) -> list[str]:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    g = rows[0]["guidance"]
    out = [f"| family | mask ratio | steps (masked + fine-tune) | train s | s/step | step time vs DiT "
           f"| accuracy (guidance {g}) | FD (guidance {g}) | accuracy (none) | FD (none) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['family']} | {r['mask_ratio']:g} | {r['steps']} ({r['phase1_steps']} + {r['phase2_steps']}) "
            f"| {r['train_seconds']:.0f} | {r['seconds_per_step']:.3f} | {f(r['step_time_vs_dit'], '.2f')} "
            f"| {f(r['accuracy'], '.3f')} | {f(r['frechet_distance'], '.2f')} | {f(r['accuracy_unguided'], '.3f')} "
            f"| {f(r['frechet_distance_unguided'], '.2f')} |"
        )
    return out

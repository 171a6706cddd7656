"""What ``fastmask train`` does around the training run: the samples drawn after training, the
digits evaluation (classifier accuracy, Frechet distance), the optional unmasked comparison, and
the run's ``metrics.json``, ``loss.png`` and summary lines. The measures themselves are in
:mod:`fastmask.evaluate`."""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from .checkpoint_io import atomic_write_json
from .evaluate import DigitClassifier, classifier_report, plot_loss_curve, sample_report
from .presets import TrainConfig
from .train import run_checkpoints, train


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_and_report(cfg: TrainConfig, *, resume=None, progress: bool | None = None, compare_unmasked: bool = False,
                     command: str = "fastmask train", t_start: float | None = None) -> int:
    """Train ``cfg`` (resuming from ``resume``), then on rank 0 sample, evaluate (digits) and
    write metrics.json, samples.png and loss.png into ``cfg.out``; returns the exit code.
    ``compare_unmasked``: also train an unmasked model for the same wall-clock time and report
    it the same way (metrics.json "unmasked", files in <out>/unmasked/)."""
    t_start = time.perf_counter() if t_start is None else t_start
    trainer = train(cfg, resume=resume, progress=progress)
    summary = trainer.summary()
    t_trained = time.perf_counter()
    uncfg = utrainer = None
    if compare_unmasked:  # every rank trains it; rank 0 then samples and evaluates both
        uncfg = unmasked_config(cfg, summary)
        say(f"fastmask: unmasked comparison: ratio 0 for {uncfg.minutes:.2f} min (the masked run's training time)")
        # a resumed command resumes its unmasked run too (towards the masked run's total time)
        uresume = uncfg.out if resume is not None and run_checkpoints(uncfg.out) else None
        utrainer = train(uncfg, resume=uresume, progress=progress)
    if trainer.rank != 0:
        return 0
    out = Path(cfg.out)
    metrics = {"command": command, "preset": cfg.preset, "config": cfg.to_dict(),
               "training": training_metrics(summary, cfg)}
    say(
        f"fastmask: trained {summary['steps']} steps ({summary['phase1_steps']} masked + {summary['phase2_steps']} "
        f"fine-tune) in {summary['train_seconds_total']:.0f} s; checkpoint {summary['checkpoint']}"
    )
    plot_loss_curve(trainer.log_path, out / "loss.png", title=f"fastmask {cfg.preset}: {cfg.model}, masked then unmasked")
    t0 = time.perf_counter()
    clf = None
    if cfg.evaluate and cfg.data == "digits":
        clf = _digits_classifier(cfg, trainer, metrics)
    rep = _sample_and_measure(trainer, cfg, out, clf)
    metrics["samples"] = rep
    # what this command costs without the comparison: start-up + training + classifier + sampling
    masked_seconds = (t_trained - t_start) + (time.perf_counter() - t0)
    if utrainer is not None:
        metrics["unmasked"] = _report_unmasked(uncfg, utrainer, clf)
    metrics["timing"] = {
        "train_seconds": summary["train_seconds_total"],
        "sample_and_eval_seconds": sum(
            r.get("sample_seconds", 0) + r.get("eval_seconds", 0) for r in (rep, rep.get("unguided", {}))
        ),
        "masked_run_seconds": masked_seconds,
        "command_seconds": time.perf_counter() - t_start,
        "note": "from the start of `fastmask train` after Python and torch are imported (a few seconds)",
    }
    if "accuracy" in rep:
        metrics["targets"] = {
            "accuracy_with_guidance>=0.85": rep["accuracy"] >= 0.85,
            "masked_run<=10_minutes": masked_seconds <= 600,
        }
    atomic_write_json(out / "metrics.json", metrics)
    say(summary_line("masked", metrics))
    if "unmasked" in metrics:
        say(summary_line("unmasked", metrics))
    say(f"fastmask: wrote {out}/metrics.json, samples.png, loss.png, log.jsonl, checkpoints/ "
        f"({metrics['timing']['command_seconds']:.0f} s in all)")
    return 0


def training_metrics(summary: dict, cfg: TrainConfig) -> dict:
    s1 = summary["train_seconds"].get("1", 0.0)
    s2 = summary["train_seconds"].get("2", 0.0)
    return {
        **summary,
        "steps_per_second": {
            "masked_phase": summary["phase1_steps"] / s1 if s1 else None,
            "finetune_phase": summary["phase2_steps"] / s2 if s2 else None,
        },
        "images_per_second": (summary["steps"] * cfg.batch_size / summary["train_seconds_total"])
        if summary["train_seconds_total"]
        else None,
        # True when a minute cap ended a phase before its step count (a slow or busy machine)
        "stopped_by_time_cap": {
            "masked_phase": cfg.steps is not None and summary["phase1_steps"] < cfg.steps,
            "finetune_phase": summary["phase2_steps"] < cfg.finetune_steps,
        },
    }


def _digits_classifier(cfg: TrainConfig, trainer, metrics: dict) -> DigitClassifier:
    t0 = time.perf_counter()
    clf = DigitClassifier(seed=cfg.seed).fit(trainer.data.images, trainer.data.labels)
    metrics["classifier"] = {**classifier_report(clf), "fit_seconds": time.perf_counter() - t0}
    say(f"fastmask: digit classifier held-out accuracy on real digits: {clf.test_accuracy:.3f}")
    return clf


def _sample_and_measure(trainer, cfg: TrainConfig, out: Path, clf, tag: str = "samples", npz: bool = False) -> dict:
    """Samples with the config's guidance (and without, when ``cfg.eval_unguided``), measured by
    ``clf``; ``npz``: pixel samples also saved as ``<tag>.npz`` (the ``fastmask sample --npz`` layout)."""
    say(f"fastmask: sampling {cfg.samples_per_class} per class, guidance {cfg.guidance}, {cfg.sample_steps} Heun steps")
    rep = _sample_once(trainer, cfg, out, clf, tag, cfg.guidance, npz)
    if cfg.eval_unguided and clf is not None and trainer.num_classes > 0 and cfg.guidance != 1.0:
        say("fastmask: sampling again without guidance (scale 1) for the unguided Frechet distance")
        rep["unguided"] = _sample_once(trainer, cfg, out, clf, tag + "_unguided", 1.0, npz)
    return rep


def _sample_once(trainer, cfg: TrainConfig, out: Path, clf, tag: str, guidance: float, npz: bool = False) -> dict:
    return sample_report(
        trainer.ema, num_classes=trainer.num_classes, shape=trainer.data.shape, kind=trainer.data.kind, out_dir=out,
        samples_per_class=cfg.samples_per_class, grid_per_class=cfg.grid_per_class, guidance=guidance,
        steps=cfg.sample_steps, seed=cfg.seed + 1, device=trainer.device, amp=trainer.amp, classifier=clf, tag=tag,
        npz=npz,
    )


def unmasked_config(cfg: TrainConfig, summary: dict) -> TrainConfig:
    """The same run without masking (ratio 0 throughout, no fine-tune) for the masked run's
    wall-clock training time."""
    ucfg = copy.deepcopy(cfg)
    ucfg.mask_ratio, ucfg.mask_schedule, ucfg.mask_ratio_end = 0.0, "constant", None
    ucfg.finetune_steps, ucfg.finetune_minutes = 0, None
    ucfg.steps, ucfg.minutes = None, summary["train_seconds_total"] / 60
    ucfg.out = str(Path(cfg.out) / "unmasked")
    ucfg.preset = cfg.preset + " (unmasked comparison)"
    return ucfg


def _report_unmasked(ucfg: TrainConfig, tr, clf) -> dict:
    us = tr.summary()
    plot_loss_curve(tr.log_path, Path(ucfg.out) / "loss.png", title=f"{ucfg.model} unmasked (ratio 0 throughout)")
    rep = _sample_and_measure(tr, ucfg, Path(ucfg.out), clf)
    res = {"training": training_metrics(us, ucfg), "samples": rep, "out": ucfg.out}
    atomic_write_json(Path(ucfg.out) / "metrics.json", {"config": ucfg.to_dict(), **res})
    return res


def summary_line(name: str, metrics: dict) -> str:
    m = metrics if name == "masked" else metrics[name]
    rep, tr = m["samples"], m["training"]
    parts = [f"fastmask: {name}: {tr['steps']} steps in {tr['train_seconds_total']:.0f} s"]
    if "accuracy" in rep:
        parts.append(f"accuracy with guidance {rep['guidance']}: {rep['accuracy']:.3f}")
        parts.append(
            f"Frechet distance {rep['frechet_distance']:.2f} (real held-out digits, same n: "
            f"{rep['frechet_distance_real_heldout_same_n']:.2f})"
        )
        if "unguided" in rep:
            u = rep["unguided"]
            parts.append(f"without guidance: accuracy {u['accuracy']:.3f}, Frechet distance {u['frechet_distance']:.2f}")
    return ", ".join(parts)

"""The ``fastmask`` command line: train, sample, eval, profile.

    fastmask train                          # the no-download digits demo (~6-7 min on 2 CPU cores)
    fastmask train --compare-unmasked       # ... plus an unmasked model trained for the same time
    fastmask train --preset imagenet256 --data-path latents/ --out runs/in256
    torchrun --nproc_per_node=8 -m fastmask train --preset imagenet256 --data-path latents/
    fastmask sample --checkpoint runs/digits --per-class 8 --guidance 2
    fastmask eval --checkpoint runs/digits
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Explicit train flags: (flag, config key, type, help). Unset flags leave the config alone.
TRAIN_FLAGS = [
    ("--data", "data", str, "data set: digits (built in, no download), latents (VAE moment shards), folder (images)"),
    ("--data-path", "data_path", str, "file or folder of the data set (latents: .npy/.npz shards; folder: class sub-folders)"),
    ("--image-size", "image_size", int, "spatial size the model sees"),
    ("--channels", "channels", int, "image channels (pixels) or latent channels (latents)"),
    ("--arch", "arch", str, "maskdit or dit"),
    ("--model", "model", str, "model config, e.g. Digits/2, T/2, S/2, B/2, XL/2"),
    ("--batch-size", "batch_size", int, "global batch size (all ranks together)"),
    ("--lr", "lr", float, "learning rate of the masked phase"),
    ("--finetune-lr", "finetune_lr", float, "learning rate of the unmasking fine-tune (default: lr / 2)"),
    ("--steps", "steps", int, "steps of the masked phase"),
    ("--minutes", "minutes", float, "wall-clock cap (minutes) of the masked phase"),
    ("--finetune-steps", "finetune_steps", int, "steps of the unmasking fine-tune at mask ratio 0 (0: none)"),
    ("--finetune-minutes", "finetune_minutes", float, "wall-clock cap (minutes) of the fine-tune"),
    ("--mask-ratio", "mask_ratio", float, "fraction of tokens dropped in the masked phase"),
    ("--mask-schedule", "mask_schedule", str, "constant, linear or cosine (towards --set mask_ratio_end=R)"),
    ("--ema-decay", "ema_decay", float, "EMA decay per step"),
    ("--grad-clip", "grad_clip", float, "clip the global gradient norm to this value"),
    ("--sample-steps", "sample_steps", int, "EDM Heun steps for the samples drawn after training"),
    ("--guidance", "guidance", float, "classifier-free guidance scale of those samples (1: none)"),
    ("--samples-per-class", "samples_per_class", int, "samples per class drawn (and evaluated) after training"),
    ("--seed", "seed", int, "random seed (initialisation, data order, all per-step randomness)"),
    ("--out", "out", str, "output folder"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--threads", "threads", int, "CPU threads for torch (1 is fastest on a busy machine)"),
]


def _config_keys_help() -> str:
    from .presets import FIELDS, TrainConfig, field_help

    d = TrainConfig()
    lines = [
        "config keys (--set KEY=VALUE, or keys of a --config JSON file); the defaults shown are the bare",
        "config's, a preset overrides many of them (see --print-config):",
    ]
    for name in FIELDS:
        lines.append(f"  {name:<18} {field_help(name)} [default {getattr(d, name)!r}]")
    return "\n".join(lines)


def _presets_help() -> str:
    from .presets import PRESETS

    lines = ["presets (--preset NAME):"]
    for name, p in PRESETS.items():
        lines.append(f"  {name:<16} {p.get('description', '')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastmask",
        description="fastmask: fast MaskDiT training (masked diffusion transformers): train, sample, evaluate, profile.",
        epilog="Run `fastmask <command> --help` for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,eval,profile,info}")

    # ---- train
    t = sub.add_parser(
        "train",
        help="train a MaskDiT (default: the digits demo), then sample and evaluate",
        description="Train a MaskDiT: phase 1 at the mask ratio, phase 2 an unmasking fine-tune at ratio 0; then "
        "sample with the EDM Heun sampler and classifier-free guidance, and (digits) evaluate with a classifier "
        "trained on real digits. Writes checkpoints/, log.jsonl, loss.png, samples.png and metrics.json into --out. "
        "Configuration: preset, then --config JSON, then --set KEY=VALUE, then the explicit flags (later wins). "
        "Distributed: torchrun --nproc_per_node=N -m fastmask train ...",
        epilog=_presets_help() + "\n\n" + _config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--preset", default=None, help="named preset (default: digits; see the list below)")
    t.add_argument("--config", default=None, metavar="FILE.json", help="JSON object of config keys applied on the preset")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="set any config key (repeatable; see below)"
    )
    for flag, key, typ, hlp in TRAIN_FLAGS:
        meta = {int: "N", float: "X", str: "STR"}[typ]
        t.add_argument(flag, dest=f"cfg_{key}", type=typ, default=None, metavar=meta, help=hlp)
    t.add_argument("--no-eval", action="store_true", help="skip the classifier evaluation after training")
    t.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="resume from a checkpoint file or folder (no value: the newest checkpoint in --out); the "
        "checkpoint's config is the base, the options given here apply on top",
    )
    t.add_argument(
        "--compare-unmasked",
        action="store_true",
        help="after the run, train an unmasked model (ratio 0 throughout) for the same wall-clock time and "
        "evaluate it the same way; results go to metrics.json ('unmasked') and <out>/unmasked/",
    )
    t.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="tqdm progress bar (auto: on a TTY)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    t.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    t.set_defaults(handler=cmd_train)

    # ---- sample
    s = sub.add_parser(
        "sample",
        help="sample from a checkpoint (fastmask's own or a published MaskDiT/DiT .pt)",
        description="Draw samples with the EDM Heun sampler and classifier-free guidance. Pixel models write one "
        "PNG per sample plus grid.png; latent models write latents.npy (the scaled VAE latents z, decode with "
        "z / 0.18215) and labels.npy.",
    )
    s.add_argument("--checkpoint", required=True, help="a fastmask .safetensors checkpoint or run folder, or a published .pt")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--labels", default=None, help="comma-separated class labels, e.g. 0,1,2,2 (-1: unconditional)")
    g.add_argument("--per-class", type=int, default=None, help="this many samples of every class (default 8)")
    g.add_argument("--num", type=int, default=None, help="number of samples of an unconditional model")
    s.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (1: none)")
    s.add_argument("--steps", type=int, default=18, help="EDM Heun steps (2 * steps - 1 network calls; 40 for published FIDs)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (sample i depends only on seed and i)")
    s.add_argument("--out", default="samples", help="output folder")
    s.add_argument("--batch-size", type=int, default=64, help="samples per network batch")
    s.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a fastmask checkpoint")
    s.add_argument("--key", default=None, help="entry of a published checkpoint to load (e.g. ema, net)")
    s.add_argument(
        "--parameterization",
        choices=("auto", "edm", "ddpm"),
        default="auto",
        help="published checkpoints: edm (MaskDiT) or ddpm (DiT eps-prediction); auto picks by architecture",
    )
    s.add_argument("--trust-pickle", action="store_true", help="allow torch.load to unpickle arbitrary objects")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.set_defaults(handler=cmd_sample)

    # ---- eval
    e = sub.add_parser(
        "eval",
        help="evaluate a digits checkpoint: classifier accuracy and Frechet distance of its samples",
        description="Sample every class of a digits model with guidance and label the samples with an MLP "
        "classifier trained on real digits; report its accuracy (and the classifier's own held-out accuracy on "
        "real digits) and the Frechet distance in the classifier's hidden-layer features.",
    )
    e.add_argument("--checkpoint", required=True, help="a fastmask checkpoint file or run folder of a digits model")
    e.add_argument("--samples-per-class", type=int, default=50, help="samples drawn and classified per class")
    e.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's config)")
    e.add_argument("--steps", type=int, default=None, help="EDM Heun steps (default: the run's config)")
    e.add_argument("--seed", type=int, default=1, help="sampling seed")
    e.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA weights (default) or the raw ones")
    e.add_argument("--out", default=None, help="output folder (default: the run folder); writes eval.json, eval_samples.png")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.set_defaults(handler=cmd_eval)

    # ---- profile (implemented in fastmask.profiling, imported only when used)
    p = sub.add_parser(
        "profile",
        help="profile training steps (fastmask.profiling; run `fastmask profile --help`)",
        add_help=False,
        description="Profile training steps; options are defined by fastmask.profiling.",
    )
    p.add_argument("profile_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_profile)

    # ---- info (fastmask.info)
    from . import info

    i = sub.add_parser("info", help="versions, backends, and the backend each op of a model would take")
    info.add_arguments(i)
    i.set_defaults(handler=info.run)
    return parser


# --------------------------------------------------------------------------- helpers
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_config(args):
    """The TrainConfig from preset / checkpoint, --config, --set and the explicit flags."""
    from .presets import TrainConfig, get_preset, load_config_file, parse_value, update

    resume_path = None
    if args.resume is not None:
        from .checkpoint_io import read_metadata, resolve

        out = args.cfg_out
        if args.resume == "":
            if out is None:
                base = get_preset(args.preset or "digits")
                out = base.out
            resume_path = resolve(Path(out) / "checkpoints")
        else:
            resume_path = resolve(args.resume)
        cfg = TrainConfig.from_dict(read_metadata(resume_path)["config"])
    else:
        cfg = get_preset(args.preset or "digits")
    if args.config:
        update(cfg, load_config_file(args.config), where=f"--config {args.config}")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        update(cfg, {key.strip(): parse_value(key.strip(), value.strip())}, where="--set")
    for _, key, _, _ in TRAIN_FLAGS:
        v = getattr(args, f"cfg_{key}")
        if v is not None:
            setattr(cfg, key, v)
    if args.no_eval:
        cfg.evaluate = False
    cfg.validate()
    return cfg, resume_path


def _progress(flag: str):
    return {"auto": None, "on": True, "off": False}[flag]


def _write_metrics(path: Path, metrics: dict) -> None:
    from .checkpoint_io import atomic_write_json

    atomic_write_json(path, metrics)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    t_start = time.perf_counter()
    if args.list_presets:
        print(_presets_help())
        return 0
    cfg, resume_path = resolve_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .train import train

    trainer = train(cfg, resume=resume_path, progress=_progress(args.progress))
    summary = trainer.summary()
    t_trained = time.perf_counter()
    uncfg = utrainer = None
    if args.compare_unmasked:  # every rank trains it; rank 0 then samples and evaluates both
        uncfg = _unmasked_config(cfg, summary)
        _say(f"fastmask: unmasked comparison: ratio 0 for {uncfg.minutes:.2f} min (the masked run's training time)")
        utrainer = train(uncfg, progress=_progress(args.progress))
    if trainer.rank != 0:
        return 0
    out = Path(cfg.out)
    metrics = {
        "command": "fastmask " + " ".join(args.argv),
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "training": _training_metrics(summary, cfg),
    }
    _say(
        f"fastmask: trained {summary['steps']} steps ({summary['phase1_steps']} masked + {summary['phase2_steps']} "
        f"fine-tune) in {summary['train_seconds_total']:.0f} s; checkpoint {summary['checkpoint']}"
    )
    from .evaluate import plot_loss_curve

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
    _write_metrics(out / "metrics.json", metrics)
    _say(_summary_line("masked", metrics))
    if "unmasked" in metrics:
        _say(_summary_line("unmasked", metrics))
    _say(f"fastmask: wrote {out}/metrics.json, samples.png, loss.png, log.jsonl, checkpoints/ "
         f"({metrics['timing']['command_seconds']:.0f} s in all)")
    return 0


def _training_metrics(summary: dict, cfg) -> dict:
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


def _digits_classifier(cfg, trainer, metrics):
    from .evaluate import DigitClassifier, classifier_report

    t0 = time.perf_counter()
    clf = DigitClassifier(seed=cfg.seed).fit(trainer.data.images, trainer.data.labels)
    metrics["classifier"] = {**classifier_report(clf), "fit_seconds": time.perf_counter() - t0}
    _say(f"fastmask: digit classifier held-out accuracy on real digits: {clf.test_accuracy:.3f}")
    return clf


def _sample_and_measure(trainer, cfg, out: Path, clf, tag: str = "samples") -> dict:

    _say(f"fastmask: sampling {cfg.samples_per_class} per class, guidance {cfg.guidance}, {cfg.sample_steps} Heun steps")
    rep = _sample_once(trainer, cfg, out, clf, tag, cfg.guidance)
    if cfg.eval_unguided and clf is not None and trainer.num_classes > 0 and cfg.guidance != 1.0:
        _say("fastmask: sampling again without guidance (scale 1) for the unguided Frechet distance")
        rep["unguided"] = _sample_once(trainer, cfg, out, clf, tag + "_unguided", 1.0)
    return rep


def _sample_once(trainer, cfg, out: Path, clf, tag: str, guidance: float) -> dict:
    from .evaluate import sample_report

    return sample_report(
        trainer.ema,
        num_classes=trainer.num_classes,
        shape=trainer.data.shape,
        kind=trainer.data.kind,
        out_dir=out,
        samples_per_class=cfg.samples_per_class,
        grid_per_class=cfg.grid_per_class,
        guidance=guidance,
        steps=cfg.sample_steps,
        seed=cfg.seed + 1,
        device=trainer.device,
        amp=trainer.amp,
        classifier=clf,
        tag=tag,
    )


def _unmasked_config(cfg, summary: dict):
    """The same run without masking (ratio 0 throughout, no fine-tune) for the masked run's
    wall-clock training time."""
    import copy

    ucfg = copy.deepcopy(cfg)
    ucfg.mask_ratio, ucfg.mask_schedule, ucfg.mask_ratio_end = 0.0, "constant", None
    ucfg.finetune_steps, ucfg.finetune_minutes = 0, None
    ucfg.steps, ucfg.minutes = None, summary["train_seconds_total"] / 60
    ucfg.out = str(Path(cfg.out) / "unmasked")
    ucfg.preset = cfg.preset + " (unmasked comparison)"
    return ucfg


def _report_unmasked(ucfg, tr, clf) -> dict:
    from .evaluate import plot_loss_curve

    us = tr.summary()
    plot_loss_curve(tr.log_path, Path(ucfg.out) / "loss.png", title=f"{ucfg.model} unmasked (ratio 0 throughout)")
    rep = _sample_and_measure(tr, ucfg, Path(ucfg.out), clf)
    res = {"training": _training_metrics(us, ucfg), "samples": rep, "out": ucfg.out}
    _write_metrics(Path(ucfg.out) / "metrics.json", {"config": ucfg.to_dict(), **res})
    return res


def _summary_line(name: str, metrics: dict) -> str:
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


# --------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .sampling import load_model, sample, save_grid, save_images

    dev = _device(args.device)
    net, info = load_model(
        args.checkpoint,
        use_ema=args.weights == "ema",
        device=dev,
        key=args.key,
        parameterization=args.parameterization,
        trust_pickle=args.trust_pickle,
    )
    K = info["num_classes"]
    if args.labels is not None:
        try:
            labels = torch.tensor([int(v) for v in args.labels.split(",") if v.strip()], dtype=torch.long)
        except ValueError:
            raise ValueError(f"--labels: expected comma-separated integers, got {args.labels!r}") from None
        if len(labels) == 0:
            raise ValueError("--labels: no labels given")
        if K == 0 and bool((labels >= 0).any()):
            raise ValueError("--labels: the model is unconditional; use --num")
        if bool(((labels < -1) | (labels >= max(K, 1))).any()):
            raise ValueError(f"--labels: expected values in [-1, {K - 1}] for this {K}-class model")
        num = None
    elif K > 0 and args.num is None:
        labels = torch.arange(K).repeat_interleave(args.per_class or 8)
        num = None
    else:
        labels, num = None, args.num or args.per_class or 8
    if args.steps < 1:
        raise ValueError(f"--steps: expected at least 1, got {args.steps}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x = sample(
        net, labels, info["shape"], num=num, steps=args.steps, guidance=args.guidance, seed=args.seed,
        batch_size=args.batch_size, device=dev, amp=dev.type == "cuda",
    )
    dt = time.perf_counter() - t0
    if info["kind"] == "latents":
        np.save(out / "latents.npy", x.numpy())
        if labels is not None:
            np.save(out / "labels.npy", labels.numpy())
        _say(f"fastmask: wrote {len(x)} latents {tuple(x.shape[1:])} to {out / 'latents.npy'} ({dt:.1f} s)")
    else:
        save_images(x, out, labels)
        rows = K if (labels is not None and args.labels is None and K > 0) else max(1, int(len(x) ** 0.5))
        save_grid(x, out / "grid.png", rows=rows)
        _say(f"fastmask: wrote {len(x)} PNGs and grid.png to {out} ({dt:.1f} s)")
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .checkpoint_io import atomic_write_json, load_checkpoint, resolve
    from .data import DigitsDataset
    from .evaluate import DigitClassifier, classifier_report, sample_report
    from .presets import TrainConfig
    from .sampling import load_model

    path = resolve(args.checkpoint)
    cfg = TrainConfig.from_dict(load_checkpoint(path)["config"])
    dev = _device(args.device)
    net, info = load_model(path, use_ema=args.weights == "ema", device=dev)
    if cfg.data != "digits" or info["num_classes"] != 10 or info["shape"][0] != 1:
        raise ValueError(
            f"checkpoint: eval measures class-conditional digits models; {str(path)!r} was trained on "
            f"data={cfg.data!r} with {info['num_classes']} classes and shape {info['shape']}"
        )
    out = Path(args.out) if args.out else path.parent.parent if path.parent.name == "checkpoints" else path.parent
    data = DigitsDataset(cfg.image_size, cfg.channels)
    clf = DigitClassifier(seed=cfg.seed).fit(data.images, data.labels)
    guidance = cfg.guidance if args.guidance is None else args.guidance
    steps = cfg.sample_steps if args.steps is None else args.steps
    rep = sample_report(
        net, num_classes=10, shape=info["shape"], kind="pixels", out_dir=out, samples_per_class=args.samples_per_class,
        grid_per_class=min(10, args.samples_per_class), guidance=guidance, steps=steps, seed=args.seed, device=dev,
        amp=dev.type == "cuda", classifier=clf, tag="eval_samples",
    )
    result = {"checkpoint": str(path), "step": info.get("step"), "weights": info.get("weights"),
              "classifier": classifier_report(clf), "samples": rep}
    atomic_write_json(out / "eval.json", result)
    print(json.dumps({k: rep[k] for k in ("accuracy", "frechet_distance", "guidance", "num_samples")}, indent=2))
    _say(f"fastmask: wrote {out / 'eval.json'} and {out / 'eval_samples.png'}")
    return 0


# --------------------------------------------------------------------------- profile
def cmd_profile(args) -> int:
    """``fastmask profile ...``: every argument after ``profile`` goes to fastmask.profiling's parser."""
    from . import profiling  # imported here: the profiler is only needed by this command

    parser = argparse.ArgumentParser(prog="fastmask profile", description="Profile training steps.")
    profiling.add_arguments(parser)
    return int(profiling.run(parser.parse_args(args.profile_args)) or 0)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "profile":  # argparse cannot pass a leading --help through REMAINDER
        args = argparse.Namespace(command="profile", handler=cmd_profile, profile_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from .train import NonFiniteLossError

    try:
        return args.handler(args)
    except NonFiniteLossError as e:
        _say(f"fastmask: error: {e}")
        return 1
    except ValueError as e:
        _say(f"fastmask {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say("fastmask: interrupted (a checkpoint was saved; resume with `fastmask train --resume`)"
             if args.command == "train" else "fastmask: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

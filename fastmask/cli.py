"""The ``fastmask`` command line: train, sample, eval, profile.

    fastmask train                          # the no-download digits demo (its run time: README, "Measured results")
    fastmask train --compare-unmasked       # ... plus an unmasked model trained for the same time
    fastmask train --compare dit,maskdit    # model families for the same time, one table
    fastmask train --preset imagenet256 --data-path latents/ --out runs/in256
    torchrun --nproc_per_node=8 -m fastmask train --preset imagenet256 --data-path latents/
    fastmask sample --checkpoint runs/digits --per-class 8 --guidance 2
    fastmask eval --checkpoint runs/digits

A mistake in what was asked for (a flag, a config key, a file) is reported as one line
``fastmask <command>: error: ...`` with exit code 2; ``FASTMASK_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import UsageError
from .values import arg_type, make_out_dir


# --------------------------------------------------------------------------- train
def _train_flags() -> list[tuple[str, str]]:
    """(flag, config key) of every ``fastmask train`` flag that sets a config key."""
    from .presets import flag_fields, flag_name

    return [(flag_name(k), k) for k in flag_fields()]


TRAIN_FLAGS = _train_flags()


def _config_keys_help() -> str:
    from .presets import FIELDS, TrainConfig, field_check, field_help, flag_name

    d = TrainConfig()
    lines = ["config keys (--set KEY=VALUE, keys of a --config JSON file, or the flag named); the defaults shown",
             "are the bare config's, a preset overrides many of them (see --print-config):"]
    for name, f in FIELDS.items():
        flag = f" ({flag_name(name)})" if f.metadata["flag"] else ""
        check = field_check(name)
        accepts = "" if check.choices and len(check.choices) > 4 else f"; {check.expected()}"
        lines.append(f"  {name + flag:<34} {field_help(name)} [default {getattr(d, name)!r}{accepts}]")
    return "\n".join(lines)


def _presets_help() -> str:
    from .presets import PRESETS

    lines = [f"  {n:<16} {p.get('description', '')}" for n, p in PRESETS.items()]
    return "\n".join(["presets (--preset NAME):", *lines])


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    from .presets import field_check, field_help

    t.description = (
        "Train a MaskDiT: phase 1 at the mask ratio, phase 2 an unmasking fine-tune at ratio 0; then sample with the "
        "EDM Heun sampler and classifier-free guidance, and (digits) evaluate with a classifier trained on real "
        "digits. Writes checkpoints/, log.jsonl, loss.png, samples.png and metrics.json into --out. Configuration: "
        "preset, then --config JSON, then --set KEY=VALUE, then the flags (later wins); every value is checked the "
        "same way. Resuming: --steps N is the total step count of the masked phase; a resumed run continues to N "
        "(the fine-tune and the minute caps over resumes: README, \"Steps, minutes and phases on resume\"). One run per --out: a second run on a folder in use is refused (the folder is locked), and "
        "so is a new run (without --resume) on a folder that holds another run's checkpoints. Distributed: "
        "torchrun --nproc_per_node=N -m fastmask train ..."
    )
    t.epilog = _presets_help() + "\n\n" + _config_keys_help()
    t.formatter_class = argparse.RawDescriptionHelpFormatter
    t.add_argument("--preset", default=None, help="named preset (default: digits; see the list below)")
    t.add_argument("--config", default=None, metavar="FILE.json",
                   help="JSON object of config keys applied on the preset")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set any config key (repeatable)")
    for flag, key in TRAIN_FLAGS:
        check = field_check(key)
        meta = {int: "N", float: "X"}.get(check.type, "STR")
        if check.choices and len(check.choices) <= 4:
            meta = "{" + ",".join(check.choices) + "}"
        t.add_argument(flag, dest=f"cfg_{key}", type=arg_type(check), default=None, metavar=meta, help=field_help(key))
    t.add_argument("--no-eval", action="store_true", help="skip the classifier evaluation after training")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint file or folder (no value: the newest checkpoint in --out); the "
                   "checkpoint's config is the base, the options given here apply on top. Without --resume, an --out "
                   "that already holds another run's checkpoints is refused (one run per folder)")
    t.add_argument("--compare-unmasked", action="store_true",
                   help="after the run, train an unmasked model (ratio 0 throughout) for the same wall-clock time and "
                   "evaluate it the same way; results go to metrics.json ('unmasked') and <out>/unmasked/ (with "
                   "--resume, that unmasked run is resumed too and trains up to the masked run's total time)")
    t.add_argument("--compare", default=None, metavar="FAMILIES",
                   help="train each model family of a comma-separated list (e.g. dit,maskdit; --arch names) in "
                   "<out>/<family>/ for the same wall-clock time as the first one, evaluate each the same way, and "
                   "write the table to <out>/compare.md and compare.json (see fastmask/compare.py)")
    t.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="tqdm progress bar (auto: on a TTY)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    t.add_argument("--list-presets", action="store_true", help="list the presets and exit")


def resolve_config(args):
    """The TrainConfig from preset / checkpoint, --config, --set and the flags, checked."""
    from .presets import TrainConfig, get_preset, load_config_file, parse_value, update

    resume_path = None
    if args.resume is not None:
        from .checkpoint_io import read_metadata, resolve

        if args.resume == "":
            preset = args.preset if args.preset is not None else "digits"
            out = args.cfg_out if args.cfg_out is not None else get_preset(preset).out
            resume_path = resolve(Path(out) / "checkpoints")
        else:
            resume_path = resolve(args.resume)
        cfg = TrainConfig.from_dict(read_metadata(resume_path)["config"])
    else:
        cfg = get_preset(args.preset if args.preset is not None else "digits")
    if args.config is not None:
        update(cfg, load_config_file(args.config), where=f"--config {args.config}")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        setattr(cfg, key.strip(), parse_value(key.strip(), value))
    for flag, key in TRAIN_FLAGS:
        v = getattr(args, f"cfg_{key}")
        if v is not None:
            update(cfg, {key: v}, where=flag)
    if args.no_eval:
        cfg.evaluate = False
    cfg.validate()
    return cfg, resume_path


def cmd_train(args) -> int:
    t_start = time.perf_counter()
    if args.list_presets:
        print(_presets_help())
        return 0
    if args.compare is not None and (args.resume is not None or args.compare_unmasked):
        raise UsageError("--compare: runs fresh comparisons only (not with --resume or --compare-unmasked)")
    cfg, resume_path = resolve_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    make_out_dir(cfg.out, "--out")
    if args.compare is not None:
        return _compare(args, cfg, resume_path)
    from .train import check_run_folder

    # one run per folder: a fresh run never writes into a folder that holds another run's checkpoints
    check_run_folder(cfg.out, resume_path, flag="--out", how="--resume")
    if args.compare_unmasked and resume_path is None:  # its sub-run is resumed along with a resumed run
        check_run_folder(Path(cfg.out) / "unmasked", None, flag="--out", how="--resume")
    from .report import train_and_report

    return train_and_report(cfg, resume=resume_path, progress={"auto": None, "on": True, "off": False}[args.progress],
                            compare_unmasked=args.compare_unmasked, command="fastmask " + " ".join(args.argv),
                            t_start=t_start)


def _compare(args, cfg, resume_path) -> int:
    from .compare import check_folders, compare, parse_families

    families = parse_families(args.compare)
    check_folders(cfg, families)
    return compare(cfg, families, progress={"auto": None, "on": True, "off": False}[args.progress],
                   command="fastmask " + " ".join(args.argv))


# --------------------------------------------------------------------------- the command table
# name: (one-line help, add_arguments(parser), run(args) -> exit code), or (one-line help, a module
# path) for a module that provides ``add_arguments`` and ``run`` (imported when the parser is built).
COMMANDS = {
    "train": ("train a MaskDiT (default: the digits demo), then sample and evaluate", add_train_arguments, cmd_train),
    "sample": ("sample from a checkpoint (fastmask's own or a published MaskDiT/DiT .pt)", "fastmask.generate"),
    "eval": ("evaluate a digits checkpoint: classifier accuracy and Frechet distance of samples", "fastmask.evaluate"),
    "profile": ("profile training steps: time per op kind, MFU", "fastmask.profiling"),
    "info": ("versions, backends, and the backend each op of a model would take", "fastmask.info"),
    "latents": ("encode an image folder into VAE-latent training shards", "fastmask.latents"),
    "fid": ("FID (and IS, precision/recall) of samples against a reference", "fastmask.fid"),
}


class _ParseError(UsageError):
    """An argparse error, its message already prefixed with the command."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as one-line :class:`UsageError` (no usage block)."""

    def error(self, message: str):
        raise _ParseError(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="fastmask",
        description="fastmask: fast MaskDiT training (masked diffusion transformers): train, sample, evaluate, "
        "profile.",
        epilog="Run `fastmask <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"fastmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser)
    for name, (help_, *impl) in COMMANDS.items():
        if isinstance(impl[0], str):
            module = importlib.import_module(impl[0])
            impl = [module.add_arguments, module.run]
        p = sub.add_parser(name, help=help_, description=help_)  # add_arguments may set a longer one
        impl[0](p)
        p.set_defaults(handler=impl[1])
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM before the trainer's own handling is installed (start-up): stop like Ctrl-C."""

    signum = signal.SIGTERM


def _on_sigterm(signum, frame):
    raise _Terminated()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("FASTMASK_DEBUG", "") not in ("", "0")
    command = argv[0] if argv and argv[0] in COMMANDS else None
    # SIGTERM (schedulers, `timeout`) stops start-up like Ctrl-C, with one line and exit code 143;
    # training installs its own handler, which saves a checkpoint
    main_thread = threading.current_thread() is threading.main_thread()
    prev_term = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread and prev_term == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv
        if getattr(args, "handler", None) is None:
            parser.print_help()
            return 2
        from .ops.dispatch import check_environment

        check_environment()  # FASTMASK_BACKEND and the 0/1 switches, before any work
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        ckpt = getattr(e, "checkpoint", None)  # set by the trainer's signal handling
        if ckpt is not None:
            _say(f"fastmask: interrupted; saved {ckpt} (resume with `fastmask train --resume`)")
        else:
            _say("fastmask: interrupted (no checkpoint was saved)" if command == "train" else "fastmask: interrupted")
        return 128 + getattr(e, "signum", 2)
    except Exception as e:
        from .train import NonFiniteLossError

        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        where = f"fastmask {command}: error: " if command else "fastmask: error: "
        if isinstance(e, (ValueError, NonFiniteLossError)):
            _say(where + msg)
            return 1 if isinstance(e, NonFiniteLossError) else 2
        raise
    finally:
        if main_thread and prev_term == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())

"""Training configuration (one flat dataclass) and the named presets of ``fastmask train``.

A run's configuration is built in this order, later wins:
    preset (``--preset``, default ``digits``) -> JSON file (``--config``) -> ``--set key=value``
    -> explicit command-line flags (``--steps``, ``--lr`` ...).
Every key is a field of :class:`TrainConfig`; ``fastmask train --print-config`` shows the result.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field


def _f(default, help: str):
    """A config field with its help text (shown by `fastmask train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # ---- data
    data: str = _f("digits", "digits | latents | folder")
    data_path: str | None = _f(None, "latents: .npy/.npz file or folder of shards; folder: root of class sub-folders")
    image_size: int = _f(16, "pixel data are resized to this; latents must already have it")
    channels: int = _f(1, "image channels (pixels) or latent channels (latents: moments have 2x this)")
    latent_scale: float = _f(0.18215, "z = latent_scale * (mean + exp(logvar / 2) * eps)")
    # ---- model
    arch: str = _f("maskdit", "maskdit | dit")
    model: str = _f("Digits/2", "model config name (fastmask.models.config_names()): Digits/2, T/2, S/2, XL/2 ...")
    num_classes: int | None = _f(None, "classes (None: from the data set; 0 = unconditional)")
    # ---- optimisation
    batch_size: int = _f(128, "global batch (all ranks together)")
    lr: float = _f(1e-4, "AdamW learning rate of phase 1 (the masked phase)")
    weight_decay: float = _f(0.0, "AdamW weight decay (the paper uses none)")
    betas: tuple = _f((0.9, 0.999), "AdamW betas, e.g. --set betas=0.9,0.99")
    warmup_steps: int = _f(0, "linear lr warm-up at the start of training")
    grad_clip: float | None = _f(None, "max global gradient norm; None = no clipping")
    ema_decay: float = _f(0.9999, "EMA decay, updated every step (paper: 0.9999)")
    ema_warmup: bool = _f(False, "EMA decay min(ema_decay, (1 + step) / (10 + step)): for short runs")
    label_dropout: float = _f(0.1, "probability that a label is replaced by -1 (no label) for CFG")
    mae_coef: float = _f(0.1, "weight of the MAE term on dropped tokens")
    amp: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
    # ---- phase 1: masked training
    steps: int | None = _f(2000, "optimizer steps of phase 1 (None: until `minutes` runs out)")
    minutes: float | None = _f(None, "wall-clock cap of phase 1")
    mask_ratio: float = _f(0.5, "fraction of tokens dropped in phase 1")
    mask_schedule: str = _f("constant", "constant | linear | cosine (from mask_ratio to mask_ratio_end)")
    mask_ratio_end: float | None = _f(None, "end of a linear/cosine schedule (default: mask_ratio)")
    # ---- phase 2: unmasking fine-tune (mask ratio 0)
    finetune_steps: int = _f(0, "steps of phase 2, the unmasking fine-tune at ratio 0")
    finetune_minutes: float | None = _f(None, "wall-clock cap of phase 2")
    finetune_lr: float | None = _f(None, "learning rate of phase 2 (None: lr / 2)")
    # ---- sampling and evaluation after training
    sample_steps: int = _f(18, "EDM Heun steps (2 * steps - 1 network calls)")
    guidance: float = _f(1.5, "classifier-free guidance scale (1 = none)")
    samples_per_class: int = _f(50, "samples per class drawn after training (evaluation)")
    grid_per_class: int = _f(10, "columns of the sample grid PNG")
    evaluate: bool = _f(True, "digits only: classifier accuracy and Frechet distance")
    eval_unguided: bool = _f(False, "also sample and evaluate without guidance (scale 1): the fairer Frechet distance")
    # ---- bookkeeping
    seed: int = _f(0, "seeds the initialisation, the data order and all per-step randomness")
    out: str = _f("runs/digits", "output folder (checkpoints, log.jsonl, PNGs, metrics.json)")
    log_every: int = _f(20, "steps between rows of log.jsonl")
    ckpt_every: int = _f(500, "steps between checkpoints (also saved after each phase, on Ctrl-C and at the end)")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep (older ones are deleted)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    threads: int | None = _f(None, "CPU threads for torch (None: torch's default); 1 is fastest on a busy machine")
    preset: str = _f("digits", "name of the preset this config started from (informative)")
    description: str = _f("", "what the preset is (informative)")

    def phase_lr(self, phase: int) -> float:
        if phase == 1:
            return self.lr
        return self.finetune_lr if self.finetune_lr is not None else self.lr / 2

    def validate(self) -> None:
        if self.data not in ("digits", "latents", "folder"):
            raise ValueError(f"data: expected 'digits', 'latents' or 'folder', got {self.data!r}")
        if self.data in ("latents", "folder") and not self.data_path:
            raise ValueError(f"data_path: data={self.data!r} needs --data-path (a file or folder)")
        if self.arch not in ("maskdit", "dit"):
            raise ValueError(f"arch: expected 'maskdit' or 'dit', got {self.arch!r}")
        if self.arch == "dit" and (self.mask_ratio > 0 or (self.mask_ratio_end or 0) > 0):
            raise ValueError("mask_ratio: a plain DiT (arch='dit') cannot drop tokens; set mask_ratio=0")
        for name in ("mask_ratio", "mask_ratio_end"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1), got {v}")
        if self.mask_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"mask_schedule: expected constant, linear or cosine, got {self.mask_schedule!r}")
        if self.steps is None and self.minutes is None:
            raise ValueError("steps: give a step count or a time budget (minutes)")
        if self.steps is not None and self.steps < 0 or self.finetune_steps < 0:
            raise ValueError(f"steps: expected non-negative counts, got {self.steps} and {self.finetune_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive batch, got {self.batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a value in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout: expected a probability, got {self.label_dropout}")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError(f"amp: expected auto, bf16 or fp32, got {self.amp!r}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps: expected at least 1, got {self.sample_steps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = cls()
        update(cfg, d, where="config")
        return cfg


_HINTS = typing.get_type_hints(TrainConfig)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_value(key: str, text: str):
    """A ``--set key=value`` string converted to the type of ``key``."""
    if key not in FIELDS:
        raise ValueError(f"--set: unknown key {key!r}; known keys: {', '.join(FIELDS)}")
    hint = _HINTS[key]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is tuple:
            return tuple(float(v) for v in text.split(","))
        return text
    except ValueError:
        raise ValueError(f"--set {key}={text}: expected a {getattr(base, '__name__', base)}") from None


def update(cfg: TrainConfig, values: dict, where: str) -> TrainConfig:
    for k, v in values.items():
        if k not in FIELDS:
            raise ValueError(f"{where}: unknown key {k!r}; known keys: {', '.join(FIELDS)}")
        if k == "betas" and v is not None:
            v = tuple(v)
        setattr(cfg, k, v)
    return cfg


# --------------------------------------------------------------------------- presets
# Digits presets, measured on this project's shared 2-core CPU: 1 thread runs the masked
# Digits/2 step at batch 64 at about 2 steps/s and the unmasked one at about 1.4 (other work
# running); 600 + 100 steps, 200 guided samples and the evaluation take about 7 minutes. The step
# counts keep a run reproducible; the minute caps only protect the 10-minute budget on a machine
# that is much slower (a run that hits a cap says so in metrics.json).
# What the two ImageNet recipes share (MaskDiT paper: XL/2 on SD-VAE latents, ratio 0.5 then 0).
_IMAGENET = dict(
    data="latents",
    channels=4,
    arch="maskdit",
    model="XL/2",
    batch_size=1024,
    lr=1e-4,
    ema_decay=0.9999,
    mask_ratio=0.5,
    finetune_lr=5e-5,
    sample_steps=40,
    guidance=1.5,
    samples_per_class=1,
    grid_per_class=1,
    evaluate=False,
    log_every=100,
    ckpt_every=10_000,
)

_DIGITS = dict(
    data="digits",
    image_size=16,
    channels=1,
    arch="maskdit",
    model="Digits/2",
    batch_size=64,
    lr=2e-3,
    warmup_steps=50,
    grad_clip=1.0,
    ema_decay=0.999,
    ema_warmup=True,
    sample_steps=18,
    guidance=2.0,
    samples_per_class=20,
    grid_per_class=10,
    eval_unguided=True,
    threads=1,
    log_every=20,
    ckpt_every=200,
)

PRESETS: dict[str, dict] = {
    "digits": dict(
        _DIGITS,
        description="no-download demo: class-conditional MaskDiT (Digits/2, ~1.5M params) on scikit-learn's "
        "8x8 digits upsampled to 16x16; 600 steps at ratio 0.5, then 100 unmasking steps at ratio 0 (lr "
        "halved); batch 64, lr 2e-3; EMA 0.999 with warm-up (0.9999 would average over far more steps than "
        "the run has); 1 CPU thread (fastest on a shared machine); minute caps keep a slow machine in budget",
        steps=600,
        minutes=4.5,
        mask_ratio=0.5,
        finetune_steps=100,
        finetune_minutes=1.25,
        out="runs/digits",
    ),
    "digits-unmasked": dict(
        _DIGITS,
        description="the digits demo without masking (ratio 0 throughout, no fine-tune) for a time budget: "
        "the baseline that `fastmask train --compare-unmasked` trains for the masked run's wall-clock time",
        steps=None,
        minutes=5.0,
        mask_ratio=0.0,
        finetune_steps=0,
        out="runs/digits-unmasked",
    ),
    "imagenet256": dict(
        _IMAGENET,
        description="the paper's ImageNet 256x256 recipe on VAE-latent shards (--data-path): MaskDiT-XL/2, "
        "batch 1024, lr 1e-4, EMA 0.9999, ratio 0.5 for 2M steps, then ratio 0 at lr 5e-5",
        image_size=32,
        steps=2_000_000,
        finetune_steps=37_500,
        out="runs/imagenet256",
    ),
    "imagenet512": dict(
        _IMAGENET,
        description="the paper's ImageNet 512x512 recipe on VAE-latent shards (64x64 latents): MaskDiT-XL/2",
        image_size=64,
        steps=1_000_000,
        finetune_steps=50_000,
        out="runs/imagenet512",
    ),
    "folder": dict(
        description="pixel-space MaskDiT on an image folder (one sub-folder per class, --data-path), 32x32 RGB, "
        "MaskDiT-S/2",
        data="folder",
        image_size=32,
        channels=3,
        arch="maskdit",
        model="S/2",
        batch_size=128,
        lr=1e-4,
        ema_decay=0.9999,
        steps=100_000,
        mask_ratio=0.5,
        finetune_steps=5_000,
        sample_steps=18,
        guidance=1.5,
        samples_per_class=8,
        grid_per_class=8,
        evaluate=False,
        out="runs/folder",
        log_every=50,
        ckpt_every=5_000,
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {preset_names()}")
    cfg = TrainConfig()
    update(cfg, PRESETS[name], where=f"preset {name!r}")
    cfg.preset = name
    return cfg


def load_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--config: no such file {path!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path!r} must hold a JSON object of config keys")
    return data


def field_help(name: str) -> str:
    return FIELDS[name].metadata.get("help", "")

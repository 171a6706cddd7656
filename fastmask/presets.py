"""Training configuration (one flat dataclass) and the named presets of ``fastmask train``.

A run's configuration is built in this order, later wins:
    preset (``--preset``, default ``digits``) -> JSON file (``--config``) -> ``--set key=value``
    -> explicit command-line flags (``--steps``, ``--lr`` ...).
Every key is a field of :class:`TrainConfig`, which carries its help text, whether ``fastmask
train`` has a flag for it, and what it accepts (a :class:`Check`: type, range, choices). Every
value, whichever way it comes, passes :func:`check_value`; a bad one raises
:class:`~fastmask.errors.UsageError` naming the flag, ``--set`` key or file.
``fastmask train --print-config`` shows the result.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from .errors import UsageError


# The value checks and the command line's helpers live in fastmask/values.py; these names are
# imported here for the modules that still take them from presets.
from .values import (  # noqa: E402, F401
    COUNT,
    DEVICE,
    DEVICE_PATTERN,
    MAX_INT,
    MAX_SAMPLES,
    RATIO,
    Check,
    arg_type,
    check_out_file,
    make_out_dir,
    resolve_device,
)


# --------------------------------------------------------------------------- the config
def _f(default, help: str, *, flag: bool = False, **check):
    """A config field: its default, its help text (the one shown for both ``--set KEY`` and its
    flag), whether ``fastmask train`` has a flag ``--key-name`` for it, and what it accepts
    (:class:`Check` arguments; the type comes from the annotation)."""
    meta = {"help": help, "flag": flag, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


_UNIT = dict(lo=0.0, hi=1.0, hi_open=True)  # a fraction in [0, 1)
_LR = dict(lo=0.0, hi=1.0, lo_open=True)  # AdamW learning rates
_RESUME = "README: \"Steps, minutes and phases on resume\""  # the resume rules are stated there, once


@dataclass
class TrainConfig:
    # ---- data
    data: str = _f("digits", "data set: digits (built in, no download), latents (VAE moment shards), folder (images "
                   "in class sub-folders)", flag=True, choices=("digits", "latents", "folder"))
    data_path: str | None = _f(None, "file or folder of the data set (latents: .npy/.npz file or folder of shards; "
                               "folder: root of the class sub-folders)", flag=True)
    image_size: int = _f(16, "spatial size the model sees (pixel data are resized to it; latents must have it)",
                         flag=True, lo=1, hi=4096)
    channels: int = _f(1, "image channels (pixels) or latent channels (latents: moments have 2x this)", flag=True, lo=1,
                   hi=1024)
    latent_scale: float = _f(0.18215, "z = latent_scale * (mean + exp(logvar / 2) * eps)", lo=0.0, lo_open=True)
    # ---- model
    arch: str = _f("maskdit", "model family, one of fastmask.models.ARCHITECTURES (maskdit, dit, ...)", flag=True)
    model: str = _f("Digits/2", "model config (fastmask.models.config_names()): Digits/2, T/2, S/2, B/2, XL/2 ...",
                    flag=True)
    num_classes: int | None = _f(None, "classes (none: from the data set; 0 = unconditional)", lo=0, hi=1_000_000)
    objective: str = _f("edm", "training objective: edm (MaskDiT's EDM denoising loss) or flow (SiT's linear "
                        "flow matching: x_t = t x1 + (1 - t) x0, velocity target x1 - x0)", flag=True,
                        choices=("edm", "flow"))
    t_schedule: str = _f("uniform", "flow only: distribution of the training time t, uniform (SiT) or logit_normal "
                         "(sigmoid of a standard normal)", flag=True, choices=("uniform", "logit_normal"))
    # ---- optimisation
    batch_size: int = _f(128, "global batch size (all ranks together)", flag=True, lo=1, hi=2**20)
    lr: float = _f(1e-4, "AdamW learning rate of the masked phase", flag=True, **_LR)
    weight_decay: float = _f(0.0, "AdamW weight decay (the paper uses none)", lo=0.0)
    betas: tuple = _f((0.9, 0.999), "AdamW betas, a pair, e.g. --set betas=0.9,0.99", **_UNIT)
    warmup_steps: int = _f(0, "linear lr warm-up at the start of training", lo=0)
    grad_clip: float | None = _f(None, "clip the global gradient norm to this value (none: no clipping)", flag=True,
                                 lo=0.0, lo_open=True)
    ema_decay: float = _f(0.9999, "EMA decay, updated every step (paper: 0.9999)", flag=True, **_UNIT)
    ema_warmup: bool = _f(False, "EMA decay min(ema_decay, (1 + step) / (10 + step)): for short runs")
    label_dropout: float = _f(0.1, "probability that a label is replaced by -1 (no label) for guidance", lo=0.0, hi=1.0)
    mae_coef: float = _f(0.1, "weight of the MAE term on dropped tokens", lo=0.0)
    amp: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32", choices=("auto", "bf16", "fp32"))
    cuda_graph: bool = _f(True, "on CUDA, run each training step as one captured CUDA graph (forward, backward, "
                          "AdamW, EMA), replayed per step; false: eager. Off with several ranks or a compiled step")
    # ---- phase 1: masked training
    steps: int | None = _f(2000, f"total step count of the masked phase, over all resumes ({_RESUME}; none: until "
                           "--minutes runs out)", flag=True, lo=0)
    minutes: float | None = _f(None, f"wall-clock cap (minutes) of the masked phase, a total over all resumes ({_RESUME})",
                               flag=True, lo=0.0, lo_open=True)
    mask_ratio: float = _f(0.5, "fraction of tokens dropped in the masked phase (arch tread: the fraction that "
                           "bypasses the routed blocks)", flag=True, **_UNIT)
    mask_schedule: str = _f("constant", "constant, linear or cosine (from mask_ratio to mask_ratio_end)", flag=True,
                            choices=("constant", "linear", "cosine"))
    mask_ratio_end: float | None = _f(None, "end of a linear/cosine schedule (default: mask_ratio)", **_UNIT)
    # ---- phase 2: unmasking fine-tune (mask ratio 0)
    finetune_steps: int = _f(0, "steps of the unmasking fine-tune at mask ratio 0 (0: none), counted after the "
                             f"masked phase ({_RESUME})", flag=True, lo=0)
    finetune_minutes: float | None = _f(None, "wall-clock cap (minutes) of the fine-tune, a total over all resumes", flag=True,
                                        lo=0.0, lo_open=True)
    finetune_lr: float | None = _f(None, "learning rate of the fine-tune (none: lr / 2)", flag=True, **_LR)
    # ---- sampling and evaluation after training
    sample_steps: int = _f(18, "EDM Heun steps of the samples drawn after training (2 * steps - 1 network calls)",
                           flag=True, lo=1, hi=10_000)
    guidance: float = _f(1.5, "classifier-free guidance scale of those samples (1: none)", flag=True, lo=0.0,
                         hi=1000.0)
    samples_per_class: int = _f(50, "samples per class drawn (and evaluated) after training", flag=True, lo=1,
                                hi=1_000_000)
    grid_per_class: int = _f(10, "columns of the sample grid PNG", lo=1, hi=1000)
    evaluate: bool = _f(True, "digits only: classifier accuracy and Frechet distance")
    eval_unguided: bool = _f(False, "also sample and evaluate without guidance (scale 1): the fairer Frechet distance")
    # ---- bookkeeping
    seed: int = _f(0, "random seed (initialisation, data order, all per-step randomness)", flag=True, lo=0,
                   hi=2**31 - 1)
    out: str = _f("runs/digits", "output folder (checkpoints/, log.jsonl, PNGs, metrics.json)", flag=True)
    log_every: int = _f(20, "steps between rows of log.jsonl", lo=1)
    ckpt_every: int = _f(500, "steps between checkpoints (0: none between; also saved after each phase, on Ctrl-C "
                         "and at the end)", lo=0)
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep (older ones are deleted)", lo=1)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N", flag=True, pattern=DEVICE_PATTERN)
    threads: int | None = _f(None, "CPU threads for torch (none: torch's default; 1 is fastest on a busy machine)",
                             flag=True, lo=1, hi=1024)
    preset: str = _f("digits", "name of the preset this config started from (informative)")
    description: str = _f("", "what the preset is (informative)", empty=True)

    def phase_lr(self, phase: int) -> float:
        if phase == 1:
            return self.lr
        return self.finetune_lr if self.finetune_lr is not None else self.lr / 2

    def validate(self) -> None:
        """Check every value (:func:`check_value`) and how they fit together; raises
        :class:`~fastmask.errors.UsageError` naming the key."""
        for name in FIELDS:
            setattr(self, name, check_value(name, getattr(self, name)))
        if self.data in ("latents", "folder") and not self.data_path:
            raise UsageError(f"data_path: data={self.data!r} needs --data-path (a file or folder)")
        if self.data == "digits" and self.data_path is not None:
            raise UsageError(f"data_path: the built-in digits need no --data-path (got {self.data_path!r}); "
                             "set --data latents or --data folder to train on it")
        from .models import ARCHITECTURES

        masks = self.arch not in ARCHITECTURES or ARCHITECTURES[self.arch].masks
        if not masks and (self.mask_ratio > 0 or (self.mask_ratio_end or 0) > 0):
            raise UsageError(f"mask_ratio: {self.arch} (arch={self.arch!r}) runs every token; set mask_ratio=0")
        if self.steps is None and self.minutes is None:
            raise UsageError("steps: give a step count or a time budget (minutes)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = cls()
        update(cfg, d, where="config")
        return cfg


_HINTS = typing.get_type_hints(TrainConfig)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_of(name: str) -> Check:
    hint = _HINTS[name]
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint)
    check = dict(FIELDS[name].metadata["check"])
    if name == "model":
        from .models import config_names

        check["choices"] = tuple(config_names())
    if name == "arch":  # the registered model families (fastmask.models.ARCHITECTURES)
        from .models import ARCHITECTURES

        check["choices"] = tuple(ARCHITECTURES)
    return Check(type=base, optional=type(None) in args, **check)


CHECKS: dict[str, Check] = {}


def field_check(name: str) -> Check:
    """The :class:`Check` of config key ``name``."""
    if name not in CHECKS:
        CHECKS[name] = _check_of(name)
    return CHECKS[name]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_fields() -> list[str]:
    """The config keys that ``fastmask train`` has a flag for (``--key-name``)."""
    return [n for n, f in FIELDS.items() if f.metadata["flag"]]


def _known(name: str, where: str) -> None:
    if name not in FIELDS:
        raise UsageError(f"{where}: unknown key {name!r}; known keys: {', '.join(FIELDS)}")


def check_value(name: str, value, where: str | None = None):
    """``value`` for config key ``name``, type- and range-checked; the one check that config
    files, ``--set``, the flags, presets and stored checkpoint configs all go through. Raises
    :class:`~fastmask.errors.UsageError` naming ``where`` (default: the key)."""
    _known(name, where or "config")
    try:
        return field_check(name).check(value)
    except ValueError as e:
        raise UsageError(f"{where or name}: {e}") from None


def parse_value(key: str, text: str):
    """A ``--set key=value`` string converted to the type of ``key`` and checked."""
    _known(key, "--set")
    try:
        return field_check(key).parse(text)
    except ValueError as e:
        raise UsageError(f"--set {key}: {e}") from None


def update(cfg: TrainConfig, values: dict, where: str) -> TrainConfig:
    """Set ``values`` on ``cfg``, each checked; errors name ``where`` and the key."""
    for k, v in values.items():
        _known(k, where)
        setattr(cfg, k, check_value(k, v, where=f"{where}: {k}"))
    return cfg


# --------------------------------------------------------------------------- presets
# The MaskDiT paper's optimisation and guidance settings (and no digits classifier), shared by the
# ImageNet and image-folder presets.
_PAPER = dict(arch="maskdit", lr=1e-4, ema_decay=0.9999, mask_ratio=0.5, guidance=1.5, evaluate=False)

# What the two ImageNet recipes share (MaskDiT paper: XL/2 on SD-VAE latents, ratio 0.5 then 0).
_IMAGENET = dict(
    _PAPER,
    data="latents",
    channels=4,
    model="XL/2",
    batch_size=1024,
    finetune_lr=5e-5,
    sample_steps=40,
    samples_per_class=1,
    grid_per_class=1,
    log_every=100,
    ckpt_every=10_000,
)

# Digits presets, measured on this project's shared 2-core CPU: 1 thread runs the masked
# Digits/2 step at batch 64 at about 2 steps/s and the unmasked one at about 1.4 (other work
# running); the run time of 600 + 100 steps, 200 guided samples and the evaluation is in the
# README ("Measured results"). The step
# counts keep a run reproducible; the minute caps only protect the 10-minute budget on a machine
# that is much slower (a run that hits a cap says so in metrics.json).
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
    "digits-tread": dict(
        _DIGITS,
        description="the digits demo as TREAD (--arch tread): Digits/2, blocks 1..2 of 4 see a random half of "
        "the tokens (rate 0.5, K = 32 of 64), the others skip them; loss on every token, no fine-tune (TREAD has "
        "none); 700 steps, the digits demo's total",
        arch="tread",
        steps=700,
        minutes=5.75,
        mask_ratio=0.5,
        finetune_steps=0,
        out="runs/digits-tread",
    ),
    # TREAD's ImageNet-256 recipe. CompVis/tread configs/config.yaml + train.py: batch 256, AdamW lr 1e-4,
    # betas (0.9, 0.999), no weight decay, no clipping, EMA 0.9999, EDM loss, label dropout 0.1, no
    # fine-tune; eval with the EDM Heun sampler, 40 steps, no guidance. The official model config
    # (configs/model/tread.yaml) is DiT-B/2 routing blocks 2..8 at rate 0.5; the XL/2 route 2..24 is
    # LightningDiT_TREAD's 2 .. depth - 4 rule (stefan-baumann/LightningDiT_TREAD
    # models/lightningdit_tread.py), which fastmask.models.tread.default_route applies to XL/2's 28 blocks.
    # 400K steps: the iteration count of the paper's convergence comparison (arXiv 2501.04765 abstract).
    "tread256": dict(
        _IMAGENET,
        description="TREAD's ImageNet 256x256 recipe on VAE-latent shards (--data-path): DiT-XL/2 routing blocks "
        "2..24 at rate 0.5 (half of the tokens skip them), EDM loss on every token, batch 256, lr 1e-4, EMA "
        "0.9999, 400K steps, no fine-tune; samples with 40 Heun steps and no guidance",
        arch="tread",
        image_size=32,
        batch_size=256,
        mask_ratio=0.5,
        steps=400_000,
        finetune_steps=0,
        guidance=1.0,
        out="runs/tread256",
    ),
    # MicroDiT's 256 stages (SonyResearch/micro_diffusion configs/res_256_pretrain.yaml and
    # res_256_finetune.yaml, train_e2e.sh steps 1-2): MicroDiT_XL_2 on 32x32 SD-VAE latents, batch
    # 2048, AdamW lr 2.4e-4, betas (0.9, 0.999), weight decay 0.1, 2500 warm-up steps, clip 0.25,
    # 75% masking for 250K steps, then 30K dense steps at lr 8e-5; Heun 30 steps at sampling. Not
    # expressible here: the cosine decay to 0.33x (the lr stays constant after the warm-up), EDM
    # sigma_data 0.9 and P_mean -0.6 (the trainer's EDM uses 0.5 and -1.2), no EMA at 256 (the EMA
    # kept here does not touch training). Guidance: the official 5.0 is for text prompts; class
    # labels take MaskDiT's 1.5. The loss is on the kept tokens only (mae_coef 0).
    "microdit256": dict(
        _IMAGENET,
        description="MicroDiT's 256 recipe on VAE-latent shards (--data-path), class-conditional: MicroDiT-XL/2 "
        "(patch mixer 6 blocks at 768, backbone 28 at 1024), batch 2048, lr 2.4e-4 (warm-up 2500), wd 0.1, clip "
        "0.25, ratio 0.75 for 250K steps, then ratio 0 for 30K steps at lr 8e-5",
        arch="microdit",
        image_size=32,
        batch_size=2048,
        lr=2.4e-4,
        weight_decay=0.1,
        warmup_steps=2500,
        grad_clip=0.25,
        mask_ratio=0.75,
        mae_coef=0.0,
        steps=250_000,
        finetune_steps=30_000,
        finetune_lr=8e-5,
        sample_steps=30,
        ckpt_every=2500,
        out="runs/microdit256",
    ),
    # MicroDiT at digits scale (SPEC-ROUTING section 6: mixer 2 + backbone 4 blocks of width 128,
    # ratio 0.75 -> K = 16 of 64 tokens, kept-token loss, dense fine-tune); the digits demo's
    # optimisation settings and step counts.
    "digits-microdit": dict(
        _DIGITS,
        description="the digits demo with MicroDiT (Digits/2: patch mixer 2 blocks, backbone 4, width 128): 600 "
        "steps at ratio 0.75 (loss on the kept tokens only), then 100 dense fine-tune steps at ratio 0",
        arch="microdit",
        steps=600,
        minutes=4.5,
        mask_ratio=0.75,
        mae_coef=0.0,
        finetune_steps=100,
        finetune_minutes=1.25,
        out="runs/digits-microdit",
    ),
    "digits-sprint": dict(
        _DIGITS,
        description="the digits demo as SPRINT (--arch sprint): Digits/2 split 1 + 2 + 1 blocks, the 2 middle "
        "blocks on one token of every 2x2 group (ratio 0.75, K = 16 of 64), concat-linear fusion, path-drop 0.1; "
        "flow matching with logit-normal t on every token; 600 steps, then 100 dense fine-tune steps; at this size "
        "SPRINT's routing runs on DiT's block and sin-cos table (why: fastmask/models/sprint.py)",
        arch="sprint",
        objective="flow",
        t_schedule="logit_normal",
        steps=600,
        minutes=4.5,
        mask_ratio=0.75,
        finetune_steps=100,
        finetune_minutes=1.25,
        out="runs/digits-sprint",
    ),
    # SPRINT's ImageNet-256 recipe, snap-research/Sprint configs/train/SIT_XL_SPRINT_256.yaml (pre-training)
    # and SIT_XL_SPRINT_256_ft.yaml (fine-tune): SiT-XL/2 split 2 + 24 + 2, structured mask at ratio 0.75,
    # path-drop 0.1, label dropout 0.1; flow matching, t = sigmoid(N(0, 1)) ("lognormal"), loss on every token;
    # batch 256, AdamW lr 1e-4 constant, betas (0.9, 0.999), no weight decay, grad-clip 1.0, bf16, EMA 0.9999,
    # 2M steps; then ratio 0 at lr 2e-4 for 200K steps. Not expressed here: the fine-tune's batch 1024 and its
    # 5K-step lr warm-up (this trainer has one batch size and warms up phase 1 only). Evaluation
    # (configs/eval/SiT_XL_SPRINT_PDG.yaml): SDE, 250 steps, guidance 3.0 with Path-Drop Guidance; the
    # trainer's own samples use Heun, 125 steps = 250 network calls.
    "sprint256": dict(
        _IMAGENET,
        description="SPRINT's ImageNet 256x256 recipe on VAE-latent shards (--data-path): SiT-XL/2 as SPRINT "
        "(2 + 24 + 2 blocks, structured mask 0.75, concat-linear fusion, path-drop 0.1), flow matching with "
        "logit-normal t, batch 256, lr 1e-4, grad-clip 1, EMA 0.9999, 2M steps, then 200K dense steps at lr 2e-4",
        arch="sprint",
        objective="flow",
        t_schedule="logit_normal",
        image_size=32,
        batch_size=256,
        grad_clip=1.0,
        mask_ratio=0.75,
        steps=2_000_000,
        finetune_steps=200_000,
        finetune_lr=2e-4,
        sample_steps=125,
        guidance=3.0,
        out="runs/sprint256",
    ),
    "folder": dict(
        _PAPER,
        description="pixel-space MaskDiT on an image folder (one sub-folder per class, --data-path), 32x32 RGB, "
        "MaskDiT-S/2",
        data="folder",
        image_size=32,
        channels=3,
        model="S/2",
        batch_size=128,
        steps=100_000,
        finetune_steps=5_000,
        sample_steps=18,
        samples_per_class=8,
        grid_per_class=8,
        out="runs/folder",
        log_every=50,
        ckpt_every=5_000,
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise UsageError(f"--preset: unknown preset {name!r}; expected one of {', '.join(preset_names())}")
    cfg = TrainConfig()
    update(cfg, PRESETS[name], where=f"preset {name!r}")
    cfg.preset = name
    return cfg


def load_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config: no such file {path!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: cannot read {path!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--config: {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path!r} must hold a JSON object of config keys")
    return data


def field_help(name: str) -> str:
    return FIELDS[name].metadata.get("help", "")

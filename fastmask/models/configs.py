"""Named model configurations (DiT/MaskDiT S, B, L, XL with patch 2/4/8, tiny ones for tests and
the CPU demo) and the model a training config builds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .dit import DiT, MaskDiT
from .edm import EDMPrecond
from .flow import FlowPrecond
from .microdit import MICRODIT_SIZES, MicroDiT
from .sprint import SPRINT
from .tread import TREAD

# (depth, hidden_size, num_heads) of the DiT paper.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

# Tiny encoders for tests and the CPU demo: (depth, hidden, heads), decoder (depth, hidden, heads).
TINY = {
    "T": dict(depth=2, hidden_size=64, num_heads=4, decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=2),
    "Digits": dict(depth=4, hidden_size=128, num_heads=4, decoder_depth=2, decoder_hidden_size=64, decoder_num_heads=4),
}


# LightningDiT's block (hustvl/LightningDiT models/lightningdit.py): RMSNorm with weights, 2-D
# RoPE (theta 10000, interleaved pairs), SwiGLU MLP, plus per-head q/k RMSNorm (use_qknorm;
# the released XL checkpoint was trained without it: see checkpoint.load_lightningdit).
LIGHTNINGDIT_PREFIX = "LightningDiT-"
LIGHTNINGDIT_BLOCK = dict(norm="rms", qk_norm=True, rope=True, mlp="swiglu")


def config_names() -> list[str]:
    names = [f"{s}/{p}" for s in list(DIT_SIZES) + list(TINY) for p in (2, 4, 8)]
    names += [f"{LIGHTNINGDIT_PREFIX}{s}/{p}" for s in list(DIT_SIZES) + list(TINY) for p in (1, 2)]
    return names


def _size_and_patch(name: str) -> tuple[str, int]:
    """'XL/2' -> ('XL', 2), the patch size checked."""
    try:
        size, patch = name.split("/")
        patch = int(patch)
    except (ValueError, AttributeError):
        raise ValueError(f"config: expected a name like 'XL/2', got {name!r}") from None
    if patch not in (1, 2, 4, 8):
        raise ValueError(f"config: patch size must be 1, 2, 4 or 8, got {patch}")
    return size, patch


def model_kwargs(name: str, masked: bool = True) -> dict:
    """Constructor kwargs of config ``name`` ('XL/2', 'S/4', 'T/2', ...; 'LightningDiT-XL/1',
    'LightningDiT-Digits/2': the same sizes with LightningDiT's block, ``block=...``)."""
    if isinstance(name, str) and name.startswith(LIGHTNINGDIT_PREFIX):
        kw = model_kwargs(name[len(LIGHTNINGDIT_PREFIX):], masked)
        return dict(kw, block=dict(LIGHTNINGDIT_BLOCK))
    size, patch = _size_and_patch(name)
    if size in DIT_SIZES:
        depth, hidden, heads = DIT_SIZES[size]
        kw = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
        if masked:  # published MaskDiT decoder: 8 blocks of width 512, 16 heads
            kw.update(decoder_depth=8, decoder_hidden_size=512, decoder_num_heads=16)
        return kw
    if size in TINY:
        kw = dict(TINY[size], patch_size=patch)
        if not masked:
            for k in ("decoder_depth", "decoder_hidden_size", "decoder_num_heads"):
                kw.pop(k)
        return kw
    raise ValueError(f"config: unknown size {size!r}; expected one of {list(DIT_SIZES) + list(TINY)}")


def maskdit(name: str = "XL/2", **overrides) -> MaskDiT:
    """A MaskDiT of config ``name``; ``overrides`` (input_size, in_channels, num_classes,
    decoder_hidden_size, ...) replace the config's values."""
    return MaskDiT(**{**model_kwargs(name, masked=True), **overrides})


def dit(name: str = "XL/2", **overrides) -> DiT:
    """A plain DiT of config ``name`` (the baseline)."""
    return DiT(**{**model_kwargs(name, masked=False), **overrides})


def tread(name: str = "XL/2", **overrides) -> TREAD:
    """A DiT of config ``name`` with TREAD's token routing (``route=(first, last)``, default
    :func:`fastmask.models.tread.default_route`: 2..24 for XL/2)."""
    return TREAD(**{**model_kwargs(name, masked=False), **overrides})


def microdit_kwargs(name: str) -> dict:
    """Constructor kwargs of MicroDiT config ``name`` ('XL/2', 'Digits/2', 'S/4', ...):
    :data:`fastmask.models.microdit.MICRODIT_SIZES` at patch size 1, 2, 4 or 8. (No 'LightningDiT-'
    names: pass ``block=dict(...)`` instead.)"""
    size, patch = _size_and_patch(name)
    if size not in MICRODIT_SIZES:
        raise ValueError(f"config: MicroDiT has no size {size!r}; expected one of {list(MICRODIT_SIZES)}")
    return dict(MICRODIT_SIZES[size], patch_size=patch)


def microdit(name: str = "XL/2", **overrides) -> MicroDiT:
    """A MicroDiT of config ``name``; ``overrides`` (input_size, in_channels, num_classes,
    mixer_depth, ...) replace the config's values."""
    return MicroDiT(**{**microdit_kwargs(name), **overrides})


def sprint(name: str = "XL/2", **overrides) -> SPRINT:
    """A SPRINT of config ``name`` (encoder / middle / decoder split
    :func:`fastmask.models.sprint.default_split`: 2 + 24 + 2 for XL/2). S, B, L, XL: SPRINT's own
    block (RoPE, q/k-norm, no absolute position); the tiny sizes (T, Digits) run SPRINT's routing on
    DiT's block and sin-cos table (the digits-scale default, measured in fastmask.models.sprint);
    ``LightningDiT-*``: LightningDiT's block and, as LightningDiT, the sin-cos table too."""
    kw = model_kwargs(name, masked=False)
    if "block" in kw:
        kw["pos_embed"] = True
    elif name.split("/")[0] in TINY:
        kw["block"] = {}
    return SPRINT(**{**kw, **overrides})


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Architecture:
    """A model family ``fastmask train --arch NAME`` builds: ``build(config_name, **overrides)``
    makes the network, ``masks`` says whether it trains with dropped tokens."""

    build: Callable
    masks: bool
    help: str
    #: config keys this family trains with by default (e.g. its published mask ratio); applied
    #: by ``fastmask train --compare`` (fastmask.compare) on top of the shared config
    train_defaults: dict = field(default_factory=dict)


#: name -> family. A new family is its module plus one :func:`register_architecture` call.
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, build: Callable, *, masks: bool, help: str,
                          train_defaults: dict | None = None) -> None:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is registered twice")
    ARCHITECTURES[name] = Architecture(build, masks, help, dict(train_defaults or {}))


register_architecture("maskdit", maskdit, masks=True, help="MaskDiT: DiT encoder on the kept tokens, narrow decoder")
register_architecture("dit", dit, masks=False, help="plain DiT on every token (the baseline)")
register_architecture("microdit", microdit, masks=True,
                      help="MicroDiT: patch mixer on all tokens, then masking; backbone on the kept tokens, zeros "
                           "put back after the final layer",
                      train_defaults={"mask_ratio": 0.75, "mae_coef": 0.0})
register_architecture("sprint", sprint, masks=True,
                      help="SPRINT: dense encoder, middle blocks on the kept tokens (structured 2x2 mask at 0.75), "
                           "concat-linear fusion, dense decoder; path-drop; loss on every token",
                      train_defaults={"mask_ratio": 0.75})
# TREAD's published rate 0.5 and no fine-tune phase (CompVis/tread configs/model/tread.yaml, train.py)
register_architecture("tread", tread, masks=True,
                      help="TREAD: DiT whose middle blocks see a random subset of the tokens (mask_ratio is the "
                           "fraction that bypasses them); loss on every token",
                      train_defaults={"mask_ratio": 0.5, "finetune_steps": 0})


def build_model(cfg, shape: tuple[int, int, int], num_classes: int) -> EDMPrecond | FlowPrecond:
    """The wrapped network a training config describes (``cfg.arch``, ``cfg.model``, and
    ``cfg.objective``: EDMPrecond for ``edm``, FlowPrecond for ``flow``;
    ``cfg.image_size`` and ``cfg.channels`` are checked against the data ``shape`` (C, H, W))."""
    C, H, W = shape
    if H != W:
        raise ValueError(f"data: expected square inputs, got {H}x{W}")
    if H != cfg.image_size:
        raise ValueError(f"image_size: the data are {H}x{W} but the config says {cfg.image_size}")
    if C != cfg.channels:
        raise ValueError(f"channels: the data have {C} channels but the config says {cfg.channels}")
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"arch: unknown architecture {cfg.arch!r}; expected one of {list(ARCHITECTURES)}")
    build = ARCHITECTURES[cfg.arch].build
    net = build(cfg.model, input_size=H, in_channels=C, num_classes=num_classes)
    if getattr(cfg, "objective", "edm") == "flow":
        return FlowPrecond(net, t_schedule=getattr(cfg, "t_schedule", "uniform"))
    return EDMPrecond(net)

"""Loading published DiT and MaskDiT checkpoints (their key names and layouts).

Released MaskDiT files are pickles holding the weights (``net``/``ema``/``model``) and the
training arguments as an ``argparse.Namespace`` (``args``). :func:`load_published_file` opens
them with ``torch.load(weights_only=True)`` plus exactly that one extra allowed class, so they
load without trusting the file, while any other object in the pickle is still refused.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UsageError
from .configs import DIT_SIZES, TINY
from .dit import DiT, MaskDiT

# The only non-tensor objects released checkpoints need, allowed on top of weights_only's set.
SAFE_GLOBALS = (argparse.Namespace,)
# Head counts of the known widths: DiT S/B/L/XL and the MaskDiT decoder (512), plus fastmask's
# own small configs (T, Digits); and the heads of the size names in stored arguments.
_STANDARD_HEADS = {**{D: H for _, D, H in DIT_SIZES.values()}, **{c["hidden_size"]: c["num_heads"] for c in TINY.values()}}
_STANDARD_DECODER_HEADS = {512: 16, **{c["decoder_hidden_size"]: c["decoder_num_heads"] for c in TINY.values()}}
_SIZE_HEADS = {name: H for name, (_, _, H) in DIT_SIZES.items()}


def load_published_file(path, *, trust_pickle: bool = False, map_location="cpu"):
    """The object in a published ``.pt``/``.pth`` file, loaded without executing code:
    ``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS` (argparse.Namespace) allowed.
    A file that needs anything else raises :class:`fastmask.errors.UsageError` naming it;
    ``trust_pickle=True`` unpickles arbitrary objects (only for files you trust)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint: {str(p)!r} does not exist or is not a file")
    if trust_pickle:
        return torch.load(p, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(
            f"checkpoint: {str(p)!r} could not be loaded safely ({type(e).__name__}: {first}); it holds objects "
            "beyond tensors and argparse.Namespace; if you trust the file, pass --trust-pickle (trust_pickle=True)"
        ) from None


def stored_args(obj) -> dict:
    """The training arguments stored next to the weights (``args``, an argparse.Namespace or
    a dict) as a dict; empty if there are none."""
    a = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(a, argparse.Namespace):
        return dict(vars(a))
    if isinstance(a, dict):
        return dict(a)
    return {}


def _heads_from_args(args: dict, decoder: bool) -> int | None:
    key = "decoder_num_heads" if decoder else "num_heads"
    if isinstance(args.get(key), int) and args[key] > 0:
        return args[key]
    if decoder:
        return None
    for name in ("model_type", "model", "arch", "model_name"):
        m = re.search(r"(?<![A-Za-z])(XL|L|B|S)[-/]\d+$", str(args.get(name, "")))
        if m:
            return _SIZE_HEADS[m.group(1)]
    return None

_NESTED = ("ema", "model", "net", "state_dict", "module")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def unwrap_state_dict(obj, key: str | None = None) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a checkpoint: picks ``key`` (or the first of ema/model/net/
    state_dict) from a nested dict and strips DDP/EDM/compile prefixes (``module.``, ``model.``)."""
    sd = obj
    if key is not None:
        if key not in sd:
            raise ValueError(f"key: checkpoint has no entry {key!r}; it has {sorted(sd)[:10]}")
        sd = sd[key]
    while isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _NESTED if k in sd and isinstance(sd[k], dict)), None)
        if inner is None:
            raise ValueError(f"state_dict: found no tensors; top-level keys are {sorted(sd)[:10]}")
        sd = inner
    if not isinstance(sd, dict):
        raise ValueError(f"state_dict: expected a dict of tensors, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _strip_learned_sigma(w: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    # rows are ordered (p_row, p_col, channel) over 2C channels: keep the first C of each patch cell
    return w.reshape(patch * patch, 2 * channels, *w.shape[1:])[:, :channels].reshape(-1, *w.shape[1:])


def load_published(model: nn.Module, state_dict, *, key: str | None = None, drop_learned_sigma: bool = False) -> None:
    """Load a published DiT or MaskDiT checkpoint into ``model`` (a DiT, MaskDiT or an EDMPrecond
    around one), strictly. Raises ValueError naming every key or shape that does not fit.

    ``state_dict``: the loaded object (a state dict, or a released checkpoint dict with
    ``net``/``ema``/``model`` and ``args``), or a file path, opened with
    :func:`load_published_file`. ``drop_learned_sigma=True`` loads a learned-sigma DiT
    checkpoint (2C output channels) into a model with C output channels by keeping the mean
    channels of the final layer. As in the published code, a MaskDiT trained without the MAE
    loss (no ``mask_token`` stored) gets a zero mask token, and a DiT label table without the
    null row (trained with class dropout 0) gets a zero null row.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_published_file(state_dict)
    net = getattr(model, "model", model)
    if not isinstance(net, (DiT, MaskDiT)):
        raise ValueError(f"model: expected a DiT, MaskDiT or EDMPrecond, got {type(model).__name__}")
    sd = dict(unwrap_state_dict(state_dict, key))
    own = net.state_dict()
    if "mask_token" in own and "mask_token" not in sd and any(k.startswith("decoder_blocks.") for k in sd):
        sd["mask_token"] = torch.zeros_like(own["mask_token"])  # MaskDiT trained without the MAE loss

    y_key = "y_embedder.embedding_table.weight"
    if (
        y_key in sd and y_key in own and net.y_embedder.form == "table" and sd[y_key].dim() == 2
        and sd[y_key].shape[0] == net.num_classes and sd[y_key].shape[1] == own[y_key].shape[1]
    ):  # a table without the null row (class dropout 0): that row is never used; add a zero one
        sd[y_key] = torch.cat([sd[y_key], sd[y_key].new_zeros(1, sd[y_key].shape[1])])
    if y_key in sd and y_key in own and sd[y_key].shape != own[y_key].shape:
        rows = sd[y_key].shape
        form = "table" if rows[0] == net.num_classes + 1 else "linear" if rows == (own[y_key].shape) else "?"
        raise ValueError(
            f"{y_key}: checkpoint shape {tuple(rows)} does not fit the model's {tuple(own[y_key].shape)} "
            f"(label_form={net.y_embedder.form!r}); DiT checkpoints use label_form='table' "
            f"([num_classes + 1, D]), MaskDiT checkpoints label_form='linear' ([D, num_classes])"
            + (f"; this one looks like form {form!r}" if form != "?" else "")
        )
    p, C = net.patch_size, net.in_channels
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        if name in sd and name in own and sd[name].shape[0] == 2 * own[name].shape[0]:
            if not drop_learned_sigma:
                raise ValueError(
                    f"{name}: the checkpoint has learned-sigma outputs ({sd[name].shape[0]} rows, model "
                    f"{own[name].shape[0]}); build DiT(learn_sigma=True) or pass drop_learned_sigma=True"
                )
            sd[name] = _strip_learned_sigma(sd[name], p, C)

    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or bad:
        msg = ["state_dict: the checkpoint does not fit the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if bad:
            msg.append(f"shape mismatches ({len(bad)}): {bad[:6]}")
        raise ValueError("; ".join(msg))
    net.load_state_dict(sd, strict=True)


def infer_config(state_dict, key: str | None = None, **known) -> dict:
    """Constructor kwargs (and the class) of the DiT/MaskDiT that a published checkpoint fits;
    ``known`` (e.g. ``num_heads``, ``num_classes``) are taken as given.

    Weights do not store head counts, and a DiT label table of R rows is R - 1 classes plus
    the null row (class dropout > 0) or R classes (class dropout 0). Both are taken from the
    checkpoint's stored arguments (``args``) when it has them. Otherwise head counts follow the
    published widths (384: 6, 768: 12, 1024 and 1152: 16; decoder 512: 16) and fastmask's own
    T and Digits configs, and are None for any other width (:func:`from_published` then asks for them); a table is read as holding a
    null row, with a warning unless it has 1001 rows (ImageNet)."""
    args = stored_args(state_dict)
    sd = unwrap_state_dict(state_dict, key)
    w = sd["x_embedder.proj.weight"]
    D, C, p, _ = w.shape
    N = sd["pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    kw = dict(input_size=int(round(N**0.5)) * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth)
    kw["num_heads"] = _heads_from_args(args, False) or _STANDARD_HEADS.get(D)
    y = sd.get("y_embedder.embedding_table.weight")
    if y is None:
        kw["num_classes"] = 0
    elif y.shape[1] == D and y.shape[0] != D:  # nn.Embedding [num_classes (+ 1 null row), D]
        rows = y.shape[0]
        n = known.get("num_classes", args.get("num_classes"))
        if isinstance(n, int) and n in (rows, rows - 1):
            num_classes = n
        elif args.get("class_dropout_prob") is not None:
            num_classes = rows if float(args["class_dropout_prob"]) == 0 else rows - 1
        else:
            num_classes = rows - 1
            if rows != 1001:
                warnings.warn(
                    f"y_embedder.embedding_table.weight: {rows} rows are read as {rows - 1} classes plus the null "
                    f"label (class dropout > 0); if the model was trained without class dropout it has {rows} "
                    f"classes: pass num_classes={rows}",
                    stacklevel=2,
                )
        kw.update(num_classes=num_classes, label_form="table")
    else:  # Linear(num_classes, D): weight [D, num_classes]
        kw.update(num_classes=y.shape[1], label_form="linear")
    if args.get("class_dropout_prob") is not None:
        kw["class_dropout_prob"] = float(args["class_dropout_prob"])
    if any(k.startswith("decoder_blocks.") for k in sd):  # MaskDiT, with or without a mask token
        Dd = sd["decoder_layer.linear.weight"].shape[0]
        ddepth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
        dheads = _heads_from_args(args, True) or _STANDARD_DECODER_HEADS.get(Dd)
        kw.update(decoder_hidden_size=Dd, decoder_depth=ddepth, decoder_num_heads=dheads)
        return {"cls": MaskDiT, **kw, **known}
    out_rows = sd["final_layer.linear.weight"].shape[0]
    kw["learn_sigma"] = out_rows == 2 * p * p * C
    return {"cls": DiT, **kw, **known}


def from_published(state_dict, key: str | None = None, **overrides) -> nn.Module:
    """Build the DiT/MaskDiT a published checkpoint describes and load it. ``state_dict`` is
    the loaded object or a file path. ``overrides`` replace inferred constructor arguments;
    ``num_heads`` (and ``decoder_num_heads``) are required when the checkpoint stores no
    arguments and its width is not a published one."""
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_published_file(state_dict)
    try:
        kw = infer_config(state_dict, key, **overrides)
    except (KeyError, IndexError, TypeError, AttributeError) as e:  # not the layout of a DiT/MaskDiT file
        raise ValueError(
            f"checkpoint: not a DiT/MaskDiT state dict (cannot read its layout: {type(e).__name__} {e})"
        ) from None
    for name, width in (("num_heads", kw["hidden_size"]), ("decoder_num_heads", kw.get("decoder_hidden_size"))):
        if name in kw and kw[name] is None:
            raise ValueError(
                f"{name}: the checkpoint stores no arguments and width {width} is not a published DiT/MaskDiT "
                f"width, so the head count is unknown; pass {name}=..."
            )
    cls = kw.pop("cls")
    model = cls(**kw)
    load_published(model, state_dict, key=key)
    return model


# ----------------------------------------------------------------------------- LightningDiT
# hustvl/LightningDiT (models/lightningdit.py) saves a plain DiT layout with its block's keys:
# blocks.i.norm1.weight / norm2.weight (RMSNorm), attn.qkv, attn.q_norm.weight / k_norm.weight
# (only with use_qknorm), attn.proj, mlp.w12 / mlp.w3 (SwiGLU), adaLN_modulation.1, and
# final_layer.norm_final.weight; pos_embed, x_embedder.proj, t_embedder.mlp, y_embedder
# (a table of num_classes + 1 rows). ``feat_rope.freqs_cos`` / ``freqs_sin`` are buffers that
# fastmask rebuilds (checked equal) instead of loading.
_LIGHTNINGDIT_ROPE = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")


def from_lightningdit(state_dict, *, input_size: int | None = None, key: str | None = None) -> DiT:
    """A fastmask :class:`DiT` with LightningDiT's blocks holding a LightningDiT checkpoint
    (its ``ema``/``model`` dict or the flat tensors), loaded with ``strict=True``.

    The architecture is read from the tensors: width, depth, patch size, channels, classes,
    whether RMSNorm / SwiGLU / RoPE / qk-norm are used (a LayerNorm or GELU checkpoint is
    refused: fastmask's DiT layout loads those with :func:`from_published`). Heads follow the
    standard widths (LightningDiT's B/L/XL/1p0B/1p6B keep head dim 64 or 72). ``input_size``
    is the latent size (default: from ``pos_embed`` and the patch size).
    """
    sd = dict(unwrap_state_dict(state_dict, key))
    rope = {k: sd.pop(k) for k in _LIGHTNINGDIT_ROPE if k in sd}
    if "blocks.0.norm1.weight" not in sd or "blocks.0.mlp.w12.weight" not in sd:
        raise ValueError("state_dict: not a LightningDiT checkpoint with RMSNorm and SwiGLU blocks "
                         "(no blocks.0.norm1.weight / blocks.0.mlp.w12.weight)")
    D = sd["blocks.0.norm1.weight"].shape[0]
    heads = {1536: 24, 1792: 28, **_STANDARD_HEADS}.get(D)
    if heads is None:
        raise ValueError(f"state_dict: no standard head count for width {D}")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    conv = sd["x_embedder.proj.weight"]  # [D, C, p, p]
    C, p = conv.shape[1], conv.shape[2]
    grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
    # LightningDiT's SwiGLU width is int(2/3 * int(D * mlp_ratio)): pick the ratio whose inner
    # width M = ceil(1.5 * hidden) gives it back (half a unit over M, so int() lands on M)
    M = -(-3 * hidden // 2)
    mlp_ratio = (M + 0.5) / D
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    block = dict(norm="rms", qk_norm="blocks.0.attn.q_norm.weight" in sd, rope=bool(rope), mlp="swiglu")
    model = DiT(input_size=input_size or grid * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
                num_heads=heads, mlp_ratio=mlp_ratio, num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out == 2 * C, label_form="table", block=block)
    if model.blocks[0].mlp.w3.in_features != hidden:
        raise ValueError(f"state_dict: SwiGLU width {hidden} does not follow int(2/3 * int({D} * mlp_ratio))")
    if rope:
        want = (model.rope_cos, model.rope_sin)
        for (name, t), w in zip(rope.items(), want):
            if t.shape != w.shape or not torch.allclose(t.float(), w, atol=1e-4):
                raise ValueError(f"state_dict: {name} differs from fastmask's 2-D RoPE table (rope_2d)")
    model.load_state_dict(sd, strict=True)
    return model

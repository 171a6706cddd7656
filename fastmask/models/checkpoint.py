"""Loading published DiT and MaskDiT checkpoints (their key names and layouts)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .dit import DiT, MaskDiT

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

    ``drop_learned_sigma=True`` loads a learned-sigma DiT checkpoint (2C output channels) into a
    model with C output channels by keeping the mean channels of the final layer.
    """
    net = getattr(model, "model", model)
    if not isinstance(net, (DiT, MaskDiT)):
        raise ValueError(f"model: expected a DiT, MaskDiT or EDMPrecond, got {type(model).__name__}")
    sd = unwrap_state_dict(state_dict, key)
    own = net.state_dict()

    y_key = "y_embedder.embedding_table.weight"
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


def infer_config(state_dict, key: str | None = None) -> dict:
    """Constructor kwargs (and the class) of the DiT/MaskDiT that a published state dict fits.

    Head counts are not stored in weights: DiT's convention (head dim 64, 16 heads at width 1152;
    16 decoder heads) is assumed; pass your own to the constructor if yours differ."""
    sd = unwrap_state_dict(state_dict, key)
    w = sd["x_embedder.proj.weight"]
    D, C, p, _ = w.shape
    N = sd["pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    kw = dict(input_size=int(round(N**0.5)) * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth)
    kw["num_heads"] = 16 if D == 1152 else max(1, D // 64)
    y = sd.get("y_embedder.embedding_table.weight")
    if y is None:
        kw["num_classes"] = 0
    elif y.shape[1] == D and y.shape[0] != D:  # nn.Embedding [num_classes + 1, D]
        kw.update(num_classes=y.shape[0] - 1, label_form="table")
    else:  # Linear(num_classes, D): weight [D, num_classes]
        kw.update(num_classes=y.shape[1], label_form="linear")
    if "mask_token" in sd:
        Dd = sd["mask_token"].shape[-1]
        ddepth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
        kw.update(decoder_hidden_size=Dd, decoder_depth=ddepth, decoder_num_heads=16)
        return {"cls": MaskDiT, **kw}
    out_rows = sd["final_layer.linear.weight"].shape[0]
    kw["learn_sigma"] = out_rows == 2 * p * p * C
    return {"cls": DiT, **kw}


def from_published(state_dict, key: str | None = None, **overrides) -> nn.Module:
    """Build the DiT/MaskDiT a published state dict describes and load it. ``overrides``
    replace inferred constructor arguments (e.g. ``num_heads``, which weights do not store)."""
    kw = {**infer_config(state_dict, key), **overrides}
    cls = kw.pop("cls")
    model = cls(**kw)
    load_published(model, state_dict, key=key)
    return model

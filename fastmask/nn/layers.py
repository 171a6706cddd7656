"""DiT building blocks other than the transformer block: embedders, final layer, pos embed.

Parameter names follow DiT/MaskDiT checkpoints (x_embedder.proj, t_embedder.mlp.{0,2},
y_embedder.embedding_table, final_layer.{linear, adaLN_modulation.1}).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..constants import RMS_EPS


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid_size**2, dim] (MAE/DiT convention:
    the first half of the channels encodes the column (w), the second half the row (h))."""
    if dim % 4 != 0:
        raise ValueError(f"dim: the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    gh = np.arange(grid_size, dtype=np.float64)
    gw = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(gw, gh)  # grid_w varies along columns

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1).astype(np.float32)


def rope_2d(grid_size: int, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """2-D axial rotary tables (cos, sin), each [grid_size**2, head_dim] fp32, row n = token
    (row n // grid_size, column n % grid_size) in raster order.

    LightningDiT's layout (models/pos_embed.py, VisionRotaryEmbeddingFast with dim =
    head_dim // 2, theta 10000, pt_seq_len = grid): the first half of the head dim rotates with
    the token's grid row, the second half with its column; within a half, frequency
    f_j = theta ** (-2j / (head_dim / 2)) for j < head_dim / 4, each used by one interleaved
    pair (2j, 2j + 1), so columns 2j and 2j + 1 hold the same angle. SPRINT's rope.py uses the
    same interleaved pairing (rotate_half on pairs) and theta.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim: 2-D RoPE needs a multiple of 4, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)  # [hd / 4]
    t = torch.arange(grid_size, dtype=torch.float64)
    ang = (t[:, None] * freqs[None, :]).repeat_interleave(2, dim=1)  # [grid, half], pairs share an angle
    rows = ang[:, None, :].expand(grid_size, grid_size, half)
    cols = ang[None, :, :].expand(grid_size, grid_size, half)
    full = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return full.cos().float(), full.sin().float()


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (LightningDiT's norm1 / norm2 / norm_final and q/k norms):
    ``x * rsqrt(mean(x^2) + eps) * weight``, statistics in fp32. The blocks do not call it;
    they pass ``weight`` and ``eps`` to the fused ops."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class PatchEmbed(nn.Module):
    """p x p stride-p convolution: [B, C, H, W] -> [B, N, D], tokens in row-major order."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"patch_size: {patch_size} does not divide input_size {input_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        ops.checks.activation_dtype("x", x, self.proj.weight, "PatchEmbed")
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar (EDM: c_noise = ln(sigma)/4) -> 256-dim sinusoid -> MLP -> [B, D]."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        emb = self.sinusoid(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding in either checkpoint form.

    ``form="linear"`` (MaskDiT/EDM): ``embedding_table`` is a Linear(num_classes, D, bias=False)
    applied to one-hot labels; a dropped label is the zero vector, whose embedding is zero.
    ``form="table"`` (DiT): an nn.Embedding of num_classes + 1 rows, the last row the learned
    "null" class used for classifier-free guidance.

    ``forward`` takes integer labels [B] (``-1`` or ``num_classes`` = null / dropped) or
    one-hot float labels [B, num_classes] (an all-zero row = null).
    """

    def __init__(self, num_classes: int, hidden_size: int, form: str = "linear"):
        super().__init__()
        if form not in ("linear", "table"):
            raise ValueError(f"form: expected 'linear' or 'table', got {form!r}")
        self.num_classes, self.form = num_classes, form
        if form == "linear":
            self.embedding_table = nn.Linear(num_classes, hidden_size, bias=False)
        else:
            self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor, check_values: bool = True) -> Tensor:
        """``check_values=False`` skips the range check of integer labels (a device sync), for
        labels the caller made itself (the null labels of an unconditional call)."""
        C = self.num_classes
        if labels.dim() == 2:
            if labels.shape[1] != C:
                raise ValueError(f"class_labels: expected one-hot [B, {C}], got shape {tuple(labels.shape)}")
            if self.form == "linear":
                return self.embedding_table(labels.to(self.embedding_table.weight.dtype))
            null = labels.abs().sum(1) == 0
            idx = torch.where(null, torch.full_like(null, C, dtype=torch.long), labels.argmax(1))
            return self.embedding_table(idx)
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"class_labels: expected integer labels [B] or one-hot [B, {C}], got {labels.dtype} {tuple(labels.shape)}"
            )
        if check_values and ops.checks.value_checks_enabled() and bool(((labels < -1) | (labels > C)).any()):
            raise ValueError(f"class_labels: expected values in [-1, {C}] (-1 or {C} = no label)")
        null = (labels < 0) | (labels == C)
        if self.form == "table":
            return self.embedding_table(torch.where(null, torch.full_like(labels, C), labels))
        onehot = torch.nn.functional.one_hot(labels.clamp(0, C - 1), C).to(self.embedding_table.weight.dtype)
        onehot = onehot * (~null).unsqueeze(1).to(onehot.dtype)
        return self.embedding_table(onehot)


class FinalLayer(nn.Module):
    """LN (no affine) + adaLN shift/scale from c + Linear. Used as DiT's final layer and as
    MaskDiT's ``decoder_layer`` (hidden D -> decoder width Dd). ``norm="rms"``: RMSNorm with a
    weight (``norm_final.weight``, LightningDiT's final layer) instead of the LayerNorm."""

    def __init__(self, hidden_size: int, out_features: int, cond_size: int | None = None, norm: str = "layer"):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm: expected 'layer' or 'rms', got {norm!r}")
        cond_size = hidden_size if cond_size is None else cond_size
        if norm == "rms":
            self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_features, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        ops.checks.activation_dtype("x", x, self.linear.weight, "FinalLayer")
        ops.checks.activation_dtype("c", c, self.linear.weight, "FinalLayer")
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        if hasattr(self, "norm_final"):
            return self.linear(ops.rmsnorm_modulate(x, shift, scale, self.norm_final.weight, self.norm_final.eps))
        return self.linear(ops.layernorm_modulate(x, shift, scale))

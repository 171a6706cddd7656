"""MaskedDiTBlock: a drop-in, state-dict compatible replacement for DiT's block."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch import Tensor

from .. import _env, ops
from ..constants import LN_EPS
from ..ops.ranges import named_range
from .layers import RMSNorm

# FASTMASK_NVTX=1 (as fastmask._env last read it) names the block's stages in Nsight Systems (NVTX) and
# torch.profiler traces. Off, a stage costs one shared no-op context; under torch.compile
# it is always off, so compiled graphs are unchanged.
_NO_RANGE = contextlib.nullcontext()


def _stage(name: str):
    if not _env.nvtx() or torch.compiler.is_compiling():
        return _NO_RANGE
    return named_range("fastmask.block." + name)


class Attention(nn.Module):
    """DiT/timm attention: ``qkv`` Linear -> fused-layout attention -> ``proj`` Linear.

    ``qk_norm=True`` adds LightningDiT's per-head RMSNorm of q and k (``q_norm.weight``,
    ``k_norm.weight`` [head_dim], eps 1e-6); ``forward(x, rope=(cos, sin), rope_ids=...)``
    rotates q and k (see :func:`fastmask.ops.attention`). Both run inside the attention kernels.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads: expected a positive integer, got {num_heads!r}")
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} does not divide hidden_size {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, rope_ids: Tensor | None = None) -> Tensor:
        ops.checks.activation_dtype("x", x, self.qkv.weight, "Attention")
        B, L, D = x.shape
        # The Linear's output viewed as [B, L, 3, H, hd] is exactly the layout the kernel reads.
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        if rope is None and not hasattr(self, "q_norm"):
            return self.proj(ops.attention(qkv, self.scale))
        kw = {}
        if hasattr(self, "q_norm"):
            kw = dict(q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight, qk_norm_eps=self.q_norm.eps)
        out = ops.attention(qkv, self.scale, rope=rope, ids_keep=rope_ids if rope is not None else None, **kw)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, as in DiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        ops.checks.activation_dtype("x", x, self.fc1.weight, "Mlp")
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUMlp(nn.Module):
    """LightningDiT's SwiGLUFFN: ``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2)``; the
    activation is one fused op (:func:`fastmask.ops.swiglu`), the matmuls stay torch."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        ops.checks.activation_dtype("x", x, self.w12.weight, "SwiGLUMlp")
        return self.w3(ops.swiglu(self.w12(x)))


class MaskedDiTBlock(nn.Module):
    """DiT block with adaLN-Zero, fused where a fast backend exists.

    Same constructor order and state-dict keys as DiT's ``DiTBlock`` (``norm1``, ``attn.qkv``,
    ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``), so DiT and MaskDiT
    block weights load with ``strict=True``.

    Args:
        hidden_size: token width D.
        num_heads: attention heads (D / num_heads is the head dim; 72 for DiT-XL/2).
        mlp_ratio: MLP hidden width = mlp_ratio * D.
        cond_size: width of the conditioning vector c (default D). MaskDiT's decoder blocks are
            D_dec wide but conditioned on the encoder-width c.
        norm: ``"layer"`` (DiT: LayerNorm without affine) or ``"rms"`` (LightningDiT: RMSNorm
            with a weight, ``norm1.weight`` / ``norm2.weight``, eps 1e-6).
        qk_norm: per-head RMSNorm of q and k (``attn.q_norm.weight``, ``attn.k_norm.weight``).
        rope: 2-D rotary embedding of q and k; ``forward`` then needs ``rope=(cos, sin)``
            (:func:`fastmask.nn.layers.rope_2d`).
        mlp: ``"gelu"`` (DiT's fc1 / fc2) or ``"swiglu"`` (LightningDiT's ``mlp.w12`` / ``mlp.w3``,
            hidden width int(2/3 * int(mlp_ratio * D)), as LightningDiT rounds it).

    The defaults are DiT's block. ``norm="rms", qk_norm=True, rope=True, mlp="swiglu"`` is
    LightningDiT's block (models/lightningdit.py) with the same state-dict keys.

    ``forward(x, c)`` computes DiT's block on x [B, L, D] with c [B, cond_size].
    ``forward(x, c, ids_keep=...)`` first keeps only the tokens ``ids_keep`` [B, K] of x
    (a fused gather), then runs the block on them: returns [B, K, D].
    With RoPE, ``rope_ids`` [B, L_x] gives the grid position of each token of x when x holds
    kept tokens already (TREAD / SPRINT routes); with ``ids_keep`` the positions are ids_keep.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        cond_size: int | None = None,
        norm: str = "layer",
        qk_norm: bool = False,
        rope: bool = False,
        mlp: str = "gelu",
    ):
        super().__init__()
        ops.checks.integer("hidden_size", hidden_size, 1)
        if cond_size is not None:
            ops.checks.integer("cond_size", cond_size, 1)
        if not (isinstance(mlp_ratio, (int, float)) and math.isfinite(mlp_ratio) and int(hidden_size * mlp_ratio) >= 1):
            raise ValueError(f"mlp_ratio: expected a finite number > 0 giving an MLP width >= 1, got {mlp_ratio!r}")
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm: expected 'layer' or 'rms', got {norm!r}")
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp: expected 'gelu' or 'swiglu', got {mlp!r}")
        self.hidden_size = hidden_size
        self.cond_size = hidden_size if cond_size is None else cond_size
        self.norm, self.rope = norm, bool(rope)
        if norm == "rms":
            self.norm1 = RMSNorm(hidden_size)
            self.norm2 = RMSNorm(hidden_size)
        else:
            # LayerNorms without affine parameters: no state-dict entries, as in DiT. They are kept
            # as modules for drop-in fidelity; the fused ops below compute the same normalisation.
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        if rope and self.attn.head_dim % 4:
            raise ValueError(f"rope: 2-D RoPE needs a head dim divisible by 4, got {self.attn.head_dim}")
        if norm == "layer":
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        if mlp == "swiglu":
            self.mlp = SwiGLUMlp(hidden_size, int(2 / 3 * int(hidden_size * mlp_ratio)))
        else:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(self.cond_size, 6 * hidden_size, bias=True))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        ids_keep: Tensor | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        rope_ids: Tensor | None = None,
    ) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected [B, L, {self.hidden_size}], got shape {tuple(x.shape)}")
        if c.dim() != 2 or c.shape[0] != x.shape[0] or c.shape[1] != self.cond_size:
            raise ValueError(f"c: expected [{x.shape[0]}, {self.cond_size}], got shape {tuple(c.shape)}")
        w = self.adaLN_modulation[1].weight
        ops.checks.activation_dtype("x", x, w, "MaskedDiTBlock")
        ops.checks.activation_dtype("c", c, w, "MaskedDiTBlock")
        if self.rope != (rope is not None):
            raise ValueError("rope: a block built with rope=True needs rope=(cos, sin), and only such a block takes it")
        if ids_keep is not None:
            x = ops.gather_tokens(x, ids_keep)
            if rope_ids is None:
                rope_ids = ids_keep
        with _stage("modulation"):
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        rms = self.norm == "rms"
        with _stage("norm1"):
            if rms:
                h = ops.rmsnorm_modulate(x, shift1, scale1, self.norm1.weight, self.norm1.eps)
            else:
                h = ops.layernorm_modulate(x, shift1, scale1, self.norm1.eps)
        with _stage("attention"):
            a = self.attn(h, rope, rope_ids) if self.rope else self.attn(h)
        # x + gate1 * attn, then LN + modulate for the MLP, in one pass over the tokens.
        with _stage("residual_norm2"):
            if rms:
                x, h = ops.residual_rmsnorm_modulate(x, a, gate1, shift2, scale2, self.norm2.weight, self.norm2.eps)
            else:
                x, h = ops.residual_layernorm_modulate(x, a, gate1, shift2, scale2, self.norm2.eps)
        with _stage("mlp"):
            m = self.mlp(h)
        with _stage("residual"):
            return ops.gated_residual(x, m, gate2)


def swap_dit_blocks(model: nn.Module, *, attr_names=("blocks", "decoder_blocks")) -> nn.Module:
    """Replace the DiT blocks of an existing DiT-style model by MaskedDiTBlocks, weights kept.

    Any sub-module found in ``model.<attr>`` (an nn.ModuleList) for ``attr`` in ``attr_names``
    that has DiT's block structure (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``,
    ``adaLN_modulation.1``) is rebuilt as a MaskedDiTBlock and its state dict loaded with
    ``strict=True``. The model's own ``forward`` keeps calling ``block(x, c)``. Returns the model.
    """
    swapped = 0
    for attr in attr_names:
        blocks = getattr(model, attr, None)
        if not isinstance(blocks, nn.ModuleList):
            continue
        for i, blk in enumerate(blocks):
            if isinstance(blk, MaskedDiTBlock):
                continue
            try:
                qkv, fc1, ada = blk.attn.qkv, blk.mlp.fc1, blk.adaLN_modulation[1]
                heads = blk.attn.num_heads
            except AttributeError as e:
                raise ValueError(f"{attr}[{i}]: not a DiT block ({e})") from None
            D = qkv.in_features
            new = MaskedDiTBlock(D, heads, fc1.out_features / D, cond_size=ada.in_features)
            new.load_state_dict(blk.state_dict(), strict=True)
            p = next(blk.parameters())
            blocks[i] = new.to(device=p.device, dtype=p.dtype)
            swapped += 1
    if swapped == 0:
        raise ValueError(f"model: found no DiT blocks in attributes {attr_names}")
    return model

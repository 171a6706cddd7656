"""DiT and MaskDiT, built from MaskedDiTBlock. Reads top to bottom: base -> DiT -> MaskDiT ->
:func:`compile_model`. The named configs (XL/2, S/2, ...) are in :mod:`fastmask.models.configs`."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..ops import checks, reference
from ..nn import FinalLayer, LabelEmbedder, MaskedDiTBlock, PatchEmbed, TimestepEmbedder, rope_2d, sincos_pos_embed_2d


def unpatchify(tokens: Tensor, patch_size: int, channels: int) -> Tensor:
    """[B, N, p*p*C] with (p_row, p_col, channel) order -> [B, C, H, W]."""
    B, N, _ = tokens.shape
    g = int(round(N**0.5))
    if g * g != N:
        raise ValueError(f"tokens: {N} tokens do not form a square grid")
    p = patch_size
    x = tokens.reshape(B, g, g, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, g * p, g * p)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in the order :func:`unpatchify` inverts."""
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"x: spatial size {H}x{W} is not divisible by patch size {p}")
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


class _DiTBase(nn.Module):
    """Patch embedding, fixed position embedding, conditioning, encoder blocks.

    ``block``: extra MaskedDiTBlock options for every block (e.g. LightningDiT's
    ``dict(norm="rms", qk_norm=True, rope=True, mlp="swiglu")``); with ``norm="rms"`` the final
    layer's norm is an RMSNorm too, with ``rope`` the 2-D rotary tables are non-persistent
    buffers (``rope_cos`` / ``rope_sin``, rebuilt from the grid) handed to every block. The
    fixed sin-cos position embedding is still added, as LightningDiT does.
    """

    #: Whether the model itself drops labels (with ``class_dropout_prob``) in train mode when no
    #: ``force_drop_ids`` is given: True for DiT, whose published model does; False for MaskDiT,
    #: whose published training loop drops the labels and whose model never does.
    drops_labels_in_train_mode: bool = True

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_classes: int,
        label_form: str,
        class_dropout_prob: float = 0.1,
        block: dict | None = None,
    ):
        super().__init__()
        self.block_options = dict(block or {})
        for name, value, lo in (("input_size", input_size, 1), ("patch_size", patch_size, 1),
                                ("in_channels", in_channels, 1), ("hidden_size", hidden_size, 1),
                                ("depth", depth, 1), ("num_classes", num_classes, 0)):
            checks.integer(name, value, lo)
        if not (isinstance(num_heads, int) and num_heads > 0):
            raise ValueError(f"num_heads: expected a positive integer, got {num_heads!r}")
        if hidden_size % num_heads or hidden_size // num_heads == 0:
            raise ValueError(f"num_heads: hidden_size {hidden_size} is not divisible into {num_heads} heads")
        if not 0.0 <= float(class_dropout_prob) <= 1.0:
            raise ValueError(f"class_dropout_prob: expected a probability in [0, 1], got {class_dropout_prob}")
        self.class_dropout_prob = float(class_dropout_prob)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.num_classes = hidden_size, num_heads, num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.num_patches = self.x_embedder.num_patches
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, form=label_form) if num_classes > 0 else None
        pos = sincos_pos_embed_2d(hidden_size, self.x_embedder.grid_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).unsqueeze(0))  # fixed, not trained
        self.blocks = nn.ModuleList(
            [MaskedDiTBlock(hidden_size, num_heads, mlp_ratio, **self.block_options) for _ in range(depth)]
        )
        self.final_norm = self.block_options.get("norm", "layer")
        self._add_rope("rope", hidden_size // num_heads)

    def _add_rope(self, prefix: str, head_dim: int) -> None:
        if self.block_options.get("rope"):
            cos, sin = rope_2d(self.x_embedder.grid_size, head_dim)
            self.register_buffer(f"{prefix}_cos", cos, persistent=False)
            self.register_buffer(f"{prefix}_sin", sin, persistent=False)

    def _rope(self, prefix: str = "rope", ids: Tensor | None = None) -> dict:
        """The blocks' RoPE arguments: the tables, and the kept tokens' positions."""
        if not self.block_options.get("rope"):
            return {}
        return dict(rope=(getattr(self, f"{prefix}_cos"), getattr(self, f"{prefix}_sin")), rope_ids=ids)

    def _init_base(self, decoder_blocks=()):
        """DiT's initialisation: xavier-uniform Linears, normal(0.02) embeddings, and zeros for the
        adaLN modulation of every block and the final layer (adaLN-Zero: a fresh block is the identity)."""

        def _xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_xavier)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [blk.adaLN_modulation[1] for blk in [*self.blocks, *decoder_blocks]] + [
            self.final_layer.adaLN_modulation[1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def condition(self, noise_labels: Tensor, class_labels: Tensor | None, force_drop_ids: Tensor | None = None) -> Tensor:
        """c = timestep embedding + class embedding, [B, D].

        As in the published code of each family: ``class_labels=None`` is unconditional (the
        null label); a label is dropped to the null label where ``force_drop_ids`` [B] is true/1
        (a caller that draws its own randomness, in any mode). Otherwise, in train mode, DiT
        drops each label with probability ``class_dropout_prob`` from the global RNG (DiT's
        model does), and MaskDiT drops none (MaskDiT's training loop drops its labels; its
        model never does): see :attr:`drops_labels_in_train_mode`."""
        c = self.t_embedder(noise_labels)
        if self.y_embedder is not None:
            made = class_labels is None  # the null labels made here need no range check (a sync)
            if made:
                class_labels = torch.full((noise_labels.shape[0],), -1, dtype=torch.long, device=noise_labels.device)
            else:
                if not isinstance(class_labels, Tensor) or class_labels.dim() == 0 or class_labels.shape[0] != c.shape[0]:
                    got = tuple(class_labels.shape) if isinstance(class_labels, Tensor) else type(class_labels).__name__
                    raise ValueError(f"class_labels: expected [{c.shape[0]}] labels (one per sample), got {got}")
                drop = force_drop_ids
                if drop is None and self.training and self.drops_labels_in_train_mode and self.class_dropout_prob > 0:
                    drop = torch.rand(class_labels.shape[0], device=class_labels.device) < self.class_dropout_prob
                if drop is not None:
                    drop = drop.to(class_labels.device) == 1
                    if class_labels.dim() == 2:  # one-hot: a dropped row is all zeros
                        class_labels = class_labels * (~drop).unsqueeze(1).to(class_labels.dtype)
                    else:
                        class_labels = torch.where(drop, torch.full_like(class_labels, -1), class_labels)
            c = c + self.y_embedder(class_labels, check_values=not made).to(c.dtype)
        return c

    def _check_input(self, x: Tensor, noise_labels: Tensor) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected [B, {want[0]}, {want[1]}, {want[2]}], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x: the batch is empty (shape {tuple(x.shape)}); expected at least one sample")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f"noise_labels: expected shape [{x.shape[0]}], got {tuple(noise_labels.shape)}")


class DiT(_DiTBase):
    """Plain DiT (the baseline): all tokens through every block; optional learned sigma
    (``learn_sigma=True`` doubles the output channels, as in DiT checkpoints)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        label_form: str = "table",
        class_dropout_prob: float = 0.1,
        block: dict | None = None,
    ):
        super().__init__(
            input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, num_classes, label_form,
            class_dropout_prob, block,
        )
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels, norm=self.final_norm)
        self._init_base()

    def forward_tokens(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        *,
        mask_ratio: float = 0.0,
        ids_keep: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        **_,
    ) -> Tensor:
        """[B, C, H, W] -> output tokens [B, N, p*p*out_channels]."""
        if mask_ratio or ids_keep is not None:
            raise ValueError("mask_ratio: plain DiT runs every token; use MaskDiT to train with masking")
        self._check_input(x, noise_labels)
        c = self.condition(noise_labels, class_labels, force_drop_ids)
        # the residual stream in the embedder's dtype (bf16 under autocast), as MaskDiT's
        h = reference.add_pos(self.x_embedder(x), self.pos_embed)
        for blk in self.blocks:
            h = blk(h, c, **self._rope())
        return self.final_layer(h, c)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None, **kw) -> Tensor:
        return unpatchify(self.forward_tokens(x, noise_labels, class_labels, **kw), self.patch_size, self.out_channels)


class MaskDiT(_DiTBase):
    """MaskDiT: DiT encoder on the visible tokens, a narrow DiT decoder on all tokens.

    x_emb = PatchEmbed(x) + pos_embed; keep K = int(N * (1 - mask_ratio)) tokens (fused gather
    with the position embedding); encoder blocks; decoder_layer (LN + adaLN + Linear D -> Dd);
    unmask (visible tokens back in place, ``mask_token`` elsewhere, + ``decoder_pos_embed``, one
    fused pass); decoder blocks of width Dd conditioned on c of width D; final layer; unpatchify.

    Labels are dropped only where ``force_drop_ids`` says so, in any mode: as in the published
    code, the training loop drops them (with probability ``class_dropout_prob``), not the model.
    """

    drops_labels_in_train_mode = False

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        decoder_hidden_size: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        label_form: str = "linear",
        class_dropout_prob: float = 0.1,
        block: dict | None = None,
    ):
        super().__init__(
            input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, num_classes, label_form,
            class_dropout_prob, block,
        )
        checks.integer("decoder_hidden_size", decoder_hidden_size, 1)
        checks.integer("decoder_depth", decoder_depth, 0)
        if not (isinstance(decoder_num_heads, int) and decoder_num_heads > 0):
            raise ValueError(f"decoder_num_heads: expected a positive integer, got {decoder_num_heads!r}")
        if decoder_hidden_size % decoder_num_heads or decoder_hidden_size // decoder_num_heads == 0:
            raise ValueError(
                f"decoder_num_heads: decoder_hidden_size {decoder_hidden_size} is not divisible into {decoder_num_heads} heads"
            )
        Dd = decoder_hidden_size
        self.decoder_hidden_size, self.out_channels = Dd, in_channels
        self.decoder_layer = FinalLayer(hidden_size, Dd, cond_size=hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        pos = sincos_pos_embed_2d(Dd, self.x_embedder.grid_size)
        self.register_buffer("decoder_pos_embed", torch.from_numpy(pos).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(
            [MaskedDiTBlock(Dd, decoder_num_heads, mlp_ratio, cond_size=hidden_size, **self.block_options)
             for _ in range(decoder_depth)]
        )
        self._add_rope("decoder_rope", Dd // decoder_num_heads)
        self.final_layer = FinalLayer(Dd, patch_size * patch_size * in_channels, cond_size=hidden_size,
                                      norm=self.final_norm)
        # final_layer's adaLN_modulation is over Dd, conditioned on c of width D.
        self._init_base(self.decoder_blocks)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, x: Tensor, c: Tensor, ids_keep: Tensor | None) -> Tensor:
        """Patch embed + position embed, keep ``ids_keep`` tokens, run the encoder blocks."""
        h = self.x_embedder(x)
        pos = self.pos_embed[0]
        if ids_keep is None:
            h = reference.add_pos(h, pos)
        else:
            h = ops.gather_tokens(h, ids_keep, pos, check_ids=False)
        for blk in self.blocks:  # with RoPE, the kept tokens rotate by their grid positions
            h = blk(h, c, **self._rope("rope", ids_keep))
        return h

    def decode(self, h: Tensor, c: Tensor, ids_keep: Tensor | None) -> Tensor:
        """decoder_layer, unmask (+ decoder position embedding), decoder blocks, final layer."""
        h = self.decoder_layer(h, c)
        pos = self.decoder_pos_embed[0]
        if ids_keep is None:
            h = reference.add_pos(h, pos)
        else:
            h = ops.unmask_tokens(h, ids_keep, self.mask_token, self.num_patches, pos, check_ids=False)
        for blk in self.decoder_blocks:
            h = blk(h, c, **self._rope("decoder_rope"))
        return self.final_layer(h, c)

    def forward_tokens(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        *,
        mask_ratio: float = 0.0,
        ids_keep: Tensor | None = None,
        generator: torch.Generator | None = None,
        check_ids: bool = True,
        force_drop_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Output tokens [B, N, p*p*C] and the mask [B, N] (1 = dropped; None if nothing dropped).

        Give either ``mask_ratio`` (a ratio or a :class:`fastmask.ops.TokenStrategy`; in train mode
        its tokens are drawn, from ``generator`` if given; in eval mode nothing is masked, as in the
        published model) or explicit
        ``ids_keep`` [B, K], used in either mode (``check_ids=False`` skips validating them: a
        device sync).
        """
        self._check_input(x, noise_labels)
        B, N = x.shape[0], self.num_patches
        tokens = ops.as_strategy(mask_ratio)
        if ids_keep is None and self.training and not tokens.keeps_all(N):
            ids_keep = tokens.draw(B, N, generator=generator, device=x.device)
            mask = ops.mask_from_ids(ids_keep, N)
        elif ids_keep is not None:
            if check_ids:
                checks.ids("ids_keep", ids_keep, B, N)
            mask = ops.mask_from_ids(ids_keep, N)
        else:
            mask = None
        c = self.condition(noise_labels, class_labels, force_drop_ids)
        h = self.encode(x, c, ids_keep)
        return self.decode(h, c, ids_keep), mask

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None, **kw) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W] (no masking unless ``ids_keep`` is given, or ``mask_ratio``
        in train mode)."""
        tokens, _ = self.forward_tokens(x, noise_labels, class_labels, **kw)
        return unpatchify(tokens, self.patch_size, self.out_channels)


def compile_model(model, scope: str = "blocks"):
    """torch.compile a DiT/MaskDiT (or another family built of the same blocks, inside an
    EDMPrecond) in place.

    ``blocks``: each transformer block (regional compilation: identical blocks share one
    compiled graph, so compiling is quick): the block lists ``blocks``, ``decoder_blocks`` and
    ``mixer_blocks`` (MicroDiT's patch mixer); ``model``: the whole network forward.

    Static shapes (``dynamic=False``): the encoder's blocks (K kept tokens) and the decoder's
    (N tokens) each get a graph of their own at their first call, instead of the second shape
    turning the shared graph symbolic (slower code, and the launch plans key on shapes).
    """
    net = getattr(model, "model", model)
    if scope == "blocks":
        for name in ("blocks", "decoder_blocks", "mixer_blocks"):
            for blk in getattr(net, name, []):
                blk.compile(dynamic=False)
    elif scope == "model":
        net.forward_tokens = torch.compile(net.forward_tokens, dynamic=False)
    else:
        raise ValueError(f"compile scope: expected 'blocks' or 'model', got {scope!r}")
    return model

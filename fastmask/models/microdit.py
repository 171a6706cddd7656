"""MicroDiT's deferred masking ("Stretching Each Dollar", Sehwag et al., CVPR 2025), class-conditional,
on fastmask's DiT blocks: :class:`MicroDiT` and its named sizes (the builder ``fastmask train
--arch microdit`` uses, :func:`fastmask.models.configs.microdit`, parses the names as every family's).

What it does (SonyResearch/micro_diffusion at 900d7d4, models/dit.py ``forward_without_cfg``;
SPEC-ROUTING.md section 3):

    x_emb = PatchEmbed(x) + pos_embed                                  [B, N, D]
    map_in (LayerNorm + Linear D -> D_mix; identity when D_mix == D)   [B, N, D_mix]
    patch mixer: ``mixer_depth`` DiT blocks on ALL N tokens            [B, N, D_mix]
    keep K = int(N * (1 - mask_ratio)) tokens per sample (unsorted)    [B, K, D_mix]
    map_out (LayerNorm + Linear D_mix -> D), on the kept tokens only  [B, K, D]
    backbone: ``depth`` DiT blocks on the kept tokens                  [B, K, D]
    final layer                                                        [B, K, p*p*C]
    tokens back in place, ZEROS in output space at the dropped places [B, N, p*p*C]

The mask comes after the mixer and before map_out, as in the official code (the projection of
the dropped tokens is never computed). The fill is a zero vector of width p*p*C (the official
``mask_token`` buffer is zeros and never trained), so MicroDiT adds no mask token and no fusion
layer: its only extra parameters are the mixer blocks and the two maps. The put-back is
:func:`fastmask.ops.scatter_tokens` without a fill (zeros; its backward reads only the kept rows).

Loss (micro_diffusion models/model.py ``edm_loss``): the EDM-weighted squared error, averaged over
the channels and over each p x p patch, then over the KEPT tokens of each sample only (the zero
fill gives D = c_skip x at a dropped patch, which must not count). That is exactly the DSM term of
:func:`fastmask.ops.dsm_mae_loss` with this model's mask (the mean over the p*p*C values of a
token, then the kept-token mean), so :meth:`EDMPrecond.loss_given` computes it unchanged. MicroDiT
has no MAE term: train it with ``mae_coef=0`` (the ``microdit256`` and ``digits-microdit`` presets
do). With ``mae_coef > 0`` the MAE term only adds a constant: the network's output at a dropped
token is the fixed zero fill, so that term has no gradient. The EDM constants are the trainer's
(sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2)), not MicroDiT's (0.9, N(-0.6, 1.2^2)): neither is a
setting of fastmask's trainer yet. Under ``--objective flow`` the same kept-token mean applies.

Training phases: the official recipe masks 75% and then fine-tunes without masking (train_e2e.sh:
250K masked + 30K dense steps at 256); fastmask's trainer does the same with its phase 2 at ratio
0 (``finetune_steps``). Masking is off in eval mode (the official ``eval_mask_ratio`` is 0): as
for MaskDiT, ``mask_ratio`` masks only in train mode, explicit ``ids_keep`` in any mode.

Simplified against the official text-to-image model (each is a deliberate choice):

* Class-conditional, not text: no cross-attention, no caption encoder; c = timestep embedding +
  class embedding (MicroDiT adds an MLP of the mean-pooled caption to the timestep embedding, so
  the adaLN input plays the same role). The class embedding is the ``linear`` form: a dropped
  label is the zero vector, the counterpart of MicroDiT's zeroed caption.
* The blocks are fastmask's :class:`~fastmask.nn.MaskedDiTBlock` (DiT's block: LayerNorm without
  affine, adaLN-Zero with SiLU, GELU-tanh MLP, no q/k LayerNorm, biases) instead of MicroDiT's
  (affine LayerNorms without bias, GELU adaLN, q/k LayerNorm, SwiGLU FFN rounded to a multiple
  of 256, no biases). ``block=dict(...)`` picks the options MaskedDiTBlock has (e.g.
  ``mlp="swiglu"``, ``qk_norm=True``).
* Dense FFN everywhere: no expert-choice MoE (the official XL puts one in every second block).
* Layer-wise scaling: the MLP ratio may go linearly over the backbone (``mlp_ratio=(lo, hi)``,
  the official (0.5, 4.0)); the qkv width stays D in every block (the official qkv ratio goes
  0.5 -> 1.0, which MaskedDiTBlock's fused attention layout does not take).
* The maps keep the official LayerNorm with a weight and no bias, and Linears without bias.

So ``microdit("XL/2")`` has 503M parameters where MicroDiT_XL_2 has 1.16B (README; MoE experts
and cross-attention make the difference); its forward at ratio 0.75 is 56.3 GFLOPs per image
(:func:`fastmask.models.traced_flops`; DiT-XL/2: 237.2 at every token, the same count).

Initialisation, as the official ``initialize_weights``: xavier-uniform Linears with zero biases,
then trunc-normal q/k/v and first MLP weights (std 0.02) and output projections (attn.proj,
the MLP's second matmul) with std 0.02 / sqrt(2 (i + 1)) in backbone block i and
0.02 / sqrt(2 depth) in the mixer; adaLN and final-layer weights zero (a fresh model outputs
zeros, as DiT's adaLN-Zero).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..ops import checks, reference
from ..nn import FinalLayer, MaskedDiTBlock
from .dit import _DiTBase, unpatchify

# Named sizes. ``XL`` is MicroDiT_XL_2 (micro_diffusion models/dit.py): backbone D 1024, 28 blocks,
# head dim 64, MLP ratio linspace(0.5, 4.0); mixer 6 blocks at width 768, MLP ratio 4. The tiny
# ones follow the spec's digits miniature (SPEC-ROUTING section 6: mixer 2 + backbone 4) at the
# widths of fastmask's T and Digits configs. S, B and L (no official MicroDiT) take the DiT
# paper's backbone (depth, width, heads as fastmask.models.configs.DIT_SIZES) and a mixer of
# depth // 4 blocks at the backbone width (the official Tiny has 4 mixer blocks to 16, XL 6 to 28).
MICRODIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6, mlp_ratio=4.0,
              mixer_depth=3, mixer_hidden_size=384, mixer_num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12, mlp_ratio=4.0,
              mixer_depth=3, mixer_hidden_size=768, mixer_num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, mlp_ratio=4.0,
              mixer_depth=6, mixer_hidden_size=1024, mixer_num_heads=16),
    "XL": dict(depth=28, hidden_size=1024, num_heads=16, mlp_ratio=(0.5, 4.0),
               mixer_depth=6, mixer_hidden_size=768, mixer_num_heads=12, mixer_mlp_ratio=4.0),
    "T": dict(depth=2, hidden_size=64, num_heads=4, mlp_ratio=4.0,
              mixer_depth=1, mixer_hidden_size=64, mixer_num_heads=4),
    "Digits": dict(depth=4, hidden_size=128, num_heads=4, mlp_ratio=4.0,
                   mixer_depth=2, mixer_hidden_size=128, mixer_num_heads=4),
}


def _map(d_in: int, d_out: int) -> nn.Module:
    """MicroDiT's width map: LayerNorm (weight, no bias, eps 1e-6) + Linear without bias, or the
    identity when the widths agree."""
    if d_in == d_out:
        return nn.Identity()
    return nn.Sequential(nn.LayerNorm(d_in, eps=1e-6, bias=False), nn.Linear(d_in, d_out, bias=False))


def _mlp_ratios(mlp_ratio, depth: int) -> list[float]:
    if isinstance(mlp_ratio, (tuple, list)):
        if len(mlp_ratio) != 2:
            raise ValueError(f"mlp_ratio: expected a number or a pair (first, last), got {mlp_ratio!r}")
        lo, hi = (float(v) for v in mlp_ratio)  # numpy.linspace's values, in Python (no tensor: meta-safe)
        return [lo + (hi - lo) * i / (depth - 1) for i in range(depth - 1)] + [hi] if depth > 1 else [lo]
    return [mlp_ratio] * depth


class MicroDiT(_DiTBase):
    """MicroDiT with deferred masking (see the module docstring for the data flow, the loss and
    what is simplified). ``blocks`` is the backbone, ``mixer_blocks`` the patch mixer,
    ``mixer_in`` / ``mixer_out`` the width maps around the mixer.

    ``forward_tokens`` returns the output tokens [B, N, p*p*C] (zeros at dropped tokens) and the
    mask [B, N] (1 = dropped; None when nothing was dropped), as MaskDiT's, so that
    :class:`~fastmask.models.EDMPrecond` and the trainer treat both alike.
    """

    #: As MaskDiT: the training loop drops labels (MicroDiT's data loader zeroes captions), the
    #: model never does on its own.
    drops_labels_in_train_mode = False

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1024,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: "float | tuple[float, float]" = (0.5, 4.0),
        mixer_depth: int = 6,
        mixer_hidden_size: int = 768,
        mixer_num_heads: int = 12,
        mixer_mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        label_form: str = "linear",
        class_dropout_prob: float = 0.1,
        block: dict | None = None,
    ):
        ratios = _mlp_ratios(mlp_ratio, depth) if isinstance(depth, int) and depth > 0 else [4.0]
        super().__init__(
            input_size, patch_size, in_channels, hidden_size, depth, num_heads, ratios[0], num_classes, label_form,
            class_dropout_prob, block,
        )
        if len(set(ratios)) > 1:  # layer-wise scaling of the MLP width
            self.blocks = nn.ModuleList(
                [MaskedDiTBlock(hidden_size, num_heads, r, **self.block_options) for r in ratios]
            )
        self.mlp_ratios = ratios
        checks.integer("mixer_depth", mixer_depth, 1)
        checks.integer("mixer_hidden_size", mixer_hidden_size, 1)
        if not (isinstance(mixer_num_heads, int) and mixer_num_heads > 0):
            raise ValueError(f"mixer_num_heads: expected a positive integer, got {mixer_num_heads!r}")
        if mixer_hidden_size % mixer_num_heads:
            raise ValueError(
                f"mixer_num_heads: mixer_hidden_size {mixer_hidden_size} is not divisible into {mixer_num_heads} heads"
            )
        Dm = mixer_hidden_size
        self.mixer_hidden_size, self.out_channels = Dm, in_channels
        self.mixer_in = _map(hidden_size, Dm)
        # mixer blocks are Dm wide and conditioned on c of width D (the official pooled_emb_dim=dim)
        self.mixer_blocks = nn.ModuleList(
            [MaskedDiTBlock(Dm, mixer_num_heads, mixer_mlp_ratio, cond_size=hidden_size, **self.block_options)
             for _ in range(mixer_depth)]
        )
        self.mixer_out = _map(Dm, hidden_size)
        self._add_rope("mixer_rope", Dm // mixer_num_heads)
        P = patch_size * patch_size * in_channels
        self.final_layer = FinalLayer(hidden_size, P, norm=self.final_norm)
        self._init_base(self.mixer_blocks)
        self._init_microdit()

    def _init_microdit(self) -> None:
        """The official per-block trunc-normal init on top of :meth:`_init_base` (whose xavier
        Linears, zero biases and zero adaLN / final layer it keeps)."""
        depth = len(self.blocks)
        groups = [(blk, 0.02 / (2 * (i + 1)) ** 0.5) for i, blk in enumerate(self.blocks)]
        groups += [(blk, 0.02 / (2 * depth) ** 0.5) for blk in self.mixer_blocks]
        with torch.no_grad():
            for blk, std in groups:
                nn.init.trunc_normal_(blk.attn.qkv.weight, std=0.02)
                nn.init.trunc_normal_(blk.attn.proj.weight, std=std)
                if hasattr(blk.mlp, "fc1"):
                    nn.init.trunc_normal_(blk.mlp.fc1.weight, std=0.02)
                    nn.init.trunc_normal_(blk.mlp.fc2.weight, std=std)
                else:  # SwiGLU: w12 = [gate w1; value w2], as the official w1 (0.02) and w2, w3 (std)
                    hidden = blk.mlp.w3.in_features
                    nn.init.trunc_normal_(blk.mlp.w12.weight[:hidden], std=0.02)
                    nn.init.trunc_normal_(blk.mlp.w12.weight[hidden:], std=std)
                    nn.init.trunc_normal_(blk.mlp.w3.weight, std=std)

    def forward_tokens(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        *,
        mask_ratio: "float | ops.TokenStrategy" = 0.0,
        ids_keep: Tensor | None = None,
        generator: torch.Generator | None = None,
        check_ids: bool = True,
        force_drop_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Output tokens [B, N, p*p*C] (zeros at the dropped tokens) and the mask [B, N] (1 =
        dropped; None if nothing was dropped).

        ``mask_ratio`` (a ratio or a :class:`fastmask.ops.TokenStrategy`) masks in train mode
        only, drawing from ``generator``; explicit ``ids_keep`` [B, K] masks in any mode
        (``check_ids=False`` skips validating their values: a device sync).
        """
        self._check_input(x, noise_labels)
        B, N = x.shape[0], self.num_patches
        tokens = ops.as_strategy(mask_ratio)
        if ids_keep is None and self.training and not tokens.keeps_all(N):
            ids_keep = tokens.draw(B, N, generator=generator, device=x.device)
        elif ids_keep is not None and check_ids:
            checks.ids("ids_keep", ids_keep, B, N)
        mask = None if ids_keep is None else ops.mask_from_ids(ids_keep, N)
        c = self.condition(noise_labels, class_labels, force_drop_ids)
        h = reference.add_pos(self.x_embedder(x), self.pos_embed)
        h = self.mixer_in(h)
        for blk in self.mixer_blocks:  # the patch mixer sees every token
            h = blk(h, c, **self._rope("mixer_rope"))
        if ids_keep is not None:  # mask after the mixer, before map_out
            h = ops.gather_tokens(h, ids_keep, check_ids=False)
        h = self.mixer_out(h)
        for blk in self.blocks:  # with RoPE, the kept tokens rotate by their grid positions
            h = blk(h, c, **self._rope("rope", ids_keep))
        out = self.final_layer(h, c)
        if ids_keep is not None:  # back in place only now, zeros in output space elsewhere
            out = ops.scatter_tokens(out, ids_keep, num_tokens=N, check_ids=False)
        return out, mask

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None, **kw) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W] (no masking unless ``ids_keep`` is given, or
        ``mask_ratio`` in train mode)."""
        tokens, _ = self.forward_tokens(x, noise_labels, class_labels, **kw)
        return unpatchify(tokens, self.patch_size, self.out_channels)

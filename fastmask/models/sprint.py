"""SPRINT (sparse-dense residual fusion, snap-research/Sprint): a dense shallow encoder, a sparse
deep middle on a quarter of the tokens, a concat-linear fusion of the two paths and a dense
decoder; path-drop in training and Path-Drop Guidance (PDG) at sampling.

Described from the official code (SPEC-ROUTING section 2; Sprint src/models/sit.py at 12c5fc9):
patch embedding -> ``encoder_depth`` blocks on all N tokens (their output x_enc is the
"dense-shallow path") -> K tokens gathered (:func:`fastmask.ops.gather_tokens`) -> the middle
blocks on [B, K, D], RoPE rotating each kept token by its own grid position (the "sparse-deep
path") -> restored to [B, N, D] with the mask token at the dropped positions -> path-drop ->
fusion ``h = Linear(2D -> D)(concat(restored, x_enc))`` (deep first, shallow second) ->
``decoder_depth`` blocks on all N -> final layer. The loss covers every token (the forward returns
no mask): the decoder predicts the dropped tokens from the mask token fused with x_enc.

The network is one stack ``blocks`` of ``depth`` blocks (state keys ``blocks.0 ..``, as DiT's):
``blocks[:encoder_depth]`` the encoder, ``blocks[-decoder_depth:]`` the decoder, the middle in
between. Default split: SPRINT's 2 + (depth - 4) + 2 (XL: 2 + 24 + 2,
configs/train/SIT_XL_SPRINT_256.yaml); a stack under 6 blocks keeps 1 + (depth - 2) + 1 (the
digits model's 4 blocks: 1 + 2 + 1; SPEC-ROUTING's miniature has 8 blocks, no fastmask config has;
2 blocks: 0 + 1 + 1).

Backbone: SPRINT's own (no absolute position embedding; 2-D axial RoPE, theta 10000, in every
attention; per-head RMSNorm q/k-norm with a weight; LayerNorms without affine, eps 1e-6; GELU
(tanh) MLP; adaLN-Zero), which is :class:`fastmask.nn.MaskedDiTBlock` with
:data:`SPRINT_BLOCK`. ``block={}`` runs the routing on the plain DiT block instead; the fixed
sin-cos position table is then added after the patch embedding, as DiT's. Two layout
differences from the official weights, neither affecting training from scratch: the patch
embedding is DiT's stride-p convolution (the official one is a Linear on flattened patches: the
same map, another parameter shape) and tokens unpatchify in DiT's (p, p, c) order, not (c, p, p).

New parameters and their initialisation (as the official code): ``fusion`` Linear(2D, D) with
xavier-uniform weight and zero bias (not zero-initialised); ``mask_token`` [1, 1, D] drawn from
N(0, 0.02^2), which the official code registers as a Parameter with ``requires_grad=False``: a
fixed random vector, saved in the checkpoint, never trained (its comment calls it learnable; the
code is followed, SPEC-ROUTING 7.5). Here it is a persistent buffer (same state-dict key), so no
optimizer, EMA or trainer switch touches it. Every other parameter is DiT's (adaLN-Zero and the
final layer zeroed).

The fusion is computed without the concat: with W = [W_a | W_b],
``h = W_a restored + W_b x_enc + b``, and since restored is kept rows scattered into a mask-token
fill and W_a is linear, ``W_a restored = unmask(W_a kept, fill = W_a mask_token)``: the deep half
of the fusion is a matmul on the K kept rows only, its fill one [D] vector (tested equal to the
concat form).

Tokens (:meth:`SPRINT.token_strategy`): the structured mask with a random offset
(:class:`fastmask.ops.StructuredTokens`, the official default: at 0.75 one random token per 2x2
group, K = N / 4) for the ratios of its table, else (or with ``mask_type="random"``) MaskDiT's
random tokens, K = int(N (1 - r)). Kept ids are not sorted.

Path-drop (training only, ``path_drop_prob`` 0.1 as ``cfg_mask_prob``): per sample, with that
probability, the whole restored deep output is replaced by the mask token before the fusion,
independently of label dropout; it stays on in the dense fine-tune (mask ratio 0), as in the
official code. ``path_drop=`` [B] gives them explicitly, in any mode: the trainer draws them for
the global batch with the step's other randomness (:func:`fastmask.train_step.step_randomness`,
at this network's ``path_drop_prob``) and passes each rank its share, so a distributed run equals
the one-process run. Without them, in train mode, flags come from ``generator`` when given, else
from torch's global RNG (the official code's ``torch.rand``).

Inference: in eval mode nothing is dropped (no tokens, no path-drop) unless ``ids_keep`` or
``path_drop`` are passed: the middle blocks see all N tokens and the fusion gets the dense deep
output. Path-Drop Guidance (the sampler's ``path_drop_guidance=True``): the CFG batch [x, x] with
labels [y, null] runs encoder, fusion and decoder on both halves, but the middle blocks only on
the conditional half; the unconditional half's deep output is the mask token everywhere. So the
weak branch is the null label AND the dropped deep path, as forward_pdg does (the paper's summary
names only the dropped path, SPEC-ROUTING 7.6; the code is followed). The sampler enters
:meth:`SPRINT.path_drop_guidance` around the doubled call only, so a batch outside the guidance
interval is never split in halves (the official trap, SPEC-ROUTING 2.3).

Digits-scale default: a network with no absolute position is, up to border effects,
translation-equivariant, so from pure noise it has no cue to put a centred digit in the centre.
On the embedded digits (every digit centred; Digits/2, ratio 0.75, flow with logit-normal t, the
digits-sprint preset's settings, 200 steps, no fine-tune; `fastmask eval` with 10 samples per
class, guidance 2, 18 Heun steps; Frechet distance of real held-out digits at that n: 8.62):
SPRINT's backbone gave classifier accuracy 0.12 and Frechet distance 39.2; the same block plus
DiT's sin-cos table 0.23 and 27.4; SPRINT's routing on DiT's block (sin-cos table, no RoPE, no
q/k-norm) 0.62 and 25.7. So the tiny configs (T, Digits: the tests and the CPU demo) build the
DiT block (:func:`fastmask.models.configs.sprint`), and S/B/L/XL SPRINT's own; any build takes
``block=`` and ``pos_embed=`` explicitly.

Objective: the official SPRINT trains SiT-style flow matching with t = sigmoid(n), n ~ N(0, 1), on
every token; fastmask's ``--objective flow --t-schedule logit_normal`` is that loss in SiT's time
direction (t = 0 noise, target x1 - x0; the official REPA convention is t -> 1 - t, v -> -v, the
same distribution of t since the logit-normal is symmetric). ``--objective edm`` works too (EDM's
denoising loss on every token).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops import checks, reference
from ..ops.selection import STRUCTURED
from .dit import DiT

#: SPRINT's block: LayerNorm without affine, per-head q/k RMSNorm, 2-D RoPE, GELU MLP
#: (configs/train/SIT_XL_SPRINT_256.yaml: q_norm / k_norm RMSNorm, rel_pos_embed rope; use_swiglu unset).
SPRINT_BLOCK = dict(norm="layer", qk_norm=True, rope=True, mlp="gelu")

MASK_TYPES = ("structured", "random")


def default_split(depth: int) -> tuple[int, int]:
    """(encoder_depth, decoder_depth) of a stack of ``depth`` blocks: SPRINT's 2 and 2 (XL: 2 + 24
    + 2); 1 and 1 from 3 to 5 blocks (the middle keeps at least 1); 0 and 1 for 2 blocks (the tiny
    test model T: the patch embedding is the shallow path)."""
    checks.integer("depth", depth, 2)
    return (2, 2) if depth >= 6 else (1, 1) if depth >= 3 else (0, 1)


class SPRINT(DiT):
    """SPRINT on fastmask's DiT parts (see the module docstring). Keyword arguments only; every one
    not named here is :class:`fastmask.models.DiT`'s (defaults XL/2 on 32x32 latents, a label table
    with a null row); ``block`` defaults to :data:`SPRINT_BLOCK`.

    Args:
        pos_embed: add DiT's fixed sin-cos position table after the patch embedding (default: only
            on a block without RoPE; SPRINT's own backbone has no absolute position).
        encoder_depth, decoder_depth: the dense blocks before and after the middle (default
            :func:`default_split`); the middle gets the rest, at least one block.
        path_drop_prob: training probability that a sample's deep path is replaced by the mask
            token (official ``cfg_mask_prob`` 0.1).
        mask_type: ``"structured"`` (default) or ``"random"``: the tokens a float ratio draws.
    """

    def __init__(
        self,
        *,
        block: dict | None = None,
        pos_embed: bool | None = None,
        encoder_depth: int | None = None,
        decoder_depth: int | None = None,
        path_drop_prob: float = 0.1,
        mask_type: str = "structured",
        **dit_kwargs,
    ):
        super().__init__(block=dict(SPRINT_BLOCK) if block is None else block, **dit_kwargs)
        depth = len(self.blocks)
        enc, dec = default_split(depth)
        enc = enc if encoder_depth is None else encoder_depth
        dec = dec if decoder_depth is None else decoder_depth
        checks.integer("encoder_depth", enc, 0)
        checks.integer("decoder_depth", dec, 0)
        if enc + dec >= depth:
            raise ValueError(f"encoder_depth, decoder_depth: {enc} + {dec} leave no middle block of depth {depth}")
        if not 0.0 <= float(path_drop_prob) <= 1.0:
            raise ValueError(f"path_drop_prob: expected a probability in [0, 1], got {path_drop_prob}")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type: expected one of {MASK_TYPES}, got {mask_type!r}")
        self.uses_pos_embed = not self.block_options.get("rope") if pos_embed is None else bool(pos_embed)
        if not self.uses_pos_embed:  # SPRINT has no absolute position: no table in the state dict
            del self.pos_embed
        self.encoder_depth, self.decoder_depth = enc, dec
        self.path_drop_prob, self.mask_type = float(path_drop_prob), mask_type
        D = self.hidden_size
        self.fusion = nn.Linear(2 * D, D, bias=True)
        nn.init.xavier_uniform_(self.fusion.weight)
        nn.init.zeros_(self.fusion.bias)
        # A buffer, not a frozen Parameter: no optimizer, EMA or DDP ever sees it, and the trainer's
        # switch of MaskDiT's trainable mask token (requires_grad on in phase 1) cannot train it.
        self.register_buffer("mask_token", torch.randn(1, 1, D) * 0.02)
        self._pdg = False

    # ------------------------------------------------------------------ parts
    @property
    def encoder_blocks(self):
        return self.blocks[: self.encoder_depth]

    @property
    def middle_blocks(self):
        return self.blocks[self.encoder_depth: len(self.blocks) - self.decoder_depth]

    @property
    def dense_decoder_blocks(self):  # not ``decoder_blocks``: the FLOP count reads that name as MaskDiT's
        return self.blocks[len(self.blocks) - self.decoder_depth:]

    def token_strategy(self, mask_ratio) -> ops.TokenStrategy:
        """The tokens kept at ``mask_ratio`` (the fraction dropped): a strategy as given; the
        structured mask for the ratios of :data:`fastmask.ops.selection.STRUCTURED` (unless
        ``mask_type="random"``); else random tokens, K = int(N (1 - r))."""
        if isinstance(mask_ratio, ops.TokenStrategy):
            return mask_ratio
        r = checks.mask_ratio(mask_ratio)
        if self.mask_type == "structured" and r in STRUCTURED:
            return ops.StructuredTokens(r)
        return ops.RandomTokens(r)

    @contextlib.contextmanager
    def path_drop_guidance(self):
        """Inside this context every forward takes its batch as [conditional; unconditional]
        halves (the batch a CFG sampler builds) and drops the deep path of the second half:
        Path-Drop Guidance, the official ``forward_pdg``. Only for the doubled call."""
        prev, self._pdg = self._pdg, True
        try:
            yield self
        finally:
            self._pdg = prev

    def fuse(self, deep: Tensor | None, x_enc: Tensor, ids_keep: Tensor | None = None,
             path_drop: Tensor | None = None) -> Tensor:
        """``fusion(concat(restored, x_enc))`` without the concat (see the module docstring).

        deep: the middle blocks' output, [B', K, D] on the kept ``ids_keep`` or [B', N, D]; its
        B' <= B rows are the first rows of ``x_enc`` [B, N, D], the other rows' deep path is
        dropped (None: every row's). ``path_drop`` [B] bool: rows whose deep path is the mask token.
        ``ids_keep`` is trusted (distinct ids in [0, N): :meth:`forward_tokens` checks them)."""
        B, N, D = x_enc.shape
        W = self.fusion.weight
        out = F.linear(x_enc, W[:, D:], self.fusion.bias)  # the shallow half and the bias
        token = self.mask_token.detach().reshape(1, D).to(W.dtype)  # fixed: never a gradient, whoever asks
        fill = F.linear(token, W[:, :D])  # the mask token through W_a: [1, D]
        if deep is None:
            return out + fill.to(out.dtype)
        d = F.linear(deep, W[:, :D])
        if ids_keep is not None:
            d = ops.unmask_tokens(d, ids_keep, fill, N, check_ids=False)
        if d.shape[0] < B:
            d = torch.cat([d, fill.to(d.dtype).expand(B - d.shape[0], N, D)])
        if path_drop is not None:
            d = torch.where(path_drop.view(B, 1, 1), fill.to(d.dtype), d)
        return out + d

    # ------------------------------------------------------------------ forward
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
        path_drop: Tensor | None = None,
    ) -> Tensor:
        """[B, C, H, W] -> output tokens [B, N, p*p*out_channels], every token (the loss covers all).

        ``mask_ratio`` (a drop ratio or a strategy, :meth:`token_strategy`) and path-drop act in
        train mode only, drawn from ``generator`` if given (tokens first, then the path-drop
        flags). Explicit ``ids_keep`` [B, K] and ``path_drop`` [B] (bool: deep path replaced by
        the mask token) apply in any mode (``check_ids=False`` skips validating the ids: a sync)."""
        self._check_input(x, noise_labels)
        B, N = x.shape[0], self.num_patches
        if ids_keep is None and self.training and not self._pdg:
            tokens = self.token_strategy(mask_ratio)
            if not tokens.keeps_all(N):
                ids_keep = tokens.draw(B, N, generator=generator, device=x.device)
        elif ids_keep is not None and check_ids:
            checks.ids("ids_keep", ids_keep, B, N)
        if path_drop is not None:
            if not isinstance(path_drop, Tensor) or path_drop.shape != (B,):
                got = tuple(path_drop.shape) if isinstance(path_drop, Tensor) else type(path_drop).__name__
                raise ValueError(f"path_drop: expected [{B}] flags (one per sample), got {got}")
            path_drop = path_drop.to(x.device) != 0
        elif self.training and self.path_drop_prob > 0 and not self._pdg:
            dev = generator.device if generator is not None else x.device
            path_drop = (torch.rand(B, generator=generator, device=dev) < self.path_drop_prob).to(x.device)
        c = self.condition(noise_labels, class_labels, force_drop_ids)
        h = self.x_embedder(x)
        if self.uses_pos_embed:  # DiT's fixed sin-cos table (the DiT backbone, or asked for)
            h = reference.add_pos(h, self.pos_embed)
        for blk in self.encoder_blocks:
            h = blk(h, c, **self._rope())
        rows = B
        if self._pdg:  # Path-Drop Guidance: the deep path of the conditional half only
            if B % 2 or ids_keep is not None:
                raise ValueError(f"x: path-drop guidance takes a [conditional; unconditional] batch of even size "
                                 f"without ids_keep, got {B} samples{' and ids_keep' if ids_keep is not None else ''}")
            rows = B // 2
        deep = h[:rows] if ids_keep is None else ops.gather_tokens(h, ids_keep, check_ids=False)
        for blk in self.middle_blocks:  # with RoPE, a kept token rotates by its grid position
            deep = blk(deep, c[:rows], **self._rope("rope", ids_keep))
        h = self.fuse(deep, h, ids_keep, path_drop)
        for blk in self.dense_decoder_blocks:
            h = blk(h, c, **self._rope())
        return self.final_layer(h, c)

"""TREAD (token routing, CompVis/tread): a DiT whose blocks ``route_start .. route_end`` see only
a random subset of the tokens; the others skip those blocks and keep their saved value.

Described from the official code (see SPEC-ROUTING section 1; CompVis/tread dit.py and
routing_module.py): just before block ``route_start`` the stream x [B, N, D] is saved and K
tokens are gathered (:func:`fastmask.ops.gather_tokens`, no position add: the fixed sin-cos
table was added at the patch embedding); blocks ``route_start .. route_end`` (both inclusive) run
on [B, K, D]; right after block ``route_end`` the K outputs are put back into the saved stream
(:func:`fastmask.ops.scatter_tokens`, out of place), so a token that was not kept carries its
block ``route_start - 1`` output through the routed blocks unchanged. Blocks after the route are
dense. No parameter is added: the state dict is DiT's. The loss covers every token (the full
re-assembled output; no mask, no auxiliary term); labels are dropped inside the model in train
mode as DiT's are.

Which tokens: :class:`fastmask.ops.RoutedTokens`, where the ratio is TREAD's ``rate``, the
fraction that BYPASSES the routed blocks: K = N - int(N * rate); one uniform draw per sample,
ids unsorted. Routing is on only in train mode (or when ``ids_keep`` is passed, in any mode:
the official ``force_routing``); an eval-mode call without ids is the dense DiT.

Choices where the official code does something this module does not, and why:

* the official block right after ``route_end`` runs with autocast disabled (``fp32_next``), which
  its history ties to an older put-back that built its output as an fp32 tensor; here the put-back
  keeps the stream's dtype, so nothing needs the fp32 block, and it would cost a full-precision
  block per step. The routed tokens are therefore not bit-comparable with the official code
  under bf16 autocast (they are in fp32);
* one route per model (the official config uses one; its code allows a list).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..ops import checks, reference
from .dit import DiT


def default_route(depth: int) -> tuple[int, int]:
    """The routed blocks (first, last; inclusive) of a stack of ``depth`` blocks: TREAD's
    ``2 .. depth - 4`` (CompVis/tread configs/model/tread.yaml: DiT-B/2, 12 blocks, 2..8;
    LightningDiT_TREAD: 2 .. depth - 4, so 2..24 for DiT-XL's 28). A stack too shallow for that
    rule (under 6 blocks) keeps its first and last block dense, ``1 .. depth - 2`` (the digits
    model's 4 blocks: 1..2), and one of 1 or 2 blocks routes block 0."""
    checks.integer("depth", depth, 1)
    if depth >= 6:
        return 2, depth - 4
    if depth >= 3:
        return 1, depth - 2
    return 0, 0


class TREAD(DiT):
    """DiT with TREAD's token routing over blocks ``route[0] .. route[1]`` (inclusive; default
    :func:`default_route`). Every other argument is :class:`fastmask.models.DiT`'s, and so are the
    parameters and their initialisation."""

    def __init__(self, *args, route: tuple[int, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        depth = len(self.blocks)
        if route is None:
            route = default_route(depth)
        if not (isinstance(route, (tuple, list)) and len(route) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in route)):
            raise ValueError(f"route: expected (first, last) block indices, got {route!r}")
        start, end = route
        if not 0 <= start <= end < depth:
            raise ValueError(f"route: expected 0 <= first <= last < depth = {depth}, got {tuple(route)}")
        self.route = (int(start), int(end))

    @staticmethod
    def token_strategy(rate) -> ops.TokenStrategy:
        """The tokens a routed step keeps: :class:`fastmask.ops.RoutedTokens` of ``rate`` (the
        fraction that bypasses the route), or a strategy as given."""
        if isinstance(rate, ops.TokenStrategy):
            return rate
        return ops.RoutedTokens(checks.mask_ratio(rate))

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
    ) -> Tensor:
        """[B, C, H, W] -> output tokens [B, N, p*p*out_channels], every token (the loss covers all).

        ``mask_ratio`` is TREAD's rate (a number: :class:`fastmask.ops.RoutedTokens`, or any
        strategy); its tokens are drawn in train mode only (from ``generator`` if given). Explicit
        ``ids_keep`` [B, K] routes in any mode (``check_ids=False`` skips validating them: a
        device sync)."""
        self._check_input(x, noise_labels)
        B, N = x.shape[0], self.num_patches
        if ids_keep is None and self.training:
            tokens = self.token_strategy(mask_ratio)
            if not tokens.keeps_all(N):
                ids_keep = tokens.draw(B, N, generator=generator, device=x.device)
        elif ids_keep is not None and check_ids:
            checks.ids("ids_keep", ids_keep, B, N)
        c = self.condition(noise_labels, class_labels, force_drop_ids)
        h = reference.add_pos(self.x_embedder(x), self.pos_embed)
        start, end = self.route
        saved = None
        for i, blk in enumerate(self.blocks):
            if ids_keep is not None and i == start:
                saved = h
                h = ops.gather_tokens(h, ids_keep, check_ids=False)
            # with RoPE, a routed token rotates by its grid position (LightningDiT_TREAD's rope_ids)
            h = blk(h, c, **self._rope("rope", ids_keep if saved is not None else None))
            if saved is not None and i == end:
                h = ops.scatter_tokens(h, ids_keep, saved, check_ids=False)
                saved = None
        return self.final_layer(h, c)

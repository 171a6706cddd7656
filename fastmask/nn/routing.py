"""Token routing as a drop-in (TREAD): a random subset of the tokens skips a range of blocks.

:func:`route_tokens` turns any stack of transformer blocks that pass a token tensor
[B, N, D] from one to the next (fastmask's DiT and MaskDiT, a diffusers ``DiTTransformer2DModel``
or PixArt, fused by :func:`fastmask.nn.diffusers.fuse_transformer` or not, or a user's own
``nn.ModuleList`` of :class:`~fastmask.nn.MaskedDiTBlock`) into TREAD's routed stack, in
training mode only, with forward hooks (CompVis/tread ``dit.py`` / ``routing_module.py``):

- just before block ``start``, the stream x [B, N, D] is kept (``x_saved``) and K tokens per
  sample are chosen at random (:class:`fastmask.ops.selection.RoutedTokens`: ``rate`` is the
  fraction that bypasses the blocks, K = N - int(N * rate), ids unsorted, a fresh draw each
  forward); blocks ``start`` .. ``end`` (both inclusive) run on those K tokens only;
- right after block ``end`` the K outputs are put back into ``x_saved`` (out of place): the
  other tokens carry block ``start - 1``'s output unchanged, and the blocks after ``end`` are
  dense again.

No parameter is added and none renamed (the state dict is the model's), and in ``eval()`` the
hooks do nothing: the model is exactly the dense one. A block argument that is aligned with the
tokens cannot be cut down by a hook it does not know, so such an argument (a tensor of shape
[B, N, ...] other than the tokens, e.g. a self-attention mask) is refused with an error naming
it. Known exception: fastmask's ``rope_ids`` [B, N] (rotary positions of the tokens) is cut to
the routed tokens, so RoPE blocks see each token at its own position (LightningDiT-TREAD's
``rope_ids``). Not supported: activation checkpointing that re-runs a routed block's forward
(the hooks would draw again), and replacing the blocks after routing them (the hooks stay on
the old modules): fuse first, then route.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.selection import RoutedTokens

# keyword arguments that are never aligned with the image tokens (cross-attention context)
_NOT_TOKEN_ALIGNED = frozenset({"encoder_hidden_states", "encoder_attention_mask", "c", "timestep", "class_labels"})


class TokenRouter:
    """The handle :func:`route_tokens` returns: ``remove()`` takes the hooks off, ``enabled``
    switches routing off and on, ``last_ids`` are the kept ids [B, K] of the last routed forward."""

    def __init__(self, blocks: nn.ModuleList, start: int, end: int, rate: float, generator: torch.Generator | None):
        self.blocks, self.start, self.end = blocks, start, end
        self.strategy = RoutedTokens(rate)
        self.generator = generator
        self.enabled = True
        self.last_ids: Tensor | None = None
        self._ids: Tensor | None = None  # the route in flight
        self._saved: Tensor | None = None
        self._handles = [blocks[start].register_forward_pre_hook(self._enter, with_kwargs=True)]
        for i in range(start + 1, end + 1):
            self._handles.append(blocks[i].register_forward_pre_hook(self._inside, with_kwargs=True))
        self._handles.append(blocks[end].register_forward_hook(self._leave, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _active(self, module) -> bool:
        return self.enabled and module.training

    def _enter(self, module, args, kwargs):
        if not self._active(module):
            return None
        x, where = _tokens(args, kwargs, self.start)
        B, N, _ = x.shape
        ids = self.strategy.draw(B, N, generator=self.generator, device=x.device)
        if ids is None:  # rate 0: every token takes the blocks
            return None
        self._ids, self._saved, self.last_ids = ids, x, ids
        routed = ops.gather_tokens(x, ids, check_ids=False)
        return self._cut(args, kwargs, where, routed, B, N)

    def _inside(self, module, args, kwargs):
        if self._ids is None or not self._active(module):
            return None
        x, where = _tokens(args, kwargs, self.start)
        return self._cut(args, kwargs, where, x, x.shape[0], self._saved.shape[1])

    def _cut(self, args, kwargs, where, x, B: int, N: int):
        """The block's arguments with the routed tokens in place of the stream; rope_ids cut to
        the routed tokens; any other token-aligned tensor refused."""
        args, kwargs = list(args), dict(kwargs)
        if where == 0:
            args[0] = x
        else:
            kwargs[where] = x
        for i, a in enumerate(args[1:], 1):
            _refuse_aligned(f"positional argument {i}", a, B, N)
        for name, a in kwargs.items():
            if name not in (where, "rope", "rope_ids") and name not in _NOT_TOKEN_ALIGNED:
                _refuse_aligned(f"keyword argument {name!r}", a, B, N)
        if kwargs.get("rope") is not None:  # the rotary rows of the routed tokens: their own positions
            rid = kwargs.get("rope_ids")
            if rid is not None and tuple(rid.shape) != (B, N):
                raise ValueError(f"route_tokens: rope_ids of shape {tuple(rid.shape)}; expected [{B}, {N}] (one "
                                 "position per token of the stream)")
            kwargs["rope_ids"] = self._ids if rid is None else rid.gather(1, self._ids)
        return tuple(args), kwargs

    def _leave(self, module, args, kwargs, output):
        if self._ids is None or not self._active(module):
            return None
        ids, saved = self._ids, self._saved
        self._ids = self._saved = None
        out = output[0] if isinstance(output, tuple) else output
        full = _put_back(out, ids, saved)
        return (full, *output[1:]) if isinstance(output, tuple) else full


def _put_back(x_kept: Tensor, ids: Tensor, fill: Tensor) -> Tensor:
    """``fill`` with row ``ids[b, k]`` of sample b replaced by ``x_kept[b, k]`` (out of place)."""
    index = ids.unsqueeze(-1).expand(-1, -1, fill.shape[-1])
    return fill.scatter(1, index, x_kept.to(fill.dtype))


def _tokens(args, kwargs, start: int):
    if args:
        x, where = args[0], 0
    elif "hidden_states" in kwargs:
        x, where = kwargs["hidden_states"], "hidden_states"
    elif "x" in kwargs:
        x, where = kwargs["x"], "x"
    else:
        raise ValueError(f"route_tokens: block {start} was called without a token tensor (the first positional "
                         "argument, hidden_states= or x=)")
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"route_tokens: expected the tokens [B, N, D] as the blocks' first argument, got "
                         f"{type(x).__name__}{'' if not isinstance(x, Tensor) else ' of shape ' + str(tuple(x.shape))}")
    return x, where


def _refuse_aligned(what: str, a, B: int, N: int) -> None:
    """Refuse per-token data: a tensor [B, N, ...] of 3 or more dims, or an integer / boolean
    [B, *] (token ids, masks). A floating [B, C] is per-sample conditioning (adaLN's c)."""
    if not isinstance(a, Tensor) or a.dim() < 2 or a.shape[0] != B:
        return
    per_token = (a.dim() >= 3 and a.shape[1] == N) or (a.dim() == 2 and not a.is_floating_point())
    if per_token:
        raise ValueError(f"route_tokens: the blocks' {what} has shape {tuple(a.shape)} ({a.dtype}), per token "
                         f"or per id of the {N} tokens; routing cannot cut it down to the routed tokens, so it "
                         "refuses to run (an exact result or none)")


def route_tokens(model_or_blocks, start: int, end: int, rate: float = 0.5, *,
                 generator: torch.Generator | None = None) -> TokenRouter:
    """Route a random ``rate`` of the tokens around blocks ``start`` .. ``end`` (inclusive) in
    training mode (TREAD; see the module docstring). ``model_or_blocks``: an ``nn.ModuleList`` of
    blocks, or a model holding one as ``blocks`` (fastmask's DiT, MaskDiT's encoder) or
    ``transformer_blocks`` (diffusers). TREAD's ImageNet setting: ``start=2, end=depth - 5``
    (blocks 2 .. 23 of DiT-XL/2's 28; CompVis/tread's "end" index is inclusive), ``rate=0.5``.
    Returns the :class:`TokenRouter` (``.remove()`` undoes it)."""
    blocks = model_or_blocks
    if not isinstance(blocks, nn.ModuleList):
        blocks = next((getattr(model_or_blocks, a) for a in ("blocks", "transformer_blocks")
                       if isinstance(getattr(model_or_blocks, a, None), nn.ModuleList)), None)
        if blocks is None:
            raise ValueError(f"model_or_blocks: expected an nn.ModuleList of blocks or a model with one as .blocks or "
                             f".transformer_blocks, got {type(model_or_blocks).__name__}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"rate: expected the fraction of tokens that bypasses the blocks, in [0, 1), got {rate!r}")
    n = len(blocks)
    if isinstance(start, bool) or isinstance(end, bool) or not (isinstance(start, int) and isinstance(end, int)):
        raise ValueError(f"start, end: expected block indices (int), got {start!r}, {end!r}")
    if not 0 <= start <= end < n:
        raise ValueError(f"start, end: expected 0 <= start <= end < {n} (the number of blocks), got {start}, {end}")
    return TokenRouter(blocks, start, end, float(rate), generator)

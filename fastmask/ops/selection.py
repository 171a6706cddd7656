"""How the kept tokens are chosen: token strategies.

Every token-sparse method fastmask serves keeps a fixed count K of tokens per sample, the same K
for every sample of a batch, chosen by ``ids_keep [B, K]``. A strategy says what K is for N
tokens and draws ``ids_keep`` from a ``torch.Generator``, so that the trainer, seeding one
generator by (seed, step), gets the same tokens again on a resume:

* :class:`RandomTokens` (MaskDiT, MicroDiT, MDT, SPRINT "random"): per sample, argsort of N
  uniform numbers, the first K kept; K = int(N * (1 - ratio)) in Python float arithmetic, as
  the published code computes it.
* :class:`RoutedTokens` (TREAD): ``ratio`` is the fraction that bypasses the routed blocks (its rate);
  K = N - int(N * rate) (so N = 64, 0.3 keeps 45 where RandomTokens keeps 44). The same draw.
* :class:`StructuredTokens` (SPRINT "structured with random offset"): the square token grid in
  g x g groups, s positions kept per group (top-s of uniform noise, per group and sample); ids in
  group-raster order, within a group in top-s order. K = (N / g^2) * s. SPRINT's table of ratios:
  0.5 -> g 2, s 2; 0.625 -> g 4, s 6; 0.75 -> g 2, s 1; 0.875 -> g 4, s 2.
* :class:`RandomRatioTokens` (MDT): the drop ratio itself drawn per batch from U[lo, hi] (one draw
  for the batch, so K stays the same for every sample), then as RandomTokens.

Equivalent PyTorch code throughout; no kernel is involved (the draws are tiny next to a step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks
from .tokens import num_kept

#: SPRINT's structured masks: drop ratio -> (group size g, kept per group s)
STRUCTURED = {0.5: (2, 2), 0.625: (4, 6), 0.75: (2, 1), 0.875: (4, 2)}


class TokenStrategy:
    """How ``ids_keep`` is chosen (see the module docstring). Subclasses define :meth:`num_kept`
    and :meth:`draw`; ``keeps_all(N)`` is True when nothing is dropped (ids_keep is then None)."""

    def num_kept(self, num_tokens: int) -> int:
        raise NotImplementedError

    def draw(self, batch: int, num_tokens: int, *, generator: torch.Generator | None = None,
             device=None) -> Tensor | None:
        """``ids_keep [batch, K]`` (int64), or None when every token is kept."""
        raise NotImplementedError

    def keeps_all(self, num_tokens: int) -> bool:
        return self.num_kept(num_tokens) == num_tokens


def _device(generator, device):
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    return torch.device(device)


@dataclass(frozen=True)
class RandomTokens(TokenStrategy):
    """Per-sample random subset; ``ratio`` is the fraction dropped, in [0, 1). The draw is
    MaskDiT's (:func:`fastmask.ops.random_mask`): argsort of N uniform numbers, the first K kept."""

    ratio: float

    def __post_init__(self):
        checks.mask_ratio(self.ratio)

    def num_kept(self, num_tokens: int) -> int:
        return num_kept(num_tokens, self.ratio)

    def draw(self, batch, num_tokens, *, generator=None, device=None):
        K = self.num_kept(num_tokens)
        if K == num_tokens:
            return None
        noise = torch.rand(batch, num_tokens, generator=generator, device=_device(generator, device))
        return torch.argsort(noise, dim=1)[:, :K].contiguous()


@dataclass(frozen=True)
class RoutedTokens(RandomTokens):
    """TREAD's routing: ``ratio`` is the fraction of tokens that bypasses the routed blocks (its
    ``rate``), so K = N - int(N * ratio); drawn as :class:`RandomTokens`."""

    def num_kept(self, num_tokens: int) -> int:
        checks.integer("num_tokens", num_tokens, 1)
        return num_tokens - int(num_tokens * self.ratio)


@dataclass(frozen=True)
class StructuredTokens(TokenStrategy):
    """SPRINT's structured mask with a random offset: ``ratio`` one of :data:`STRUCTURED`."""

    ratio: float

    def __post_init__(self):
        if self.ratio not in STRUCTURED:
            raise ValueError(f"ratio: the structured mask takes one of {sorted(STRUCTURED)}, got {self.ratio!r}")

    def _grid(self, num_tokens: int) -> tuple[int, int, int]:
        g, s = STRUCTURED[self.ratio]
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % g:
            raise ValueError(f"num_tokens: the structured mask needs a square grid whose side is a multiple of "
                             f"{g}, got {num_tokens} tokens")
        return side, g, s

    def num_kept(self, num_tokens: int) -> int:
        side, g, s = self._grid(num_tokens)
        return (num_tokens // (g * g)) * s

    def draw(self, batch, num_tokens, *, generator=None, device=None):
        side, g, s = self._grid(num_tokens)
        dev = _device(generator, device)
        groups = side // g
        noise = torch.rand(batch, groups * groups, g * g, generator=generator, device=dev)
        pick = noise.topk(s, dim=2).indices  # [B, G, s]: positions inside each group, top-s order
        gy = torch.arange(groups, device=dev).repeat_interleave(groups)  # group row, raster order
        gx = torch.arange(groups, device=dev).repeat(groups)
        row = gy[None, :, None] * g + pick // g
        col = gx[None, :, None] * g + pick % g
        return (row * side + col).reshape(batch, -1)


@dataclass(frozen=True)
class RandomRatioTokens(TokenStrategy):
    """MDT's ratio drawn per batch from U[lo, hi]; K then as :class:`RandomTokens` (int(N (1 - r)))."""

    lo: float
    hi: float

    def __post_init__(self):
        checks.mask_ratio(self.lo)
        checks.mask_ratio(self.hi)
        if self.hi < self.lo:
            raise ValueError(f"hi: expected hi >= lo, got lo={self.lo}, hi={self.hi}")

    def num_kept(self, num_tokens: int) -> int:
        raise ValueError("RandomRatioTokens: K is drawn with each batch; see draw()")

    def keeps_all(self, num_tokens: int) -> bool:
        return self.hi == 0

    def draw(self, batch, num_tokens, *, generator=None, device=None):
        dev = _device(generator, device)
        u = torch.rand((), generator=generator, device=dev).item()  # the one host read: K is a shape
        ratio = self.lo + (self.hi - self.lo) * u
        return RandomTokens(ratio).draw(batch, num_tokens, generator=generator, device=dev)


def as_strategy(mask_ratio) -> TokenStrategy:
    """A :class:`TokenStrategy` as given, or :class:`RandomTokens` of a drop ratio (MaskDiT's masks):
    every ``mask_ratio`` argument of the models and losses takes either."""
    if isinstance(mask_ratio, TokenStrategy):
        return mask_ratio
    return RandomTokens(checks.mask_ratio(mask_ratio))

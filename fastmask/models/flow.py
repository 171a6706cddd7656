"""Flow matching beside EDM: :class:`FlowPrecond` makes a DiT/MaskDiT a velocity field v(x, t)
with SiT's linear interpolant (willisma/SiT, transport/path.py "Linear"), and gives it the
training loss that :class:`~fastmask.models.edm.EDMPrecond` gives an EDM denoiser, with the same
``loss`` / ``loss_given`` signatures and returns, so that the trainer treats both alike.

Convention (SiT's): t = 0 is noise, t = 1 is data; x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I) and
x1 the data; the target velocity is u = x1 - x0; t is fed to the time embedding as it is (no
x1000, no log); t ~ U[0, 1] by default, or logit-normal (t = sigmoid(m + s n), n ~ N(0, 1)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..ops import checks
from .dit import patchify, unpatchify

T_DISTS = ("uniform", "logit-normal")


def draw_t(
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
    dist: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """The training times [batch] in [0, 1]: U[0, 1) (one rand draw) or logit-normal
    sigmoid(mean + std n) (one randn draw)."""
    if dist == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if dist == "logit-normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean)
    raise ValueError(f"dist: expected one of {T_DISTS}, got {dist!r}")


class FlowPrecond(nn.Module):
    """v(x, t, label) = F(x, t, label): the wrapped network predicts the velocity directly.

    The network is stored as ``self.model`` (state-dict keys ``model.``, as EDMPrecond's), so a
    fastmask checkpoint of either objective has the same layout; ``objective`` says which.
    ``t_dist`` ("uniform" or "logit-normal", with ``t_mean`` / ``t_std``) is the training
    distribution of t. ``guide_channels``: how many leading channels classifier-free guidance
    acts on (None: all; 3 for a published SiT, whose code guides channels 0-2 only).

    The MAE term (MaskDiT, on the dropped tokens) is taken in the space of the network's input:
    the prediction F at a dropped token is compared with that token of x_t, normalised per
    token (zero mean, unit variance), as MaskDiT's MAE reconstructs its noisy input x + sigma n.
    Why this space: x_t is what the encoder saw at the kept tokens, so the task is the same
    inpainting MaskDiT's decoder learns; the normalised target has unit scale at every t, like
    the velocity (variance 1 + var(x1)), so one output head serves both terms without a t-dependent
    weight; and it is defined at t = 0 and t = 1, where a clean-data target x1 = x_t + (1 - t) v
    would make the term's gradient vanish (t -> 1) or ask for pure noise recovery (t -> 0).
    """

    objective = "flow"

    def __init__(self, model: nn.Module, *, t_dist: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0,
                 guide_channels: int | None = None):
        super().__init__()
        if t_dist not in T_DISTS:
            raise ValueError(f"t_dist: expected one of {T_DISTS}, got {t_dist!r}")
        if not (float(t_std) > 0 and float(t_std) < float("inf")):
            raise ValueError(f"t_std: expected a positive finite number, got {t_std}")
        if guide_channels is not None and not (isinstance(guide_channels, int) and guide_channels >= 1):
            raise ValueError(f"guide_channels: expected None or a positive int, got {guide_channels!r}")
        self.model = model
        self.t_dist, self.t_mean, self.t_std = t_dist, float(t_mean), float(t_std)
        self.guide_channels = guide_channels

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    def draw_level(self, batch: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """The training times [batch] (this wrapper's ``t_dist``)."""
        return draw_t(batch, generator=generator, device=device, dist=self.t_dist, mean=self.t_mean, std=self.t_std)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        *,
        mask_ratio: float = 0.0,
        ids_keep: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The velocity [B, C, H, W] (fp32) at x_t = ``x``; t: [B] or a scalar in [0, 1]."""
        t = _time(t, x)
        F_tokens, _ = self._network(x, t, class_labels, mask_ratio, ids_keep, generator)
        F_img = unpatchify(F_tokens.float(), self.model.patch_size, self.model.out_channels)
        return F_img[:, : x.shape[1]]  # a learned-sigma network (SiT) carries dead variance channels

    def _network(self, x, t, class_labels, mask_ratio, ids_keep, generator, **kw):
        drop = kw.pop("force_drop_ids", None)
        kw = dict(mask_ratio=mask_ratio, ids_keep=ids_keep, generator=generator, **kw)
        if mask_ratio == 0 and ids_keep is None:  # plain DiT takes no masking arguments
            kw = {}
        if drop is not None:
            kw["force_drop_ids"] = drop
        out = self.model.forward_tokens(x, t, class_labels, **kw)
        return out if isinstance(out, tuple) else (out, None)

    def loss(
        self,
        y: Tensor,
        class_labels: Tensor | None = None,
        *,
        mask_ratio: float = 0.5,
        mae_coef: float = 0.1,
        generator: torch.Generator | None = None,
        return_terms: bool = False,
        force_drop_ids: Tensor | None = None,
    ):
        """The flow-matching objective for data y = x1 [B, C, H, W]: per-sample loss [B].

        Draws from ``generator`` in this order (as EDMPrecond.loss): t, noise x0, mask. Labels as
        in :meth:`EDMPrecond.loss`. With ``return_terms`` returns (loss, fm, mae)."""
        B = y.shape[0]
        t = self.draw_level(B, generator=generator, device=y.device)
        noise = torch.randn(y.shape, device=y.device, generator=generator)
        ids_keep = None
        if mask_ratio and ops.num_kept(self.model.num_patches, mask_ratio) < self.model.num_patches:
            ids_keep = ops.random_mask(B, self.model.num_patches, mask_ratio, generator=generator, device=y.device)[0]
        loss, fm, mae = self.loss_given(
            y, class_labels, t, noise, ids_keep, mae_coef=mae_coef, force_drop_ids=force_drop_ids, check_ids=False,
            check_sigma=False,  # t drawn here: in [0, 1], and checking would sync with the device
        )
        return (loss, fm, mae) if return_terms else loss

    def loss_given(
        self,
        y: Tensor,
        class_labels: Tensor | None,
        t: Tensor,
        noise: Tensor,
        ids_keep: Tensor | None,
        *,
        mae_coef: float = 0.1,
        force_drop_ids: Tensor | None = None,
        check_ids: bool = True,
        check_sigma: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The objective with every random draw given: t [B] in [0, 1], noise x0 [B, C, H, W],
        ids_keep [B, K] or None, and optionally ``force_drop_ids`` [B]. Returns (loss, fm, mae),
        each [B]: fm the velocity loss on kept tokens, mae the MAE term on dropped ones (0
        without dropping). Computed by the fused op :func:`fastmask.ops.flow_mae_loss`.
        ``check_sigma=False`` (named as EDMPrecond's, so the trainer calls both alike) skips the
        range check of t, a device sync, for times the caller drew; ``check_ids`` as EDMPrecond's."""
        if y.dim() != 4 or y.shape[0] == 0:
            raise ValueError(f"y: expected a non-empty batch [B, C, H, W], got shape {tuple(y.shape)}")
        if ids_keep is not None and check_ids:
            checks.ids("ids_keep", ids_keep, y.shape[0], self.model.num_patches)
        checks.tensor("noise", noise, shape=tuple(y.shape))
        t = _time(t, y, check=check_sigma)
        tv = t.view(-1, 1, 1, 1)
        x1, x0 = y.float(), noise.float()
        x_t = tv * x1 + (1 - tv) * x0
        kw = {} if ids_keep is None else {"check_ids": False}  # checked above
        if force_drop_ids is not None:
            kw["force_drop_ids"] = force_drop_ids
        F_tokens, mask = self._network(x_t.to(y.dtype), t, class_labels, 0.0, ids_keep, None, **kw)
        p = self.model.patch_size
        C = y.shape[1]
        if F_tokens.shape[-1] != p * p * C:  # learned-sigma network: keep the velocity channels
            F_tokens = F_tokens.unflatten(-1, (p * p, -1))[..., :C].flatten(-2)
        return ops.flow_mae_loss(
            F_tokens, patchify(x_t, p), patchify(x1 - x0, p), mask, mae_coef=mae_coef, return_terms=True,
            check_values=False,  # the mask comes from ids the model checked (or the caller trusts)
        )


def _time(t, x: Tensor, check: bool = True) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected a scalar or shape [{x.shape[0]}], got {tuple(t.shape)}")
    if check and checks.value_checks_enabled() and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))].flatten()[0].item()  # NaN fails both comparisons
        raise ValueError(f"t: expected times in [0, 1], found {bad}")
    return t

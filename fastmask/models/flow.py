"""SiT's flow-matching objective beside EDM: :class:`FlowPrecond` makes a DiT/MaskDiT a
velocity field v(x_t, t), with a ``loss`` / ``loss_given`` pair shaped like
:class:`fastmask.models.edm.EDMPrecond`'s so that the trainer treats both alike.

Conventions (SiT, willisma/SiT transport/path.py ICPlan "Linear", velocity prediction):
t = 0 is noise, t = 1 is data; x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I) and x1 the clean
latent; the target is u = x1 - x0; t ~ U[0, 1] (SiT forces train_eps = 0 for Linear +
velocity), or logit-normal (sigmoid of N(mean, std^2)) as an option. The network sees x_t
and t itself (no preconditioning: t in [0, 1] goes straight into the time embedding).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..ops import checks
from .dit import patchify, unpatchify
from .edm import Preconditioner

T_SCHEDULES = ("uniform", "logit_normal")


def draw_t(
    batch: int,
    *,
    schedule: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """The training times [batch] in [0, 1]: ``uniform`` (one rand draw, SiT) or
    ``logit_normal`` (one randn draw: sigmoid(mean + std * n))."""
    if schedule == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if schedule == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean)
    raise ValueError(f"schedule: expected one of {T_SCHEDULES}, got {schedule!r}")


class FlowPrecond(Preconditioner):
    """v(x_t, t, label) = F(x_t, t, label)[:C], F the wrapped network (``self.model``, so state
    keys carry the ``model.`` prefix like EDMPrecond's). ``t_schedule`` picks the training
    distribution of t (see :func:`draw_t`). ``guide_channels``: the channels classifier-free
    guidance acts on when sampling (None: all; 3 for a published SiT, as its code does)."""

    objective = "flow"  # what the samplers dispatch on
    guide_channels: int | None = None

    def __init__(self, model: nn.Module, t_schedule: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0):
        super().__init__()
        if t_schedule not in T_SCHEDULES:
            raise ValueError(f"t_schedule: expected one of {T_SCHEDULES}, got {t_schedule!r}")
        std = float(t_std)
        if not (std > 0 and std < float("inf")):
            raise ValueError(f"t_std: expected a positive finite number, got {t_std}")
        mean = float(t_mean)
        if not abs(mean) < float("inf"):
            raise ValueError(f"t_mean: expected a finite number, got {t_mean}")
        self.model = model
        self.t_schedule, self.t_mean, self.t_std = t_schedule, mean, std

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
        """Velocity [B, C, H, W] (fp32) at x_t. t: [B] or a scalar in [0, 1]."""
        t = _t(t, x)
        F_tokens, _ = self._network(x, t, class_labels, mask_ratio, ids_keep, generator)
        F_img = unpatchify(F_tokens.float(), self.model.patch_size, self.model.out_channels)
        return F_img[:, : x.shape[1]]  # a learned-sigma network (SiT) carries a dead half

    def _network(self, x, t, class_labels, mask_ratio, ids_keep, generator, **kw):
        return self._forward_tokens(x, t, class_labels, mask_ratio, ids_keep, generator, **kw)

    def draw_t(self, batch: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        return draw_t(batch, schedule=self.t_schedule, mean=self.t_mean, std=self.t_std, generator=generator, device=device)

    draw_level = draw_t  # what Preconditioner.loss draws first (t for flow, as sigma for EDM)

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
        path_drop: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The objective with every draw given: t [B] in [0, 1], noise x0 [B, C, H, W],
        ids_keep [B, K] or None, ``force_drop_ids`` [B], a SPRINT's path-drop flags
        ``path_drop`` [B] (None: the network draws its own in train mode). Returns (loss, fm, mae), each [B]:
        fm = mean over kept tokens of mean_p (v - (x1 - x0))^2 (SiT's loss on every token when
        nothing is dropped), mae as below; loss = fm + mae_coef * mae (fused op, one pass).

        The MAE term (dropped tokens, MaskDiT only) regresses the network output onto x_t
        normalised per token (zero mean, unit unbiased variance), the space MaskDiT's MAE uses
        (its x_noisy) carried over unchanged: x_t is the input the model sees at the kept
        tokens, so the term still asks the decoder to fill in what the encoder never saw;
        the per-token normalisation keeps its scale 1 at every t, so ``mae_coef`` keeps the
        balance it has under EDM. The velocity x1 - x0 at dropped tokens would instead ask the
        model to predict unseen noise (x0 is independent per token): an irreducible loss of
        the order of the velocity loss itself, which MaskDiT avoids for DSM the same way.

        ``check_ids`` / ``check_sigma`` validate the given ids and times t (device syncs; named as
        EDMPrecond's); the
        trainer's own draws skip them."""
        self._check_given(y, noise, ids_keep, check_ids)
        t = _t(t, y, check_values=check_sigma)
        tv = t.view(-1, 1, 1, 1)
        x1, x0 = y.float(), noise.float()
        x_t = tv * x1 + (1 - tv) * x0
        F_tokens, mask = self._mean_tokens(x_t.to(y.dtype), t, class_labels, ids_keep, force_drop_ids, y.shape[1],
                                           path_drop)
        p = self.model.patch_size
        return ops.dsm_mae_loss(
            F_tokens,
            patchify(x_t, p),
            patchify(x1 - x0, p),
            t,
            mask,
            mae_coef=mae_coef,
            return_terms=True,
            check_values=False,
            objective="flow",
        )


def _t(t, x: Tensor, check_values: bool = True) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected a scalar or shape [{x.shape[0]}], got {tuple(t.shape)}")
    if check_values and checks.value_checks_enabled() and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError("t: every time must lie in [0, 1] (0 = noise, 1 = data), without NaN")
    return t

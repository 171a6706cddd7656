"""Preconditioners that make a DiT/MaskDiT a denoiser D(x; sigma), side by side as in EDM
(Karras et al. 2022): :class:`EDMPrecond` (with the MaskDiT training loss) and
:class:`DDPMDenoiser` (a VP / DDPM eps-prediction network, e.g. a published DiT); the EDM
coefficients and the training distribution of sigma."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..ops import checks
from .dit import patchify, unpatchify

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5


def edm_coefficients(sigma: Tensor, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning: (c_skip, c_out, c_in, c_noise, lambda) for sigma [B]; lambda is
    the loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    s2 = sigma * sigma
    d2 = sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + d2)
    c_in = 1.0 / torch.sqrt(s2 + d2)
    c_noise = torch.log(sigma) / 4
    weight = (s2 + d2) / (sigma * sigma_data) ** 2
    return c_skip, c_out, c_in, c_noise, weight


def draw_sigma(batch: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
    """The training noise levels [batch]: ln(sigma) ~ N(P_MEAN, P_STD^2) (one randn draw)."""
    return (torch.randn(batch, generator=generator, device=device) * P_STD + P_MEAN).exp()


class Preconditioner(nn.Module):
    """What the objective wrappers (:class:`EDMPrecond`, :class:`fastmask.models.flow.FlowPrecond`)
    share: the wrapped network as ``self.model`` (state-dict keys with the ``model.`` prefix of the
    published checkpoints), the call of its token forward, and :meth:`loss`, which draws the noise
    level, the noise and the kept tokens and hands them to the subclass's ``loss_given``."""

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    def _forward_tokens(self, xin, level, class_labels, mask_ratio, ids_keep, generator, **kw):
        """The network's output tokens (and mask) on input ``xin`` at noise input ``level``."""
        drop = kw.pop("force_drop_ids", None)
        path_drop = kw.pop("path_drop", None)
        kw = dict(mask_ratio=mask_ratio, ids_keep=ids_keep, generator=generator, **kw)
        if mask_ratio == 0 and ids_keep is None:  # plain DiT takes no masking arguments
            kw = {}
        if drop is not None:
            kw["force_drop_ids"] = drop
        if path_drop is not None:  # SPRINT's path-drop flags (only a SPRINT is given them)
            kw["path_drop"] = path_drop
        out = self.model.forward_tokens(xin, level, class_labels, **kw)
        return out if isinstance(out, tuple) else (out, None)

    def draw_level(self, batch: int, *, generator=None, device=None) -> Tensor:
        """The training noise levels [batch] (sigma for EDM, t for flow matching)."""
        raise NotImplementedError

    def token_strategy(self, mask_ratio) -> "ops.TokenStrategy":
        """The tokens kept at ``mask_ratio``: the network's own strategy where it has one (TREAD:
        :class:`fastmask.ops.RoutedTokens`, its K rounding), else MaskDiT's random tokens."""
        own = getattr(self.model, "token_strategy", None)
        return own(mask_ratio) if own is not None else ops.as_strategy(mask_ratio)

    @property
    def path_drop_prob(self) -> float:
        """The training probability that a sample's deep path is dropped: the network's own
        (SPRINT's ``path_drop_prob``), else 0 (the trainer then draws no path-drop flags)."""
        return float(getattr(self.model, "path_drop_prob", 0.0) or 0.0)

    def _check_given(self, y: Tensor, noise: Tensor, ids_keep: Tensor | None, check_ids: bool) -> None:
        """loss_given's structural checks (and, with ``check_ids``, the ids' values: a sync)."""
        if y.dim() != 4 or y.shape[0] == 0:
            raise ValueError(f"y: expected a non-empty batch [B, C, H, W], got shape {tuple(y.shape)}")
        if ids_keep is not None and check_ids:
            checks.ids("ids_keep", ids_keep, y.shape[0], self.model.num_patches)
        checks.tensor("noise", noise, shape=tuple(y.shape))

    def _mean_tokens(self, xin, level, class_labels, ids_keep, force_drop_ids, channels: int, path_drop=None):
        """The network's output tokens on the kept ``ids_keep`` (checked already) and the mask;
        of a learned-sigma network, the mean channels only. ``path_drop`` [B]: SPRINT's flags."""
        kw = {} if ids_keep is None else {"check_ids": False}
        if force_drop_ids is not None:
            kw["force_drop_ids"] = force_drop_ids
        if path_drop is not None:
            kw["path_drop"] = path_drop
        F_tokens, mask = self._network(xin, level, class_labels, 0.0, ids_keep, None, **kw)
        p = self.model.patch_size
        if F_tokens.shape[-1] != p * p * channels:  # learned sigma (DiT, SiT): keep the mean channels
            F_tokens = F_tokens.unflatten(-1, (p * p, -1))[..., :channels].flatten(-2)
        return F_tokens, mask

    def loss(
        self,
        y: Tensor,
        class_labels: Tensor | None = None,
        *,
        mask_ratio: "float | ops.TokenStrategy" = 0.5,
        mae_coef: float = 0.1,
        generator: torch.Generator | None = None,
        return_terms: bool = False,
        force_drop_ids: Tensor | None = None,
    ):
        """The objective for clean data y [B, C, H, W]: per-sample loss [B] (with
        ``return_terms``, ``(loss, denoising term, mae)``); see the subclass's ``loss_given``.

        Draws from ``generator`` in this order: the noise level (:meth:`draw_level`), the noise,
        the kept tokens (``mask_ratio``: a ratio, MaskDiT's random masks, or any
        :class:`fastmask.ops.TokenStrategy`). No value drawn here is checked or read back to the
        host. Labels are dropped where ``force_drop_ids`` is set; without it, in train mode, a
        DiT drops them with its ``class_dropout_prob`` and a MaskDiT drops none (as in the
        published code, the caller's training loop drops MaskDiT's labels).
        """
        B = y.shape[0]
        level = self.draw_level(B, generator=generator, device=y.device)
        noise = torch.randn(y.shape, device=y.device, generator=generator)
        ids_keep = None
        tokens, N = self.token_strategy(mask_ratio), self.model.num_patches
        if not tokens.keeps_all(N):
            ids_keep = tokens.draw(B, N, generator=generator, device=y.device)
        terms = self.loss_given(
            y, class_labels, level, noise, ids_keep, mae_coef=mae_coef, force_drop_ids=force_drop_ids, check_ids=False,
            check_sigma=False,  # drawn here: finite and in range, and checking would sync with the device
        )
        return terms if return_terms else terms[0]


class EDMPrecond(Preconditioner):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, label), F the wrapped network.

    The wrapped network is stored as ``self.model`` so that state-dict keys carry the
    ``model.`` prefix of the published MaskDiT checkpoints.
    """

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        sd = float(sigma_data)
        if not (sd > 0 and sd < float("inf")):
            raise ValueError(f"sigma_data: expected a positive finite number, got {sigma_data}")
        self.model = model
        self.sigma_data = sd

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        class_labels: Tensor | None = None,
        *,
        mask_ratio: float = 0.0,
        ids_keep: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Denoised image D [B, C, H, W] (fp32). sigma: [B] or a scalar. ``class_labels=None``
        is unconditional; ``mask_ratio`` masks only in train mode, ``ids_keep`` in any mode."""
        sigma = _sigma(sigma, x)
        F_tokens, _ = self._network(x, sigma, class_labels, mask_ratio, ids_keep, generator)
        c_skip, c_out, _, _, _ = edm_coefficients(sigma, self.sigma_data)
        F_img = unpatchify(F_tokens.float(), self.model.patch_size, self.model.out_channels)
        C = x.shape[1]
        F_img = F_img[:, :C]  # a learned-sigma DiT carries variance channels: EDM uses the mean
        return c_skip.view(-1, 1, 1, 1) * x.float() + c_out.view(-1, 1, 1, 1) * F_img

    def _network(self, x, sigma, class_labels, mask_ratio, ids_keep, generator, **kw):
        _, _, c_in, c_noise, _ = edm_coefficients(sigma, self.sigma_data)
        xin = (c_in.view(-1, 1, 1, 1) * x.float()).to(x.dtype)
        return self._forward_tokens(xin, c_noise, class_labels, mask_ratio, ids_keep, generator, **kw)

    def draw_level(self, batch: int, *, generator=None, device=None) -> Tensor:
        """ln(sigma) ~ N(P_mean, P_std^2) (:func:`draw_sigma`)."""
        return draw_sigma(batch, generator=generator, device=device)

    def loss_given(
        self,
        y: Tensor,
        class_labels: Tensor | None,
        sigma: Tensor,
        noise: Tensor,
        ids_keep: Tensor | None,
        *,
        mae_coef: float = 0.1,
        force_drop_ids: Tensor | None = None,
        check_ids: bool = True,
        check_sigma: bool = True,
        path_drop: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The MaskDiT objective with every random draw given: sigma [B], noise [B, C, H, W]
        (unit variance), ids_keep [B, K] or None, and optionally the label-drop flags
        ``force_drop_ids`` [B] and a SPRINT's path-drop flags ``path_drop`` [B] (None: the
        network draws its own in train mode). x_noisy = y + sigma * noise; the network sees x_noisy with only the
        kept tokens; DSM on the kept tokens + mae_coef * MAE on the dropped ones, in token space,
        by the fused op :func:`fastmask.ops.dsm_mae_loss`. Returns (loss, dsm, mae), each [B].
        (:meth:`loss` draws them: ln(sigma) ~ N(P_mean, P_std^2).)

        ``ids_keep`` must hold distinct ids in [0, N) per sample; ``check_ids=False`` skips that
        check (a device sync), for ids made by :func:`fastmask.ops.random_mask`; ``check_sigma=False``
        likewise skips checking that sigma is finite and positive, for sigmas drawn by the caller. With
        both off (as :meth:`loss` and the trainer call it) the loss makes no host sync."""
        self._check_given(y, noise, ids_keep, check_ids)
        sigma = _sigma(sigma, y, check=check_sigma)
        x_noisy = y.float() + noise.float() * sigma.view(-1, 1, 1, 1)
        F_tokens, mask = self._mean_tokens(
            x_noisy.to(y.dtype), sigma, class_labels, ids_keep, force_drop_ids, y.shape[1], path_drop
        )
        p = self.model.patch_size
        return ops.dsm_mae_loss(
            F_tokens,
            patchify(x_noisy, p),
            patchify(y.float(), p),
            sigma,
            mask,
            mae_coef=mae_coef,
            sigma_data=self.sigma_data,
            return_terms=True,
            check_values=False,  # the caller's sigma is trusted: a sync per step costs too much
        )


def _sigma(sigma, x: Tensor, check: bool = True) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma: expected a scalar or shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    if check:  # a user's sigma: NaN, inf or <= 0 would give NaN outputs without a word (a device sync)
        checks.sigmas("sigma", sigma)
    return sigma


class DDPMDenoiser(nn.Module):
    """A DDPM eps-prediction network (published DiT checkpoints: 1000 steps, linear betas
    1e-4 .. 0.02) seen as an EDM denoiser D(x; sigma), as in the EDM paper's VP wrapping:
    sigma(t) = sqrt(1 / alpha_bar(t) - 1); the network sees x / sqrt(1 + sigma^2) at the
    (fractional) timestep t whose sigma(t) is sigma; D = x - sigma * eps (mean channels only)."""

    def __init__(self, model, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.model = model
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - betas, 0)
        self.register_buffer("log_sigmas", (1 / alpha_bar - 1).sqrt().log().float(), persistent=False)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())

    def timestep(self, sigma: Tensor) -> Tensor:
        """The fractional DDPM timestep of sigma (linear interpolation in log sigma)."""
        ls = sigma.float().clamp(self.sigma_min, self.sigma_max).log()
        hi = torch.searchsorted(self.log_sigmas, ls.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo = hi - 1
        w = (ls - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo.float() + w.clamp(0, 1)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        c_in = (1 + sigma**2).rsqrt().view(-1, 1, 1, 1)
        out = self.model(c_in * x, self.timestep(sigma), class_labels)
        eps = out[:, : x.shape[1]].float()
        return x.float() - sigma.view(-1, 1, 1, 1) * eps

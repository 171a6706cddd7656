"""Samplers for flow-matching models (SiT's conventions, :class:`fastmask.models.FlowPrecond`):
integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

- ``euler`` / ``heun``: fixed grid t_i = i / steps, i = 0 .. steps (Heun: 2 network calls a
  step, the explicit trapezoid; ``steps`` = 125 is SiT's 250-NFE setting).
- ``dopri5``: adaptive Dormand-Prince through torchdiffeq (an optional extra: ``pip install
  torchdiffeq``; SiT's default, atol 1e-6 / rtol 1e-3); its cost is not fixed: 6 calls per
  accepted step plus rejected ones.
- ``sde``: Euler-Maruyama with SiT's drift v + w(t) s and noise sqrt(2 w(t) dt) z, score
  s = (t v - x) / (1 - t), w(t) = 1 - t ("sigma", SiT's command-line default) or (1 - t) / t
  ("SBDM"), on linspace(0, 1 - last_step, steps) and then a drift-only ("Mean") last step of
  ``last_step`` (0.04); steps - 1 + 1 network calls.

Classifier-free guidance: g = u + s (c - u) on the first ``guide_channels`` channels (SiT and
DiT guide channels 0-2 only; the other channels keep the conditional prediction), all channels
when None; ``interval`` = (lo, hi) guides only for t in [lo, hi]. ``path_drop_guidance``
(SPRINT's PDG): the unconditional branch is the null label with the deep path dropped
(:func:`guidance_context`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

METHODS = ("euler", "heun", "dopri5", "sde")


def null_labels(labels: Tensor) -> Tensor:
    if labels.dim() == 2:
        return torch.zeros_like(labels)
    return torch.full_like(labels, -1)


def guidance_context(net, path_drop_guidance: bool):
    """What the doubled guidance call runs inside: with ``path_drop_guidance``, the wrapped
    model's :meth:`~fastmask.models.SPRINT.path_drop_guidance` (its batch read as [cond; uncond]
    halves, the second half's deep path dropped); else nothing. A model without a deep path to
    drop is refused."""
    if not path_drop_guidance:
        return contextlib.nullcontext()
    model = getattr(net, "model", net)
    if not hasattr(model, "path_drop_guidance"):
        raise ValueError(f"path_drop_guidance: {type(model).__name__} has no deep path to drop "
                         "(Path-Drop Guidance needs a SPRINT model)")
    return model.path_drop_guidance()


def guided_velocity(net, guidance: float = 1.0, *, guide_channels: int | None = None,
                    interval: tuple[float, float] | None = None, path_drop_guidance: bool = False):
    """v(x, t [B], labels) with classifier-free guidance (see the module docstring)."""
    if guide_channels is not None and guide_channels < 1:
        raise ValueError(f"guide_channels: expected a positive channel count or None, got {guide_channels}")
    if interval is not None and not (0.0 <= interval[0] <= interval[1] <= 1.0):
        raise ValueError(f"interval: expected 0 <= lo <= hi <= 1, got {interval}")
    guidance_context(net, path_drop_guidance)  # refuses a model without a deep path now, not at the first guided step

    def velocity(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None or guidance == 1.0:
            return net(x, t, labels).float()
        if interval is not None:
            tt = float(t[0])  # the grid's t (a host value on the fixed grids)
            if not (interval[0] <= tt <= interval[1]):
                return net(x, t, labels).float()
        with guidance_context(net, path_drop_guidance):  # only the doubled batch is split in halves
            both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels(labels)])).float()
        cond, uncond = both.chunk(2)
        k = cond.shape[1] if guide_channels is None else min(guide_channels, cond.shape[1])
        g = uncond[:, :k] + guidance * (cond[:, :k] - uncond[:, :k])
        return torch.cat([g, cond[:, k:]], 1)

    return velocity


@torch.no_grad()
def flow_sample(
    net,
    noise: Tensor,
    labels: Tensor | None = None,
    *,
    method: str = "heun",
    steps: int = 50,
    guidance: float = 1.0,
    guide_channels: int | None = None,
    interval: tuple[float, float] | None = None,
    diffusion: str = "sigma",
    last_step: float = 0.04,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    generator: torch.Generator | None = None,
    amp: bool = False,
    path_drop_guidance: bool = False,
) -> Tensor:
    """Samples x(1) [B, C, H, W] (fp32) from ``noise`` = x(0)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps: expected at least 1 sampling step, got {steps}")
    v = guided_velocity(net, guidance, guide_channels=guide_channels, interval=interval,
                        path_drop_guidance=path_drop_guidance)
    B = noise.shape[0]
    x = noise.float()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        if method in ("euler", "heun"):
            ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
            for t0, t1 in zip(ts[:-1], ts[1:]):
                h = t1 - t0
                d0 = v(x, _full(B, t0, x), labels)
                x_next = x + h * d0
                if method == "heun":
                    d1 = v(x_next, _full(B, t1, x), labels)
                    x_next = x + h * 0.5 * (d0 + d1)
                x = x_next
            return x
        if method == "dopri5":
            try:
                from torchdiffeq import odeint
            except ImportError:
                raise ValueError("method: dopri5 needs the optional torchdiffeq package (pip install torchdiffeq); "
                                 "use heun or euler") from None
            grid = torch.linspace(0.0, 1.0, 2, device=x.device)
            out = odeint(lambda t, y: v(y, t.expand(B).float(), labels), x, grid, method="dopri5", atol=atol, rtol=rtol)
            return out[-1]
        # SDE: Euler-Maruyama on linspace(0, 1 - last_step, steps), then a drift-only step
        if diffusion not in ("sigma", "SBDM"):
            raise ValueError(f"diffusion: expected sigma or SBDM, got {diffusion!r}")
        if not 0.0 < last_step < 1.0:
            raise ValueError(f"last_step: expected a value in (0, 1), got {last_step}")
        if steps < 2:
            raise ValueError(f"steps: the SDE sampler needs at least 2 grid points, got {steps}")
        ts = torch.linspace(0.0, 1.0 - last_step, steps, dtype=torch.float64).tolist()
        if diffusion == "SBDM":  # w = (1 - t) / t is infinite at 0: SiT starts at a small eps
            ts = torch.linspace(1e-3, 1.0 - last_step, steps, dtype=torch.float64).tolist()

        def drift(x, t):
            tt = _full(B, t, x)
            vel = v(x, tt, labels)
            score = (t * vel - x) / (1.0 - t)
            w = (1.0 - t) if diffusion == "sigma" else (1.0 - t) / t
            return vel + w * score, w

        for t0, t1 in zip(ts[:-1], ts[1:]):
            dt = t1 - t0
            dr, w = drift(x, t0)
            z = torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device)
            x = x + dr * dt + (2.0 * w * dt) ** 0.5 * z.to(x.device)
        dr, _ = drift(x, ts[-1])
        return x + dr * last_step


def _full(B: int, t: float, like: Tensor) -> Tensor:
    return torch.full((B,), float(t), dtype=torch.float32, device=like.device)

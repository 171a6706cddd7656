"""EDM Heun sampler, classifier-free guidance, model loading for `fastmask sample`."""
import math

import pytest
import torch

from fastmask.models import EDMPrecond, dit, maskdit
from fastmask.sampling import (
    DDPMDenoiser,
    edm_sigmas,
    guided_denoiser,
    heun_sample,
    load_model,
    null_labels,
    sample,
    save_grid,
)


def test_edm_sigmas_formula():
    t = edm_sigmas(18)
    assert t.shape == (19,) and t[-1] == 0
    assert math.isclose(t[0].item(), 80.0, rel_tol=1e-12) and math.isclose(t[17].item(), 0.002, rel_tol=1e-9)
    assert bool((t[1:] < t[:-1]).all())
    i = 5
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(t[i].item(), want, rel_tol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        edm_sigmas(0)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data ~ N(0, s^2 I): D(x, sigma) = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x, sigma, labels=None):
        s2 = self.s**2
        return x * (s2 / (s2 + sigma.view(-1, 1, 1, 1) ** 2))


def test_heun_solves_the_probability_flow_ode():
    # For Gaussian data the ODE solution is x(sigma) = x(T) sqrt(s^2 + sigma^2) / sqrt(s^2 + T^2);
    # Heun is second order: the error falls like 1 / steps^2.
    s = 0.5
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = noise * 80 * s / math.sqrt(s**2 + 80**2)

    def err(steps):
        out = heun_sample(GaussianDenoiser(s), noise, steps=steps)
        return ((out - exact).abs().max() / exact.abs().max()).item()

    e18, e40, e100 = err(18), err(40), err(100)
    assert e18 < 0.06 and e100 < 2e-3
    assert e40 / e100 > 4.5  # (100 / 40)^2 = 6.25 for a second-order method


class LabelEcho(torch.nn.Module):
    """D = 1 for a real label, 0 for the null label (-1); records batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, labels):
        self.calls.append((x.shape[0], labels.clone()))
        return (labels >= 0).float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_cfg_one_batch_all_channels():
    net = LabelEcho()
    d = guided_denoiser(net, guidance=2.5)
    x = torch.zeros(3, 4, 2, 2)
    out = d(x, torch.ones(3), torch.tensor([0, 1, 2]))
    assert len(net.calls) == 1 and net.calls[0][0] == 6  # cond and null labels in one batch
    assert net.calls[0][1].tolist() == [0, 1, 2, -1, -1, -1]
    torch.testing.assert_close(out, torch.full_like(x, 2.5))  # uncond + 2.5 (cond - uncond) on all 4 channels
    plain = guided_denoiser(LabelEcho(), guidance=1.0)(x, torch.ones(3), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(plain, torch.ones_like(x))


def test_null_labels_one_hot():
    oh = torch.eye(3)
    assert torch.equal(null_labels(oh), torch.zeros(3, 3))
    assert null_labels(torch.tensor([2, 0])).tolist() == [-1, -1]


def _tiny_precond(**kw):
    torch.manual_seed(0)
    return EDMPrecond(maskdit("T/2", input_size=8, in_channels=1, num_classes=3, **kw)).eval()


def test_sample_independent_of_chunking():
    net = _tiny_precond()
    labels = torch.tensor([0, 1, 2, 0, 1])
    a = sample(net, labels, (1, 8, 8), steps=3, guidance=2.0, seed=4, batch_size=5)
    b = sample(net, labels, (1, 8, 8), steps=3, guidance=2.0, seed=4, batch_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()


def test_ddpm_denoiser_timesteps():
    den = DDPMDenoiser(torch.nn.Identity())
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    sig = ((1 - ab) / ab).sqrt()
    t = den.timestep(sig[[0, 10, 500, 999]].float())
    torch.testing.assert_close(t, torch.tensor([0.0, 10.0, 500.0, 999.0]), atol=2e-3, rtol=0)
    assert den.sigma_min < 0.011 and den.sigma_max > 150


def test_load_published_maskdit_and_dit(tmp_path):
    pre = EDMPrecond(maskdit("T/2", input_size=8, in_channels=4, num_classes=3))
    torch.save({"ema": pre.state_dict()}, tmp_path / "maskdit.pt")
    net, info = load_model(tmp_path / "maskdit.pt")
    assert isinstance(net, EDMPrecond) and info["kind"] == "latents" and info["num_classes"] == 3
    for k, v in pre.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    d = dit("T/2", input_size=8, in_channels=4, num_classes=3, learn_sigma=True)
    torch.save(d.state_dict(), tmp_path / "dit.pt")
    den, info = load_model(tmp_path / "dit.pt")
    assert isinstance(den, DDPMDenoiser) and info["parameterization"] == "ddpm"
    x = sample(den, torch.tensor([0, 1]), info["shape"], steps=2, guidance=1.5)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_save_grid(tmp_path):
    from PIL import Image

    save_grid(torch.rand(6, 1, 8, 8) * 2 - 1, tmp_path / "g.png", rows=2, upscale=2)
    im = Image.open(tmp_path / "g.png")
    assert im.size == (3 * 17 + 1, 2 * 17 + 1)

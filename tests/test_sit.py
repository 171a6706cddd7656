"""Released SiT checkpoints (github.com/willisma/SiT) load safely and give the published model's
outputs; the flow samplers (ODE Euler/Heun, SDE, guidance on the first 3 channels, guidance
interval) and ``fastmask sample --preset sit256``.

``PublishedSiT`` below is the published architecture (DiT's network, learn_sigma=True: the
final layer outputs 2C channels and forward returns the first C; t in [0, 1] goes straight
into the 256-dim sinusoidal time embedding; label table with the null row at num_classes),
written here in plain torch from the description in SPEC-ROUTING section 5, so that fastmask's
own implementation is checked against an independent one.
"""
import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fastmask.flow_sampling import flow_sample, guided_velocity
from fastmask.models import DiT, FlowPrecond, from_published, load_published_file
from fastmask.sampling import load_model


class _Block(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H = H
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        B, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = Fn.layer_norm(x, (D,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = self.attn.qkv(h).reshape(B, N, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.H), -1) @ v
        x = x + g1[:, None] * self.attn.proj(a.transpose(1, 2).reshape(B, N, D))
        h = Fn.layer_norm(x, (D,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.mlp.fc2(Fn.gelu(self.mlp.fc1(h), approximate="tanh"))


class PublishedSiT(nn.Module):
    def __init__(self, input_size=8, patch=2, C=4, D=64, depth=2, H=4, num_classes=10):
        super().__init__()
        self.p, self.C, self.num_classes = patch, C, num_classes
        N = (input_size // patch) ** 2
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, N, D) * 0.1, requires_grad=False)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, D)
        self.blocks = nn.ModuleList(_Block(D, H) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(D, patch * patch * 2 * C)  # learn_sigma: 2C channels
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        for prm in self.parameters():  # random, nonzero everywhere (SiT zero-inits the gates)
            nn.init.normal_(prm, std=0.2)

    def forward(self, x, t, y):
        B = x.shape[0]
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        arg = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(arg), torch.sin(arg)], -1))
        c = c + self.y_embedder.embedding_table(y)
        for blk in self.blocks:
            h = blk(h, c)
        D = h.shape[-1]
        sh, sc = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = self.final_layer.linear(Fn.layer_norm(h, (D,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None])
        s, p, C2 = int(h.shape[1] ** 0.5), self.p, 2 * self.C
        img = torch.einsum("nhwpqc->nchpwq", h.reshape(B, s, s, p, p, C2)).reshape(B, C2, s * p, s * p)
        return img[:, : self.C]  # the variance half is dead

    def forward_with_cfg(self, x, t, y, scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        g = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([g, g]), rest], 1)


@pytest.fixture(scope="module")
def sit():
    torch.manual_seed(0)
    return PublishedSiT().eval()


def test_bare_state_dict_loads_and_matches(tmp_path, sit):
    f = tmp_path / "SiT-XL-2-256x256.pt"  # the released name, tiny contents
    torch.save(sit.state_dict(), f)
    with pytest.warns(UserWarning, match="11 rows"):  # no stored arguments: 10 classes + the null row
        net, info = load_model(f)  # no trust flag: a bare state dict is plain tensors
    assert isinstance(net, FlowPrecond) and isinstance(net.model, DiT) and net.guide_channels == 3
    assert info["parameterization"] == "flow" and info["objective"] == "flow" and info["num_classes"] == 10
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.37, 1.0]), torch.tensor([1, 9, 10])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), sit(x, t, y), atol=1e-5, rtol=1e-4)
    # the null label: fastmask's -1 is the published num_classes row
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, torch.tensor([-1, -1, -1])), sit(x, t, torch.tensor([10, 10, 10])),
                                   atol=1e-5, rtol=1e-4)


def test_train_py_checkpoint_loads_the_ema(tmp_path, sit):
    torch.manual_seed(1)
    model, ema = PublishedSiT(D=48, H=6), PublishedSiT(D=48, H=6).eval()  # S width: 6 heads, as args.model says
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0])).sum().backward()
    opt.step()
    f = tmp_path / "0100000.pt"
    ns = argparse.Namespace(model="SiT-S/2", num_classes=10, path_type="Linear", prediction="velocity")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": ns}, f)
    load_published_file(f)  # safely: tensors, optimizer state and a Namespace only
    net, info = load_model(f)  # SiT recognised from args.model, not the file name
    assert info["parameterization"] == "flow"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.8]), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), ema(x, t, y), atol=1e-5, rtol=1e-4)
    # a DiT file with the same layout stays a DDPM model
    g = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(sit.state_dict(), g)
    with pytest.warns(UserWarning, match="11 rows"):
        dnet, dinfo = load_model(g)
    assert dinfo["parameterization"] == "ddpm" and dnet.guide_channels == 3


def test_edm_sampler_guides_the_first_channels_where_the_net_says():
    from fastmask.sampling import guided_denoiser

    class Net(nn.Module):
        def forward(self, x, sigma, labels):
            return x + (labels.float() + 2).view(-1, 1, 1, 1) * torch.arange(4.0).view(1, 4, 1, 1)

    net, x, lab = Net(), torch.zeros(1, 4, 1, 1), torch.tensor([1])
    full = guided_denoiser(net, 3.0)(x, torch.ones(1), lab)  # cond 3c, uncond 1c: 1c + 3 * 2c = 7c
    torch.testing.assert_close(full.flatten(), 7 * torch.arange(4.0))
    net.guide_channels = 3
    part = guided_denoiser(net, 3.0)(x, torch.ones(1), lab)
    torch.testing.assert_close(part.flatten(), torch.tensor([0.0, 7.0, 14.0, 9.0]))  # channel 3: conditional


def test_guidance_on_the_first_3_channels_matches_forward_with_cfg(sit):
    pre = from_published(sit.state_dict(), num_classes=10)
    fm = FlowPrecond(pre).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.3]), torch.tensor([2, 5])
    with torch.no_grad():
        ours = guided_velocity(fm, 4.0, guide_channels=3)(x, t, y)
        ref = sit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 4.0)
    torch.testing.assert_close(ours, ref[:2], atol=1e-4, rtol=1e-4)
    allc = guided_velocity(fm, 4.0)(x, t, y)
    assert torch.equal(allc[:, :3], ours[:, :3]) and not torch.allclose(allc[:, 3], ours[:, 3])
    # guidance interval: outside it the plain conditional velocity
    with torch.no_grad():
        plain = fm(x, t, y)
        torch.testing.assert_close(guided_velocity(fm, 4.0, interval=(0.5, 1.0))(x, t, y), plain)
        torch.testing.assert_close(guided_velocity(fm, 4.0, guide_channels=3, interval=(0.0, 0.5))(x, t, y), ours)


class _Linear(nn.Module):
    """v(x, t) = a - x: the exact flow x(1) = a + (x0 - a) e^{-1}."""
    objective = "flow"

    def __init__(self):
        super().__init__()
        self.a = torch.tensor(2.0)

    def forward(self, x, t, labels=None):
        return self.a - x


def test_ode_samplers_converge_at_their_order():
    x0 = torch.randn(4, 1, 2, 2)
    exact = 2.0 + (x0 - 2.0) * math.exp(-1)
    err = {}
    for m in ("euler", "heun"):
        for n in (10, 20):
            err[m, n] = (flow_sample(_Linear(), x0, method=m, steps=n) - exact).abs().max().item()
    assert 1.7 < err["euler", 10] / err["euler", 20] < 2.3  # first order
    assert 3.5 < err["heun", 10] / err["heun", 20] < 4.5  # second order
    assert err["heun", 20] < err["euler", 20] / 10


def test_sde_sampler_reaches_the_data_of_a_point_mass():
    """Data = the point a: the exact velocity of the linear path is v = (a - x) / (1 - t); the
    SDE with SiT's w(t) = 1 - t and its drift-only last step lands near a, the noise of the
    steps is consumed from the generator (reproducible), and the ODE lands on a too."""

    class PointMass(nn.Module):
        objective = "flow"

        def forward(self, x, t, labels=None):
            return (1.5 - x) / (1 - t.view(-1, 1, 1, 1)).clamp_min(1e-3)

    x0 = torch.randn(64, 1, 2, 2)
    a = flow_sample(PointMass(), x0, method="sde", steps=250, generator=torch.Generator().manual_seed(0))
    b = flow_sample(PointMass(), x0, method="sde", steps=250, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert (a - 1.5).abs().mean() < 0.05
    with pytest.raises(ValueError, match="method"):
        flow_sample(PointMass(), x0, method="rk4")


def test_dopri5_is_optional():
    x0 = torch.randn(2, 1, 2, 2)
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="torchdiffeq"):
            flow_sample(_Linear(), x0, method="dopri5")
        return
    out = flow_sample(_Linear(), x0, method="dopri5")
    torch.testing.assert_close(out, 2.0 + (x0 - 2.0) * math.exp(-1), atol=1e-3, rtol=1e-3)


def test_sit256_preset_is_the_published_setting(tmp_path, sit):
    from fastmask.generate import SAMPLE_PRESETS, resolve_settings
    from fastmask.errors import UsageError

    p = SAMPLE_PRESETS["sit256"]
    assert (p["steps"], p["guidance"], p["latent_size"], p["objective"]) == (125, 1.5, 32, "flow")
    args = argparse.Namespace(preset="sit256", steps=None, guidance=None, labels=None, per_class=None, num=4,
                              npz=None)
    info = {"kind": "latents", "shape": (4, 32, 32), "num_classes": 1000, "objective": "flow"}
    s = resolve_settings(args, info)
    assert s["steps"] == 125 and s["guidance"] == 1.5
    with pytest.raises(UsageError, match="flow"):
        resolve_settings(args, {**info, "objective": "edm"})

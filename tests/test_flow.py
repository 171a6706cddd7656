"""Flow matching (SiT's objective) beside EDM: the wrapper's loss, its MAE space, the trainer's
draws, exact resume, and the ODE/SDE samplers with guidance."""
import json

import pytest
import torch
from helpers import randomise

import fastmask
from fastmask.models import EDMPrecond, FlowPrecond, build_model, dit, draw_t, maskdit, patchify
from fastmask.ops import checks
from fastmask.sampling import flow_sample, guided_velocity, sample_batch


def tiny_flow(masked=True, **kw):
    net = (maskdit if masked else dit)("T/2", input_size=8, in_channels=3, num_classes=5)
    randomise(net, std=0.05, seed=1)
    return FlowPrecond(net, **kw)


def _normalised(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("masked", [True, False])
def test_loss_given_is_sits_velocity_loss_plus_the_mae_of_normalised_x_t(backend, masked):
    """x_t = t x1 + (1 - t) x0, target x1 - x0, t fed to the network as is; MAE on the dropped
    tokens against x_t normalised per token; gradients equal the plain torch computation."""
    torch.manual_seed(0)
    pre = tiny_flow(masked).eval()  # no random label drop (ids_keep masks in any mode)
    B, N = 3, pre.model.num_patches
    y, x0 = torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8)
    t = torch.tensor([0.0, 0.3, 1.0])
    labels = torch.tensor([1, 2, 3])
    ids = torch.stack([torch.randperm(N)[:8] for _ in range(B)]).sort(1).values if masked else None
    with fastmask.backend(backend):
        loss, fm, mae = pre.loss_given(y, labels, t, x0, ids, mae_coef=0.1)
    loss.sum().backward()
    got = {n: p.grad.clone() for n, p in pre.named_parameters() if p.grad is not None}
    pre.zero_grad()

    seen = {}
    fwd = pre.model.forward_tokens

    def spy(x, tt, c, **kw):
        seen["t"] = tt
        return fwd(x, tt, c, **kw)

    pre.model.forward_tokens = spy
    tv = t.view(-1, 1, 1, 1)
    x_t = tv * y + (1 - tv) * x0
    with fastmask.backend("torch"):
        out = pre._network(x_t, t, labels, 0.0, ids, None)
    del pre.model.forward_tokens
    assert torch.equal(seen["t"], t)  # no x1000, no log: SiT feeds t itself
    F, mask = out
    u, xt = patchify(y - x0, 2), patchify(x_t, 2)
    e = ((F - u) ** 2).mean(-1)
    if masked:
        kept = 1 - mask
        fm_ref = (e * kept).sum(1) / kept.sum(1)
        mae_ref = (((F - _normalised(xt)) ** 2).mean(-1) * mask).sum(1) / mask.sum(1)
    else:
        fm_ref, mae_ref = e.mean(1), torch.zeros(B)
    torch.testing.assert_close(fm, fm_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mae, mae_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, (fm_ref + 0.1 * mae_ref).detach(), atol=1e-5, rtol=1e-5)
    (fm_ref + 0.1 * mae_ref).sum().backward()
    for n, p in pre.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert masked == bool((mae > 0).all())


def test_loss_draws_t_noise_mask_in_order_and_matches_loss_given():
    pre = tiny_flow().train()
    y = torch.randn(4, 3, 8, 8)
    g = torch.Generator().manual_seed(5)
    with fastmask.backend("torch"):
        loss, fm, mae = pre.loss(y, torch.arange(4), mask_ratio=0.5, generator=g, return_terms=True)
    g = torch.Generator().manual_seed(5)
    t = draw_t(4, generator=g)
    x0 = torch.randn(y.shape, generator=g)
    ids = fastmask.ops.random_mask(4, pre.model.num_patches, 0.5, generator=g)[0]
    with fastmask.backend("torch"):
        again = pre.loss_given(y, torch.arange(4), t, x0, ids)
    for a, b in zip((loss, fm, mae), again):
        torch.testing.assert_close(a, b)


def test_t_draws_and_checks():
    t = draw_t(20000, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01
    ln = draw_t(20000, generator=torch.Generator().manual_seed(0), dist="logit-normal")
    z = torch.logit(ln)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    with pytest.raises(ValueError, match="dist"):
        draw_t(2, dist="beta")
    with pytest.raises(ValueError, match="t_dist"):
        FlowPrecond(dit("T/2", input_size=8, in_channels=3), t_dist="beta")
    pre = tiny_flow(False)
    y = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="t: expected times in"):
        pre.loss_given(y, None, torch.tensor([0.5, 1.5]), y, None)
    with pytest.raises(ValueError, match="t: expected a scalar"):
        pre.loss_given(y, None, torch.zeros(3), y, None)
    with checks.trusted_values():  # the trainer's own draws: no check, no host sync
        pre.loss_given(y, None, torch.tensor([0.5, 1.5]), y, None)

    def no_sync(*a, **k):
        raise AssertionError("loss() read a value it drew itself back to the host")

    uncond = FlowPrecond(maskdit("T/2", input_size=8, in_channels=3, num_classes=0))  # no label check either
    real = torch.Tensor.__bool__
    torch.Tensor.__bool__ = no_sync
    try:
        uncond.loss(y, None, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    finally:
        torch.Tensor.__bool__ = real


def test_build_model_picks_the_wrapper():
    from fastmask.presets import TrainConfig

    cfg = TrainConfig(model="T/2", image_size=8, channels=1)
    assert isinstance(build_model(cfg, (1, 8, 8), 10), EDMPrecond)
    cfg.objective, cfg.flow_t = "flow", "logit-normal"
    pre = build_model(cfg, (1, 8, 8), 10)
    assert isinstance(pre, FlowPrecond) and pre.t_dist == "logit-normal"
    from fastmask.errors import UsageError
    from fastmask.presets import check_value

    with pytest.raises(UsageError, match="objective"):
        check_value("objective", "ddpm")


def test_step_randomness_draws_t_where_edm_draws_sigma():
    from fastmask.train import step_randomness

    e = step_randomness(0, 3, 16, (1, 4, 4), 4, 0.5, 0.1, False, "cpu")
    f = step_randomness(0, 3, 16, (1, 4, 4), 4, 0.5, 0.1, False, "cpu", "flow")
    g = torch.Generator().manual_seed(3)
    torch.rand(16, generator=g)  # the label-drop flags come first
    assert torch.equal(f["sigma"], torch.rand(16, generator=g))
    assert torch.equal(e["drop"], f["drop"]) and torch.equal(e["noise"], f["noise"])
    assert torch.equal(e["ids_keep"], f["ids_keep"]) and not torch.equal(e["sigma"], f["sigma"])
    ln = step_randomness(0, 3, 16, (1, 4, 4), 4, 0.5, 0.1, False, "cpu", "flow", "logit-normal")
    assert torch.equal(ln["noise"], f["noise"]) and not torch.equal(ln["sigma"], f["sigma"])


# ------------------------------------------------------------------------------ training
def _cfg(out, **kw):
    from test_train import tiny_cfg

    return tiny_cfg(out, objective="flow", **kw)


@pytest.mark.parametrize("arch", ["maskdit", "dit"])
def test_flow_training_logs_checkpoints_and_resumes_exactly(tmp_path, arch):
    from test_train import _all_state, _assert_bit_equal

    from fastmask.checkpoint_io import load_checkpoint
    from fastmask.train import train

    kw = dict(arch=arch, steps=6, finetune_steps=4, samples_per_class=1, grid_per_class=1, sample_steps=2)
    if arch == "dit":
        kw["mask_ratio"] = 0.0
    full = train(_cfg(tmp_path / "full", **kw), progress=False)
    assert isinstance(full.net, FlowPrecond)
    rows = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(v == v and v > 0 for v in losses)

    def stop_at_5(trainer, step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "split", **kw), hooks={"after_step": stop_at_5}, progress=False)
    ck = load_checkpoint(tmp_path / "split")
    assert ck["step"] == 5 and ck["config"]["objective"] == "flow"
    resumed = train(_cfg(tmp_path / "split", **kw), resume=tmp_path / "split", progress=False)
    assert resumed.step == 10
    _assert_bit_equal(_all_state(full), _all_state(resumed))

    from fastmask.sampling import load_model

    net, info = load_model(tmp_path / "full")
    assert isinstance(net, FlowPrecond) and info["shape"] == (1, 8, 8)
    x = sample_batch(net, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), steps=2, guidance=1.5)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_resuming_with_the_other_objective_is_refused(tmp_path):
    from fastmask.train import train

    def stop_at_3(trainer, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "r", steps=6, finetune_steps=0), hooks={"after_step": stop_at_3}, progress=False)
    from test_train import tiny_cfg

    with pytest.raises(Exception, match="objective"):
        train(tiny_cfg(tmp_path / "r", steps=6, finetune_steps=0), resume=tmp_path / "r", progress=False)


# ------------------------------------------------------------------------------ samplers
class _GaussianVelocity(torch.nn.Module):
    """The exact velocity of the linear path for data N(mu, s^2 I): E[x1 - x0 | x_t = x] =
    mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu); class c shifts mu by c."""

    objective = "flow"
    guide_channels = None

    def __init__(self, mu=1.5, s=0.5):
        super().__init__()
        self.mu, self.s = mu, s
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        mu = torch.full((x.shape[0],), self.mu) if labels is None else self.mu + labels.clamp_min(0).float()
        mu, t = mu.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
        s2 = self.s**2
        return mu + (t * s2 - (1 - t)) / (t * t * s2 + (1 - t) ** 2) * (x - t * mu)


@pytest.mark.parametrize("method,steps,tol", [("heun", 20, 0.01), ("euler", 200, 0.02), ("sde", 250, 0.05)])
def test_samplers_reach_the_data_distribution(method, steps, tol):
    net = _GaussianVelocity()
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = flow_sample(net, noise, steps=steps, method=method, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - 1.5) < tol and abs(x.std().item() - 0.5) < tol
    assert net.calls == (2 * steps if method == "heun" else steps)


def test_heun_is_second_order_and_sde_needs_its_score():
    net = _GaussianVelocity()
    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    exact = flow_sample(net, noise, steps=400, method="heun")
    e_euler = (flow_sample(net, noise, steps=10, method="euler") - exact).abs().max()
    e_heun = (flow_sample(net, noise, steps=10, method="heun") - exact).abs().max()
    assert e_heun < e_euler / 5


def test_guidance_channels_and_interval():
    net = _GaussianVelocity()
    x, t, lab = torch.randn(2, 4, 2, 2), torch.full((2,), 0.5), torch.tensor([1, 2])
    cond, uncond = net(x, t, lab), net(x, t, None)
    g = guided_velocity(net, 3.0)(x, t, lab)
    torch.testing.assert_close(g, uncond + 3.0 * (cond - uncond))
    g3 = guided_velocity(net, 3.0, channels=3)(x, t, lab)  # SiT: channels 0-2 guided, 3 conditional
    torch.testing.assert_close(g3[:, :3], g[:, :3])
    torch.testing.assert_close(g3[:, 3:], cond[:, 3:])
    net.calls = 0
    out = guided_velocity(net, 3.0, interval=(0.6, 1.0))(x, t, lab)  # t = 0.5: outside, one call
    torch.testing.assert_close(out, cond)
    assert net.calls == 1
    with pytest.raises(ValueError, match="method"):
        flow_sample(net, x, method="dopri5")


# ------------------------------------------------------------------------- released SiT files
class _PlainSiT(torch.nn.Module):
    """SiT's published architecture (willisma/SiT models.py, as described in SPEC-ROUTING
    section 5) in plain torch: DiT's adaLN-Zero network, t in [0, 1] fed to the sinusoidal time
    embedding as is, a label table with a null row, learn_sigma (2C outputs, the first C
    returned). Keys and shapes are those of the released files."""

    def __init__(self, size=8, p=2, C=4, D=384, depth=2, heads=6, classes=1000):
        super().__init__()
        nn = torch.nn
        self.p, self.C, self.heads = p, C, heads
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, p, p)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, D)
        self.pos_embed = nn.Parameter(torch.randn(1, (size // p) ** 2, D) * 0.5, requires_grad=False)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
            b.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
            self.blocks.append(b)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(D, p * p * 2 * C)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def _ln(self, x, shift, scale):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def forward(self, x, t, y):
        B, C, H, W = x.shape
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
        ang = t.float()[:, None] * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(ang), torch.sin(ang)], -1)) + self.y_embedder.embedding_table(y)
        for b in self.blocks:
            s1, g1, gate1, s2, g2, gate2 = b.adaLN_modulation(c).chunk(6, 1)
            a = self._ln(h, s1, g1)
            N, D = a.shape[1], a.shape[2]
            q, k, v = b.attn.qkv(a).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            o = torch.softmax(q @ k.transpose(-1, -2) * (D // self.heads) ** -0.5, -1) @ v
            h = h + gate1[:, None] * b.attn.proj(o.transpose(1, 2).reshape(B, N, D))
            m = b.mlp.fc2(torch.nn.functional.gelu(b.mlp.fc1(self._ln(h, s2, g2)), approximate="tanh"))
            h = h + gate2[:, None] * m
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, 1)
        out = self.final_layer.linear(self._ln(h, shift, scale))
        p, n = self.p, H // self.p
        out = out.reshape(B, n, n, p, p, 2 * C).permute(0, 5, 1, 3, 2, 4).reshape(B, 2 * C, H, W)
        return out[:, :C]

    def forward_with_cfg(self, x, t, y, scale):
        """The published guidance: channels 0-2 guided, channel 3 each half's own."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        g = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([g, g]), rest], 1)


@pytest.mark.parametrize("layout", ["bare", "train"])
def test_released_sit_files_load_safely_and_equal_the_published_model(tmp_path, layout):
    import argparse

    from fastmask.models import from_published, load_published_file, published_objective
    from fastmask.sampling import load_model

    torch.manual_seed(0)
    sit = _PlainSiT().eval()
    for m in sit.modules():  # adaLN-Zero would start at zero: random weights make the test bite
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    if layout == "bare":
        f = tmp_path / "SiT-XL-2-256x256.pt"
        torch.save(sit.state_dict(), f)
    else:
        f = tmp_path / "0100000.pt"
        raw = _PlainSiT()  # "model" holds other weights: the EMA is the one loaded, as find_model does
        opt = torch.optim.AdamW(raw.parameters(), lr=1e-4)
        raw(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([3])).sum().backward()
        opt.step()
        args = argparse.Namespace(model="SiT-S/2", path_type="Linear", prediction="velocity", num_classes=1000,
                                  image_size=64)
        torch.save({"model": raw.state_dict(), "ema": sit.state_dict(), "opt": opt.state_dict(), "args": args}, f)
    obj = load_published_file(f)  # weights_only: no trust flag
    assert published_objective(obj, f) == "flow"
    net = from_published(obj)
    assert net.learn_sigma and net.num_classes == 1000
    den, info = load_model(f)
    assert isinstance(den, FlowPrecond) and info["flow"] and den.guide_channels == 3
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0.0, 0.25, 0.7, 1.0]), torch.tensor([0, 7, 999, 3])
    with torch.no_grad(), fastmask.backend("torch"):
        want = sit(x, t, y)
        torch.testing.assert_close(den(x, t, y), want, atol=1e-4, rtol=1e-4)
        guided = guided_velocity(den, 1.5)(x, t, y)
        pub = sit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 1000)]), 1.5)
        torch.testing.assert_close(guided, pub[:4], atol=1e-4, rtol=1e-4)
        every = guided_velocity(den, 1.5, channels=4)(x, t, y)  # guiding channel 3 too would differ
        assert not torch.allclose(every[:, 3], pub[:4, 3], atol=1e-3)
    if layout == "bare":  # the command line: latents of a SiT file, its preset, its samplers
        import numpy as np

        from fastmask.cli import main

        out = tmp_path / "s"
        assert main(["sample", "--checkpoint", str(f), "--labels", "1,2", "--steps", "2", "--sampler", "sde",
                     "--guidance-interval", "0,0.8", "--out", str(out)]) == 0
        lat = np.load(out / "latents.npy")
        assert lat.shape == (2, 4, 8, 8) and np.isfinite(lat).all()
        assert main(["sample", "--checkpoint", str(f), "--labels", "1", "--preset", "sit256",
                     "--out", str(tmp_path / "p")]) == 2  # made for 32x32 latents: refused by name


def test_sample_settings_of_flow_and_edm_models():
    import argparse

    from fastmask.errors import UsageError
    from fastmask.generate import SAMPLE_PRESETS, resolve_settings

    def args(**kw):
        base = dict(preset=None, steps=None, guidance=None, labels="1", num=None, per_class=None, npz=None,
                    sampler=None, guidance_interval=None)
        return argparse.Namespace(**{**base, **kw})

    flow = {"num_classes": 10, "shape": (4, 32, 32), "kind": "latents", "flow": True}
    edm = dict(flow, flow=False)
    st = resolve_settings(args(preset="sit256"), flow)
    assert (st["steps"], st["guidance"], st["flow"]["method"]) == (125, 1.5, "heun")
    assert "2.06" in SAMPLE_PRESETS["sit256"]["note"]
    st = resolve_settings(args(sampler="sde", guidance_interval="0.1,0.9"), flow)
    assert st["flow"] == {"method": "sde", "guidance_interval": (0.1, 0.9)}
    with pytest.raises(UsageError, match="--guidance-interval"):
        resolve_settings(args(guidance_interval="0.9,0.1"), flow)
    with pytest.raises(UsageError, match="--sampler"):
        resolve_settings(args(sampler="euler"), edm)
    with pytest.raises(UsageError, match="sit256"):
        resolve_settings(args(preset="sit256"), edm)

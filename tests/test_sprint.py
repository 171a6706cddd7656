"""SPRINT (--arch sprint) against a plain-torch SPRINT written here from SPEC-ROUTING section 2
(no fastmask op, reference or model code in the oracle), the fusion without the concat, eval mode,
Path-Drop Guidance in the samplers, and a tiny training run that resumes exactly."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmask import ops
from fastmask.models import SPRINT, EDMPrecond, FlowPrecond, sprint
from fastmask.models.sprint import SPRINT_BLOCK, default_split

D, HEADS, DEPTH, SIZE = 32, 2, 4, 16  # 8x8 = 64 tokens of width 32, head dim 16; blocks 1 + 2 + 1


def tiny(**kw) -> SPRINT:
    torch.manual_seed(0)
    m = SPRINT(input_size=SIZE, patch_size=2, in_channels=1, hidden_size=D, depth=DEPTH, num_heads=HEADS,
               num_classes=10, **kw)
    with torch.no_grad():  # leave adaLN-Zero's identity: every part must matter in the comparison
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


# --------------------------------------------------------------------------- the oracle (plain torch)
def _rope_tables(grid: int, hd: int, theta: float = 10000.0):
    """2-D axial RoPE: the first half of the head dim rotates with the row, the second with the
    column; pairs (2j, 2j + 1) share the angle pos * theta^(-2j / (hd / 2))."""
    half = hd // 2
    j = torch.arange(half // 2, dtype=torch.float64)
    freq = theta ** (-2 * j / half)
    pos = torch.arange(grid, dtype=torch.float64)
    ang = torch.repeat_interleave(pos[:, None] * freq[None], 2, dim=1)  # [grid, half]
    rows = ang[:, None, :].expand(grid, grid, half).reshape(grid * grid, half)
    cols = ang[None, :, :].expand(grid, grid, half).reshape(grid * grid, half)
    a = torch.cat([rows, cols], 1)
    return a.cos().float(), a.sin().float()


def _rotate(x, cos, sin):  # x [B, H, L, hd]; cos/sin [B, 1, L, hd]
    pairs = x.unflatten(-1, (-1, 2))
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return x * cos + rot * sin


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _sincos_table(grid: int):
    """DiT's fixed 2-D sin-cos table [grid^2, D]: the first half of the width encodes the column,
    the second the row; each half sin then cos of pos * 10000^(-i / (D / 4))."""
    def one(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        a = pos[:, None].double() * omega[None]
        return torch.cat([a.sin(), a.cos()], 1)

    n = torch.arange(grid * grid)
    return torch.cat([one(n % grid, D // 2), one(n // grid, D // 2)], 1).float()


def _block(P, pre, x, c, cos, sin):
    shift1, scale1, gate1, shift2, scale2, gate2 = F.linear(F.silu(c), P[pre + "adaLN_modulation.1.weight"],
                                                            P[pre + "adaLN_modulation.1.bias"]).chunk(6, 1)
    B, L, _ = x.shape
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale1[:, None]) + shift1[:, None]
    q, k, v = F.linear(h, P[pre + "attn.qkv.weight"], P[pre + "attn.qkv.bias"]).view(B, L, 3, HEADS, -1).permute(
        2, 0, 3, 1, 4)
    if cos is not None:  # SPRINT's backbone: q/k RMSNorm, then RoPE
        q, k = _rms(q, P[pre + "attn.q_norm.weight"]), _rms(k, P[pre + "attn.k_norm.weight"])
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
    x = x + gate1[:, None] * F.linear(a, P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale2[:, None]) + shift2[:, None]
    m = F.linear(F.gelu(F.linear(h, P[pre + "mlp.fc1.weight"], P[pre + "mlp.fc1.bias"]), approximate="tanh"),
                 P[pre + "mlp.fc2.weight"], P[pre + "mlp.fc2.bias"])
    return x + gate2[:, None] * m


def plain_sprint(P, x, t, labels, ids_keep, path_drop, enc=1, dec=1, rope=True):
    """SPRINT's forward from the spec, as output tokens [B, N, p*p*C] in (p_row, p_col, c) order;
    ``rope=False``: on DiT's block (sin-cos table added after the patch embedding, no RoPE or q/k-norm)."""
    B = x.shape[0]
    tok = F.conv2d(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], stride=2).flatten(2).transpose(1, 2)
    N = tok.shape[1]
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    c = F.linear(F.silu(F.linear(temb, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"])),
                 P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
    table = P["y_embedder.embedding_table.weight"]
    c = c + table[torch.where(labels < 0, table.shape[0] - 1, labels)]
    cos, sin = _rope_tables(int(N**0.5), D // HEADS)
    full = lambda: (cos[None, None].expand(B, 1, N, -1), sin[None, None].expand(B, 1, N, -1))  # noqa: E731
    h = tok
    if not rope:
        h = tok + _sincos_table(int(N**0.5))
        full = lambda: (None, None)  # noqa: E731
    for i in range(enc):
        h = _block(P, f"blocks.{i}.", h, c, *full())
    x_enc = h
    if ids_keep is None:
        deep, cs = h, full()
    else:
        K = ids_keep.shape[1]
        deep = torch.gather(h, 1, ids_keep[..., None].expand(B, K, D))
        cs = (cos[ids_keep][:, None], sin[ids_keep][:, None]) if rope else (None, None)  # RoPE by the same ids
    for i in range(enc, DEPTH - dec):
        deep = _block(P, f"blocks.{i}.", deep, c, *cs)
    mask_token = P["mask_token"].reshape(1, 1, D)
    if ids_keep is not None:  # restore: concat [kept, mask tokens], gather by ids_restore
        rest = torch.stack([torch.tensor([n for n in range(N) if n not in set(r.tolist())]) for r in ids_keep])
        ids_restore = torch.argsort(torch.cat([ids_keep, rest], 1), 1)
        cat = torch.cat([deep, mask_token.expand(B, N - K, D)], 1)
        deep = torch.gather(cat, 1, ids_restore[..., None].expand(B, N, D))
    if path_drop is not None:
        deep = torch.where(path_drop[:, None, None], mask_token.expand(B, N, D), deep)
    h = F.linear(torch.cat([deep, x_enc], -1), P["fusion.weight"], P["fusion.bias"])
    for i in range(DEPTH - dec, DEPTH):
        h = _block(P, f"blocks.{i}.", h, c, *full())
    shift, scale = F.linear(F.silu(c), P["final_layer.adaLN_modulation.1.weight"],
                            P["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return F.linear(h, P["final_layer.linear.weight"], P["final_layer.linear.bias"])


def _inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, SIZE, SIZE, generator=g)
    t = torch.rand(B, generator=g)
    labels = torch.tensor([3, -1, 7][:B])
    return x, t, labels


def _shuffled(ids, seed=2):  # unsorted, per row
    g = torch.Generator().manual_seed(seed)
    return torch.stack([r[torch.randperm(len(r), generator=g)] for r in ids])


# --------------------------------------------------------------------------- forward and backward
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens", ["structured", "random44"])
def test_forward_and_backward_match_plain_torch(tokens, backend):
    """Train mode with given ids (unsorted) and path-drop flags: outputs, the input's and every
    parameter's gradient equal the plain-torch SPRINT, on the reference backend and on the Triton
    kernels (the interpreter on a CPU). structured: the 2x2 mask, K = 16; random44: ratio 0.3,
    K = 44 (not a multiple of 8)."""
    import fastmask

    with fastmask.backend(backend), fastmask.ops.record_choices() as ran:
        _compare_with_plain_torch(tokens)
    assert set().union(*ran.values()) == {backend} and {"attention_rope", "gather_tokens", "unmask_tokens"} <= ran.keys()


def _compare_with_plain_torch(tokens):
    m = tiny().train()
    x, t, labels = _inputs()
    N = m.num_patches
    g = torch.Generator().manual_seed(5)
    if tokens == "structured":
        ids = m.token_strategy(0.75).draw(3, N, generator=g)
        assert isinstance(m.token_strategy(0.75), ops.StructuredTokens) and ids.shape == (3, 16)
    else:
        ids = m.token_strategy(0.3).draw(3, N, generator=g)
        assert ids.shape == (3, 44)
    ids = _shuffled(ids)
    assert not bool((ids.diff(dim=1) > 0).all())
    drop = torch.tensor([False, True, False])
    xa = x.clone().requires_grad_(True)
    out = m.forward_tokens(xa, t, labels, ids_keep=ids, path_drop=drop, force_drop_ids=torch.zeros(3))
    P = {k: v.detach().clone().requires_grad_(k != "mask_token") for k, v in m.state_dict().items()}
    assert "mask_token" in P and "mask_token" not in dict(m.named_parameters())
    xb = x.clone().requires_grad_(True)
    ref = plain_sprint(P, xb, t, labels, ids, drop)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    named = dict(m.named_parameters())
    assert named.keys() == P.keys() - {"mask_token"}
    for k, p in named.items():
        torch.testing.assert_close(p.grad, P[k].grad, rtol=1e-4, atol=1e-5, msg=k)
    assert named["fusion.weight"].grad.abs().sum() > 0 and named["blocks.1.attn.qkv.weight"].grad.abs().sum() > 0


def test_dit_backbone_matches_plain_torch():
    """The digits-scale default (SPRINT's routing on DiT's block and sin-cos table), forward and
    backward, structured tokens (unsorted), one sample path-dropped."""
    torch.manual_seed(0)
    m = sprint("Digits/2", input_size=SIZE, in_channels=1, hidden_size=D, num_heads=HEADS, num_classes=10).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, labels = _inputs()
    ids = _shuffled(m.token_strategy(0.75).draw(3, 64, generator=torch.Generator().manual_seed(5)))
    drop = torch.tensor([True, False, False])
    out = m.forward_tokens(x, t, labels, ids_keep=ids, path_drop=drop, force_drop_ids=torch.zeros(3))
    P = {k: v.detach().clone().requires_grad_(k not in ("mask_token", "pos_embed")) for k, v in m.state_dict().items()}
    ref = plain_sprint(P, x, t, labels, ids, drop, rope=False)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, P[k].grad, rtol=1e-4, atol=1e-5, msg=k)


def test_fusion_without_the_concat_equals_the_concat_form():
    """fuse(): W_a on the K kept rows, scattered into the W_a mask_token fill, + W_b x_enc + b,
    equals Linear(2D -> D) on concat(restored, x_enc), path-dropped rows and a trainable mask token
    included, forward and backward; the mask token gets no gradient even when asked to (fixed)."""
    m = tiny()
    m.mask_token.requires_grad_(True)  # what the trainer does to MaskDiT's token in phase 1
    B, N, K = 3, m.num_patches, 20
    g = torch.Generator().manual_seed(3)
    x_enc = torch.randn(B, N, D, generator=g)
    deep = torch.randn(B, K, D, generator=g)
    ids = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
    drop = torch.tensor([True, False, False])
    a = [x_enc.clone().requires_grad_(True), deep.clone().requires_grad_(True)]
    out = m.fuse(a[1], a[0], ids, drop)
    grads_fast = torch.autograd.grad(out.square().sum(), [*a, m.fusion.weight, m.fusion.bias])
    assert m.mask_token.grad is None
    b = [x_enc.clone().requires_grad_(True), deep.clone().requires_grad_(True)]
    token = m.mask_token.detach()
    restored = token.expand(B, N, D).clone()
    restored = restored.scatter(1, ids[..., None].expand(B, K, D), b[1])
    restored = torch.where(drop[:, None, None], token.expand(B, N, D), restored)
    ref = m.fusion(torch.cat([restored, b[0]], -1))
    grads_ref = torch.autograd.grad(ref.square().sum(), [*b, m.fusion.weight, m.fusion.bias])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for gf, gr in zip(grads_fast, grads_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)
    # a deep output for the first rows only: the rest are dropped
    part = m.fuse(deep[:1].new_zeros(1, N, D) + 1.0, x_enc)
    full = m.fusion(torch.cat([torch.cat([torch.ones(1, N, D), token.expand(2, N, D)]), x_enc], -1))
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_initialisation_follows_the_official_code():
    m = SPRINT(input_size=SIZE, patch_size=2, in_channels=1, hidden_size=64, depth=DEPTH, num_heads=4, num_classes=10)
    assert "mask_token" in m.state_dict() and "mask_token" not in dict(m.named_parameters())
    assert 0.01 < float(m.mask_token.std()) < 0.03
    assert float(m.fusion.bias.detach().abs().max()) == 0 and float(m.fusion.weight.detach().abs().min()) > 0
    bound = math.sqrt(6 / (3 * 64))  # xavier-uniform of [64, 128]
    assert float(m.fusion.weight.detach().abs().max()) <= bound
    assert float(m.final_layer.linear.weight.detach().abs().max()) == 0  # adaLN-Zero, as DiT
    assert "pos_embed" not in m.state_dict()  # no absolute position with RoPE
    on_dit = SPRINT(input_size=SIZE, patch_size=2, in_channels=1, hidden_size=32, depth=DEPTH, num_heads=2, block={})
    assert "pos_embed" in on_dit.state_dict() and not on_dit.blocks[0].rope  # the DiT backbone keeps DiT's table
    x, t, labels = _inputs()
    out = on_dit.train().forward_tokens(x, t, labels, mask_ratio=0.75, force_drop_ids=torch.zeros(3))
    assert out.shape == (3, 64, 4)
    assert (m.encoder_depth, len(m.middle_blocks), m.decoder_depth) == (1, 2, 1)
    assert default_split(28) == (2, 2) and default_split(4) == (1, 1) and default_split(2) == (0, 1)
    s2 = sprint("S/2", input_size=8, in_channels=1, num_classes=10)  # S, B, L, XL: SPRINT's own backbone
    assert s2.block_options == SPRINT_BLOCK and "pos_embed" not in s2.state_dict() and len(s2.middle_blocks) == 8
    d2 = sprint("Digits/2", input_size=SIZE, in_channels=1, num_classes=10)  # the digits-scale default
    assert d2.block_options == {} and "pos_embed" in d2.state_dict()
    lit = sprint("LightningDiT-Digits/2", input_size=SIZE, in_channels=1, num_classes=10)
    assert lit.block_options["mlp"] == "swiglu" and lit.uses_pos_embed
    for bad in (dict(encoder_depth=2, decoder_depth=2), dict(path_drop_prob=1.5), dict(mask_type="grid")):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            SPRINT(input_size=SIZE, patch_size=2, in_channels=1, hidden_size=32, depth=DEPTH, num_heads=2, **bad)


def test_token_strategies():
    m = tiny()
    assert m.token_strategy(0.75) == ops.StructuredTokens(0.75) and m.token_strategy(0.75).num_kept(64) == 16
    assert m.token_strategy(0.3) == ops.RandomTokens(0.3) and m.token_strategy(0.3).num_kept(64) == 44
    assert tiny(mask_type="random").token_strategy(0.75) == ops.RandomTokens(0.75)
    own = ops.RandomTokens(0.5)
    assert m.token_strategy(own) is own


# --------------------------------------------------------------------------- modes
def test_eval_is_the_dense_model_and_train_draws_from_the_generator():
    """Eval: no token dropping and no path-drop whatever mask_ratio says; the output is the plain
    SPRINT with every token through the middle and the dense deep output fused. Train mode draws
    the structured tokens, then the path-drop flags, from the generator."""
    m = tiny()
    x, t, labels = _inputs()
    P = {k: v.detach() for k, v in m.state_dict().items()}
    dense = plain_sprint(P, x, t, labels, None, None)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m.forward_tokens(x, t, labels, mask_ratio=0.75), dense, rtol=1e-4, atol=1e-5)
        m.train()
        got = m.forward_tokens(x, t, labels, mask_ratio=0.75, generator=torch.Generator().manual_seed(9),
                               force_drop_ids=torch.zeros(3))
        g = torch.Generator().manual_seed(9)
        ids = ops.StructuredTokens(0.75).draw(3, 64, generator=g)
        drop = torch.rand(3, generator=g) < 0.1
        torch.testing.assert_close(got, plain_sprint(P, x, t, labels, ids, drop), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, dense, atol=1e-3)
        # a path-drop probability of 1 drops every sample's deep path; 0 none
        m.path_drop_prob = 1.0
        got = m.forward_tokens(x, t, labels, force_drop_ids=torch.zeros(3))
        torch.testing.assert_close(got, plain_sprint(P, x, t, labels, None, torch.ones(3, dtype=torch.bool)),
                                   rtol=1e-4, atol=1e-5)
        m.path_drop_prob = 0.0
        torch.testing.assert_close(m.forward_tokens(x, t, labels, force_drop_ids=torch.zeros(3)), dense,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="path_drop"):
        m.forward_tokens(x, t, labels, path_drop=torch.zeros(2))


# --------------------------------------------------------------------------- Path-Drop Guidance
def _velocity(m, x, t, labels, drop):  # FlowPrecond's velocity, by hand: the network's tokens as images
    from fastmask.models import unpatchify

    return unpatchify(m.forward_tokens(x, t, labels, path_drop=drop).float(), 2, 1)


def test_path_drop_guidance_in_the_flow_sampler_is_the_formula():
    """Euler steps of v = v_u + s (v_c - v_u), v_c the dense conditional model, v_u the null label
    with the deep path dropped, equal flow_sample(..., path_drop_guidance=True); plain CFG differs."""
    from fastmask.flow_sampling import flow_sample, guided_velocity

    m = tiny().eval()
    net = FlowPrecond(m).eval()
    B, s, steps = 2, 2.5, 3
    noise = torch.randn(B, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 8])
    null = torch.full_like(labels, -1)
    x = noise.clone()
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((B,), i / steps)
            vc = _velocity(m, x, t, labels, None)
            vu = _velocity(m, x, t, null, torch.ones(B, dtype=torch.bool))
            x = x + (vu + s * (vc - vu)) / steps
    got = flow_sample(net, noise, labels, method="euler", steps=steps, guidance=s, path_drop_guidance=True)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-5)
    cfg = flow_sample(net, noise, labels, method="euler", steps=steps, guidance=s)
    assert not torch.allclose(cfg, got, atol=1e-4)
    assert not m._pdg  # the halves mode is left after the call
    # outside the guidance interval the batch is not doubled and runs the plain model
    v = guided_velocity(net, s, interval=(0.5, 1.0), path_drop_guidance=True)
    with torch.no_grad():
        t0 = torch.zeros(B)
        torch.testing.assert_close(v(noise, t0, labels), _velocity(m, noise, t0, labels, None), rtol=1e-4, atol=1e-5)


def test_path_drop_guidance_in_the_edm_sampler_and_refusals():
    from fastmask.models import dit
    from fastmask.sampling import guided_denoiser

    m = tiny().eval()
    net = EDMPrecond(m).eval()
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    sigma, labels, s = torch.full((2,), 1.3), torch.tensor([2, 5]), 2.0
    with torch.no_grad():
        got = guided_denoiser(net, s, path_drop_guidance=True)(x, sigma, labels)
        cond = net(x, sigma, labels)
        m.path_drop_prob = 1.0  # the unconditional branch: null label, deep path dropped (train-mode flags)
        m.train()
        uncond = net(x, sigma, None)
        m.eval()
    torch.testing.assert_close(got, uncond + s * (cond - uncond), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="path_drop_guidance"):
        guided_denoiser(EDMPrecond(dit("T/2", input_size=8, in_channels=1, num_classes=10)), 2.0,
                        path_drop_guidance=True)
    with pytest.raises(ValueError, match="even size"), torch.no_grad(), m.path_drop_guidance():
        m(x[:1], sigma[:1], labels[:1])


# --------------------------------------------------------------------------- training
def test_train_arch_sprint_trains_and_resumes_exactly(tmp_path):
    """`fastmask train --arch sprint` on the embedded digits (T/2 at 8x8: 16 tokens, 0 + 1 + 1
    blocks): the flow-objective run of tests/test_train.py (finite losses; stopped at step 10, it
    resumes bit-exactly, the path-drop flags drawn by the trainer from the (seed, step) generator;
    EDM from the same seed differs), then at ratio 0.75 with logit-normal t: the mask token never
    moves (the trainer switches a mask token's requires_grad on in phase 1), the fusion does."""
    from test_train import test_flow_objective_trains_logs_and_resumes_exactly as flow_run_resumes, tiny_cfg

    from fastmask.train import train

    flow_run_resumes(tmp_path / "resume", "sprint")
    kw = dict(arch="sprint", objective="flow", t_schedule="logit_normal", mask_ratio=0.75)
    full = train(tiny_cfg(tmp_path / "full", **kw), progress=False)
    assert isinstance(full.net.model, SPRINT) and full.step == 20
    first = train(tiny_cfg(tmp_path / "zero", **{**kw, "steps": 0, "finetune_steps": 0}), progress=False)
    assert torch.equal(full.net.model.mask_token, first.net.model.mask_token)
    assert torch.equal(full.ema.model.mask_token, first.net.model.mask_token)
    assert not torch.equal(full.net.model.fusion.weight, first.net.model.fusion.weight)


@pytest.mark.parametrize("graphed", [False, True])
def test_trainer_passes_the_path_drop_flags_it_draws(tmp_path, monkeypatch, graphed):
    """The trainer draws the path-drop flags with the step's randomness (at the network's
    path_drop_prob) and the network gets exactly those, in both phases, eagerly and through the
    step graph's buffers (CPU emulation); it never draws its own. At probability 1 every sample's
    deep path is dropped: the run equals a probability-0 run whose network is handed all-True
    flags (the other draws unchanged), and differs from a plain probability-0 run."""
    from test_train import _all_state, _assert_bit_equal, tiny_cfg

    from fastmask import step_graph, train_step
    from fastmask.train import Trainer

    monkeypatch.setattr(step_graph, "CPU_EMULATION", graphed)
    kw = dict(arch="sprint", steps=3, finetune_steps=2, log_every=1, mask_ratio=0.75, cuda_graph=graphed)
    drawn, got = [], []
    real_draw, real_fwd = train_step.step_randomness, SPRINT.forward_tokens

    def draw(*a, **k):
        r = real_draw(*a, **k)
        drawn.append(r["path_drop"])
        return r

    def fwd(self, *a, **k):
        assert k.get("path_drop") is not None, "the network was left to draw its own flags"
        got.append(k["path_drop"].clone())
        return real_fwd(self, *a, **k)

    def run(out, prob):
        tr = Trainer(tiny_cfg(tmp_path / out, **kw), progress=False)
        try:
            tr.net.model.path_drop_prob = prob
            tr.run()
        finally:
            tr.close()
        assert (tr.summary()["step_graph"] == "on") == graphed
        return tr

    monkeypatch.setattr(train_step, "step_randomness", draw)
    monkeypatch.setattr(SPRINT, "forward_tokens", fwd)
    run("half", 0.5)
    assert len(drawn) == len(got) == 5
    for d, g in zip(drawn, got):
        assert d.shape == (8,) and torch.equal(d, g)
    assert any(d.any() for d in drawn) and not all(d.all() for d in drawn)  # p = 0.5: some of each
    drawn.clear(), got.clear()
    every = run("one", 1.0)
    assert all(d.all() for d in drawn) and len(got) == 5

    def forced(self, *a, **k):  # no flags from the trainer (probability 0): all-True ones made here
        assert "path_drop" not in k
        return real_fwd(self, *a, path_drop=torch.ones(a[0].shape[0], dtype=torch.bool), **k)

    monkeypatch.setattr(SPRINT, "forward_tokens", forced)
    _assert_bit_equal(_all_state(every), _all_state(run("forced", 0.0)))  # the flags come last: the rest is equal
    monkeypatch.setattr(SPRINT, "forward_tokens", real_fwd)
    assert not torch.equal(_all_state(every)["model.model.fusion.weight"],
                           _all_state(run("none", 0.0))["model.model.fusion.weight"])


def test_cli_train_arch_sprint_then_sample_with_path_drop_guidance(tmp_path, capsys):
    """`fastmask train --arch sprint` (tiny: T/2 on 8x8 digits) then `fastmask sample
    --path-drop-guidance`; a MaskDiT checkpoint refuses the flag with a one-line error."""
    import json

    from fastmask.cli import main

    tiny_run = ["--model", "T/2", "--image-size", "8", "--batch-size", "8", "--steps", "4", "--finetune-steps", "2",
                "--sample-steps", "2", "--samples-per-class", "1", "--no-eval", "--progress", "off", "--threads", "1",
                "--device", "cpu"]
    out = tmp_path / "sprint"
    assert main(["train", "--arch", "sprint", "--objective", "flow", "--mask-ratio", "0.75", *tiny_run,
                 "--out", str(out)]) == 0
    assert main(["sample", "--checkpoint", str(out), "--labels", "1,2", "--steps", "2", "--guidance", "2",
                 "--path-drop-guidance", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "sample_00001_class2.png").exists()
    assert main(["eval", "--checkpoint", str(out), "--samples-per-class", "1", "--steps", "2", "--guidance", "2",
                 "--path-drop-guidance", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["samples"]["path_drop_guidance"] is True
    other = tmp_path / "maskdit"
    assert main(["train", "--arch", "maskdit", "--mask-ratio", "0.5", *tiny_run, "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(other), "--labels", "1", "--steps", "2", "--guidance", "2",
                 "--path-drop-guidance", "--out", str(tmp_path / "x")]) == 2
    assert "--path-drop-guidance" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(other), "--samples-per-class", "1", "--path-drop-guidance"]) == 2
    assert "only for SPRINT" in capsys.readouterr().err

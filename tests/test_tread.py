"""TREAD as an architecture (fastmask.models.tread): against an independent plain-torch
implementation written here from SPEC-ROUTING section 1 (no fastmask op, reference or fused,
in it), forward and backward; routing off in eval; the state dict is DiT's; the K rounding; the
trainer's ``--arch tread`` with an exact resume."""
import json

import pytest
import torch
import torch.nn.functional as F

import fastmask
from fastmask.models import ARCHITECTURES, TREAD, DiT, EDMPrecond, tread
from fastmask.models.tread import default_route
from fastmask.ops import RandomTokens, RoutedTokens, dispatch
from helpers import randomise

# depth 4 -> blocks 1..2 routed: a dense block before the route and one after it
SMALL = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=4, num_heads=2, num_classes=3)


# ----------------------------------------------------------- the spec, in plain torch
def _modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _plain_block(blk, x, c):
    """DiT's block (adaLN-Zero, LayerNorm without affine, GELU-tanh MLP), plain torch."""
    B, L, D = x.shape
    H = blk.attn.num_heads
    s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
    h = _modulate(x, s1, sc1)
    q, k, v = blk.attn.qkv(h).reshape(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) * (D // H) ** -0.5, dim=-1)
    x = x + g1[:, None] * blk.attn.proj((att @ v).transpose(1, 2).reshape(B, L, D))
    h = _modulate(x, s2, sc2)
    return x + g2[:, None] * blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh"))


def _plain_tread(net, x, t, labels, ids, route):
    """SPEC-ROUTING 1.1: before block `start` the stream is saved and K tokens taken; blocks
    start..end (inclusive) run on them; after block `end` they are written back into a copy of
    the saved stream, out of place; the other tokens keep the saved value. ids None: dense."""
    c = net.t_embedder(t) + net.y_embedder(labels)
    h = net.x_embedder(x) + net.pos_embed
    rows = torch.arange(x.shape[0])[:, None]
    start, end = route
    for i, blk in enumerate(net.blocks):
        if ids is not None and i == start:
            saved = h
            h = h[rows, ids]
        h = _plain_block(blk, h, c)
        if ids is not None and i == end:
            back = saved.clone()
            back[rows, ids] = h
            h = back
    fl = net.final_layer
    shift, scale = fl.adaLN_modulation(c).chunk(2, dim=1)
    return fl.linear(_modulate(h, shift, scale))


def _inputs(net, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, net.in_channels, net.input_size, net.input_size, generator=g)
    t = torch.randn(B, generator=g)
    labels = torch.randint(0, net.num_classes, (B,), generator=g)
    return x, t, labels


def _unsorted_ids(B, N, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
    assert not torch.equal(ids, ids.sort(dim=1).values)
    return ids


def _grads(net, x, fn):
    x = x.clone().requires_grad_()
    net.zero_grad(set_to_none=True)
    out = fn(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(cot)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ tests
def test_route_rule_and_k_rounding():
    assert default_route(28) == (2, 24)  # XL/2: LightningDiT_TREAD's 2 .. depth - 4
    assert default_route(12) == (2, 8)  # B/2: CompVis/tread configs/model/tread.yaml
    assert default_route(4) == (1, 2) and default_route(2) == (0, 0)
    assert TREAD.token_strategy(0.3).num_kept(64) == 45 and RandomTokens(0.3).num_kept(64) == 44  # spec section 0
    assert TREAD.token_strategy(0.5).num_kept(256) == 128
    net = tread("T/2", input_size=8, in_channels=1, num_classes=3, route=(1, 1))
    assert net.route == (1, 1)
    # the preconditioner (and so Preconditioner.loss and the trainer) asks the network for its tokens
    assert EDMPrecond(net).token_strategy(0.3) == RoutedTokens(0.3)
    assert EDMPrecond(DiT(**SMALL)).token_strategy(0.3) == RandomTokens(0.3)
    for bad in ((2, 1), (0, 2), (-1, 0), (0,), "0,1", (0.0, 1)):
        with pytest.raises(ValueError, match="route"):
            tread("T/2", input_size=8, in_channels=1, num_classes=3, route=bad)


def test_no_new_parameters_state_dict_is_dits():
    a, b = TREAD(**SMALL), DiT(**SMALL)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)
    a.load_state_dict(randomise(DiT(**SMALL)).state_dict(), strict=True)
    assert "tread" in ARCHITECTURES and ARCHITECTURES["tread"].masks


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_backward_match_the_plain_torch_spec(backend):
    """Unsorted ids, K = 5 of 16 (not a multiple of 8): output, input gradient and every
    parameter gradient against the plain implementation; and the routed output is not the dense one."""
    if backend == "triton" and dispatch.why_not("triton", "scatter_tokens", [torch.zeros(1)]):
        pytest.skip(dispatch.why_not("triton", "scatter_tokens", [torch.zeros(1)]))
    torch.manual_seed(0)
    net = randomise(TREAD(**SMALL), std=0.2).eval()  # explicit ids route in any mode
    x, t, labels = _inputs(net)
    ids = _unsorted_ids(3, net.num_patches, 5)
    with fastmask.backend(backend), dispatch.record_choices() as ran:
        got = _grads(net, x, lambda x_: net.forward_tokens(x_, t, labels, ids_keep=ids))
    assert {"gather_tokens", "scatter_tokens"} <= set(ran) and ran["scatter_tokens"] == {backend}
    want = _grads(net, x, lambda x_: _plain_tread(net, x_, t, labels, ids, (1, 2)))
    def close(a, b, name):  # fp32, summation orders differ: tolerance relative to the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")

    close(got[0], want[0], "output")
    close(got[1], want[1], "grad x")
    assert got[2].keys() == want[2].keys() and len(got[2]) == len(list(net.parameters()))
    for name in want[2]:
        close(got[2][name], want[2][name], name)
    dense = _plain_tread(net, x, t, labels, None, (1, 2)).detach()
    assert (got[0] - dense).abs().max() > 1e-2  # routing changes the output: the test can fail


def test_eval_routing_off_equals_dense_dit():
    net = randomise(TREAD(**SMALL), std=0.2)
    base = DiT(**SMALL)
    base.load_state_dict(net.state_dict())
    x, t, labels = _inputs(net)
    net.eval(), base.eval()
    with torch.no_grad():
        want = base(x, t, labels)
        assert torch.equal(net(x, t, labels, mask_ratio=0.5), want)  # a ratio is ignored in eval
        assert torch.equal(EDMPrecond(net)(x, torch.full((3,), 2.0), labels), EDMPrecond(base)(x, torch.full((3,), 2.0), labels))
        net.train()  # train mode at rate 0 (K = N) is dense too
        drop = torch.zeros(3, dtype=torch.bool)
        assert torch.equal(net(x, t, labels, mask_ratio=0.0, force_drop_ids=drop), want)
        torch.testing.assert_close(_plain_tread(net, x, t, labels, None, (1, 2)), net.forward_tokens(
            x, t, labels, force_drop_ids=drop), rtol=1e-4, atol=1e-5)


def test_train_mode_draws_routed_tokens_from_the_generator():
    """Train mode routes by TREAD's K rounding (rate 0.3 of 16 tokens keeps 12, not MaskDiT's 11),
    drawn from the generator: the same output as the explicit ids of that draw."""
    net = randomise(TREAD(**SMALL), std=0.2).train()
    x, t, labels = _inputs(net)
    drop = torch.zeros(3, dtype=torch.bool)
    ids = RoutedTokens(0.3).draw(3, 16, generator=torch.Generator().manual_seed(5))
    assert ids.shape == (3, 12)
    with torch.no_grad():
        got = net.forward_tokens(x, t, labels, mask_ratio=0.3, generator=torch.Generator().manual_seed(5),
                                 force_drop_ids=drop)
        want = net.forward_tokens(x, t, labels, ids_keep=ids, force_drop_ids=drop)
        assert torch.equal(got, want)
        torch.testing.assert_close(got, _plain_tread(net, x, t, labels, ids, (1, 2)), rtol=1e-4, atol=1e-5)


def test_loss_covers_every_token():
    """EDM loss on the whole re-assembled output (SPEC-ROUTING 1.2): the weighted squared error
    of D = c_skip x + c_out F, F from the plain routed forward, averaged over all elements."""
    net = randomise(TREAD(**SMALL), std=0.2).train()
    pre = EDMPrecond(net)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(3, 2, 8, 8, generator=g)
    noise = torch.randn(3, 2, 8, 8, generator=g)
    sigma = torch.tensor([0.3, 1.0, 4.0])
    labels = torch.tensor([0, 1, 2])
    drop = torch.zeros(3, dtype=torch.bool)
    ids = _unsorted_ids(3, 16, 8)
    loss, dsm, mae = pre.loss_given(y, labels, sigma, noise, ids, force_drop_ids=drop)
    x_noisy = y + sigma.view(-1, 1, 1, 1) * noise
    sd = 0.5
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    Fo = _plain_tread(net, c_in.view(-1, 1, 1, 1) * x_noisy, sigma.log() / 4, labels, ids, (1, 2))
    Fimg = fastmask.models.unpatchify(Fo, 2, 2)
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    D = c_skip.view(-1, 1, 1, 1) * x_noisy + c_out.view(-1, 1, 1, 1) * Fimg
    w = (sigma**2 + sd**2) / (sigma * sd) ** 2
    want = (w.view(-1, 1, 1, 1) * (D - y) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(mae, torch.zeros_like(mae))


def test_preset_tread256_and_digits_default():
    from fastmask.presets import get_preset

    cfg = get_preset("tread256")
    assert (cfg.arch, cfg.model, cfg.mask_ratio, cfg.objective, cfg.finetune_steps) == ("tread", "XL/2", 0.5, "edm", 0)
    assert (cfg.batch_size, cfg.lr, cfg.ema_decay, cfg.image_size, cfg.channels) == (256, 1e-4, 0.9999, 32, 4)
    cfg = get_preset("digits-tread")
    assert (cfg.arch, cfg.model, cfg.finetune_steps) == ("tread", "Digits/2", 0)
    assert tread("Digits/2", input_size=16, in_channels=1, num_classes=10).route == (1, 2)


def _tiny(out):
    from test_train import tiny_cfg

    return tiny_cfg(out, arch="tread", mask_ratio=0.3, finetune_steps=0)


def test_train_arch_tread_routes_and_resumes_exactly(tmp_path, monkeypatch):
    """`--arch tread` trains (the trainer draws TREAD's K: 16 - int(16 * 0.3) = 12 kept), logs finite
    losses, and a run stopped at step 7 resumes bit-exactly."""
    from fastmask.train import train
    from test_train import _all_state, _assert_bit_equal

    seen = []
    real = fastmask.ops.scatter_tokens

    def spy(x_kept, ids_keep, fill, **kw):
        seen.append(tuple(ids_keep.shape))
        return real(x_kept, ids_keep, fill, **kw)

    monkeypatch.setattr(fastmask.ops, "scatter_tokens", spy)
    full = train(_tiny(tmp_path / "full"), progress=False)
    assert isinstance(full.net.model, TREAD) and seen and set(seen) == {(8, 12)}
    rows = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(v == v and v < 1e3 for v in losses)

    def stop_at_7(trainer, step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tiny(tmp_path / "split"), hooks={"after_step": stop_at_7}, progress=False)
    resumed = train(_tiny(tmp_path / "split"), resume=tmp_path / "split", progress=False)
    assert resumed.step == full.step == 12
    _assert_bit_equal(_all_state(full), _all_state(resumed))


def test_cli_train_arch_tread_then_sample(tmp_path):
    """`fastmask train --arch tread` trains, samples (routing off: the dense model) and saves a
    checkpoint that `fastmask sample` loads as a TREAD."""
    from fastmask.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--arch", "tread", "--model", "T/2", "--image-size", "8", "--batch-size", "8",
                 "--steps", "3", "--finetune-steps", "0", "--device", "cpu", "--threads", "1", "--out", str(out),
                 "--set", "evaluate=false", "--set", "samples_per_class=1", "--set", "minutes=none",
                 "--sample-steps", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["arch"] == "tread" and (out / "samples.png").exists()
    assert [p.name for p in (out / "checkpoints").glob("ckpt-*")] == ["ckpt-0000003.safetensors"]
    assert main(["sample", "--checkpoint", str(out), "--device", "cpu", "--steps", "2", "--num", "2",
                 "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 2


def test_flop_count_runs_the_routed_blocks_on_k_tokens():
    from fastmask.models import count_flops
    from fastmask.models.flops import _block_flops

    net = TREAD(**SMALL)
    dense = count_flops(DiT(**SMALL), batch=2)
    assert count_flops(net, batch=2)["forward"] == dense["forward"]  # rate 0: every block on N
    routed = count_flops(net, batch=2, mask_ratio=0.3)
    assert routed["tokens"] == {"N": 16, "K": 12}
    saved = sum(sum(_block_flops(b, 16).values()) - sum(_block_flops(b, 12).values()) for b in net.blocks[1:3])
    assert dense["forward"] - routed["forward"] == 2 * saved > 0


def test_lightningdit_blocks_route_with_rope_positions():
    """With LightningDiT's blocks (RoPE), a routed token rotates by its grid position (the
    official LightningDiT_TREAD's rope_ids): the routed forward equals the blocks run by hand with
    ``rope_ids = ids_keep`` inside the route; in eval the model is the dense DiT of the same blocks."""
    from fastmask.models.configs import LIGHTNINGDIT_BLOCK

    net = randomise(tread("LightningDiT-T/2", input_size=8, in_channels=2, num_classes=3, depth=4), std=0.2).eval()
    with torch.no_grad():  # larger q/k-norm weights: attention (and so RoPE) shapes the output
        for blk in net.blocks:
            blk.attn.q_norm.weight.fill_(3.0)
            blk.attn.k_norm.weight.fill_(3.0)
    base = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=64, depth=4, num_heads=4, num_classes=3,
               block=LIGHTNINGDIT_BLOCK)
    base.load_state_dict(net.state_dict())
    base.eval()
    x, t, labels = _inputs(net)
    ids = _unsorted_ids(3, 16, 5)
    with torch.no_grad():
        assert torch.equal(net(x, t, labels), base(x, t, labels))
        got = net.forward_tokens(x, t, labels, ids_keep=ids)
        c = net.condition(t, labels)
        h = fastmask.ops.reference.add_pos(net.x_embedder(x), net.pos_embed)
        rope = (net.rope_cos, net.rope_sin)
        rows = torch.arange(3)[:, None]
        h0 = net.blocks[0](h, c, rope=rope)

        def by_hand(rope_ids):
            h = h0[rows, ids]
            for blk in net.blocks[1:3]:
                h = blk(h, c, rope=rope, rope_ids=rope_ids)
            back = h0.clone()
            back[rows, ids] = h
            return net.final_layer(net.blocks[3](back, c, rope=rope), c)

        want = by_hand(ids)
        wrong = by_hand(torch.arange(5).expand(3, 5))  # the kept tokens' rows, not their positions
    assert net.route == (1, 2)
    assert (got - want).abs().max() < 1e-5 < 1e-3 < (got - wrong).abs().max()

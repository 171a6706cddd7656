"""`fastmask.route_tokens`: TREAD's routing as a drop-in on any stack of blocks, checked against
the routing written out by hand in plain torch (indexing, clone, index assignment)."""
import copy

import pytest
import torch

import fastmask
from fastmask.nn import MaskedDiTBlock, rope_2d
from fastmask.nn.routing import route_tokens


def _blocks(n=4, D=16, H=2, **kw):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([MaskedDiTBlock(D, H, 2.0, **kw) for _ in range(n)])
    with torch.no_grad():  # adaLN-Zero starts every block at the identity: make them do something
        for p in blocks.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    return blocks.train()


def _stack(blocks, x, c, **kw):
    for blk in blocks:
        x = blk(x, c, **kw)
    return x


def _by_hand(blocks, x, c, ids, start, end, **kw):
    """TREAD written out: save the stream before `start`, run start..end (inclusive) on the kept
    rows, write them back into a copy of the saved stream."""
    for blk in blocks[:start]:
        x = blk(x, c, **kw)
    saved = x
    B = x.shape[0]
    kept = torch.stack([saved[b, ids[b]] for b in range(B)])
    kw_in = dict(kw)
    if kw.get("rope") is not None:
        kw_in["rope_ids"] = ids
    for blk in blocks[start:end + 1]:
        kept = blk(kept, c, **kw_in)
    out = saved.clone()
    for b in range(B):
        out[b, ids[b]] = kept[b]
    for blk in blocks[end + 1:]:
        out = blk(out, c, **kw)
    return out


@pytest.mark.parametrize("start,end,rate,N", [(1, 2, 0.3, 10), (0, 3, 0.5, 9), (2, 2, 0.75, 16)])
def test_routed_stack_equals_routing_by_hand(start, end, rate, N):
    blocks = _blocks()
    B, D = 3, 16
    x = torch.randn(B, N, D, requires_grad=True)
    c = torch.randn(B, D)
    router = route_tokens(blocks, start, end, rate, generator=torch.Generator().manual_seed(5))
    out = _stack(blocks, x, c)
    ids = router.last_ids
    K = N - int(N * rate)  # TREAD's rounding: rate is the fraction that bypasses the blocks
    assert ids.shape == (B, K) and not all(bool((r[1:] > r[:-1]).all()) for r in ids)  # unsorted
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *blocks.parameters()], g)
    router.enabled = False
    ref = _by_hand(blocks, x, c, ids, start, end)
    ref_grads = torch.autograd.grad(ref, [x, *blocks.parameters()], g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the bypassing tokens skip the routed blocks: after the last block of a route that ends the
    # stack, they hold the stream from before the route
    if end == len(blocks) - 1:
        router.enabled = True
        y = _stack(blocks, x, c)
        before = _stack(blocks[:start], x, c) if start else x
        skipped = torch.ones(B, N, dtype=torch.bool)
        skipped[torch.arange(B)[:, None], router.last_ids] = False
        torch.testing.assert_close(y[skipped], before[skipped], rtol=0, atol=0)


def test_rope_blocks_see_each_routed_token_at_its_own_position():
    blocks = _blocks(norm="rms", qk_norm=True, rope=True, mlp="swiglu")
    B, N, D = 2, 16, 16
    rope = rope_2d(4, D // 2)
    x, c = torch.randn(B, N, D), torch.randn(B, D)
    router = route_tokens(blocks, 1, 2, 0.5, generator=torch.Generator().manual_seed(2))
    out = _stack(blocks, x, c, rope=rope, rope_ids=None)
    router.enabled = False
    ref = _by_hand(blocks, x, c, router.last_ids, 1, 2, rope=rope, rope_ids=None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_eval_is_the_dense_model_and_the_state_dict_is_unchanged():
    blocks = _blocks()
    keys = list(blocks.state_dict())
    x, c = torch.randn(2, 12, 16), torch.randn(2, 16)
    dense = _stack(blocks.eval(), x, c)
    router = route_tokens(blocks, 1, 2, 0.5)
    assert list(blocks.state_dict()) == keys
    assert torch.equal(_stack(blocks.eval(), x, c), dense)  # routing is a training-time change only
    blocks.train()
    assert not torch.equal(_stack(blocks, x, c), _stack(blocks.eval(), x, c))
    router.remove()
    assert torch.equal(_stack(blocks.train(), x, c), _stack(blocks.eval(), x, c))


def test_fastmask_dit_routes_in_training_only():
    net = fastmask.dit("T/2", input_size=8, in_channels=4, num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    dense = net.eval()(x, t, y)
    router = route_tokens(net, 0, 0, 0.5)  # found as net.blocks (T/2 has 2 blocks)
    assert torch.equal(net.eval()(x, t, y), dense)
    out = net.train()(x, t, y)
    assert out.shape == dense.shape and router.last_ids.shape == (2, 8) and not torch.equal(out, dense)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.blocks.parameters())


def test_refusals():
    blocks = _blocks()
    for args, msg in (((blocks, 1, 4), "start, end"), ((blocks, 2, 1), "start, end"), ((blocks, 0, 1, 1.0), "rate"),
                      ((blocks, 0, 1, -0.1), "rate"), ((torch.nn.Linear(2, 2), 0, 0), "model_or_blocks")):
        with pytest.raises(ValueError, match=msg):
            route_tokens(*args)
    route_tokens(blocks, 1, 2)

    class Masked(torch.nn.Module):  # a block taking a per-token mask: refused, not silently wrong
        def forward(self, x, attention_mask=None):
            return x

    stack = torch.nn.ModuleList([Masked(), Masked()]).train()
    route_tokens(stack, 0, 1)
    with pytest.raises(ValueError, match="'attention_mask' has shape \\(2, 6\\)"):
        stack[0](torch.randn(2, 6, 4), attention_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="tokens \\[B, N, D\\]"):
        stack[0](torch.randn(2, 6))


def test_diffusers_dit_fused_or_not():
    pytest.importorskip("diffusers", reason="needs the optional package diffusers ([latents] extra)")
    from diffusers import DiTTransformer2DModel

    from fastmask.nn.diffusers import fuse_transformer

    torch.manual_seed(0)
    base = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 9])
    keys = list(base.state_dict())
    for model in (copy.deepcopy(base), fuse_transformer(copy.deepcopy(base))):  # fuse first, then route
        dense = model.eval()(x, t, y).sample
        router = route_tokens(model, 1, 1, 0.5, generator=torch.Generator().manual_seed(0))
        assert list(model.state_dict()) == keys
        assert torch.equal(model.eval()(x, t, y).sample, dense)
        routed = model.train()(x, t, y).sample
        assert routed.shape == dense.shape and router.last_ids.shape == (2, 8) and not torch.equal(routed, dense)
        routed.square().mean().backward()
        assert all(p.grad is not None for p in model.transformer_blocks[1].parameters() if p.requires_grad)
        router.remove()

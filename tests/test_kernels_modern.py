"""Modern-DiT kernels against plain PyTorch written here (not the library's reference):
attention with RoPE gathered by ids_keep and per-head q/k RMSNorm (fastmask.kernels.attention
prologue), RMSNorm-modulate and its residual fusion (kernels/norm.py, RMS switch), SwiGLU
(kernels/swiglu.py). CPU: the Triton interpreter, fp32, tiny awkward shapes, NaN-poisoned
outputs; forward and backward, norm-weight gradients included.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmask
from fastmask import ops
from fastmask.kernels import attention_launch as K
from fastmask.kernels import norm as NK
from fastmask.kernels import swiglu as SK
from fastmask.nn.layers import rope_2d
from helpers import assert_all_written, poisoned_empty


# ----------------------------------------------------------------------------- plain torch


def _rotate_pairs(x):  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
    out = torch.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def _attention(qkv, scale, cos, sin, ids, qw, kw, eps=1e-6):
    B, L, _, H, hd = qkv.shape
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, L, hd]

    def pro(x, w):
        if w is not None:
            x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
        if cos is not None:
            c = cos[ids].unsqueeze(1) if ids is not None else cos[:L]
            s = sin[ids].unsqueeze(1) if ids is not None else sin[:L]
            x = x * c + _rotate_pairs(x) * s
        return x

    q, k = pro(q, qw), pro(k, kw)
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, L, H * hd)


def _rms_mod(x, shift, scale, w, eps=1e-6):
    h = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    if w is not None:
        h = h * w
    return h * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------- RoPE tables


def test_rope_2d_is_lightningdit_layout():
    # VisionRotaryEmbeddingFast(dim=hd/2, pt_seq_len=g), written out: per axis hd/4 frequencies
    # theta^(-2j/(hd/2)), each repeated for an interleaved pair; rows first, then columns.
    g, hd = 3, 16
    cos, sin = rope_2d(g, hd)
    dim = hd // 2
    f = 1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim))
    for n in range(g * g):
        r, c = divmod(n, g)
        want = torch.cat([(r * f).repeat_interleave(2), (c * f).repeat_interleave(2)])
        torch.testing.assert_close(cos[n].double(), want.cos(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[n].double(), want.sin(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head_dim"):
        rope_2d(4, 18)


# ----------------------------------------------------------------------------- attention prologue

# (B, L, H, hd, positions, gather, norm, rope)
ATT_CASES = [
    (2, 59, 2, 72, 80, True, True, True),  # XL head dim, ragged blocks, unsorted ids
    (1, 37, 3, 32, 37, False, True, True),  # no gather: row l reads table row l
    (2, 40, 1, 64, 50, True, False, True),  # RoPE only
    (2, 23, 2, 72, 23, False, True, False),  # qk-norm only
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "deterministic"])
@pytest.mark.parametrize("case", ATT_CASES, ids=[f"B{c[0]}-L{c[1]}-hd{c[3]}-g{int(c[5])}n{int(c[6])}r{int(c[7])}"
                                                 for c in ATT_CASES])
def test_attention_prologue_fp32(case, deterministic):
    B, L, H, hd, P, gather, norm, rope = case
    g = torch.Generator().manual_seed(L * hd)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    qkv = r(B, L, 3, H, hd)
    # RoPE tables hold one angle per interleaved pair (columns 2i and 2i + 1 equal)
    cos, sin = (r(P, hd // 2).repeat_interleave(2, 1), r(P, hd // 2).repeat_interleave(2, 1)) if rope else (None, None)
    ids = torch.stack([torch.randperm(P, generator=g)[:L] for _ in range(B)]) if gather else None
    assert ids is None or not bool((ids.diff(dim=1) > 0).all())  # really unsorted
    qw, kw = (r(hd), r(hd)) if norm else (None, None)
    scale = hd**-0.5
    grad_out = r(B, L, H * hd)

    leaves = [qkv.clone().requires_grad_()] + ([qw.clone().requires_grad_(), kw.clone().requires_grad_()] if norm
                                               else [])
    want = _attention(leaves[0], scale, cos, sin, ids, *(leaves[1:] if norm else (None, None)))
    want.backward(grad_out)

    with poisoned_empty():
        out, lse = K.attention_rope_fwd(qkv, scale, cos, sin, ids, qw, kw, 1e-6)
        dqkv, dqw, dkw = K.attention_rope_bwd(grad_out, qkv, out, lse, scale, cos, sin, ids, qw, kw, 1e-6,
                                              deterministic=deterministic)
    for t, name in ((out, "out"), (lse, "lse"), (dqkv, "dqkv")):
        assert_all_written(t, name)
    torch.testing.assert_close(out, want.detach(), atol=3e-5, rtol=1e-4)
    for i, name in enumerate("qkv"):
        torch.testing.assert_close(dqkv[:, :, i], leaves[0].grad[:, :, i], atol=2e-4, rtol=2e-4, msg=f"d{name}")
    if norm:
        torch.testing.assert_close(dqw, leaves[1].grad, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(dkw, leaves[2].grad, atol=2e-4, rtol=2e-4)
    else:
        assert dqw.numel() == 0 and dkw.numel() == 0


def test_prologue_changes_the_result():
    # guards the test above: without the prologue the kernel output differs (the plain path
    # is not silently taken)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 20, 3, 1, 32, generator=g)
    cos, sin = (torch.randn(20, 16, generator=g).repeat_interleave(2, 1) for _ in range(2))
    plain, _ = K.attention_fwd(qkv, 0.2)
    roped, _ = K.attention_rope_fwd(qkv, 0.2, cos, sin, None, None, None, 1e-6)
    assert (plain - roped).abs().max() > 1e-2


def test_attention_prologue_weight_grads_repeat():
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 33, 3, 2, 72, generator=g)
    cos, sin = rope_2d(6, 72)
    ids = torch.stack([torch.randperm(36, generator=g)[:33] for _ in range(2)])
    qw, kw = torch.randn(72, generator=g), torch.randn(72, generator=g)
    out, lse = K.attention_rope_fwd(qkv, 0.1, cos, sin, ids, qw, kw, 1e-6)
    go = torch.randn(out.shape, generator=g)
    first = K.attention_rope_bwd(go, qkv, out, lse, 0.1, cos, sin, ids, qw, kw, 1e-6, deterministic=True)
    again = K.attention_rope_bwd(go, qkv, out, lse, 0.1, cos, sin, ids, qw, kw, 1e-6, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_ops_attention_autograd_and_backends():
    g = torch.Generator().manual_seed(7)
    B, L, H, hd, P = 2, 13, 2, 32, 25
    qkv = torch.randn(B, L, 3, H, hd, generator=g, requires_grad=True)
    cos, sin = rope_2d(5, hd)
    ids = torch.stack([torch.randperm(P, generator=g)[:L] for _ in range(B)])
    qw = torch.randn(hd, generator=g, requires_grad=True)
    kw = torch.randn(hd, generator=g, requires_grad=True)
    res = {}
    for be in ("torch", "triton"):
        with fastmask.backend(be), fastmask.ops.record_choices() as ran:
            out = ops.attention(qkv, rope=(cos, sin), ids_keep=ids, q_norm_weight=qw, k_norm_weight=kw)
        assert ran["attention_rope"] == {be}
        res[be] = (out, *torch.autograd.grad((out * out).sum(), [qkv, qw, kw]))
    want = _attention(qkv, hd**-0.5, cos, sin, ids, qw, kw)
    torch.testing.assert_close(res["torch"][0], want, atol=1e-5, rtol=1e-5)
    for a, b in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_ops_attention_prologue_validation():
    qkv = torch.randn(2, 5, 3, 1, 16)
    cos = torch.randn(9, 8).repeat_interleave(2, 1)
    ids = torch.stack([torch.randperm(9)[:5] for _ in range(2)])
    with pytest.raises(ValueError, match="ids_keep"):
        ops.attention(qkv, ids_keep=ids)  # ids without rope
    with pytest.raises(ValueError, match="rope"):
        ops.attention(qkv, rope=cos)  # not a pair
    with pytest.raises(ValueError, match="rope cos"):
        ops.attention(qkv, rope=(torch.randn(9, 8), torch.randn(9, 8)))
    with pytest.raises(ValueError, match="q_norm_weight"):
        ops.attention(qkv, q_norm_weight=torch.ones(16))
    with pytest.raises(ValueError, match="ids_keep"):
        ops.attention(qkv, rope=(cos, cos), ids_keep=ids + 9)  # past the table
    with pytest.raises(ValueError, match="k_norm_weight"):
        ops.attention(qkv, q_norm_weight=torch.ones(16), k_norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="one angle per"):
        ops.attention(qkv, rope=(torch.randn(9, 16), cos))  # columns 2i and 2i + 1 differ: not a rotation


# ----------------------------------------------------------------------------- RMSNorm-modulate


@pytest.mark.parametrize("B,L,D,weight", [(2, 59, 72, True), (3, 5, 40, False), (1, 17, 130, True)])
def test_rmsnorm_modulate_kernels(B, L, D, weight):
    g = torch.Generator().manual_seed(B * L + D)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, y, gate, shift, scale = r(B, L, D), r(B, L, D), r(B, D), r(B, D), r(B, D)
    w = r(D) if weight else None
    g1, g2 = r(B, L, D), r(B, L, D)

    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)] + ([w.clone().requires_grad_()] if weight else [])
    want = _rms_mod(*leaves[:3], leaves[3] if weight else None)
    want.backward(g2)
    with poisoned_empty():
        out, rstd = NK.rmsnorm_modulate_fwd(x, shift, scale, w, 1e-6)
        grads = NK.rmsnorm_modulate_bwd(g2, x, scale, w, rstd)
    for t in (out, rstd, *grads[:3]):
        assert_all_written(t)
    torch.testing.assert_close(out, want.detach(), atol=1e-5, rtol=1e-5)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-4, rtol=1e-4)
    assert weight or grads[3].numel() == 0

    leaves = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)] + (
        [w.clone().requires_grad_()] if weight else [])
    x_new = leaves[0] + leaves[2][:, None] * leaves[1]
    want = _rms_mod(x_new, leaves[3], leaves[4], leaves[5] if weight else None)
    torch.autograd.backward([x_new, want], [g1, g2])
    with poisoned_empty():
        xn, out, rstd = NK.residual_rmsnorm_modulate_fwd(x, y, gate, shift, scale, w, 1e-6)
        grads = NK.residual_rmsnorm_modulate_bwd(g1, g2, xn, y, gate, scale, w, rstd)
    for t in (xn, out, rstd, *grads[:5]):
        assert_all_written(t)
    torch.testing.assert_close(xn, x_new.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, want.detach(), atol=1e-5, rtol=1e-5)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-4, rtol=1e-4)


def test_rmsnorm_ops_match_reference_both_backends():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    y = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    vec = [torch.randn(2, 40, generator=g, requires_grad=True) for _ in range(3)]
    w = torch.randn(40, generator=g, requires_grad=True)
    res = {}
    for be in ("torch", "triton"):
        with fastmask.backend(be):
            h1 = ops.rmsnorm_modulate(x, vec[1], vec[2], w)
            xn, h2 = ops.residual_rmsnorm_modulate(x, y, vec[0], vec[1], vec[2], w)
        loss = (h1 * h1).sum() + (h2 * h2).sum() + xn.sum()
        res[be] = (h1, xn, h2, *torch.autograd.grad(loss, [x, y, w, *vec]))
    for a, b in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="weight"):
        ops.rmsnorm_modulate(x, vec[1], vec[2], torch.ones(39))


# ----------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("shape", [(2, 7, 2 * 37), (3, 2 * 80), (1, 5, 9, 2 * 8)])
def test_swiglu_kernels(shape):
    g = torch.Generator().manual_seed(sum(shape))
    ab = torch.randn(*shape, generator=g)
    go = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    leaf = ab.clone().requires_grad_()
    a, b = leaf.chunk(2, dim=-1)
    want = F.silu(a) * b
    want.backward(go)
    with poisoned_empty():
        out = SK.swiglu_fwd(ab)
        gab = SK.swiglu_bwd(go, ab)
    assert_all_written(out)
    assert_all_written(gab)
    torch.testing.assert_close(out, want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gab, leaf.grad, atol=1e-6, rtol=1e-5)


def test_swiglu_op():
    ab = torch.randn(2, 3, 12, requires_grad=True)
    with fastmask.backend("triton"):
        out = ops.swiglu(ab)
    a, b = ab.chunk(2, -1)
    torch.testing.assert_close(out, F.silu(a) * b)
    (ga,) = torch.autograd.grad(out.sum(), ab)
    (gw,) = torch.autograd.grad((F.silu(a) * b).sum(), ab)
    torch.testing.assert_close(ga, gw)
    with pytest.raises(ValueError, match="ab"):
        ops.swiglu(torch.randn(2, 5))


def test_prologue_configs_fit_the_partial_buffers():
    # the qk-norm weight partials have one row per program, sized for blocks >= _MIN_GRID_BLOCK
    for kind in ("fwd", "dq", "dkdv", "bwd", "qchain"):
        for hd in (32, 64, 72, 128):
            for dt in (torch.bfloat16, torch.float32):
                m, n, w, s = K.prologue_config(kind, 256, hd, dt)
                grid_block = {"BLOCK_M": m, "BLOCK_N": n}[K._GRID_DIM[kind]]
                assert grid_block >= K._MIN_GRID_BLOCK and m >= 16 and n >= 16 and w in (4, 8) and s >= 1


@pytest.mark.parametrize("hd,kinds", [(32, ["delta", "bwd", "qchain"]), (72, ["dq", "dkdv"])])
def test_one_pass_backward_kinds_with_prologue(monkeypatch, hd, kinds):
    # head dim 72 with a prologue always takes the deterministic pair (the one-pass kernel
    # spilled there on sm_90 and sm_80); other head dims keep the one-pass kernel + the chain
    ran = []
    real = K._launch
    monkeypatch.setattr(K, "_launch", lambda kind, *a: (ran.append(kind), real(kind, *a))[1])
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(1, 17, 3, 1, hd, generator=g)
    cos, sin = rope_2d(5, hd)
    out, lse = K.attention_rope_fwd(qkv, 0.2, cos, sin, None, None, None, 1e-6)
    ran.clear()
    K.attention_rope_bwd(torch.randn(out.shape, generator=g), qkv, out, lse, 0.2, cos, sin, None, None, None, 1e-6,
                         deterministic=False)
    assert ran == kinds

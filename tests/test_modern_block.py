"""LightningDiT-style blocks and models: MaskedDiTBlock(norm="rms", qk_norm=True, rope=True,
mlp="swiglu") against a plain-torch block written here after hustvl/LightningDiT
(models/lightningdit.py: LightningDiTBlock, Attention; models/rmsnorm.py; models/swiglu_ffn.py;
models/pos_embed.py: VisionRotaryEmbeddingFast, rotate_half), with that code's module names so
its state dict has the published keys; on kept tokens (ids_keep) and on both backends.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmask
from fastmask.cli import main
from fastmask.models import dit, from_lightningdit, maskdit
from fastmask.nn import MaskedDiTBlock
from helpers import randomise


class _RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _rotate_half(x):  # interleaved pairs
    x = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def _lightning_rope(head_dim, grid):
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    f = torch.einsum("i,f->if", torch.arange(grid).float(), freqs).repeat_interleave(2, dim=-1)
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    return f.cos().reshape(grid * grid, -1), f.sin().reshape(grid * grid, -1)


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = _RMSNorm(self.hd), _RMSNorm(self.hd)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class _SwiGLUFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class _LightningBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2 = _RMSNorm(dim), _RMSNorm(dim)
        self.attn = _Attention(dim, heads)
        self.mlp = _SwiGLUFFN(dim, int(2 / 3 * int(dim * mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        mod = lambda h, s, sc: h * (1 + sc.unsqueeze(1)) + s.unsqueeze(1)  # noqa: E731
        x = x + g1.unsqueeze(1) * self.attn(mod(self.norm1(x), s1, sc1), cos, sin)
        return x + g2.unsqueeze(1) * self.mlp(mod(self.norm2(x), s2, sc2))


MODERN = dict(norm="rms", qk_norm=True, rope=True, mlp="swiglu")


def test_default_block_keys_unchanged():
    keys = set(MaskedDiTBlock(64, 4).state_dict())
    assert keys == {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
                    "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight",
                    "adaLN_modulation.1.bias"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_modern_block_matches_lightningdit_on_kept_tokens(backend):
    D, H, grid, B, K = 64, 2, 5, 2, 11  # head dim 32, 25 tokens, 11 kept (unsorted)
    ref = randomise(_LightningBlock(D, H), std=0.1, seed=1)
    blk = MaskedDiTBlock(D, H, **MODERN)
    blk.load_state_dict(ref.state_dict(), strict=True)  # the published keys, nothing else
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, grid * grid, D, generator=g)
    c = torch.randn(B, D, generator=g)
    ids = torch.stack([torch.randperm(grid * grid, generator=g)[:K] for _ in range(B)])
    cos, sin = _lightning_rope(D // H, grid)

    xr = x.clone().requires_grad_()
    kept = torch.gather(xr, 1, ids[..., None].expand(-1, -1, D))
    want = ref(kept, c, cos[ids][:, None], sin[ids][:, None])
    want.backward(torch.ones_like(want))

    xb = x.clone().requires_grad_()
    with fastmask.backend(backend), fastmask.ops.record_choices() as ran:
        got = blk(xb, c, ids_keep=ids, rope=(cos, sin))
    got.backward(torch.ones_like(got))
    assert ran["attention_rope"] == {backend} and ran["swiglu"] == {backend}
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(xb.grad, xr.grad, atol=1e-4, rtol=1e-4)
    for (name, p), (_, q) in zip(blk.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=2e-4, msg=name)
    with pytest.raises(ValueError, match="rope"):
        blk(x, c)  # a RoPE block without tables


def test_rope_ids_on_already_kept_tokens():
    blk = randomise(MaskedDiTBlock(32, 2, **MODERN), seed=3)
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])
    cos, sin = _lightning_rope(16, 4)
    a = blk(x, c, ids_keep=ids, rope=(cos, sin))
    b = blk(torch.gather(x, 1, ids[..., None].expand(-1, -1, 32)), c, rope=(cos, sin), rope_ids=ids)
    torch.testing.assert_close(a, b)


def _published_layout(D=64, H=4, depth=2, grid=4, C=4, classes=10):
    """A LightningDiT-XL-like state dict at toy size, keys as models/lightningdit.py names them."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(depth):
        for k, v in randomise(_LightningBlock(D, H), std=0.05, seed=i).state_dict().items():
            sd[f"blocks.{i}.{k}"] = v
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd.update({
        "pos_embed": r(1, grid * grid, D), "x_embedder.proj.weight": r(D, C, 1, 1), "x_embedder.proj.bias": r(D),
        "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D), "t_embedder.mlp.2.weight": r(D, D),
        "t_embedder.mlp.2.bias": r(D), "y_embedder.embedding_table.weight": r(classes + 1, D),
        "final_layer.norm_final.weight": 1 + r(D), "final_layer.linear.weight": r(C, D), "final_layer.linear.bias": r(C),
        "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
    })
    cos, sin = _lightning_rope(D // H, grid)
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = cos, sin
    return sd


def test_loads_published_lightningdit_layout():
    sd = _published_layout()
    model = from_lightningdit({"ema": sd})
    assert model.patch_size == 1 and model.in_channels == 4 and len(model.blocks) == 2
    assert model.blocks[0].mlp.w3.in_features == 170 and model.blocks[0].norm == "rms"
    torch.testing.assert_close(model.blocks[1].attn.q_norm.weight, sd["blocks.1.attn.q_norm.weight"])
    x = torch.randn(2, 4, 4, 4)
    out = model(x, torch.rand(2), torch.tensor([1, 3]))
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()
    bad = dict(sd, **{"feat_rope.freqs_cos": sd["feat_rope.freqs_cos"] * 0})
    with pytest.raises(ValueError, match="RoPE"):
        from_lightningdit(bad)
    with pytest.raises(ValueError, match="LightningDiT"):
        from_lightningdit(dit("T/2", input_size=8).state_dict())


def test_lightningdit_configs_build_and_run_masked():
    m = maskdit("LightningDiT-T/2", input_size=8, num_classes=10).train()
    assert isinstance(m.blocks[0].mlp, fastmask.nn.SwiGLUMlp) and m.decoder_blocks[0].rope
    assert not any("rope" in k for k in m.state_dict())  # tables are rebuilt, not saved
    out, mask = m.forward_tokens(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), mask_ratio=0.5)
    assert out.shape == (2, 16, 16) and mask.sum() == 16
    out.square().mean().backward()
    assert m.blocks[0].attn.q_norm.weight.grad is not None


def test_digits_demo_trains_lightningdit(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", "LightningDiT-Digits/2", "--steps", "4", "--finetune-steps", "1", "--sample-steps", "2",
            "--samples-per-class", "1", "--batch-size", "8", "--set", "log_every=1", "--set", "grid_per_class=1",
            "--progress", "off", "--no-eval", "--out", str(out)]
    assert main(argv) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert losses and all(l == l and l < 1e3 for l in losses)


def test_modern_block_compiles_without_graph_breaks():
    blk = randomise(MaskedDiTBlock(32, 2, **MODERN), seed=6)
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])
    cos, sin = _lightning_rope(16, 4)
    fn = lambda x, c, i: blk(x, c, ids_keep=i, rope=(cos, sin))  # noqa: E731
    torch._dynamo.reset()
    with fastmask.backend("triton"), fastmask.ops.checks.trusted_values():
        want = fn(x, c, ids)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, c, ids)
    torch.testing.assert_close(got, want)

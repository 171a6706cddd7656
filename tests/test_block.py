"""MaskedDiTBlock is a drop-in for DiT's block: same keys, same output."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmask
from fastmask import MaskedDiTBlock, ops, swap_dit_blocks


class DiTBlockSpec(nn.Module):
    """DiT's block written out from the DiT paper's definition (adaLN-Zero; timm-style attention and MLP names)."""

    def __init__(self, D, heads, mlp_ratio=4.0, cond=None):
        super().__init__()
        cond = cond or D
        self.heads = heads
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(D, 3 * D)
        self.attn.proj = nn.Linear(D, D)
        self.attn.num_heads = heads
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(D, int(D * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(D * mlp_ratio), D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond, 6 * D))

    def _attn(self, x):
        B, L, D = x.shape
        qkv = self.attn.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5
        x = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        return self.attn.proj(x)

    def forward(self, x, c):
        s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        mod = lambda h, s, c: h * (1 + c.unsqueeze(1)) + s.unsqueeze(1)  # noqa: E731
        x = x + g1.unsqueeze(1) * self._attn(mod(self.norm1(x), s1, c1))
        mlp = lambda h: self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))  # noqa: E731
        return x + g2.unsqueeze(1) * mlp(mod(self.norm2(x), s2, c2))


def _random_spec_block(D=48, heads=4, cond=None, seed=0):
    torch.manual_seed(seed)
    blk = DiTBlockSpec(D, heads, cond=cond)
    for p in blk.parameters():  # adaLN-Zero would make the block the identity: randomise everything
        nn.init.normal_(p, std=0.2)
    return blk


@pytest.mark.parametrize("cond", [None, 40])
def test_state_dict_loads_strict_and_output_matches(cond):
    spec = _random_spec_block(cond=cond)
    blk = MaskedDiTBlock(48, 4, 4.0, cond_size=cond)
    assert set(blk.state_dict()) == set(spec.state_dict())
    blk.load_state_dict(spec.state_dict(), strict=True)
    x = torch.randn(3, 17, 48)
    c = torch.randn(3, cond or 48)
    with fastmask.backend("torch"):
        out = blk(x, c)
    assert (out - spec(x, c)).abs().max().item() < 1e-5


def test_published_key_names():
    keys = set(MaskedDiTBlock(16, 2).state_dict())
    assert keys == {
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    }  # fmt: skip


def test_ids_keep_gathers_first():
    spec = _random_spec_block()
    blk = MaskedDiTBlock(48, 4)
    blk.load_state_dict(spec.state_dict())
    x, c = torch.randn(2, 16, 48), torch.randn(2, 48)
    ids = ops.random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))[0]
    out = blk(x, c, ids_keep=ids)
    torch.testing.assert_close(out, blk(ops.gather_tokens(x, ids), c))
    assert out.shape == (2, 8, 48)


def test_fresh_block_is_identity():
    blk = MaskedDiTBlock(32, 4)
    nn.init.zeros_(blk.adaLN_modulation[1].weight)
    nn.init.zeros_(blk.adaLN_modulation[1].bias)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(blk(x, torch.randn(2, 32)), x)


def test_swap_dit_blocks_keeps_weights_and_output():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_random_spec_block(seed=i) for i in range(2)])

        def forward(self, x, c):
            for b in self.blocks:
                x = b(x, c)
            return x

    m = Toy()
    x, c = torch.randn(2, 9, 48), torch.randn(2, 48)
    want = m(x, c)
    swap_dit_blocks(m)
    assert all(isinstance(b, MaskedDiTBlock) for b in m.blocks)
    torch.testing.assert_close(m(x, c), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no DiT blocks"):
        swap_dit_blocks(nn.Linear(2, 2))


def test_block_bad_inputs():
    blk = MaskedDiTBlock(16, 2)
    with pytest.raises(ValueError, match="^x:"):
        blk(torch.randn(2, 5, 8), torch.randn(2, 16))
    with pytest.raises(ValueError, match="^c:"):
        blk(torch.randn(2, 5, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match="num_heads"):
        MaskedDiTBlock(16, 3)


def test_input_of_another_dtype_than_the_weights_is_named():
    """fp64 activations into fp32 weights: a ValueError naming the input, its dtype and the
    expected one, from the block and from every other module that takes activations."""
    from fastmask.nn import FinalLayer, PatchEmbed
    from fastmask.nn.block import Attention, Mlp

    torch.manual_seed(0)
    blk = MaskedDiTBlock(32, 4)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"^x: expected dtype torch.float32 .*got torch.float64"):
        blk(x.double(), c)
    with pytest.raises(ValueError, match=r"^c: expected dtype torch.float32 .*got torch.float64"):
        blk(x, c.double())
    with pytest.raises(ValueError, match=r"^x: expected dtype torch.float64 .*got torch.float32"):
        MaskedDiTBlock(32, 4).double()(x, c.double())
    from fastmask.nn.block import SwiGLUMlp

    cases = [
        (Attention(32, 4), (x.double(),)),
        (Mlp(32, 64), (x.double(),)),
        (SwiGLUMlp(32, 64), (x.double(),)),
        (FinalLayer(32, 8), (x.double(), c)),
        (PatchEmbed(8, 2, 3, 32), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)),
    ]
    for mod, args in cases:
        with pytest.raises(ValueError, match=r"^x: expected dtype torch.float32 .*got torch.float64"):
            mod(*args)
    with pytest.raises(ValueError, match=r"^c: expected dtype torch.float32"):
        FinalLayer(32, 8)(x, c.double())
    # what autocast casts is still accepted (bf16 activations into fp32 weights), fp64 is not
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert blk(x.bfloat16(), c).shape == (2, 5, 32)
        with pytest.raises(ValueError, match="x: expected dtype torch.float32"):
            blk(x.double(), c)
    torch.testing.assert_close(blk(x, c), blk(x, c))  # matching dtypes: unchanged

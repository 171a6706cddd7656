"""A position table added to low-precision tokens rounds once (the fp32 sum rounded to the
tokens' dtype), in the reference and in the Triton kernels; bf16 on a GPU, where the kernels
round as the hardware does. (Training and sampling under autocast: tests/test_autocast.py.)"""
from __future__ import annotations

import pytest
import torch

import fastmask
from fastmask import ops
from fastmask.ops import dispatch, reference


TRITON_REASON = dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_position_table_rounds_once(dtype):
    g = torch.Generator().manual_seed(0)
    B, N, K, D = 4, 64, 32, 64
    x = torch.randn(B, N, D, generator=g).to(dtype)
    pos = torch.randn(N, D, generator=g)  # fp32, as the model's table (sin-cos values of this size)
    ids = ops.random_mask(B, N, 1 - K / N, generator=g)[0]
    exact = torch.gather(x.float(), 1, ids.unsqueeze(-1).expand(-1, -1, D)) + pos[ids]
    got = reference.gather_tokens(x, ids, pos)
    assert torch.equal(got, exact.to(dtype)), "the reference must round x + pos once"
    twice = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, D)) + pos[ids].to(dtype)
    assert not torch.equal(twice, got), "the inputs do not tell one rounding from two"
    xv, mt = x[:, :K].contiguous(), torch.randn(D, generator=g)
    out = reference.unmask_tokens(xv, ids, mt, N, pos)
    filled = mt.to(dtype).expand(B, N, D).scatter(1, ids.unsqueeze(-1).expand(-1, -1, D), xv)
    assert torch.equal(out, (filled.float() + pos).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_token_ops_round_as_the_reference(dtype, device):
    if device == "cpu" and TRITON_REASON is not None:
        pytest.skip(f"Triton backend unavailable: {TRITON_REASON}")
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest; "
                    "bf16 rounding is checked on a GPU (this test, with a CUDA device)")
    g = torch.Generator().manual_seed(1)
    B, N, K, D = 2, 59, 29, 72  # the shape of the GPU case that found the double rounding
    x = torch.randn(B, N, D, generator=g).to(dtype)
    pos = torch.randn(N, D, generator=g)
    ids = ops.random_mask(B, N, 1 - K / N, generator=g)[0]
    xv, mt = torch.randn(B, K, D, generator=g).to(dtype), torch.randn(D, generator=g)
    x, pos, ids, xv, mt = (t.to(device) for t in (x, pos, ids, xv, mt))
    with fastmask.backend("triton"):
        gathered = ops.gather_tokens(x, ids, pos)
        unmasked = ops.unmask_tokens(xv, ids, mt, N, pos)
    assert torch.equal(gathered, reference.gather_tokens(x, ids, pos))
    assert torch.equal(unmasked, reference.unmask_tokens(xv, ids, mt, N, pos))

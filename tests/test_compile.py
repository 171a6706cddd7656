"""torch.compile(fullgraph=True) of a block, forward and backward, without graph breaks.

fullgraph=True turns any graph break into an error. The custom-op path (Triton backend,
interpreted on the CPU) is traced through register_fake / register_autograd.
"""
import pytest
import torch

import fastmask
from fastmask import MaskedDiTBlock, ops
from fastmask.ops import dispatch


def _block_and_inputs(seed=0):
    torch.manual_seed(seed)
    blk = MaskedDiTBlock(32, 4, cond_size=24)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 12, 32, requires_grad=True)
    c = torch.randn(2, 24)
    ids = ops.random_mask(2, 12, 0.5, generator=torch.Generator().manual_seed(0))[0]
    return blk, x, c, ids


def _run(fn, blk, x, c, ids):
    out = fn(x, c, ids)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in blk.parameters()]
    x.grad = None
    blk.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("backend,compiler", [("torch", "inductor"), ("torch", "aot_eager"), ("triton", "aot_eager")])
def test_compiled_block_matches_eager(backend, compiler):
    if backend == "triton" and dispatch.why_not("triton", "attention", [torch.zeros(1)]):
        pytest.skip(f"Triton backend unavailable here: {dispatch.why_not('triton', 'attention', [torch.zeros(1)])}")
    blk, x, c, ids = _block_and_inputs()
    torch._dynamo.reset()
    with fastmask.backend(backend):
        want_out, want_grads = _run(lambda x, c, i: blk(x, c, ids_keep=i), blk, x, c, ids)
        compiled = torch.compile(lambda x, c, i: blk(x, c, ids_keep=i), fullgraph=True, backend=compiler)
        got_out, got_grads = _run(compiled, blk, x, c, ids)
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

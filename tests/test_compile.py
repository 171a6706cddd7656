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
    if backend == "triton" and dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)]):
        pytest.skip(f"Triton backend unavailable here: {dispatch.why_not('triton', 'gather_tokens', [torch.zeros(1)])}")
    blk, x, c, ids = _block_and_inputs()
    torch._dynamo.reset()
    with fastmask.backend(backend):
        want_out, want_grads = _run(lambda x, c, i: blk(x, c, ids_keep=i), blk, x, c, ids)
        compiled = torch.compile(lambda x, c, i: blk(x, c, ids_keep=i), fullgraph=True, backend=compiler)
        got_out, got_grads = _run(compiled, blk, x, c, ids)
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _opcheck_cases():
    import importlib

    A, Lo, Nm, T, S = (importlib.import_module(f"fastmask.ops.{m}")
                       for m in ("attention", "loss", "norm", "tokens", "swiglu"))

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, N, K, D = 2, 7, 3, 8
    ids = ops.random_mask(B, N, 1 - K / N, generator=torch.Generator().manual_seed(1))[0]
    x, xv, vec = r(B, N, D).requires_grad_(), r(B, K, D).requires_grad_(), lambda: r(B, D).requires_grad_()
    mask = ops.mask_from_ids(ids, N)
    return {
        "gather_tokens": (T._gather_op, (x, ids, r(N, D).requires_grad_(), "triton")),
        "unmask_tokens": (T._unmask_op, (xv, ids, r(D).requires_grad_(), N, r(N, D).requires_grad_(), "triton")),
        "scatter_tokens": (T._scatter_op, (xv, ids, r(B, N, D).requires_grad_(), N, "triton")),
        "layernorm_modulate": (Nm._lnm_op, (x, vec(), vec(), 1e-6, "triton")),
        "gated_residual": (Nm._gr_op, (x, r(B, N, D).requires_grad_(), vec(), "triton")),
        "residual_layernorm_modulate": (
            Nm._rlnm_op,
            (x, r(B, N, D).requires_grad_(), vec(), vec(), vec(), 1e-6, "triton"),
        ),
        "attention": (A._attn_op, (r(B, 5, 3, 2, 8).requires_grad_(), 0.35, "triton")),
        "attention_rope": (A._attn_rope_op, (
            r(B, 5, 3, 2, 8).requires_grad_(), 0.35, r(9, 4).repeat_interleave(2, 1), r(9, 4).repeat_interleave(2, 1),
            torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(B)]),  # unsorted ids into 9 positions
            r(8).requires_grad_(), r(8).requires_grad_(), 1e-6, "triton",
        )),
        "rmsnorm_modulate": (Nm._rnm_op, (x, vec(), vec(), r(D).requires_grad_(), 1e-6, "triton")),
        "residual_rmsnorm_modulate": (
            Nm._rrnm_op, (x, r(B, N, D).requires_grad_(), vec(), vec(), vec(), r(D).requires_grad_(), 1e-6, "triton"),
        ),
        "swiglu": (S._swiglu_op, (r(B, N, 2 * D).requires_grad_(), "triton")),
        "dsm_mae_loss": (
            Lo._loss_op,
            (r(B, N, 8).requires_grad_(), r(B, N, 8), r(B, N, 8), torch.tensor([0.5, 2.0]), mask, 0.1, 0.5, "triton"),
        ),
    }


@pytest.mark.parametrize("name", list(dispatch.OPS))
def test_opcheck_custom_ops(name):
    """torch.library.opcheck: schema, fake (shape/dtype) functions and autograd registration agree
    with the real kernels."""
    reason = dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)])
    if reason:
        pytest.skip(f"Triton backend unavailable here: {reason}")
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

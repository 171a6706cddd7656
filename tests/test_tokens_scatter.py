"""scatter_tokens: kept rows put back into a saved stream (TREAD's route end), against the
reference, forward and backward.

CPU: the Triton kernels in the interpreter on tiny awkward shapes (unsorted ids, K not a
multiple of 8, K = 0, K = N), fp32 tightly; the op is pure data movement, so every result is
compared bit for bit (fp16 activations with an fp32 fill: one cast, which the interpreter
rounds like a GPU). GPU (``gpu_quick``): DiT-XL/2 shapes in bf16 and fp32.
"""
import pytest
import torch

import fastmask
from fastmask import kernels as fk
from fastmask.ops import dispatch
from fastmask.ops import reference as R
from helpers import assert_all_written, poisoned_empty

SHAPES = [  # (B, N, K, D)
    (1, 59, 29, 72),
    (3, 16, 5, 24),  # K not a multiple of 8
    (2, 16, 16, 24),  # K = N: the fill is not read
    (2, 16, 0, 24),  # K = 0: a copy of the fill
]


def _case(B, N, K, D, dtype=torch.float32, fill_dtype=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, D, generator=gen).to(device, dtype)
    ids = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]).to(device)  # unsorted
    fill = torch.randn(B, N, D, generator=gen).to(device, fill_dtype or dtype)
    g = torch.randn(B, N, D, generator=gen).to(device, dtype)
    return x, ids, fill, g


def _ref(x, ids, fill, g):
    xs, fs = x.clone().requires_grad_(), fill.clone().requires_grad_()
    out = R.scatter_tokens(xs, ids, fs)
    out.backward(g)
    return out.detach(), xs.grad, fs.grad


def _spec(x, ids, fill, g):
    """The semantics written out, independently of the reference: a Python loop over rows."""
    out = fill.to(x.dtype).clone()
    gx = torch.zeros_like(x)
    gf = g.clone().to(fill.dtype)
    for b in range(x.shape[0]):
        for k in range(x.shape[1]):
            n = int(ids[b, k])
            out[b, n] = x[b, k]
            gx[b, k] = g[b, n]
            gf[b, n] = 0
    return out, gx, gf


@pytest.mark.parametrize("B,N,K,D", SHAPES)
def test_reference_is_the_spec(B, N, K, D):
    x, ids, fill, g = _case(B, N, K, D, seed=B + N + K)
    for got, want in zip(_ref(x, ids, fill, g), _spec(x, ids, fill, g)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("B,N,K,D", SHAPES)
@pytest.mark.parametrize("dtype,fill_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_kernels_match_reference(B, N, K, D, dtype, fill_dtype):
    x, ids, fill, g = _case(B, N, K, D, dtype, fill_dtype, seed=B * N + K)
    with poisoned_empty():
        out = fk.scatter_tokens_fwd(x, ids, fill, N)
        gx, gf = fk.scatter_tokens_bwd(g, ids, True)
        gx_only, none = fk.scatter_tokens_bwd(g, ids, False)
    ref_out, ref_gx, ref_gf = _ref(x, ids, fill, g)
    assert out.dtype == dtype and out.shape == (B, N, D)
    assert_all_written(out, "out")
    assert torch.equal(out, ref_out), "forward"
    assert gx.shape == (B, K, D) and torch.equal(gx, ref_gx), "grad_x_kept"
    assert torch.equal(gf, ref_gf.to(gf.dtype)), "grad_fill"  # in grad_out's dtype; the op casts it
    assert none is None and torch.equal(gx_only, ref_gx), "grad_x_kept without a fill gradient"
    if K == N:
        assert torch.equal(gf, torch.zeros_like(gf)), "every row kept: the fill gets no gradient"
    if K == 0:
        assert torch.equal(out, fill.to(dtype)) and torch.equal(gf, g)


@pytest.mark.parametrize("x_grad,fill_grad", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype,fill_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_public_op_triton_backend(x_grad, fill_grad, dtype, fill_dtype):
    B, N, K, D = 2, 19, 7, 24
    x, ids, fill, g = _case(B, N, K, D, dtype, fill_dtype, seed=3)
    xs, fs = x.clone().requires_grad_(x_grad), fill.clone().requires_grad_(fill_grad)
    with dispatch.record_choices() as ran, fastmask.backend("triton"):
        out = fastmask.ops.scatter_tokens(xs, ids, fs)
    assert ran == {"scatter_tokens": {"triton"}}
    out.backward(g)
    ref_out, ref_gx, ref_gf = _ref(x, ids, fill, g)
    assert torch.equal(out, ref_out)
    assert (xs.grad is None) == (not x_grad) and (fs.grad is None) == (not fill_grad)
    if x_grad:
        assert torch.equal(xs.grad, ref_gx)
    if fill_grad:
        assert fs.grad.dtype == fill_dtype and torch.equal(fs.grad, ref_gf)


def test_public_op_torch_backend_and_autograd_gradcheck():
    B, N, K, D = 2, 9, 4, 5
    x, ids, fill, _ = _case(B, N, K, D, torch.float64, seed=4)
    x.requires_grad_()
    fill.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, f: fastmask.ops.scatter_tokens(a, ids, f), (x, fill))
    with fastmask.backend("triton"):
        # fp64 is reference-only: an explicit request says why
        with pytest.raises(fastmask.ops.BackendUnavailable, match="float64"):
            fastmask.ops.scatter_tokens(x, ids, fill)


@pytest.mark.parametrize("B,N,K,D", SHAPES)
def test_zero_fill(B, N, K, D):
    """fill=None: zeros of num_tokens rows (MicroDiT's output-space fill), kernels and public op;
    the gradient reaches x_kept only."""
    x, ids, _, g = _case(B, N, K, D, seed=B + K + 7)
    zeros = torch.zeros(B, N, D)
    want = R.scatter_tokens(x, ids, zeros)
    assert torch.equal(R.scatter_tokens(x, ids, None, N), want)
    with poisoned_empty():
        assert torch.equal(fk.scatter_tokens_fwd(x, ids, None, N), want)
    for backend in ("torch", "triton"):
        xs = x.clone().requires_grad_()
        with fastmask.backend(backend):
            out = fastmask.ops.scatter_tokens(xs, ids, num_tokens=N)
        out.backward(g)
        assert torch.equal(out, want) and torch.equal(xs.grad, _ref(x, ids, zeros, g)[1]), backend


def test_out_of_range_ids_write_nothing():
    """With the id check skipped, an id outside [0, N) puts nothing back: its row of the output
    keeps the fill, its grad_x_kept row is zeros, and nothing outside the tensors is touched."""
    B, N, K, D = 2, 19, 7, 24
    x, ids, fill, g = _case(B, N, K, D, seed=5)
    ids[0, 0], ids[0, 3], ids[1, 6] = -1, N, 2**40
    valid = (ids >= 0) & (ids < N)
    kept = torch.zeros(B, N + 1, dtype=torch.bool).scatter(1, torch.where(valid, ids, N), True)[:, :N]
    safe = torch.where(valid, ids, 0)
    with poisoned_empty():
        out = fk.scatter_tokens_fwd(x, ids, fill, N)
        gx, gf = fk.scatter_tokens_bwd(g, ids, True)
        gx2, _ = fk.scatter_tokens_bwd(g, ids, False)
    want = fill.clone()
    for b in range(B):
        for k in range(K):
            if valid[b, k]:
                want[b, ids[b, k]] = x[b, k]
    assert torch.equal(out, want)
    want_gx = torch.where(valid[..., None], torch.gather(g, 1, safe[..., None].expand(-1, -1, D)), 0.0)
    assert torch.equal(gx, want_gx) and torch.equal(gx2, want_gx)
    assert torch.equal(gf, torch.where(kept[..., None], 0.0, g))
    with fastmask.backend("triton"):
        out = fastmask.ops.scatter_tokens(x, ids, fill, check_ids=False)
    assert torch.equal(out, want)


def test_bad_input_names_the_argument():
    B, N, K, D = 2, 8, 3, 4
    x, ids, fill, _ = _case(B, N, K, D, seed=6)
    op = fastmask.ops.scatter_tokens
    cases = {
        r"x_kept: expected a 3-d tensor": lambda: op(x[0], ids, fill),
        r"x_kept: expected a floating-point tensor": lambda: op(x.long(), ids, fill),
        r"fill: expected a 3-d tensor": lambda: op(x, ids, fill[0]),
        r"fill: expected a torch.Tensor": lambda: op(x, ids, fill.tolist()),
        r"num_tokens: expected an integer >= 1, got None": lambda: op(x, ids, None),
        r"num_tokens: 9 is not the fill's token count 8": lambda: op(x, ids, fill, num_tokens=9),
        r"ids_keep: keeps 3 tokens of only 2$": lambda: op(x, ids, num_tokens=2),
        r"x_kept: B is 0": lambda: op(x[:0], ids[:0], num_tokens=N),
        r"fill: expected shape \(2, '\*', 4\)": lambda: op(x, ids, fill[:1]),
        r"fill: expected shape .*dimension 2": lambda: op(x, ids, fill[..., :3]),
        r"fill: N is 0": lambda: op(x[:, :0], ids[:, :0], fill[:, :0]),
        r"ids_keep: expected an int64": lambda: op(x, ids.float(), fill),
        r"ids_keep: expected 3 kept tokens": lambda: op(x, ids[:, :2], fill),
        r"ids_keep: expected batch size 2": lambda: op(x, ids[:1], fill),
        r"ids_keep: keeps 3 tokens of only 2": lambda: op(x, torch.zeros(B, K, dtype=torch.long), fill[:, :2]),
        r"ids_keep: ids must lie in \[0, 8\)": lambda: op(x, ids + N, fill),
        r"ids_keep: a token id is repeated": lambda: op(x, torch.zeros(B, K, dtype=torch.long), fill),
    }
    for pattern, call in cases.items():
        with pytest.raises(ValueError, match=pattern):
            call()
    # the same checks on a second call with the same shapes (the cached plan skips only
    # structural checks it has passed before; the data-dependent ones still run)
    op(x, ids, fill)
    with pytest.raises(ValueError, match="ids_keep: ids must lie"):
        op(x, ids + N, fill)


# -------------------------------------------------------------------------------- GPU
@pytest.mark.gpu_quick
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests above run on the CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [1152, 512])  # DiT-XL/2 width; MaskDiT's decoder width
def test_scatter_gpu_dit_xl(dtype, D):
    """DiT-XL/2 at 256 px (N = 256, TREAD's rate 0.5 keeps K = 128), the public op on Triton:
    bit-identical to the reference (a copy), fill fp32 next to bf16 activations as well."""
    B, N, K = 8, 256, 128
    for fill_dtype in (dtype, torch.float32):
        x, ids, fill, g = _case(B, N, K, D, dtype, fill_dtype, seed=D, device="cuda")
        xs, fs = x.clone().requires_grad_(), fill.clone().requires_grad_()
        with dispatch.record_choices() as ran, fastmask.backend("triton"):
            out = fastmask.ops.scatter_tokens(xs, ids, fs, check_ids=False)
        out.backward(g)
        assert ran == {"scatter_tokens": {"triton"}}
        ref_out, ref_gx, ref_gf = _ref(x, ids, fill, g)
        assert torch.equal(out, ref_out)
        assert torch.equal(xs.grad, ref_gx) and torch.equal(fs.grad, ref_gf)

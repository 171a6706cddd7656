"""Triton gather / unmask kernels (fastmask.kernels.tokens) against fastmask.ops.reference.

CPU: the kernels run in the Triton interpreter on small awkward shapes (N = 59, odd K,
D = 72 and 24, B = 1..3). fp32 must match tightly; fp16 is judged like flash-attention
(error vs an fp32 reference <= 2x (outputs) / 3x (grads) PyTorch's own fp16 error + atol).
bf16 arithmetic is left to the GPU tests: the interpreter truncates fp32 -> bf16 instead
of rounding to nearest, which alone doubles the error; bf16 copies are exact and tested.
"""
import pytest
import torch

import fastmask
from fastmask import kernels as fk
from fastmask.ops import reference as R
from helpers import assert_all_written, assert_close_to_ref, poisoned_empty

SHAPES = [  # (B, N, K, D)
    (1, 59, 29, 72),
    (3, 59, 30, 24),
]


def _ids(B, N, K, gen, device="cpu"):
    return torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]).to(device)


def _check(ours, ref_lowp, ref32, dtype, factor, name):
    assert_all_written(ours, name)
    assert ours.dtype == ref_lowp.dtype, f"{name}: dtype {ours.dtype}, expected {ref_lowp.dtype}"
    if dtype == torch.float32:
        torch.testing.assert_close(ours.float(), ref32.float(), atol=1e-5, rtol=1e-5, msg=name)
    else:
        atol = 1e-5 * max(1.0, ref32.abs().max().item())
        assert_close_to_ref(ours.float(), ref_lowp.float(), ref32.float(), factor, atol=atol, name=name)


def _gather_case(B, N, K, D, dtype, pos_dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=gen).to(device, dtype)
    ids = _ids(B, N, K, gen, device)
    pos = None if pos_dtype is None else torch.randn(N, D, generator=gen).to(device, pos_dtype)
    g = torch.randn(B, K, D, generator=gen).to(device, dtype)
    return x, ids, pos, g


def _ref_grads(fn, inputs, grads, upcast: bool):
    """Run the reference on (optionally fp32-upcast) leaf copies; return outputs and input grads."""
    leaves = [None if t is None else (t.float() if upcast and t.is_floating_point() else t).detach().clone()
              .requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = [g.float() if upcast else g for g in grads]
    torch.autograd.backward([o for o in outs], gs)
    return outs, [None if t is None or not t.requires_grad else t.grad for t in leaves]


# ---------------------------------------------------------------------------- gather
@pytest.mark.parametrize("B,N,K,D", SHAPES)
@pytest.mark.parametrize("dtype,pos_dtype", [
    (torch.float32, None), (torch.float32, torch.float32),
    (torch.float16, torch.float16), (torch.float16, torch.float32),
])
def test_gather_kernel(B, N, K, D, dtype, pos_dtype):
    x, ids, pos, g = _gather_case(B, N, K, D, dtype, pos_dtype)
    with poisoned_empty():
        out = fk.gather_tokens_fwd(x, ids, pos)
        gx, gpos = fk.gather_tokens_bwd(g, ids, N, pos is not None)
    fn = lambda x_, p_: R.gather_tokens(x_, ids, p_)  # noqa: E731
    (ref_lo,), (gx_lo, gp_lo) = _ref_grads(fn, [x, pos], [g], upcast=False)
    (ref32,), (gx32, gp32) = _ref_grads(fn, [x, pos], [g], upcast=True)
    _check(out, ref_lo, ref32, dtype, 2, "out")
    _check(gx, gx_lo, gx32, dtype, 3, "grad_x")
    if pos is None:
        assert gpos is None
    else:
        assert gpos.dtype == torch.float32 and gpos.shape == (N, D)
        _check(gpos, gp_lo.float(), gp32, torch.float32 if dtype == torch.float32 else dtype, 3, "grad_pos")
    # dropped rows get exact zeros
    dropped = torch.ones(B, N, dtype=torch.bool).scatter(1, ids, False)
    assert (gx[dropped] == 0).all()


def test_gather_bf16_copy_exact():
    x, ids, _, g = _gather_case(2, 59, 29, 72, torch.bfloat16, None)
    with poisoned_empty():
        out = fk.gather_tokens_fwd(x, ids, None)
        gx, _ = fk.gather_tokens_bwd(g, ids, 59, False)
    assert torch.equal(out, R.gather_tokens(x, ids))
    assert torch.equal(gx, torch.zeros_like(x).scatter(1, ids[..., None].expand(-1, -1, 72), g))


def test_gather_bwd_deterministic():
    x, ids, pos, g = _gather_case(3, 59, 30, 72, torch.float32, torch.float32, seed=1)
    a = fk.gather_tokens_bwd(g, ids, 59, True)
    b = fk.gather_tokens_bwd(g, ids, 59, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------- unmask
def _unmask_case(B, N, K, D, dtype, mt_dtype, pos_dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    xv = torch.randn(B, K, D, generator=gen).to(device, dtype)
    ids = _ids(B, N, K, gen, device)
    mt = torch.randn(D, generator=gen).to(device, mt_dtype)
    pos = None if pos_dtype is None else torch.randn(N, D, generator=gen).to(device, pos_dtype)
    g = torch.randn(B, N, D, generator=gen).to(device, dtype)
    return xv, ids, mt, pos, g


@pytest.mark.parametrize("B,N,K,D", SHAPES)
@pytest.mark.parametrize("dtype,mt_dtype,pos_dtype", [
    (torch.float32, torch.float32, None), (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16), (torch.float16, torch.float32, torch.float32),
])
def test_unmask_kernel(B, N, K, D, dtype, mt_dtype, pos_dtype):
    xv, ids, mt, pos, g = _unmask_case(B, N, K, D, dtype, mt_dtype, pos_dtype)
    with poisoned_empty():
        out = fk.unmask_tokens_fwd(xv, ids, mt, N, pos)
        gxv, gmt, gpos = fk.unmask_tokens_bwd(g, ids, pos is not None)
    fn = lambda x_, m_, p_: R.unmask_tokens(x_, ids, m_, N, p_)  # noqa: E731
    (ref_lo,), (gx_lo, gm_lo, gp_lo) = _ref_grads(fn, [xv, mt, pos], [g], upcast=False)
    (ref32,), (gx32, gm32, gp32) = _ref_grads(fn, [xv, mt, pos], [g], upcast=True)
    _check(out, ref_lo, ref32, dtype, 2, "out")
    _check(gxv, gx_lo, gx32, dtype, 3, "grad_x_vis")
    assert gmt.dtype == torch.float32 and gmt.shape == (D,)
    _check(gmt, gm_lo.float(), gm32, torch.float32 if dtype == torch.float32 else dtype, 3, "grad_mask_token")
    if pos is None:
        assert gpos is None
    else:
        assert gpos.dtype == torch.float32 and gpos.shape == (N, D)
        _check(gpos, gp_lo.float(), gp32, torch.float32 if dtype == torch.float32 else dtype, 3, "grad_pos")


def test_unmask_bf16_copy_exact():
    xv, ids, mt, _, g = _unmask_case(2, 59, 29, 72, torch.bfloat16, torch.bfloat16, None)
    with poisoned_empty():
        out = fk.unmask_tokens_fwd(xv, ids, mt, 59, None)
        gxv, _, _ = fk.unmask_tokens_bwd(g, ids, False)
    assert torch.equal(out, R.unmask_tokens(xv, ids, mt, 59))
    assert torch.equal(gxv, torch.gather(g, 1, ids[..., None].expand(-1, -1, 72)))


def test_unmask_no_dropped_token():
    """K = N: the mask token gets an exact zero gradient."""
    xv, ids, mt, pos, g = _unmask_case(2, 24, 24, 40, torch.float32, torch.float32, torch.float32)
    with poisoned_empty():
        gxv, gmt, gpos = fk.unmask_tokens_bwd(g, ids, True)
    assert torch.equal(gmt, torch.zeros(40))
    torch.testing.assert_close(gpos, g.sum(0))


def test_unmask_bwd_deterministic():
    xv, ids, mt, pos, g = _unmask_case(3, 59, 29, 72, torch.float32, torch.float32, torch.float32, seed=2)
    a = fk.unmask_tokens_bwd(g, ids, True)
    b = fk.unmask_tokens_bwd(g, ids, True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


class _LaunchSpy:
    """Stands in for a jitted kernel: records each launch's grid and arguments, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("gpu_sizes", [False, True])
@pytest.mark.parametrize("G,R,M", [(1, 1000, 72), (3, 37, 1100), (2, 5, 24), (1, 1, 40)])
def test_sum_partials_is_a_parallel_fixed_order_reduction(monkeypatch, gpu_sizes, G, R, M):
    from fastmask.kernels import _utils
    if gpu_sizes:
        monkeypatch.setattr(_utils, "interpreting", lambda: False)
    spy = _LaunchSpy(_utils._sum_partials_kernel)
    monkeypatch.setattr(_utils, "_sum_partials_kernel", spy)
    part = torch.randn(G, R, M, generator=torch.Generator().manual_seed(R + M))
    out = _utils.sum_partials(part, torch.float32)
    launches = list(spy.launches)
    torch.testing.assert_close(out.double(), part.double().sum(1), atol=1e-4, rtol=1e-5)
    assert torch.equal(out, _utils.sum_partials(part, torch.float32))  # bit-identical repeat
    # no program walks more than sum_rows_per_program() partial rows: R = 1000 is split
    # over many programs instead of walked by one
    per_prog = _utils.sum_rows_per_program()
    for _, args in launches:
        rows, chunks, rows_per_prog = args[2], args[5], args[6]
        assert rows_per_prog <= per_prog and chunks * rows_per_prog >= rows
    passes, r = 1, R
    while r > per_prog:
        passes, r = passes + 1, -(-r // per_prog)
    assert len(launches) == passes


@pytest.mark.parametrize("B,N,K,D", [(5, 100, 37, 40), (2, 257, 1, 24), (7, 33, 32, 72)])
def test_unmask_bwd_mask_token_grad_awkward_shapes(B, N, K, D):
    xv, ids, mt, pos, g = _unmask_case(B, N, K, D, torch.float32, torch.float32, torch.float32, seed=B + N)
    with poisoned_empty():
        gxv, gmt, gpos = fk.unmask_tokens_bwd(g, ids, True)
    dropped = torch.ones(B, N, dtype=torch.bool).scatter(1, ids, False)
    torch.testing.assert_close(gmt.double(), g.double()[dropped].sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gpos.double(), g.double().sum(0), atol=1e-4, rtol=1e-5)
    again = fk.unmask_tokens_bwd(g, ids, True)
    assert torch.equal(gmt, again[1]) and torch.equal(gpos, again[2]) and torch.equal(gxv, again[0])


# ------------------------------------------------------------ public ops, Triton forced
@pytest.mark.parametrize("dtype,pos_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_gather_op_triton_backend(dtype, pos_dtype):
    B, N, Kk, D = 2, 59, 29, 72
    x, ids, pos, g = _gather_case(B, N, Kk, D, dtype, pos_dtype, seed=3)
    xs, ps = x.clone().requires_grad_(), pos.clone().requires_grad_()
    with fastmask.backend("triton"):
        out = fastmask.ops.gather_tokens(xs, ids, ps)
    out.backward(g)
    fn = lambda x_, p_: R.gather_tokens(x_, ids, p_)  # noqa: E731
    (ref_lo,), (gx_lo, gp_lo) = _ref_grads(fn, [x, pos], [g], upcast=False)
    (ref32,), (gx32, gp32) = _ref_grads(fn, [x, pos], [g], upcast=True)
    _check(out, ref_lo, ref32, dtype, 2, "out")
    _check(xs.grad, gx_lo, gx32, dtype, 3, "grad_x")
    assert ps.grad.dtype == pos_dtype
    _check(ps.grad, gp_lo, gp32, torch.float32 if dtype == torch.float32 else dtype, 3, "grad_pos")


@pytest.mark.parametrize("dtype,mt_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_unmask_op_triton_backend(dtype, mt_dtype):
    B, N, Kk, D = 2, 59, 30, 24
    xv, ids, mt, pos, g = _unmask_case(B, N, Kk, D, dtype, mt_dtype, torch.float32, seed=4)
    xs, ms, ps = xv.clone().requires_grad_(), mt.reshape(1, 1, D).clone().requires_grad_(), pos.clone().requires_grad_()
    with fastmask.backend("triton"):
        out = fastmask.ops.unmask_tokens(xs, ids, ms, N, ps)
    out.backward(g)
    fn = lambda x_, m_, p_: R.unmask_tokens(x_, ids, m_, N, p_)  # noqa: E731
    (ref_lo,), (gx_lo, gm_lo, gp_lo) = _ref_grads(fn, [xv, mt, pos], [g], upcast=False)
    (ref32,), (gx32, gm32, gp32) = _ref_grads(fn, [xv, mt, pos], [g], upcast=True)
    lo = torch.float32 if dtype == torch.float32 else dtype
    _check(out, ref_lo, ref32, dtype, 2, "out")
    _check(xs.grad, gx_lo, gx32, dtype, 3, "grad_x_vis")
    assert ms.grad.shape == (1, 1, D) and ms.grad.dtype == mt_dtype
    _check(ms.grad.reshape(D), gm_lo, gm32, lo, 3, "grad_mask_token")
    _check(ps.grad, gp_lo, gp32, lo, 3, "grad_pos")


# -------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [1152, 512])  # DiT-XL/2 encoder width, MaskDiT decoder width
def test_tokens_gpu_dit_xl(dtype, D):
    B, N, Kk = 64, 256, 128
    x, ids, pos, g = _gather_case(B, N, Kk, D, dtype, torch.float32, device="cuda", seed=5)
    out = fk.gather_tokens_fwd(x, ids, pos)
    gx, gpos = fk.gather_tokens_bwd(g, ids, N, True)
    fn = lambda x_, p_: R.gather_tokens(x_, ids, p_)  # noqa: E731
    (ref_lo,), (gx_lo, gp_lo) = _ref_grads(fn, [x, pos], [g], upcast=False)
    (ref32,), (gx32, gp32) = _ref_grads(fn, [x, pos], [g], upcast=True)
    assert_close_to_ref(out.float(), ref_lo.float(), ref32, 2, atol=1e-3, name="gather out")
    assert_close_to_ref(gx.float(), gx_lo.float(), gx32, 3, atol=1e-3, name="gather grad_x")
    assert_close_to_ref(gpos, gp_lo.float(), gp32, 3, atol=1e-3, name="gather grad_pos")
    assert torch.equal(gpos, fk.gather_tokens_bwd(g, ids, N, True)[1])

    xv, ids, mt, pos, g = _unmask_case(B, N, Kk, D, dtype, torch.float32, torch.float32, device="cuda", seed=6)
    out = fk.unmask_tokens_fwd(xv, ids, mt, N, pos)
    gxv, gmt, gpos = fk.unmask_tokens_bwd(g, ids, True)
    fn = lambda x_, m_, p_: R.unmask_tokens(x_, ids, m_, N, p_)  # noqa: E731
    (ref_lo,), (gx_lo, gm_lo, gp_lo) = _ref_grads(fn, [xv, mt, pos], [g], upcast=False)
    (ref32,), (gx32, gm32, gp32) = _ref_grads(fn, [xv, mt, pos], [g], upcast=True)
    assert_close_to_ref(out.float(), ref_lo.float(), ref32, 2, atol=1e-3, name="unmask out")
    assert_close_to_ref(gxv.float(), gx_lo.float(), gx32, 3, atol=1e-3, name="unmask grad_x_vis")
    assert_close_to_ref(gmt, gm_lo.float(), gm32, 3, atol=1e-3, name="unmask grad_mask_token")
    assert_close_to_ref(gpos, gp_lo.float(), gp32, 3, atol=1e-3, name="unmask grad_pos")
    again = fk.unmask_tokens_bwd(g, ids, True)
    assert torch.equal(gmt, again[1]) and torch.equal(gpos, again[2])


def test_gpu_launch_configs_in_interpreter(monkeypatch):
    """The GPU's launch choices (row tiles by width, batch chunks for ~8 programs per SM)
    run here too, so their indexing is proven before a GPU ever sees them."""
    from fastmask.kernels import _utils, tokens
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    monkeypatch.setattr(tokens, "target_programs", lambda t: 8 * 132)
    test_gather_kernel(3, 59, 30, 72, torch.float32, torch.float32)
    test_unmask_kernel(3, 59, 30, 24, torch.float16, torch.float32, torch.float32)


# ------------------------------------------------------------ ids outside [0, N)
def _bad_ids(B, N, K, gen):
    """Distinct in-range ids with some replaced by ids outside [0, N) (what an unchecked
    caller might pass), and the mask of the entries that are valid."""
    ids = _ids(B, N, K, gen)
    bad = torch.tensor([-1, N, N + 100, 2**40, -(2**35)])
    ids[0, : min(K, 3)] = bad[: min(K, 3)]
    ids[-1, -1] = bad[-1]
    ids[-1, 0] = bad[3]
    return ids, (ids >= 0) & (ids < N)


@pytest.mark.parametrize("B,N,K,D", [(2, 19, 7, 24), (3, 40, 40, 72)])
def test_out_of_range_ids_touch_nothing_outside(B, N, K, D):
    """With the id check skipped, an out-of-range id reads and writes nothing: its gathered
    row is zeros, it keeps no token in unmask, and its grad_x_vis row is zeros."""
    gen = torch.Generator().manual_seed(N + K)
    ids, valid = _bad_ids(B, N, K, gen)
    x = torch.randn(B, N, D, generator=gen)
    pos = torch.randn(N, D, generator=gen)
    safe = ids.clamp(0, N - 1)
    with poisoned_empty():
        out = fk.gather_tokens_fwd(x, ids, pos)
    want = torch.where(valid[..., None], R.gather_tokens(x, safe, pos), 0.0)
    assert torch.equal(out, want)

    g = torch.randn(B, K, D, generator=gen)
    with poisoned_empty():
        gx, gpos = fk.gather_tokens_bwd(g, ids, N, True)
    want_gx = torch.zeros(B, N + 1, D).scatter(1, torch.where(valid, ids, N)[..., None].expand(-1, -1, D), g)[:, :N]
    assert torch.equal(gx, want_gx)
    torch.testing.assert_close(gpos, want_gx.sum(0))

    xv = torch.randn(B, K, D, generator=gen)
    mt = torch.randn(D, generator=gen)
    with poisoned_empty():
        out = fk.unmask_tokens_fwd(xv, ids, mt, N, pos)
    kept = torch.zeros(B, N + 1, dtype=torch.bool).scatter(1, torch.where(valid, ids, N), True)[:, :N]
    want = torch.where(kept[..., None], want_gx.new_zeros(()), mt) + pos
    src = torch.zeros(B, N + 1, D).scatter(1, torch.where(valid, ids, N)[..., None].expand(-1, -1, D), xv)[:, :N]
    torch.testing.assert_close(out, want + src)

    gu = torch.randn(B, N, D, generator=gen)
    with poisoned_empty():
        gxv, gmt, gpos = fk.unmask_tokens_bwd(gu, ids, True)
    want_gxv = torch.where(valid[..., None], torch.gather(gu, 1, safe[..., None].expand(-1, -1, D)), 0.0)
    assert torch.equal(gxv, want_gxv)
    torch.testing.assert_close(gmt, gu[~kept].sum(0))
    torch.testing.assert_close(gpos, gu.sum(0))


def test_out_of_range_ids_public_ops_unchecked():
    B, N, K, D = 2, 19, 7, 24
    gen = torch.Generator().manual_seed(5)
    ids, valid = _bad_ids(B, N, K, gen)
    x = torch.randn(B, N, D, generator=gen, requires_grad=True)
    with fastmask.backend("triton"):
        out = fastmask.ops.gather_tokens(x, ids, check_ids=False)
        back = fastmask.ops.unmask_tokens(out, ids, torch.zeros(D), N, check_ids=False)
    back.sum().backward()
    assert torch.isfinite(back).all() and torch.isfinite(x.grad).all()
    assert (out[~valid] == 0).all()
    with pytest.raises(ValueError, match="ids_keep"):
        fastmask.ops.gather_tokens(x, ids)  # checked by default


# One rounding for the add of the position table (see fastmask.ops.reference.gather_tokens): the
# token and the fp32 pos row are summed in fp32 and rounded once, identically on every backend.
# bf16 is left out on the CPU: the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest),
# so only the GPU test (tests/test_cuda_ext.py, triton-True-bf16-fp32) can show bf16 bit-exact.
@pytest.mark.parametrize("B,N,K,D", SHAPES)
def test_pos_add_rounds_once_bit_exact(B, N, K, D):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(B, N, D, generator=gen) * 4).half()
    pos = torch.randn(N, D, generator=gen)  # fp32, as the models hold it
    # make some sums cancel to tiny values: double rounding would give 0 or a different ulp there
    pos[:, : D // 2] = -x[0, :, : D // 2].float() + torch.randn(N, D // 2, generator=gen) * 1e-4
    ids = _ids(B, N, K, gen)
    want = (x.float()[torch.arange(B)[:, None], ids] + pos[ids]).half()
    ref = R.gather_tokens(x, ids, pos)
    assert torch.equal(ref, want), "reference: not the fp32 sum rounded once"
    twice = x[torch.arange(B)[:, None], ids] + pos[ids].half()
    assert not torch.equal(twice, want), "the case does not tell one rounding from two"
    assert torch.equal(fk.gather_tokens_fwd(x, ids, pos), ref), "triton gather"
    mt = torch.randn(D, generator=gen).half()
    xv = ref
    want_u = R.unmask_tokens(xv, ids, mt, N, None).float() + pos
    ref_u = R.unmask_tokens(xv, ids, mt, N, pos)
    assert torch.equal(ref_u, want_u.half()), "reference unmask: not the fp32 sum rounded once"
    assert torch.equal(fk.unmask_tokens_fwd(xv, ids, mt, N, pos), ref_u), "triton unmask"

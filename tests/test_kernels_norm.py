"""Triton adaLN kernels (fastmask.kernels.norm) against fastmask.ops.reference.

layernorm_modulate, gated_residual and residual_layernorm_modulate, forward and backward,
on awkward shapes in the interpreter: fp32 tight, fp16 by flash-attention's rule (error vs
an fp32 reference <= 2x / 3x PyTorch's fp16 error + atol), fp16 activations with fp32
modulation vectors, poisoned outputs, and repeat runs of the split parameter-gradient
reductions. bf16 is judged on the GPU only (the interpreter truncates fp32 -> bf16).
"""
import pytest
import torch

import fastmask
from fastmask import kernels as fk
from fastmask.ops import reference as R
from helpers import assert_all_written, assert_close_to_ref, poisoned_empty

EPS = 1e-6
SHAPES = [(1, 59, 72), (3, 59, 40), (2, 7, 24)]  # (B, L, D)
DTYPES = [  # (activations, modulation vectors)
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]


def _case(B, L, D, dtype, vdtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, dt, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device, dt)

    return dict(
        x=r(B, L, D, dt=dtype) + 0.5,  # a non-zero mean exercises the centring
        y=r(B, L, D, dt=dtype),
        gate=r(B, D, dt=vdtype, scale=0.5),
        shift=r(B, D, dt=vdtype, scale=0.5),
        scale=r(B, D, dt=vdtype, scale=0.5),
        g1=r(B, L, D, dt=dtype),
        g2=r(B, L, D, dt=dtype),
    )


def _reference(fn, inputs, grads, upcast):
    leaves = [(t.float() if upcast else t).detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), [g.float() if upcast else g for g in grads])
    return list(outs), [t.grad for t in leaves]


def _check(ours, ref_lo, ref32, dtype, factor, name):
    assert_all_written(ours, name)
    assert ours.dtype == ref_lo.dtype, f"{name}: dtype {ours.dtype}, expected {ref_lo.dtype}"
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref32, atol=1e-5, rtol=1e-5, msg=name)
    else:
        atol = 1e-4 * max(1.0, ref32.abs().max().item())
        assert_close_to_ref(ours.float(), ref_lo.float(), ref32.float(), factor, atol=atol, name=name)


def _check_all(ours, ref_lo, ref32, dtype, factor, names):
    for o, lo, r32, n in zip(ours, ref_lo, ref32, names):
        # fp32 modulation vectors next to fp16 activations: their gradients are fp32 sums of
        # fp16 products, judged against the fp32 reference with the low-precision rule.
        _check(o, lo, r32, dtype, factor, n)


def _check_vs_reference(fn, inputs, upstream, outs, grads, dtype, grad_names):
    """Runs ``fn`` in the inputs' dtype and in fp32, checks ``outs`` ({index: tensor} of fn's
    outputs) by the 2x rule and ``grads`` by the 3x rule; returns (low, fp32) outputs."""
    lo, glo = _reference(fn, inputs, upstream, upcast=False)
    r32, g32 = _reference(fn, inputs, upstream, upcast=True)
    for i, o in outs.items():
        _check(o, lo[i], r32[i], dtype, 2, f"out{i}")
    _check_all(list(grads), glo, g32, dtype, 3, grad_names)
    return lo, r32


# ------------------------------------------------------------------- layernorm_modulate
@pytest.mark.parametrize("B,L,D", SHAPES)
@pytest.mark.parametrize("dtype,vdtype", DTYPES)
def test_layernorm_modulate_kernel(B, L, D, dtype, vdtype):
    c = _case(B, L, D, dtype, vdtype)
    with poisoned_empty():
        out, mean, rstd = fk.layernorm_modulate_fwd(c["x"], c["shift"], c["scale"], EPS)
        gx, gshift, gscale = fk.layernorm_modulate_bwd(c["g1"], c["x"], c["scale"], mean, rstd)
    assert_all_written(mean, "mean")
    assert_all_written(rstd, "rstd")
    x32 = c["x"].float()
    torch.testing.assert_close(mean, x32.mean(-1).reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x32.var(-1, unbiased=False) + EPS).reshape(-1), atol=1e-5, rtol=1e-5)
    fn = lambda x, sh, sc: R.layernorm_modulate(x, sh, sc, EPS)  # noqa: E731
    ins = [c["x"], c["shift"], c["scale"]]
    _check_vs_reference(fn, ins, [c["g1"]], {0: out}, [gx, gshift, gscale], dtype, ["grad_x", "grad_shift", "grad_scale"])


# ----------------------------------------------------------------------- gated_residual
@pytest.mark.parametrize("B,L,D", SHAPES)
@pytest.mark.parametrize("dtype,vdtype", DTYPES)
def test_gated_residual_kernel(B, L, D, dtype, vdtype):
    c = _case(B, L, D, dtype, vdtype)
    with poisoned_empty():
        out = fk.gated_residual_fwd(c["x"], c["y"], c["gate"])
        gx, gy, ggate = fk.gated_residual_bwd(c["g1"], c["y"], c["gate"])
    ins = [c["x"], c["y"], c["gate"]]
    _check_vs_reference(R.gated_residual, ins, [c["g1"]], {0: out}, [gx, gy, ggate], dtype,
                        ["grad_x", "grad_y", "grad_gate"])


def test_gated_residual_bwd_writes_no_copy_of_grad_out():
    # d(x + gate * y)/dx is the identity: grad_x is grad_out itself, never a copy (a copy
    # would move B * L * D more elements through memory in every block's backward)
    c = _case(2, 7, 24, torch.float32, torch.float32, seed=2)
    g = c["g1"]
    gx, gy, ggate = fk.gated_residual_bwd(g, c["y"], c["gate"])
    assert gx.data_ptr() == g.data_ptr() and gx.shape == g.shape
    # through the public op, autograd hands that same tensor on to x
    x, y, gate = (c[k].detach().clone().requires_grad_() for k in ("x", "y", "gate"))
    seen = []
    x.register_hook(lambda grad: seen.append(grad.data_ptr()))
    with fastmask.backend("triton"):
        out = fastmask.ops.gated_residual(x, y, gate)
    out.backward(g)
    assert seen == [g.data_ptr()]
    torch.testing.assert_close(y.grad, gy)
    torch.testing.assert_close(gate.grad, ggate)


# ---------------------------------------------------------- residual_layernorm_modulate
@pytest.mark.parametrize("B,L,D", SHAPES)
@pytest.mark.parametrize("dtype,vdtype", DTYPES)
def test_residual_layernorm_modulate_kernel(B, L, D, dtype, vdtype):
    c = _case(B, L, D, dtype, vdtype)
    with poisoned_empty():
        x_new, out, mean, rstd = fk.residual_layernorm_modulate_fwd(
            c["x"], c["y"], c["gate"], c["shift"], c["scale"], EPS
        )
        grads = fk.residual_layernorm_modulate_bwd(
            c["g1"], c["g2"], x_new, c["y"], c["gate"], c["scale"], mean, rstd
        )
    assert_all_written(mean, "mean")
    assert_all_written(rstd, "rstd")
    fn = lambda x, y, g, sh, sc: R.residual_layernorm_modulate(x, y, g, sh, sc, EPS)  # noqa: E731
    ins = [c["x"], c["y"], c["gate"], c["shift"], c["scale"]]
    lo, r32 = _check_vs_reference(fn, ins, [c["g1"], c["g2"]], {1: out}, grads, dtype,
                                  ["grad_x", "grad_y", "grad_gate", "grad_shift", "grad_scale"])
    if dtype == torch.float32:
        torch.testing.assert_close(x_new, r32[0], atol=1e-5, rtol=1e-5)
    else:  # same rounding of the same fp32 sum as the reference
        assert torch.equal(x_new, lo[0])


def test_norm_bwd_deterministic():
    c = _case(3, 59, 72, torch.float16, torch.float32, seed=1)
    _, _, mean, rstd = fk.residual_layernorm_modulate_fwd(c["x"], c["y"], c["gate"], c["shift"], c["scale"], EPS)
    x_new = fk.gated_residual_fwd(c["x"], c["y"], c["gate"])
    runs = [fk.residual_layernorm_modulate_bwd(c["g1"], c["g2"], x_new, c["y"], c["gate"], c["scale"], mean, rstd)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    runs = [fk.layernorm_modulate_bwd(c["g1"], c["x"], c["scale"], mean, rstd) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    runs = [fk.gated_residual_bwd(c["g1"], c["y"], c["gate"]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------ public ops, Triton forced
@pytest.mark.parametrize("dtype,vdtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_norm_ops_triton_backend(dtype, vdtype):
    B, L, D = 2, 59, 40
    c = _case(B, L, D, dtype, vdtype, seed=3)
    ops = fastmask.ops
    cases = [
        ("layernorm_modulate", lambda x, y, g, sh, sc: ops.layernorm_modulate(x, sh, sc),
         lambda x, y, g, sh, sc: R.layernorm_modulate(x, sh, sc), 1),
        ("gated_residual", lambda x, y, g, sh, sc: ops.gated_residual(x, y, g),
         lambda x, y, g, sh, sc: R.gated_residual(x, y, g), 1),
        ("residual_layernorm_modulate", lambda x, y, g, sh, sc: ops.residual_layernorm_modulate(x, y, g, sh, sc),
         lambda x, y, g, sh, sc: R.residual_layernorm_modulate(x, y, g, sh, sc), 2),
    ]
    ins = [c["x"], c["y"], c["gate"], c["shift"], c["scale"]]
    for name, op, ref, n_out in cases:
        leaves = [t.detach().clone().requires_grad_() for t in ins]
        with fastmask.backend("triton"):
            outs = op(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        upstream = [c["g1"], c["g2"]][:n_out]
        torch.autograd.backward(list(outs), upstream)
        lo, glo = _reference(ref, ins, upstream, upcast=False)
        r32, g32 = _reference(ref, ins, upstream, upcast=True)
        for i in range(n_out):
            _check(outs[i], lo[i], r32[i], dtype, 2, f"{name} out{i}")
        for leaf, gl, g3, arg in zip(leaves, glo, g32, ["x", "y", "gate", "shift", "scale"]):
            if gl is None:
                assert leaf.grad is None, f"{name}: grad of unused {arg}"
                continue
            assert leaf.grad.dtype == leaf.dtype, f"{name}: grad_{arg} dtype {leaf.grad.dtype}"
            _check(leaf.grad, gl, g3, dtype, 3, f"{name} grad_{arg}")


def test_rlnm_op_only_out_used():
    """Only `out` feeds the loss: the backward gets grad_x_new = None, which the op fills with zeros."""
    c = _case(2, 7, 24, torch.float32, torch.float32, seed=4)
    leaves = [c[k].detach().clone().requires_grad_() for k in ("x", "y", "gate", "shift", "scale")]
    with fastmask.backend("triton"):
        _, out = fastmask.ops.residual_layernorm_modulate(*leaves)
    out.backward(c["g2"])
    refs = [c[k].detach().clone().requires_grad_() for k in ("x", "y", "gate", "shift", "scale")]
    R.residual_layernorm_modulate(*refs)[1].backward(c["g2"])
    for a, b in zip(leaves, refs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vdtype", ["same", torch.float32])
@pytest.mark.parametrize("L,D", [(128, 1152), (256, 512)])  # DiT-XL/2 encoder (K = 128), decoder
def test_norm_gpu_dit_xl(dtype, vdtype, L, D):
    B = 64
    c = _case(B, L, D, dtype, dtype if vdtype == "same" else vdtype, device="cuda", seed=5)
    x_new, out, mean, rstd = fk.residual_layernorm_modulate_fwd(c["x"], c["y"], c["gate"], c["shift"], c["scale"], EPS)
    grads = fk.residual_layernorm_modulate_bwd(c["g1"], c["g2"], x_new, c["y"], c["gate"], c["scale"], mean, rstd)
    fn = lambda x, y, g, sh, sc: R.residual_layernorm_modulate(x, y, g, sh, sc, EPS)  # noqa: E731
    ins = [c["x"], c["y"], c["gate"], c["shift"], c["scale"]]
    lo, glo = _reference(fn, ins, [c["g1"], c["g2"]], upcast=False)
    r32, g32 = _reference(fn, ins, [c["g1"], c["g2"]], upcast=True)
    assert_close_to_ref(x_new.float(), lo[0].float(), r32[0], 2, atol=1e-3, name="x_new")
    assert_close_to_ref(out.float(), lo[1].float(), r32[1], 2, atol=1e-3, name="out")
    for o, gl, g3, n in zip(grads, glo, g32, ["x", "y", "gate", "shift", "scale"]):
        assert o.dtype == gl.dtype
        assert_close_to_ref(o.float(), gl.float(), g3, 3, atol=1e-3, name=f"grad_{n}")
    again = fk.residual_layernorm_modulate_bwd(c["g1"], c["g2"], x_new, c["y"], c["gate"], c["scale"], mean, rstd)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))

    out, mean, rstd = fk.layernorm_modulate_fwd(c["x"], c["shift"], c["scale"], EPS)
    grads = fk.layernorm_modulate_bwd(c["g1"], c["x"], c["scale"], mean, rstd)
    fn = lambda x, sh, sc: R.layernorm_modulate(x, sh, sc, EPS)  # noqa: E731
    ins = [c["x"], c["shift"], c["scale"]]
    lo, glo = _reference(fn, ins, [c["g1"]], upcast=False)
    r32, g32 = _reference(fn, ins, [c["g1"]], upcast=True)
    assert_close_to_ref(out.float(), lo[0].float(), r32[0], 2, atol=1e-3, name="ln out")
    for o, gl, g3, n in zip(grads, glo, g32, ["x", "shift", "scale"]):
        assert_close_to_ref(o.float(), gl.float(), g3, 3, atol=1e-3, name=f"ln grad_{n}")

    out = fk.gated_residual_fwd(c["x"], c["y"], c["gate"])
    grads = fk.gated_residual_bwd(c["g1"], c["y"], c["gate"])
    ins = [c["x"], c["y"], c["gate"]]
    lo, glo = _reference(R.gated_residual, ins, [c["g1"]], upcast=False)
    r32, g32 = _reference(R.gated_residual, ins, [c["g1"]], upcast=True)
    assert_close_to_ref(out.float(), lo[0].float(), r32[0], 2, atol=1e-3, name="gr out")
    for o, gl, g3, n in zip(grads, glo, g32, ["x", "y", "gate"]):
        assert_close_to_ref(o.float(), gl.float(), g3, 3, atol=1e-3, name=f"gr grad_{n}")


@pytest.mark.parametrize("target", [8 * 132, 4])
def test_gpu_launch_configs_in_interpreter(monkeypatch, target):
    """The GPU's launch choices (row tiles by width, warps for 16 elements per thread, chunks
    of a sample's rows sized by the SM count) run here too, so their indexing is proven
    before a GPU ever sees them."""
    from fastmask.kernels import _utils, norm
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    monkeypatch.setattr(norm, "interpreting", lambda: False)
    monkeypatch.setattr(norm, "target_programs", lambda t: target)
    test_residual_layernorm_modulate_kernel(3, 59, 72, torch.float16, torch.float32)
    test_layernorm_modulate_kernel(2, 59, 40, torch.float32, torch.float32)
    from test_kernels_modern import test_rmsnorm_modulate_kernels

    test_rmsnorm_modulate_kernels(2, 59, 72, True)  # the RMSNorm variants share the backward launcher


def test_backward_plan_at_the_measured_shapes(monkeypatch):
    """The plan benchmarks/tune_norm.py measured fastest on an H200 (132 SMs): about four
    programs per SM, i.e. 16 rows per program for the XL/2 encoder (B=64, L=128), 32 for the
    decoder (L=256), 16 at 512 px (B=16, L=512); 2048-element tiles, 4 warps."""
    from fastmask.kernels import norm
    monkeypatch.setattr(norm, "interpreting", lambda: False)
    monkeypatch.setattr(norm, "target_programs", lambda t: 8 * 132)
    ref = torch.empty(1, dtype=torch.bfloat16, device="meta")
    assert norm._row_chunks(64, 128, 1, ref) == (8, 16)
    assert norm._row_chunks(64, 256, 4, ref) == (8, 32)
    assert norm._row_chunks(16, 512, 1, ref) == (32, 16)
    assert norm._row_chunks(1024, 128, 1, ref) == (1, 128)  # more samples than programs wanted: one chunk each
    assert norm._row_chunks(2, 3, 4, ref) == (1, 4)  # shorter than a tile
    from fastmask.kernels import _utils
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # row_config's switch
    assert norm._tile(1152) == (1, 2048, 4) and norm._tile(512) == (4, 512, 4) and norm._tile(4096) == (1, 4096, 8)

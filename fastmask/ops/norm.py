"""adaLN ops: LayerNorm + modulate, gated residual, and the fused residual + LN + modulate;
RMSNorm + modulate and its residual fusion (LightningDiT-style blocks).

LayerNorm has no affine parameters (DiT's norm1/norm2/norm_final), eps 1e-6, statistics
in fp32. The modulation vectors shift/scale/gate are per sample ([B, D]) and may be fp32
while the activations are bf16/fp16.

Each op: the kernels' forward and backward as plain functions, a custom-op pair made of them
(what torch.compile traces) and an eager autograd.Function over the same functions (what an
eager call runs; see :mod:`fastmask.ops._library`). The public function checks a call and
picks its backend once per signature (:func:`fastmask.ops.dispatch.signature`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .registry import declare
from .ranges import profiled
from ._library import compiled_ops, eager_function, kernels
from .reference import LN_EPS, RMS_EPS


def _check_vec(name: str, v: Tensor, x: Tensor) -> Tensor:
    checks.tensor(name, v, floating=True)
    B, D = x.shape[0], x.shape[-1]
    if v.dim() == 3 and v.shape[1] == 1:  # accept the broadcast form [B, 1, D]
        v = v[:, 0]
    checks.tensor(name, v, shape=(B, D))
    checks.same_device("x", x, **{name: v})
    return v


def _vec(v: Tensor) -> Tensor:
    """The [B, D] view of a modulation vector that passed :func:`_check_vec`."""
    return v[:, 0] if v.dim() == 3 else v


def _check_x(name: str, x: Tensor) -> None:
    checks.tensor(name, x, ndim=3, floating=True)
    checks.nonempty(name, x, "B L D")


def _stage_example(op: str, n_rows: int, n_vecs: int):
    """The info example of a norm op: x (and y) [B, L, D] and the modulation vectors [B, D]."""

    def example(e):
        if e.part == "output":
            return None
        return f"{e.part} x [{e.B}, {e.L}, {e.D}]", (*(e.t(e.B, e.L, e.D),) * n_rows, *(e.t(e.B, e.D),) * n_vecs)

    return example


declare(
    "layernorm_modulate",
    reference=reference.layernorm_modulate,
    launchers=("layernorm_modulate_fwd(x, shift, scale, eps)",
               "layernorm_modulate_bwd(grad_out, x, scale, mean, rstd)"),  # forward -> (out, mean, rstd)
    category="norm/modulate",
    example=_stage_example("layernorm_modulate", 1, 2),
)
declare(
    "gated_residual",
    reference=reference.gated_residual,
    # backward -> (grad_x, grad_y, grad_gate); grad_x is grad_out itself, never a copy
    launchers=("gated_residual_fwd(x, y, gate)", "gated_residual_bwd(grad_out, y, gate)"),
    category="norm/modulate",
    example=_stage_example("gated_residual", 2, 1),
)
declare(
    "residual_layernorm_modulate",
    reference=reference.residual_layernorm_modulate,
    launchers=("residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)",  # -> (x_new, out, mean, rstd)
               "residual_layernorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, mean, rstd)"),
    category="norm/modulate",
    example=_stage_example("residual_layernorm_modulate", 2, 3),
)


# ------------------------------------------------------------------ layernorm_modulate
def _lnm_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).layernorm_modulate_fwd(x, shift, scale, eps)


def _lnm_bwd(
    grad_out: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).layernorm_modulate_bwd(grad_out, x, scale, mean, rstd)


def _lnm_fake(x, shift, scale, eps, backend):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stats, stats.clone()


def _lnm_bwd_fake(grad_out, x, scale, mean, rstd, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _lnm_setup(ctx, inputs, output):
    x, shift, scale, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype


def _lnm_backward(ctx, grad_out, _gmean, _grstd, bwd):
    x, scale, mean, rstd = ctx.saved_tensors
    gx, gshift, gscale = bwd(grad_out.contiguous(), x, scale, mean, rstd, ctx.backend)
    return gx, gshift.to(ctx.shift_dtype), gscale, None, None


_LNM_OPS = compiled_ops("layernorm_modulate", _lnm_fwd, _lnm_bwd, _lnm_setup, _lnm_backward, fake=_lnm_fake,
                        fake_backward=_lnm_bwd_fake)
_lnm_op = _LNM_OPS["cuda"]  # the custom op (the cuda backend's)
_LNM = eager_function(
    "LayerNormModulate", _lnm_fwd, _lnm_setup, functools.partial(_lnm_backward, bwd=_lnm_bwd), nondifferentiable=(1, 2)
)


@dispatch.signature("layernorm_modulate")
def _layernorm_modulate_signature(x, shift, scale, eps):
    return (
        x.shape, x.dtype, x.device, shift.shape, shift.dtype, shift.device, scale.shape, scale.dtype,
        scale.device, eps,
    )


@profiled("layernorm_modulate")
def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = LN_EPS) -> Tensor:
    """``LN(x) * (1 + scale[b]) + shift[b]``; x [B, L, D], shift/scale [B, D] -> [B, L, D].

    Equivalent PyTorch code: :func:`fastmask.ops.reference.layernorm_modulate`.
    """
    sig, backend = _layernorm_modulate_signature(x, shift, scale, eps)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        _check_x("x", x)
        checks.positive_float("eps", eps)
        _check_vec("shift", shift, x)
        _check_vec("scale", scale, x)
        backend = dispatch.plan("layernorm_modulate", sig, x, shift, scale)
    shift, scale = _vec(shift), _vec(scale)
    if backend == "torch":
        return reference.layernorm_modulate(x, shift, scale, eps)
    args = (x.contiguous(), shift.contiguous(), scale.contiguous(), float(eps), backend)
    out, _, _ = _LNM_OPS[backend](*args) if compiling else _LNM.apply(*args)
    return out


# ---------------------------------------------------------------------- gated_residual
def _gr_fwd(x: Tensor, y: Tensor, gate: Tensor, backend: str) -> Tensor:
    return kernels(backend).gated_residual_fwd(x, y, gate)


# The gradient of x is grad_out itself: the backward op computes only grad_y and grad_gate
# (a custom op may not return an alias of its input), and autograd passes grad_out on to x,
# so no copy of grad_out is ever written.
def _gr_bwd(grad_out: Tensor, y: Tensor, gate: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    _, gy, ggate = kernels(backend).gated_residual_bwd(grad_out, y, gate)
    return gy, ggate


def _gr_fake(x, y, gate, backend):
    return torch.empty_like(x)


def _gr_bwd_fake(grad_out, y, gate, backend):
    return torch.empty_like(y), torch.empty_like(gate)


def _gr_setup(ctx, inputs, output):
    x, y, gate, backend = inputs
    ctx.save_for_backward(y, gate)
    ctx.backend = backend


def _gr_backward(ctx, grad_out, bwd):
    y, gate = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    gy, ggate = bwd(grad_out, y, gate, ctx.backend)
    return grad_out, gy, ggate, None


_GR_OPS = compiled_ops("gated_residual", _gr_fwd, _gr_bwd, _gr_setup, _gr_backward, fake=_gr_fake,
                       fake_backward=_gr_bwd_fake)
_gr_op = _GR_OPS["cuda"]  # the custom op (the cuda backend's)
_GR = eager_function("GatedResidual", _gr_fwd, _gr_setup, functools.partial(_gr_backward, bwd=_gr_bwd))


@dispatch.signature("gated_residual")
def _gated_residual_signature(x, y, gate):
    return (
        x.shape, x.dtype, x.device, y.shape, y.dtype, y.device, gate.shape, gate.dtype, gate.device,
    )


@profiled("gated_residual")
def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """``x + gate[b] * y``; x, y [B, L, D], gate [B, D].

    Equivalent PyTorch code: :func:`fastmask.ops.reference.gated_residual`.
    """
    sig, backend = _gated_residual_signature(x, y, gate)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        _check_x("x", x)
        checks.tensor("y", y, shape=tuple(x.shape))
        checks.same_dtype("x", x, y=y)
        checks.same_device("x", x, y=y)
        _check_vec("gate", gate, x)
        backend = dispatch.plan("gated_residual", sig, x, y, gate)
    gate = _vec(gate)
    if backend == "torch":
        return reference.gated_residual(x, y, gate)
    args = (x.contiguous(), y.contiguous(), gate.contiguous(), backend)
    return _GR_OPS[backend](*args) if compiling else _GR.apply(*args)


# --------------------------------------------------------- residual_layernorm_modulate
def _rlnm_fwd(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)


def _rlnm_bwd(
    grad_x_new: Tensor,
    grad_out: Tensor,
    x_new: Tensor,
    y: Tensor,
    gate: Tensor,
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).residual_layernorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, mean, rstd)


def _rlnm_fake(x, y, gate, shift, scale, eps, backend):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(x), stats, stats.clone()


def _rlnm_bwd_fake(grad_x_new, grad_out, x_new, y, gate, scale, mean, rstd, backend):
    return (
        torch.empty_like(x_new),
        torch.empty_like(y),
        torch.empty_like(gate),
        torch.empty_like(scale),
        torch.empty_like(scale),
    )


def _rlnm_setup(ctx, inputs, output):
    x, y, gate, shift, scale, eps, backend = inputs
    x_new, _, mean, rstd = output
    ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype


def _rlnm_backward(ctx, grad_x_new, grad_out, _gmean, _grstd, bwd):
    x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
    if grad_x_new is None:
        grad_x_new = torch.zeros_like(x_new)
    if grad_out is None:
        grad_out = torch.zeros_like(x_new)
    gx, gy, ggate, gshift, gscale = bwd(
        grad_x_new.contiguous(), grad_out.contiguous(), x_new, y, gate, scale, mean, rstd, ctx.backend
    )
    return gx, gy, ggate, gshift.to(ctx.shift_dtype), gscale, None, None


_RLNM_OPS = compiled_ops("residual_layernorm_modulate", _rlnm_fwd, _rlnm_bwd, _rlnm_setup, _rlnm_backward,
                         fake=_rlnm_fake, fake_backward=_rlnm_bwd_fake)
_rlnm_op = _RLNM_OPS["cuda"]  # the custom op (the cuda backend's)
_RLNM = eager_function(
    "ResidualLayerNormModulate", _rlnm_fwd, _rlnm_setup, functools.partial(_rlnm_backward, bwd=_rlnm_bwd),
    nondifferentiable=(2, 3),
)


@dispatch.signature("residual_layernorm_modulate")
def _residual_layernorm_modulate_signature(x, y, gate, shift, scale, eps):
    return (
        x.shape, x.dtype, x.device, y.shape, y.dtype, y.device, gate.shape, gate.dtype, gate.device,
        shift.shape, shift.dtype, shift.device, scale.shape, scale.dtype, scale.device, eps,
    )


@profiled("residual_layernorm_modulate")
def residual_layernorm_modulate(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = LN_EPS
) -> tuple[Tensor, Tensor]:
    """Fused ``x_new = x + gate[b] * y; out = LN(x_new) * (1 + scale[b]) + shift[b]``.

    Returns ``(x_new, out)``, both [B, L, D]: the new residual stream and the modulated
    input of the next sub-layer. Equivalent PyTorch code:
    :func:`fastmask.ops.reference.residual_layernorm_modulate`.
    """
    sig, backend = _residual_layernorm_modulate_signature(x, y, gate, shift, scale, eps)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        _check_x("x", x)
        checks.positive_float("eps", eps)
        checks.tensor("y", y, shape=tuple(x.shape))
        checks.same_dtype("x", x, y=y)
        checks.same_device("x", x, y=y)
        for name, v in (("gate", gate), ("shift", shift), ("scale", scale)):
            _check_vec(name, v, x)
        tensors = (x, y, gate, shift, scale)
        backend = dispatch.plan("residual_layernorm_modulate", sig, *tensors)
    gate, shift, scale = _vec(gate), _vec(shift), _vec(scale)
    if backend == "torch":
        return reference.residual_layernorm_modulate(x, y, gate, shift, scale, eps)
    args = (x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(), float(eps),
            backend)
    x_new, out, _, _ = _RLNM_OPS[backend](*args) if compiling else _RLNM.apply(*args)
    return x_new, out


# --------------------------------------------------------------------- rmsnorm_modulate
# RMSNorm variants of the two ops above (LightningDiT's blocks): the same Triton kernels with
# the RMS switch; ``weight`` [D] is optional (LightningDiT's RMSNorm has one; None = no weight).
declare(
    "rmsnorm_modulate",
    reference=reference.rmsnorm_modulate,
    # forward -> (out, rstd); backward -> (grad_x, grad_shift, grad_scale, grad_weight fp32 or empty)
    launchers=("rmsnorm_modulate_fwd(x, shift, scale, weight, eps)",
               "rmsnorm_modulate_bwd(grad_out, x, scale, weight, rstd)"),
    category="norm/modulate",
    example=lambda e: _stage_example("rmsnorm_modulate", 1, 2)(e) if e.part == "encoder" else None,
)
declare(
    "residual_rmsnorm_modulate",
    reference=reference.residual_rmsnorm_modulate,
    # forward -> (x_new, out, rstd); backward -> (grad_x, grad_y, grad_gate, grad_shift, grad_scale, grad_weight)
    launchers=("residual_rmsnorm_modulate_fwd(x, y, gate, shift, scale, weight, eps)",
               "residual_rmsnorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, weight, rstd)"),
    category="norm/modulate",
    example=lambda e: _stage_example("residual_rmsnorm_modulate", 2, 3)(e) if e.part == "encoder" else None,
)


def _check_weight(weight: Tensor | None, x: Tensor) -> None:
    if weight is not None:
        checks.tensor("weight", weight, shape=(x.shape[-1],), floating=True)
        checks.same_device("x", x, weight=weight)


def _w_out(gw: Tensor, weight: Tensor | None):
    return None if weight is None else gw.to(weight.dtype)


def _rnm_fwd(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    return kernels(backend).rmsnorm_modulate_fwd(x, shift, scale, weight, eps)


def _rnm_bwd(
    grad_out: Tensor, x: Tensor, scale: Tensor, weight: Optional[Tensor], rstd: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).rmsnorm_modulate_bwd(grad_out, x, scale, weight, rstd)


def _rnm_fake(x, shift, scale, weight, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


def _rnm_bwd_fake(grad_out, x, scale, weight, rstd, backend):
    D = x.shape[-1] if weight is not None else 0
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale), x.new_empty(D, dtype=torch.float32)


def _rnm_setup(ctx, inputs, output):
    x, shift, scale, weight, eps, backend = inputs
    ctx.save_for_backward(x, scale, weight, output[1])
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype


def _rnm_backward(ctx, grad_out, _grstd, bwd):
    x, scale, weight, rstd = ctx.saved_tensors
    gx, gshift, gscale, gw = bwd(grad_out.contiguous(), x, scale, weight, rstd, ctx.backend)
    return gx, gshift.to(ctx.shift_dtype), gscale, _w_out(gw, weight), None, None


_RNM_OPS = compiled_ops("rmsnorm_modulate", _rnm_fwd, _rnm_bwd, _rnm_setup, _rnm_backward, fake=_rnm_fake,
                        fake_backward=_rnm_bwd_fake)
_rnm_op = _RNM_OPS["cuda"]  # the custom op (the cuda backend's)
_RNM = eager_function(
    "RMSNormModulate", _rnm_fwd, _rnm_setup, functools.partial(_rnm_backward, bwd=_rnm_bwd), nondifferentiable=(1,)
)


@profiled("rmsnorm_modulate")
def rmsnorm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None, eps: float = RMS_EPS
) -> Tensor:
    """``RMSNorm(x) * weight * (1 + scale[b]) + shift[b]``; x [B, L, D], shift/scale [B, D],
    weight [D] or None. Equivalent PyTorch code: :func:`fastmask.ops.reference.rmsnorm_modulate`.
    """
    _check_x("x", x)
    eps = checks.positive_float("eps", eps)
    shift = _check_vec("shift", shift, x)
    scale = _check_vec("scale", scale, x)
    _check_weight(weight, x)
    backend = dispatch.select("rmsnorm_modulate", x, shift, scale)
    if backend == "torch":
        return reference.rmsnorm_modulate(x, shift, scale, weight, eps)
    w = None if weight is None else weight.contiguous()
    args = (x.contiguous(), shift.contiguous(), scale.contiguous(), w, float(eps), backend)
    out, _ = _RNM_OPS[backend](*args) if torch.compiler.is_compiling() else _RNM.apply(*args)
    return out


def _rrnm_fwd(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).residual_rmsnorm_modulate_fwd(x, y, gate, shift, scale, weight, eps)


def _rrnm_bwd(
    grad_x_new: Tensor, grad_out: Tensor, x_new: Tensor, y: Tensor, gate: Tensor, scale: Tensor,
    weight: Optional[Tensor], rstd: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).residual_rmsnorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, weight, rstd)


def _rrnm_fake(x, y, gate, shift, scale, weight, eps, backend):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


def _rrnm_bwd_fake(grad_x_new, grad_out, x_new, y, gate, scale, weight, rstd, backend):
    D = x_new.shape[-1] if weight is not None else 0
    return (torch.empty_like(x_new), torch.empty_like(y), torch.empty_like(gate), torch.empty_like(scale),
            torch.empty_like(scale), x_new.new_empty(D, dtype=torch.float32))


def _rrnm_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, eps, backend = inputs
    x_new, _, rstd = output
    ctx.save_for_backward(x_new, y, gate, scale, weight, rstd)
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype


def _rrnm_backward(ctx, grad_x_new, grad_out, _grstd, bwd):
    x_new, y, gate, scale, weight, rstd = ctx.saved_tensors
    if grad_x_new is None:
        grad_x_new = torch.zeros_like(x_new)
    if grad_out is None:
        grad_out = torch.zeros_like(x_new)
    gx, gy, ggate, gshift, gscale, gw = bwd(
        grad_x_new.contiguous(), grad_out.contiguous(), x_new, y, gate, scale, weight, rstd, ctx.backend
    )
    return gx, gy, ggate, gshift.to(ctx.shift_dtype), gscale, _w_out(gw, weight), None, None


_RRNM_OPS = compiled_ops("residual_rmsnorm_modulate", _rrnm_fwd, _rrnm_bwd, _rrnm_setup, _rrnm_backward,
                         fake=_rrnm_fake, fake_backward=_rrnm_bwd_fake)
_rrnm_op = _RRNM_OPS["cuda"]  # the custom op (the cuda backend's)
_RRNM = eager_function(
    "ResidualRMSNormModulate", _rrnm_fwd, _rrnm_setup, functools.partial(_rrnm_backward, bwd=_rrnm_bwd),
    nondifferentiable=(2,),
)


@profiled("residual_rmsnorm_modulate")
def residual_rmsnorm_modulate(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
    eps: float = RMS_EPS,
) -> tuple[Tensor, Tensor]:
    """Fused ``x_new = x + gate[b] * y; out = RMSNorm(x_new) * weight * (1 + scale[b]) + shift[b]``.

    Returns ``(x_new, out)``. Equivalent PyTorch code:
    :func:`fastmask.ops.reference.residual_rmsnorm_modulate`.
    """
    _check_x("x", x)
    eps = checks.positive_float("eps", eps)
    checks.tensor("y", y, shape=tuple(x.shape))
    checks.same_dtype("x", x, y=y)
    checks.same_device("x", x, y=y)
    gate = _check_vec("gate", gate, x)
    shift = _check_vec("shift", shift, x)
    scale = _check_vec("scale", scale, x)
    _check_weight(weight, x)
    backend = dispatch.select("residual_rmsnorm_modulate", x, y, gate, shift, scale)
    if backend == "torch":
        return reference.residual_rmsnorm_modulate(x, y, gate, shift, scale, weight, eps)
    w = None if weight is None else weight.contiguous()
    args = (x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(), w, float(eps),
            backend)
    x_new, out, _ = _RRNM_OPS[backend](*args) if torch.compiler.is_compiling() else _RRNM.apply(*args)
    return x_new, out

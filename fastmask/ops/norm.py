"""adaLN ops: LayerNorm + modulate, gated residual, and the fused residual + LN + modulate;
RMSNorm + modulate and its residual fusion (LightningDiT-style blocks).

LayerNorm has no affine parameters (DiT's norm1/norm2/norm_final), eps 1e-6, statistics
in fp32. The modulation vectors shift/scale/gate are per sample ([B, D]) and may be fp32
while the activations are bf16/fp16.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .ranges import profiled
from ._library import kernels
from .reference import LN_EPS, RMS_EPS


def _check_vec(name: str, v: Tensor, x: Tensor) -> Tensor:
    checks.tensor(name, v, floating=True)
    B, D = x.shape[0], x.shape[-1]
    if v.dim() == 3 and v.shape[1] == 1:  # accept the broadcast form [B, 1, D]
        v = v[:, 0]
    checks.tensor(name, v, shape=(B, D))
    checks.same_device("x", x, **{name: v})
    return v


def _check_x(name: str, x: Tensor) -> None:
    checks.tensor(name, x, ndim=3, floating=True)
    checks.nonempty(name, x, "B L D")


# ------------------------------------------------------------------ layernorm_modulate
@torch.library.custom_op("fastmask::layernorm_modulate", mutates_args=())
def _lnm_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).layernorm_modulate_fwd(x, shift, scale, eps)


@_lnm_op.register_fake
def _(x, shift, scale, eps, backend):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stats, stats.clone()


@torch.library.custom_op("fastmask::layernorm_modulate_backward", mutates_args=())
def _lnm_bwd_op(
    grad_out: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).layernorm_modulate_bwd(grad_out, x, scale, mean, rstd)


@_lnm_bwd_op.register_fake
def _(grad_out, x, scale, mean, rstd, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _lnm_setup(ctx, inputs, output):
    x, shift, scale, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype


def _lnm_backward(ctx, grad_out, _gmean, _grstd):
    x, scale, mean, rstd = ctx.saved_tensors
    gx, gshift, gscale = _lnm_bwd_op(grad_out.contiguous(), x, scale, mean, rstd, ctx.backend)
    return gx, gshift.to(ctx.shift_dtype), gscale, None, None


_lnm_op.register_autograd(_lnm_backward, setup_context=_lnm_setup)


@profiled("layernorm_modulate")
def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = LN_EPS) -> Tensor:
    """``LN(x) * (1 + scale[b]) + shift[b]``; x [B, L, D], shift/scale [B, D] -> [B, L, D].

    Equivalent PyTorch code: :func:`fastmask.ops.reference.layernorm_modulate`.
    """
    _check_x("x", x)
    eps = checks.positive_float("eps", eps)
    shift = _check_vec("shift", shift, x)
    scale = _check_vec("scale", scale, x)
    backend = dispatch.select("layernorm_modulate", x, shift, scale)
    if backend == "torch":
        return reference.layernorm_modulate(x, shift, scale, eps)
    out, _, _ = _lnm_op(x.contiguous(), shift.contiguous(), scale.contiguous(), float(eps), backend)
    return out


# ---------------------------------------------------------------------- gated_residual
@torch.library.custom_op("fastmask::gated_residual", mutates_args=())
def _gr_op(x: Tensor, y: Tensor, gate: Tensor, backend: str) -> Tensor:
    return kernels(backend).gated_residual_fwd(x, y, gate)


@_gr_op.register_fake
def _(x, y, gate, backend):
    return torch.empty_like(x)


# The gradient of x is grad_out itself: the backward op computes only grad_y and grad_gate
# (a custom op may not return an alias of its input), and autograd passes grad_out on to x,
# so no copy of grad_out is ever written.
@torch.library.custom_op("fastmask::gated_residual_backward", mutates_args=())
def _gr_bwd_op(grad_out: Tensor, y: Tensor, gate: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    _, gy, ggate = kernels(backend).gated_residual_bwd(grad_out, y, gate)
    return gy, ggate


@_gr_bwd_op.register_fake
def _(grad_out, y, gate, backend):
    return torch.empty_like(y), torch.empty_like(gate)


def _gr_setup(ctx, inputs, output):
    x, y, gate, backend = inputs
    ctx.save_for_backward(y, gate)
    ctx.backend = backend


def _gr_backward(ctx, grad_out):
    y, gate = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    gy, ggate = _gr_bwd_op(grad_out, y, gate, ctx.backend)
    return grad_out, gy, ggate, None


_gr_op.register_autograd(_gr_backward, setup_context=_gr_setup)


@profiled("gated_residual")
def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """``x + gate[b] * y``; x, y [B, L, D], gate [B, D].

    Equivalent PyTorch code: :func:`fastmask.ops.reference.gated_residual`.
    """
    _check_x("x", x)
    checks.tensor("y", y, shape=tuple(x.shape))
    checks.same_dtype("x", x, y=y)
    checks.same_device("x", x, y=y)
    gate = _check_vec("gate", gate, x)
    backend = dispatch.select("gated_residual", x, y, gate)
    if backend == "torch":
        return reference.gated_residual(x, y, gate)
    return _gr_op(x.contiguous(), y.contiguous(), gate.contiguous(), backend)


# --------------------------------------------------------- residual_layernorm_modulate
@torch.library.custom_op("fastmask::residual_layernorm_modulate", mutates_args=())
def _rlnm_op(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)


@_rlnm_op.register_fake
def _(x, y, gate, shift, scale, eps, backend):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(x), stats, stats.clone()


@torch.library.custom_op("fastmask::residual_layernorm_modulate_backward", mutates_args=())
def _rlnm_bwd_op(
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


@_rlnm_bwd_op.register_fake
def _(grad_x_new, grad_out, x_new, y, gate, scale, mean, rstd, backend):
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


def _rlnm_backward(ctx, grad_x_new, grad_out, _gmean, _grstd):
    x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
    if grad_x_new is None:
        grad_x_new = torch.zeros_like(x_new)
    if grad_out is None:
        grad_out = torch.zeros_like(x_new)
    gx, gy, ggate, gshift, gscale = _rlnm_bwd_op(
        grad_x_new.contiguous(), grad_out.contiguous(), x_new, y, gate, scale, mean, rstd, ctx.backend
    )
    return gx, gy, ggate, gshift.to(ctx.shift_dtype), gscale, None, None


_rlnm_op.register_autograd(_rlnm_backward, setup_context=_rlnm_setup)


@profiled("residual_layernorm_modulate")
def residual_layernorm_modulate(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = LN_EPS
) -> tuple[Tensor, Tensor]:
    """Fused ``x_new = x + gate[b] * y; out = LN(x_new) * (1 + scale[b]) + shift[b]``.

    Returns ``(x_new, out)``, both [B, L, D]: the new residual stream and the modulated
    input of the next sub-layer. Equivalent PyTorch code:
    :func:`fastmask.ops.reference.residual_layernorm_modulate`.
    """
    _check_x("x", x)
    eps = checks.positive_float("eps", eps)
    checks.tensor("y", y, shape=tuple(x.shape))
    checks.same_dtype("x", x, y=y)
    checks.same_device("x", x, y=y)
    gate = _check_vec("gate", gate, x)
    shift = _check_vec("shift", shift, x)
    scale = _check_vec("scale", scale, x)
    backend = dispatch.select("residual_layernorm_modulate", x, y, gate, shift, scale)
    if backend == "torch":
        return reference.residual_layernorm_modulate(x, y, gate, shift, scale, eps)
    x_new, out, _, _ = _rlnm_op(
        x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(), float(eps), backend
    )
    return x_new, out


# --------------------------------------------------------------------- rmsnorm_modulate
# RMSNorm variants of the two ops above (LightningDiT's blocks): the same Triton kernels with
# the RMS switch; ``weight`` [D] is optional (LightningDiT's RMSNorm has one; None = no weight).
def _check_weight(weight: Tensor | None, x: Tensor) -> None:
    if weight is not None:
        checks.tensor("weight", weight, shape=(x.shape[-1],), floating=True)
        checks.same_device("x", x, weight=weight)


def _w_out(gw: Tensor, weight: Tensor | None):
    return None if weight is None else gw.to(weight.dtype)


@torch.library.custom_op("fastmask::rmsnorm_modulate", mutates_args=())
def _rnm_op(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    return kernels(backend).rmsnorm_modulate_fwd(x, shift, scale, weight, eps)


@_rnm_op.register_fake
def _(x, shift, scale, weight, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastmask::rmsnorm_modulate_backward", mutates_args=())
def _rnm_bwd_op(
    grad_out: Tensor, x: Tensor, scale: Tensor, weight: Optional[Tensor], rstd: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).rmsnorm_modulate_bwd(grad_out, x, scale, weight, rstd)


@_rnm_bwd_op.register_fake
def _(grad_out, x, scale, weight, rstd, backend):
    D = x.shape[-1] if weight is not None else 0
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale), x.new_empty(D, dtype=torch.float32)


def _rnm_setup(ctx, inputs, output):
    x, shift, scale, weight, eps, backend = inputs
    ctx.save_for_backward(x, scale, weight, output[1])
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype


def _rnm_backward(ctx, grad_out, _grstd):
    x, scale, weight, rstd = ctx.saved_tensors
    gx, gshift, gscale, gw = _rnm_bwd_op(grad_out.contiguous(), x, scale, weight, rstd, ctx.backend)
    return gx, gshift.to(ctx.shift_dtype), gscale, _w_out(gw, weight), None, None


_rnm_op.register_autograd(_rnm_backward, setup_context=_rnm_setup)


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
    out, _ = _rnm_op(x.contiguous(), shift.contiguous(), scale.contiguous(), w, float(eps), backend)
    return out


@torch.library.custom_op("fastmask::residual_rmsnorm_modulate", mutates_args=())
def _rrnm_op(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).residual_rmsnorm_modulate_fwd(x, y, gate, shift, scale, weight, eps)


@_rrnm_op.register_fake
def _(x, y, gate, shift, scale, weight, eps, backend):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastmask::residual_rmsnorm_modulate_backward", mutates_args=())
def _rrnm_bwd_op(
    grad_x_new: Tensor, grad_out: Tensor, x_new: Tensor, y: Tensor, gate: Tensor, scale: Tensor,
    weight: Optional[Tensor], rstd: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).residual_rmsnorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, weight, rstd)


@_rrnm_bwd_op.register_fake
def _(grad_x_new, grad_out, x_new, y, gate, scale, weight, rstd, backend):
    D = x_new.shape[-1] if weight is not None else 0
    return (torch.empty_like(x_new), torch.empty_like(y), torch.empty_like(gate), torch.empty_like(scale),
            torch.empty_like(scale), x_new.new_empty(D, dtype=torch.float32))


def _rrnm_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, eps, backend = inputs
    x_new, _, rstd = output
    ctx.save_for_backward(x_new, y, gate, scale, weight, rstd)
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype


def _rrnm_backward(ctx, grad_x_new, grad_out, _grstd):
    x_new, y, gate, scale, weight, rstd = ctx.saved_tensors
    if grad_x_new is None:
        grad_x_new = torch.zeros_like(x_new)
    if grad_out is None:
        grad_out = torch.zeros_like(x_new)
    gx, gy, ggate, gshift, gscale, gw = _rrnm_bwd_op(
        grad_x_new.contiguous(), grad_out.contiguous(), x_new, y, gate, scale, weight, rstd, ctx.backend
    )
    return gx, gy, ggate, gshift.to(ctx.shift_dtype), gscale, _w_out(gw, weight), None, None


_rrnm_op.register_autograd(_rrnm_backward, setup_context=_rrnm_setup)


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
    x_new, out, _ = _rrnm_op(x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(),
                             scale.contiguous(), w, float(eps), backend)
    return x_new, out

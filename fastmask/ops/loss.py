"""The MaskDiT objective in token space: DSM on kept tokens + MAE on dropped tokens (EDM), and
its flow-matching twin (velocity loss on kept tokens + the same MAE), one fused kernel for both."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .registry import declare
from .ranges import profiled
from ._library import eager_function, kernels


declare(
    "dsm_mae_loss",
    reference=reference.dsm_mae_loss,
    # -> (loss [B], terms [B, 2], dLoss/dF); the backward is a scaling done here, no launcher
    launchers=("dsm_mae_loss_fwd(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data)",),
    category="loss",
    example=lambda e: (f"F [{e.B}, {e.N}, {e.P}]", (e.t(e.B, e.N, e.P),) * 3) if e.part == "output" else None,
)


def _loss_fwd(
    F_out: Tensor,
    x_noisy: Tensor,
    y: Tensor,
    sigma: Tensor,
    mask: Optional[Tensor],
    mae_coef: float,
    sigma_data: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).dsm_mae_loss_fwd(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data)


_loss_op = torch.library.custom_op("fastmask::dsm_mae_loss", mutates_args=())(_loss_fwd)


@_loss_op.register_fake
def _(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data, backend):
    B = F_out.shape[0]
    return F_out.new_empty(B, dtype=torch.float32), F_out.new_empty(B, 2, dtype=torch.float32), torch.empty_like(F_out)


def _loss_setup(ctx, inputs, output):
    # The forward kernel already wrote dloss_b/dF: the backward only scales it per sample.
    ctx.save_for_backward(output[2])


def _loss_backward(ctx, grad_loss, _gterms, _ggrad):
    (grad_F,) = ctx.saved_tensors
    gF = None
    if grad_loss is not None:
        gF = (grad_F * grad_loss.float().view(-1, 1, 1)).to(grad_F.dtype)  # multiply in fp32
    return gF, None, None, None, None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)
_LOSS = eager_function("DsmMaeLoss", _loss_fwd, _loss_setup, _loss_backward, nondifferentiable=(1, 2))


@dispatch.signature
def _dsm_mae_loss_signature(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data):
    return (
        F_out.shape, F_out.dtype, F_out.device, x_noisy.shape, x_noisy.dtype, x_noisy.device, y.shape,
        y.dtype, y.device, sigma.shape, sigma.dtype, sigma.device,
        None if mask is None else (mask.shape, mask.dtype, mask.device), mae_coef, sigma_data,
    )


@profiled("dsm_mae_loss")
def dsm_mae_loss(
    F_out: Tensor,
    x_noisy: Tensor,
    y: Tensor,
    sigma: Tensor,
    mask: Tensor | None = None,
    mae_coef: float = 0.1,
    sigma_data: float = 0.5,
    *,
    return_terms: bool = False,
    check_values: bool = True,
):
    """Per-sample MaskDiT loss [B] (fp32) from the raw network output in token space.

    F_out: the network output F [B, N, P] (P = p*p*C, (p_row, p_col, channel) order);
    x_noisy: the noisy input y + n, patchified the same way; y: the clean target;
    sigma [B]; mask [B, N], 1 at dropped tokens (None: nothing dropped, plain EDM loss).
    D = c_skip * x_noisy + c_out * F_out; loss = dsm + mae_coef * mae, as in the MaskDiT paper.
    With ``return_terms=True`` returns ``(loss, dsm, mae)``; only ``loss`` is differentiable.
    ``check_values=False`` skips the NaN/positivity check of sigma (a device sync); use it for
    sigmas the training loop drew itself.
    Equivalent PyTorch code: :func:`fastmask.ops.reference.dsm_mae_loss_terms`.
    """
    sig = _dsm_mae_loss_signature(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data)
    compiling = sig is None and torch.compiler.is_compiling()
    backend = dispatch.planned("dsm_mae_loss", sig)
    if backend is None:
        _check(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data)
        backend = dispatch.plan("dsm_mae_loss", sig, F_out, x_noisy, y)
    if check_values and checks.value_checks_enabled():
        if mask is not None:
            checks.binary_mask("mask", mask)
        if not bool(torch.isfinite(sigma).all()):
            raise ValueError("sigma: contains NaN or inf")
        if bool((sigma <= 0).any()):
            raise ValueError("sigma: every noise level must be positive")
    if backend == "torch":
        dsm, mae = reference.dsm_mae_loss_terms(F_out, x_noisy, y, sigma, mask, sigma_data)
        loss = dsm + mae_coef * mae
    else:
        m = None if mask is None else mask.to(torch.float32).contiguous()
        args = (F_out.contiguous(), x_noisy.contiguous(), y.contiguous(), sigma.to(torch.float32).contiguous(), m,
                float(mae_coef), float(sigma_data), backend)
        loss, terms, _ = _loss_op(*args) if compiling else _LOSS.apply(*args)
        dsm, mae = terms.unbind(1)
    return (loss, dsm, mae) if return_terms else loss


def _check(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data) -> None:
    """The structural checks of :func:`dsm_mae_loss` (shapes, dtypes, devices, coefficients)."""
    checks.tensor("F_out", F_out, ndim=3, floating=True)
    checks.nonempty("F_out", F_out, "B N P")
    B, N, P = F_out.shape
    checks.positive_float("sigma_data", sigma_data)
    checks.positive_float("mae_coef", mae_coef, allow_zero=True)
    checks.tensor("x_noisy", x_noisy, shape=(B, N, P), floating=True)
    checks.tensor("y", y, shape=(B, N, P), floating=True)
    checks.tensor("sigma", sigma, shape=(B,), floating=True)
    if mask is not None:
        checks.tensor("mask", mask, shape=(B, N))
    checks.same_device("F_out", F_out, x_noisy=x_noisy, y=y, sigma=sigma, mask=mask)
    if P < 2 and mask is not None:
        raise ValueError(f"F_out: the MAE target needs at least 2 values per token (unbiased variance), got P = {P}")


declare(
    "flow_mae_loss",
    reference=reference.flow_mae_loss,
    # -> (loss [B], terms [B, 2], dLoss/dF): the dsm_mae_loss kernel with its FLOW switch
    launchers=("flow_mae_loss_fwd(F_out, x_t, u, mask, mae_coef)",),
    category="loss",
    example=lambda e: (f"F [{e.B}, {e.N}, {e.P}] with --objective flow", (e.t(e.B, e.N, e.P),) * 3)
    if e.part == "output" else None,
)


def _flow_fwd(
    F_out: Tensor, x_t: Tensor, u: Tensor, mask: Optional[Tensor], mae_coef: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).flow_mae_loss_fwd(F_out, x_t, u, mask, mae_coef)


_flow_op = torch.library.custom_op("fastmask::flow_mae_loss", mutates_args=())(_flow_fwd)


@_flow_op.register_fake
def _(F_out, x_t, u, mask, mae_coef, backend):
    B = F_out.shape[0]
    return F_out.new_empty(B, dtype=torch.float32), F_out.new_empty(B, 2, dtype=torch.float32), torch.empty_like(F_out)


def _flow_backward(ctx, grad_loss, _gterms, _ggrad):
    (grad_F,) = ctx.saved_tensors
    gF = None
    if grad_loss is not None:
        gF = (grad_F * grad_loss.float().view(-1, 1, 1)).to(grad_F.dtype)
    return gF, None, None, None, None, None


_flow_op.register_autograd(_flow_backward, setup_context=_loss_setup)
_FLOW = eager_function("FlowMaeLoss", _flow_fwd, _loss_setup, _flow_backward, nondifferentiable=(1, 2))


@dispatch.signature
def _flow_mae_loss_signature(F_out, x_t, u, mask, mae_coef):
    return (
        F_out.shape, F_out.dtype, F_out.device, x_t.shape, x_t.dtype, x_t.device, u.shape, u.dtype, u.device,
        None if mask is None else (mask.shape, mask.dtype, mask.device), mae_coef,
    )


@profiled("flow_mae_loss")
def flow_mae_loss(
    F_out: Tensor,
    x_t: Tensor,
    u: Tensor,
    mask: Tensor | None = None,
    mae_coef: float = 0.1,
    *,
    return_terms: bool = False,
    check_values: bool = True,
):
    """Per-sample flow-matching loss [B] (fp32) from the predicted velocity in token space.

    F_out: the network output [B, N, P] (a velocity); x_t: the interpolant t x1 + (1 - t) x0 and
    u: the target x1 - x0, patchified the same way; mask [B, N], 1 at dropped tokens (None:
    nothing dropped). loss = fm + mae_coef * mae: fm the mean squared velocity error over kept
    tokens, mae the MaskDiT MAE term (F against the per-token normalised x_t) over dropped ones.
    With ``return_terms=True`` returns ``(loss, fm, mae)``; only ``loss`` is differentiable.
    ``check_values=False`` skips the check that the mask is binary (a device sync).
    Equivalent PyTorch code: :func:`fastmask.ops.reference.flow_mae_loss_terms`.
    """
    sig = _flow_mae_loss_signature(F_out, x_t, u, mask, mae_coef)
    compiling = sig is None and torch.compiler.is_compiling()
    backend = dispatch.planned("flow_mae_loss", sig)
    if backend is None:
        _check_flow(F_out, x_t, u, mask, mae_coef)
        backend = dispatch.plan("flow_mae_loss", sig, F_out, x_t, u)
    if check_values and checks.value_checks_enabled() and mask is not None:
        checks.binary_mask("mask", mask)
    if backend == "torch":
        fm, mae = reference.flow_mae_loss_terms(F_out, x_t, u, mask)
        loss = fm + mae_coef * mae
    else:
        m = None if mask is None else mask.to(torch.float32).contiguous()
        args = (F_out.contiguous(), x_t.contiguous(), u.contiguous(), m, float(mae_coef), backend)
        loss, terms, _ = _flow_op(*args) if compiling else _FLOW.apply(*args)
        fm, mae = terms.unbind(1)
    return (loss, fm, mae) if return_terms else loss


def _check_flow(F_out, x_t, u, mask, mae_coef) -> None:
    """The structural checks of :func:`flow_mae_loss`."""
    checks.tensor("F_out", F_out, ndim=3, floating=True)
    checks.nonempty("F_out", F_out, "B N P")
    B, N, P = F_out.shape
    checks.positive_float("mae_coef", mae_coef, allow_zero=True)
    checks.tensor("x_t", x_t, shape=(B, N, P), floating=True)
    checks.tensor("u", u, shape=(B, N, P), floating=True)
    if mask is not None:
        checks.tensor("mask", mask, shape=(B, N))
    checks.same_device("F_out", F_out, x_t=x_t, u=u, mask=mask)
    if P < 2 and mask is not None:
        raise ValueError(f"F_out: the MAE target needs at least 2 values per token (unbiased variance), got P = {P}")

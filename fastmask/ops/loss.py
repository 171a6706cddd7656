"""The MaskDiT objective in token space: DSM on kept tokens + MAE on dropped tokens (EDM), or
the flow-matching velocity loss on kept tokens + the same MAE term (``objective="flow"``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .registry import declare
from .ranges import profiled
from ._library import compiled_ops, eager_function, kernels


declare(
    "dsm_mae_loss",
    reference=reference.dsm_mae_loss,
    # -> (loss [B], terms [B, 2], dLoss/dF); the backward is a scaling done here, no launcher
    launchers=("dsm_mae_loss_fwd(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data, objective='edm')",),
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
    objective: str = "edm",
) -> tuple[Tensor, Tensor, Tensor]:
    if objective == "edm":  # the launchers' original call, unchanged
        return kernels(backend).dsm_mae_loss_fwd(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data)
    return kernels(backend).dsm_mae_loss_fwd(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data, objective)


def _loss_fake(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data, backend, objective="edm"):
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
    return gF, None, None, None, None, None, None, None, None


# no backward op: the backward is PyTorch code, traced as such
_LOSS_OPS = compiled_ops("dsm_mae_loss", _loss_fwd, None, _loss_setup, _loss_backward, fake=_loss_fake)
_loss_op = _LOSS_OPS["cuda"]  # the custom op (the cuda backend's)
_LOSS = eager_function("DsmMaeLoss", _loss_fwd, _loss_setup, _loss_backward, nondifferentiable=(1, 2))


@dispatch.signature("dsm_mae_loss")
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
    objective: str = "edm",
):
    """Per-sample MaskDiT loss [B] (fp32) from the raw network output in token space.

    F_out: the network output F [B, N, P] (P = p*p*C, (p_row, p_col, channel) order);
    x_noisy: the noisy input y + n, patchified the same way; y: the clean target;
    sigma [B]; mask [B, N], 1 at dropped tokens (None: nothing dropped, plain EDM loss).
    D = c_skip * x_noisy + c_out * F_out; loss = dsm + mae_coef * mae, as in the MaskDiT paper.
    With ``return_terms=True`` returns ``(loss, dsm, mae)``; only ``loss`` is differentiable.
    ``check_values=False`` skips the NaN/positivity check of sigma (a device sync); use it for
    sigmas the training loop drew itself.
    ``objective="flow"`` (SiT's velocity objective, :mod:`fastmask.models.flow`): F_out is the
    velocity v, y the target x1 - x0, x_noisy the interpolant x_t (the MAE target is built from
    it as in EDM); D = v, unweighted; sigma (the times t) is shape-checked but not read.
    Equivalent PyTorch code: :func:`fastmask.ops.reference.dsm_mae_loss_terms`.
    """
    if objective not in ("edm", "flow"):
        raise ValueError(f"objective: expected 'edm' or 'flow', got {objective!r}")
    sig, backend = _dsm_mae_loss_signature(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        _check(F_out, x_noisy, y, sigma, mask, mae_coef, sigma_data)
        backend = dispatch.plan("dsm_mae_loss", sig, F_out, x_noisy, y)
    if check_values and checks.value_checks_enabled():
        if mask is not None:
            checks.binary_mask("mask", mask)
        if objective == "edm" and not bool(torch.isfinite(sigma).all()):
            raise ValueError("sigma: contains NaN or inf")
        if objective == "edm" and bool((sigma <= 0).any()):
            raise ValueError("sigma: every noise level must be positive")
    if backend == "torch":
        dsm, mae = reference.dsm_mae_loss_terms(F_out, x_noisy, y, sigma, mask, sigma_data, objective)
        loss = dsm + mae_coef * mae
    else:
        m = None if mask is None else mask.to(torch.float32).contiguous()
        args = (F_out.contiguous(), x_noisy.contiguous(), y.contiguous(), sigma.to(torch.float32).contiguous(), m,
                float(mae_coef), float(sigma_data), backend, objective)
        loss, terms, _ = _LOSS_OPS[backend](*args) if compiling else _LOSS.apply(*args)
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

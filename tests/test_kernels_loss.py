"""Fused DSM + MAE loss kernel (fastmask.kernels.loss) against fastmask.ops.reference.

Checks loss, the (dsm, mae) terms and the dLoss_b/dF the kernel writes in the same pass
against torch autograd on the reference, with and without a mask, a sample with no
dropped token (mae must be 0), B = 1, N = 59, odd P; fp32 tightly, fp16 / mixed inputs by
the low-precision rule; repeat runs must be bit-identical.
"""
import pytest
import torch

import fastmask
from fastmask import kernels as fk
from fastmask.ops import reference as R
from helpers import assert_all_written, assert_close_to_ref, poisoned_empty

SHAPES = [(1, 59, 16), (3, 59, 12), (2, 30, 48)]  # (B, N, P): P = p*p*C
MAE_COEF, SIGMA_DATA = 0.1, 0.5


def _case(B, N, P, dtype, with_mask, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(B, N, P, generator=gen)
    sigma = torch.exp(torch.randn(B, generator=gen) * 1.2 - 1.2)
    xn = y + sigma.view(-1, 1, 1) * torch.randn(B, N, P, generator=gen)
    F = torch.randn(B, N, P, generator=gen)
    mask = None
    if with_mask:
        mask = (torch.rand(B, N, generator=gen) < 0.5).float()
        if B > 1:
            mask[-1] = 0.0  # a sample with no dropped token: its mae is 0, not 0/0
    to = lambda t: t.to(device, dtype)  # noqa: E731
    return to(F), to(xn), to(y), sigma.to(device), None if mask is None else mask.to(device)


def _reference(F, xn, y, sigma, mask, upcast):
    Fl = (F.float() if upcast else F).detach().clone().requires_grad_()
    args = [t.float() if upcast else t for t in (xn, y)]
    dsm, mae = R.dsm_mae_loss_terms(Fl, *args, sigma, mask, SIGMA_DATA)
    loss = dsm + MAE_COEF * mae
    loss.sum().backward()  # each sample's loss depends on its own F only: grad = dloss_b/dF_b
    return loss.detach(), dsm.detach(), mae.detach(), Fl.grad


def _check_loss(ours, F, xn, y, sigma, mask, dtype):
    loss, terms, grad = ours
    for t, n in [(loss, "loss"), (terms, "terms"), (grad, "grad_F")]:
        assert_all_written(t, n)
    assert loss.dtype == torch.float32 and terms.dtype == torch.float32 and grad.dtype == F.dtype
    l32, d32, m32, g32 = _reference(F, xn, y, sigma, mask, upcast=True)
    # The reference computes in fp32 from the (rounded) inputs, so the scalars match closely
    # in every dtype; the gradient is rounded once to F's dtype.
    torch.testing.assert_close(loss, l32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms[:, 0], d32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms[:, 1], m32, atol=1e-5, rtol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, g32, atol=1e-7, rtol=1e-5)
    else:
        _, _, _, g_lo = _reference(F, xn, y, sigma, mask, upcast=False)
        atol = 1e-3 * g32.abs().max().item()  # about one fp16 ulp at the largest gradient
        assert_close_to_ref(grad.float(), g_lo.float(), g32, 3, atol=atol, name="grad_F")


@pytest.mark.parametrize("B,N,P", SHAPES)
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dsm_mae_kernel(B, N, P, with_mask, dtype):
    F, xn, y, sigma, mask = _case(B, N, P, dtype, with_mask)
    with poisoned_empty():
        ours = fk.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    _check_loss(ours, F, xn, y, sigma, mask, dtype)
    if not with_mask:
        assert torch.equal(ours[1][:, 1], torch.zeros(B))
    elif B > 1:
        assert ours[1][-1, 1].item() == 0.0


def test_dsm_mae_kernel_mixed_dtypes():
    """fp16 network output with fp32 x_noisy / y (the loss often sees an fp32 target)."""
    F, xn, y, sigma, mask = _case(2, 59, 16, torch.float32, True, seed=1)
    F = F.half()
    with poisoned_empty():
        ours = fk.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    _check_loss(ours, F, xn, y, sigma, mask, torch.float16)


def test_dsm_mae_kernel_all_dropped_or_kept_extremes():
    """One sample drops every token (dsm 0), one drops none (mae 0)."""
    F, xn, y, sigma, _ = _case(2, 20, 12, torch.float32, False, seed=2)
    mask = torch.stack([torch.ones(20), torch.zeros(20)])
    with poisoned_empty():
        ours = fk.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    _check_loss(ours, F, xn, y, sigma, mask, torch.float32)
    assert ours[1][0, 0].item() == 0.0 and ours[1][1, 1].item() == 0.0


def test_dsm_mae_kernel_deterministic():
    F, xn, y, sigma, mask = _case(3, 59, 16, torch.float16, True, seed=3)
    a = fk.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    b = fk.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dsm_mae_op_triton_backend(with_mask, dtype):
    B, N, P = 3, 59, 12
    F, xn, y, sigma, mask = _case(B, N, P, dtype, with_mask, seed=4)
    Fl = F.detach().clone().requires_grad_()
    with fastmask.backend("triton"):
        loss, dsm, mae = fastmask.ops.dsm_mae_loss(Fl, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA, return_terms=True)
    w = torch.tensor([0.5, -1.0, 2.0])  # a different upstream weight per sample
    (loss * w).sum().backward()
    l32, d32, m32, _ = _reference(F, xn, y, sigma, mask, upcast=True)
    torch.testing.assert_close(loss, l32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dsm, d32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mae, m32, atol=1e-5, rtol=1e-5)
    Fr = F.float().detach().clone().requires_grad_()
    dr, mr = R.dsm_mae_loss_terms(Fr, xn.float(), y.float(), sigma, mask, SIGMA_DATA)
    ((dr + MAE_COEF * mr) * w).sum().backward()
    assert Fl.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(Fl.grad.float(), Fr.grad, atol=tol * Fr.grad.abs().max().item(), rtol=tol)


# -------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [256, 1024])  # 256x256 and 512x512 latents at p = 2
def test_dsm_mae_gpu(dtype, N):
    B, P = 64, 16
    F, xn, y, sigma, mask = _case(B, N, P, dtype, True, device="cuda", seed=5)
    ours = fk.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    l32, d32, m32, g32 = _reference(F, xn, y, sigma, mask, upcast=True)
    torch.testing.assert_close(ours[0], l32, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1][:, 0], d32, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1][:, 1], m32, atol=1e-5, rtol=1e-4)
    _, _, _, g_lo = _reference(F, xn, y, sigma, mask, upcast=False)
    assert_close_to_ref(ours[2].float(), g_lo.float(), g32, 3, atol=1e-3 * g32.abs().max().item(), name="grad_F")
    again = fk.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    assert all(torch.equal(u, v) for u, v in zip(ours, again))


def test_gpu_launch_configs_in_interpreter(monkeypatch):
    """The GPU's tile (up to 128 tokens a program) runs here too."""
    from fastmask.kernels import loss
    monkeypatch.setattr(loss, "interpreting", lambda: False)
    test_dsm_mae_kernel(3, 59, 12, True, torch.float32)
    test_dsm_mae_kernel(2, 30, 48, True, torch.float16)

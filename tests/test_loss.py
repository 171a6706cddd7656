"""The token-space DSM+MAE loss equals the MaskDiT formula written in image space."""
import pytest
import torch

import fastmask
from fastmask import ops
from fastmask.models import patchify, unpatchify


def spec_loss_image_space(D_img, xn_img, y_img, sigma, mask, p, mae_coef=0.1, sd=0.5):
    """The MaskDiT objective computed per sample, per token, on images [B, C, H, W] (float64)."""
    B, C, H, W = D_img.shape
    g = W // p
    out = []
    for b in range(B):
        lam = (sigma[b] ** 2 + sd**2) / (sigma[b] * sd) ** 2
        dsm_sum, mae_sum, n_kept, n_drop = 0.0, 0.0, 0, 0
        for t in range(g * g):
            r, c = divmod(t, g)
            sl = (b, slice(None), slice(r * p, r * p + p), slice(c * p, c * p + p))
            Dt, yt, xt = D_img[sl], y_img[sl], xn_img[sl]
            if mask is None or mask[b, t] == 0:
                dsm_sum += (lam * (Dt - yt) ** 2).mean()
                n_kept += 1
            else:
                target = (xt - xt.mean()) / torch.sqrt(xt.var(unbiased=True) + 1e-6)
                mae_sum += ((Dt - target) ** 2).mean()
                n_drop += 1
        dsm = dsm_sum / n_kept
        mae = mae_sum / n_drop if n_drop else torch.tensor(0.0, dtype=torch.float64)
        out.append(dsm + mae_coef * mae)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in out])


@pytest.mark.parametrize("use_mask", [True, False])
def test_token_loss_equals_image_space_spec(use_mask):
    torch.manual_seed(0)
    B, C, H, p = 3, 2, 6, 2
    N = (H // p) ** 2
    y = torch.randn(B, C, H, H, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.7, 12.0], dtype=torch.float64)
    xn = y + sigma.view(-1, 1, 1, 1) * torch.randn_like(y)
    F_tokens = torch.randn(B, N, p * p * C, dtype=torch.float64)
    mask = ops.random_mask(B, N, 0.5, generator=torch.Generator().manual_seed(1))[2].double() if use_mask else None
    c_skip = 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / torch.sqrt(sigma**2 + 0.25)
    D_img = c_skip.view(-1, 1, 1, 1) * xn + c_out.view(-1, 1, 1, 1) * unpatchify(F_tokens, p, C)
    want = spec_loss_image_space(D_img, xn, y, sigma, mask, p)
    with fastmask.backend("torch"):
        got = ops.dsm_mae_loss(F_tokens, patchify(xn, p), patchify(y, p), sigma, mask)
    torch.testing.assert_close(got, want)


def test_mask_ratio_zero_is_plain_edm_loss():
    B, N, P = 2, 4, 8
    F_out, xn, y = torch.randn(B, N, P), torch.randn(B, N, P), torch.randn(B, N, P)
    sigma = torch.tensor([0.3, 3.0])
    with fastmask.backend("torch"):
        loss, dsm, mae = ops.dsm_mae_loss(F_out, xn, y, sigma, None, return_terms=True)
    c_skip = 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / torch.sqrt(sigma**2 + 0.25)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    D = c_skip.view(-1, 1, 1) * xn + c_out.view(-1, 1, 1) * F_out
    torch.testing.assert_close(loss, (lam.view(-1, 1, 1) * (D - y) ** 2).mean((1, 2)))
    assert torch.equal(mae, torch.zeros(2)) and torch.equal(loss, dsm)

"""The public ops on the reference backend: semantics, float64 gradcheck, bad inputs."""
import math

import pytest
import torch

import fastmask
from fastmask import ops
from fastmask.models import edm_coefficients
from fastmask.ops import reference as ref


@pytest.fixture(autouse=True)
def torch_backend():
    with fastmask.backend("torch"):
        yield


def _ids(B, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ops.random_mask(B, N, 1 - K / N, generator=g)[0]


# ------------------------------------------------------------------ random_mask
def test_random_mask_shapes_and_inverse():
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = ops.random_mask(3, 10, 0.5, generator=g)
    assert ids_keep.shape == (3, 5) and ids_restore.shape == (3, 10) and mask.shape == (3, 10)
    assert mask.sum(1).tolist() == [5, 5, 5]
    for b in range(3):
        assert sorted(ids_keep[b].tolist()) == sorted(set(ids_keep[b].tolist()))
        assert (mask[b, ids_keep[b]] == 0).all()
    # ids_restore inverts the shuffle: kept tokens sit at the first K shuffled positions
    assert ((ids_restore < 5).float() == 1 - mask).all()
    assert torch.equal(ops.mask_from_ids(ids_keep, 10), mask)


def test_random_mask_seeded_and_K_rule():
    a = ops.random_mask(2, 256, 0.5, generator=torch.Generator().manual_seed(1))[0]
    b = ops.random_mask(2, 256, 0.5, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b) and a.shape == (2, 128)
    assert ops.num_kept(1024, 0.5) == 512 and ops.num_kept(10, 0.75) == 2 and ops.num_kept(7, 0.0) == 7


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_random_mask_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.random_mask(2, 16, ratio)


def test_random_mask_k_zero():
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.random_mask(2, 3, 0.9)


# ------------------------------------------------------------------ semantics
def test_gather_and_unmask_semantics():
    B, N, K, D = 2, 7, 3, 5
    x = torch.randn(B, N, D)
    pos = torch.randn(N, D)
    ids = _ids(B, N, K)
    out = ops.gather_tokens(x, ids, pos)
    for b in range(B):
        for k in range(K):
            n = ids[b, k]
            assert torch.allclose(out[b, k], x[b, n] + pos[n])
    mt = torch.randn(D)
    full = ops.unmask_tokens(out, ids, mt.view(1, 1, D), N, pos)
    for b in range(B):
        for n in range(N):
            if n in ids[b].tolist():
                j = ids[b].tolist().index(n)
                assert torch.allclose(full[b, n], out[b, j] + pos[n])
            else:
                assert torch.allclose(full[b, n], mt + pos[n])


def test_attention_matches_explicit_softmax():
    qkv = torch.randn(2, 9, 3, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.attention(qkv), ref.attention_math(qkv))
    torch.testing.assert_close(ops.attention(qkv, 0.3), ref.attention_math(qkv, 0.3))


def test_layernorm_modulate_and_residual_semantics():
    B, L, D = 2, 5, 12
    x, y = torch.randn(B, L, D), torch.randn(B, L, D)
    shift, scale, gate = torch.randn(B, D), torch.randn(B, D), torch.randn(B, D)
    ln = torch.nn.functional.layer_norm(x, (D,), eps=1e-6)
    torch.testing.assert_close(ops.layernorm_modulate(x, shift, scale), ln * (1 + scale[:, None]) + shift[:, None])
    xn, out = ops.residual_layernorm_modulate(x, y, gate, shift, scale)
    torch.testing.assert_close(xn, x + gate[:, None] * y)
    torch.testing.assert_close(out, ops.layernorm_modulate(xn, shift, scale))
    torch.testing.assert_close(ops.gated_residual(x, y, gate), xn)


# ------------------------------------------------------------------ gradcheck (float64)
def test_gradcheck_gather():
    B, N, K, D = 2, 6, 3, 4
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    ids = _ids(B, N, K)
    assert torch.autograd.gradcheck(lambda x, p: ops.gather_tokens(x, ids, p), (x, pos))


def test_gradcheck_unmask():
    B, N, K, D = 2, 6, 3, 4
    xv = torch.randn(B, K, D, dtype=torch.float64, requires_grad=True)
    mt = torch.randn(D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    ids = _ids(B, N, K)
    assert torch.autograd.gradcheck(lambda a, m, p: ops.unmask_tokens(a, ids, m, N, p), (xv, mt, pos))


def test_gradcheck_attention():
    qkv = torch.randn(1, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.attention(t), (qkv,))


def test_gradcheck_norm_ops():
    B, L, D = 2, 3, 5
    t = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, y, g, sh, sc = t(B, L, D), t(B, L, D), t(B, D), t(B, D), t(B, D)
    assert torch.autograd.gradcheck(ops.layernorm_modulate, (x, sh, sc))
    assert torch.autograd.gradcheck(ops.gated_residual, (x, y, g))
    assert torch.autograd.gradcheck(lambda *a: ops.residual_layernorm_modulate(*a), (x, y, g, sh, sc))


def test_gradcheck_loss():
    B, N, P = 2, 5, 4
    F_out = torch.randn(B, N, P, dtype=torch.float64, requires_grad=True)
    xn, y = torch.randn(B, N, P, dtype=torch.float64), torch.randn(B, N, P, dtype=torch.float64)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ops.dsm_mae_loss(f, xn, y, sigma, mask), (F_out,))
    assert torch.autograd.gradcheck(lambda f: ops.dsm_mae_loss(f, xn, y, sigma, None), (F_out,))


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 8, 4)
    ids = _ids(2, 8, 4)
    with pytest.raises(ValueError, match="^x:"):
        ops.gather_tokens(torch.randn(8, 4), ids)
    with pytest.raises(ValueError, match="ids_keep"):
        ops.gather_tokens(x, ids.float())
    with pytest.raises(ValueError, match="ids_keep.*range|ids_keep.*\\[0, 8\\)"):
        ops.gather_tokens(x, torch.tensor([[0, 1, 2, 8], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="ids_keep.*repeated"):
        ops.gather_tokens(x, torch.tensor([[0, 1, 1, 3], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="ids_keep.*K = 0"):
        ops.gather_tokens(x, torch.empty(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="ids_keep.*batch"):
        ops.gather_tokens(x, ids[:1])
    with pytest.raises(ValueError, match="pos"):
        ops.gather_tokens(x, ids, torch.randn(7, 4))
    with pytest.raises(ValueError, match="mask_token"):
        ops.unmask_tokens(torch.randn(2, 4, 4), ids, torch.randn(5), 8)
    with pytest.raises(ValueError, match="^y:"):
        ops.gated_residual(x, torch.randn(2, 8, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="^y:.*dtype"):
        ops.gated_residual(x, x.double(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="^gate:"):
        ops.gated_residual(x, x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="^shift:"):
        ops.layernorm_modulate(x, torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="^qkv:"):
        ops.attention(torch.randn(2, 8, 2, 2, 4))
    F_out = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="^sigma:.*NaN"):
        ops.dsm_mae_loss(F_out, F_out, F_out, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="^sigma:"):
        ops.dsm_mae_loss(F_out, F_out, F_out, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="^x_noisy:"):
        ops.dsm_mae_loss(F_out, F_out[:, :4], F_out, torch.ones(2))
    with pytest.raises(ValueError, match="^mask:"):
        ops.dsm_mae_loss(F_out, F_out, F_out, torch.ones(2), torch.ones(2, 7))


def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type (CUDA) to build a device mismatch")
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="ids_keep.*device"):
        ops.gather_tokens(x, _ids(2, 8, 4).cuda())


def test_edm_coefficients_match_spec():
    s = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise, lam = edm_coefficients(s)
    sd = 0.5
    for i, v in enumerate(s.tolist()):
        assert math.isclose(c_skip[i].item(), sd**2 / (v**2 + sd**2))
        assert math.isclose(c_out[i].item(), v * sd / math.sqrt(v**2 + sd**2))
        assert math.isclose(c_in[i].item(), 1 / math.sqrt(v**2 + sd**2))
        assert math.isclose(c_noise[i].item(), math.log(v) / 4)
        assert math.isclose(lam[i].item(), (v**2 + sd**2) / (v * sd) ** 2)

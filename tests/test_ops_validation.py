"""Library ops and models reject bad input with a ValueError naming the argument."""
import pytest
import torch

import fastmask
from fastmask import MaskedDiTBlock, ops
from fastmask.models import EDMPrecond, maskdit
from fastmask.ops import dispatch

BACKENDS = ["torch"] + ([] if dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)]) else ["triton"])


def _net():
    return EDMPrecond(maskdit("T/2", input_size=8, in_channels=4, num_classes=3))


def test_loss_given_rejects_repeated_or_out_of_range_ids():
    net = _net()
    y = torch.randn(2, 4, 8, 8)
    args = (y, torch.tensor([0, 1]), torch.ones(2), torch.randn_like(y))
    with pytest.raises(ValueError, match="ids_keep: a token id is repeated"):
        net.loss_given(*args, torch.tensor([[0, 0, 1, 2], [1, 2, 3, 4]]))
    with pytest.raises(ValueError, match=r"ids_keep: ids must lie in \[0, 16\)"):
        net.loss_given(*args, torch.tensor([[0, 1, 2, 16], [1, 2, 3, 4]]))
    net.loss_given(*args, torch.tensor([[0, 5, 1, 2], [1, 2, 3, 4]]))  # distinct ids are fine


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_and_zero_sizes_are_value_errors(backend):
    cases = {
        r"qkv: B is 0": lambda: ops.attention(torch.randn(0, 4, 3, 2, 8)),
        r"qkv: head_dim is 0": lambda: ops.attention(torch.randn(1, 4, 3, 2, 0)),
        r"qkv: H is 0": lambda: ops.attention(torch.randn(1, 4, 3, 0, 8)),
        r"x: B is 0": lambda: ops.layernorm_modulate(torch.randn(0, 4, 8), torch.randn(0, 8), torch.randn(0, 8)),
        r"x: D is 0": lambda: ops.gated_residual(torch.randn(1, 4, 0), torch.randn(1, 4, 0), torch.randn(1, 0)),
        r"x: B is 0 ": lambda: ops.gather_tokens(torch.randn(0, 4, 8), torch.zeros(0, 2, dtype=torch.long)),
        r"x_vis: B is 0": lambda: ops.unmask_tokens(torch.randn(0, 2, 8), torch.zeros(0, 2, dtype=torch.long),
                                                     torch.zeros(8), 4),
        r"F_out: B is 0": lambda: ops.dsm_mae_loss(*(torch.randn(0, 4, 8) for _ in range(3)), torch.ones(0)),
    }
    with fastmask.backend(backend):
        for match, fn in cases.items():
            with pytest.raises(ValueError, match=match):
                fn()


def test_zero_heads_and_empty_model_batches_are_value_errors():
    with pytest.raises(ValueError, match="num_heads: expected a positive integer, got 0"):
        MaskedDiTBlock(32, 0)
    with pytest.raises(ValueError, match="num_heads"):
        maskdit("T/2", input_size=8, in_channels=4, num_heads=0)
    with pytest.raises(ValueError, match="decoder_num_heads"):
        maskdit("T/2", input_size=8, in_channels=4, decoder_num_heads=0)
    net = _net()
    y = torch.randn(0, 4, 8, 8)
    with pytest.raises(ValueError, match="^y: expected a non-empty batch"):
        net.loss_given(y, torch.zeros(0, dtype=torch.long), torch.ones(0), y, None)
    with pytest.raises(ValueError, match="^x: the batch is empty"):
        net(y, torch.ones(0), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_values_eps_sigma_data_are_checked(backend):
    t = lambda: torch.randn(2, 4, 8)  # noqa: E731
    with fastmask.backend(backend):
        with pytest.raises(ValueError, match=r"mask: expected only 0 \(kept\) and 1 \(dropped\), found 0.5"):
            ops.dsm_mae_loss(t(), t(), t(), torch.ones(2), torch.full((2, 4), 0.5))
        for sd in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="sigma_data"):
                ops.dsm_mae_loss(t(), t(), t(), torch.ones(2), sigma_data=sd)
        with pytest.raises(ValueError, match="mae_coef"):
            ops.dsm_mae_loss(t(), t(), t(), torch.ones(2), mae_coef=float("nan"))
        x, v = torch.randn(2, 4, 8), torch.randn(2, 8)
        for eps in (0.0, -1e-6, float("nan")):
            with pytest.raises(ValueError, match="eps"):
                ops.layernorm_modulate(x, v, v, eps=eps)
            with pytest.raises(ValueError, match="eps"):
                ops.residual_layernorm_modulate(x, x, v, v, v, eps=eps)
        with pytest.raises(ValueError, match="scale"):
            ops.attention(torch.randn(1, 4, 3, 2, 8), scale=float("nan"))
    for sd in (0, float("nan")):
        with pytest.raises(ValueError, match="sigma_data"):
            EDMPrecond(maskdit("T/2", input_size=8, in_channels=4), sigma_data=sd)

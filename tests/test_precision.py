"""Mixed precision and host syncs.

- DiT and MaskDiT train (loss forward + backward) and sample under bf16 / fp16 autocast, the
  GPU default, here under CPU autocast, on the reference and (tiny) on the Triton interpreter.
- A position table added to low-precision tokens rounds once, the same on every backend.
- EDMPrecond.loss makes no host sync on values it drew itself; a user-given bad sigma is still
  refused.
"""
from __future__ import annotations

import pytest
import torch

import fastmask
from fastmask import EDMPrecond, dit, maskdit, ops
from fastmask.ops import dispatch, reference
from fastmask.sampling import sample

from helpers import randomise

TRITON_REASON = dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)])
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    TRITON_REASON is not None, reason=f"Triton backend unavailable: {TRITON_REASON}"))]


def _net(build, seed=0):
    torch.manual_seed(seed)
    return EDMPrecond(randomise(build("T/2", input_size=8, in_channels=2, num_classes=3), std=0.02))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["dit", "maskdit"])
def test_training_step_under_autocast(arch, backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 tl.dot is wrong (GPU.md); bf16 Triton runs in the GPU quick set")
    net = _net(dit if arch == "dit" else maskdit)
    y, labels = torch.randn(2, 2, 8, 8), torch.tensor([0, 2])
    ratio = 0.0 if arch == "dit" else 0.5
    with fastmask.backend(backend), torch.autocast("cpu", dtype=dtype):
        loss = net.loss(y, labels, mask_ratio=ratio, generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ["dit", "maskdit"])
def test_sampling_under_autocast(arch):
    net = _net(dit if arch == "dit" else maskdit)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = sample(net, torch.tensor([0, 1]), (2, 8, 8), steps=3, guidance=1.5)
    assert x.shape == (2, 2, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_position_table_rounds_once(dtype):
    g = torch.Generator().manual_seed(0)
    B, N, K, D = 4, 64, 32, 64
    x = torch.randn(B, N, D, generator=g).to(dtype)
    pos = torch.randn(N, D, generator=g)  # fp32, as the model's table (sin-cos values of this size)
    ids = ops.random_mask(B, N, 1 - K / N, generator=g)[0]
    exact = torch.gather(x.float(), 1, ids.unsqueeze(-1).expand(-1, -1, D)) + pos[ids]
    got = reference.gather_tokens(x, ids, pos)
    assert torch.equal(got, exact.to(dtype)), "the reference must round x + pos once"
    twice = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, D)) + pos[ids].to(dtype)
    assert not torch.equal(twice, got), "the inputs do not tell one rounding from two"
    xv, mt = x[:, :K].contiguous(), torch.randn(D, generator=g)
    out = reference.unmask_tokens(xv, ids, mt, N, pos)
    filled = mt.to(dtype).expand(B, N, D).scatter(1, ids.unsqueeze(-1).expand(-1, -1, D), xv)
    assert torch.equal(out, (filled.float() + pos).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_token_ops_round_as_the_reference(dtype, device):
    if device == "cpu" and TRITON_REASON is not None:
        pytest.skip(f"Triton backend unavailable: {TRITON_REASON}")
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest; "
                    "bf16 rounding is checked on a GPU (this test, with a CUDA device)")
    g = torch.Generator().manual_seed(1)
    B, N, K, D = 2, 59, 29, 72  # the shape of the GPU case that found the double rounding
    x = torch.randn(B, N, D, generator=g).to(dtype)
    pos = torch.randn(N, D, generator=g)
    ids = ops.random_mask(B, N, 1 - K / N, generator=g)[0]
    xv, mt = torch.randn(B, K, D, generator=g).to(dtype), torch.randn(D, generator=g)
    x, pos, ids, xv, mt = (t.to(device) for t in (x, pos, ids, xv, mt))
    with fastmask.backend("triton"):
        gathered = ops.gather_tokens(x, ids, pos)
        unmasked = ops.unmask_tokens(xv, ids, mt, N, pos)
    assert torch.equal(gathered, reference.gather_tokens(x, ids, pos))
    assert torch.equal(unmasked, reference.unmask_tokens(xv, ids, mt, N, pos))


def test_loss_makes_no_host_sync_on_what_it_drew(monkeypatch):
    net = _net(maskdit)
    y = torch.randn(2, 2, 8, 8)
    reads = []
    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    assert ops.checks.value_checks_enabled()  # the checks are on: the loss must not need them
    # unconditional: user-given labels are range-checked (a read the caller can switch off with
    # trusted_values(), as the trainer does); sigma, noise and ids are drawn here and are not
    net.loss(y, None, mask_ratio=0.5, generator=torch.Generator().manual_seed(0)).mean().backward()
    monkeypatch.undo()
    assert reads == [], f"EDMPrecond.loss read the device: {reads}"


def test_a_user_sigma_is_still_checked():
    net = _net(maskdit)
    y = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match="sigma"):
        net.loss_given(y, None, torch.tensor([1.0, float("nan")]), torch.randn_like(y), None)
    with pytest.raises(ValueError, match="sigma"):
        net(y, torch.tensor([1.0, -2.0]))

"""DiT and MaskDiT under CPU autocast (bf16, fp16): loss forward + backward and a short Heun
sampling call, with the torch backend and with the Triton kernels (interpreter, tiny shapes);
and the EDM loss makes no host sync on values it drew itself."""
import pytest
import torch

import fastmask
from fastmask.models.dit import DiT, MaskDiT
from fastmask.models.edm import EDMPrecond
from fastmask.sampling import heun_sample

DTYPES = [torch.bfloat16, torch.float16]


def _net(kind: str, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    common = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=5)
    if kind == "dit":
        model = DiT(**common)
    else:
        model = MaskDiT(**common, decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2)
    for p in model.parameters():  # adaLN-Zero starts as the identity: make every path carry signal
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    return EDMPrecond(model)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["dit", "maskdit"])
def test_loss_and_sampling_under_cpu_autocast(kind, backend, dtype):
    net = _net(kind)
    y = torch.randn(2, 4, 4, 4)
    labels = torch.tensor([1, 3])
    ratio = 0.5 if kind == "maskdit" else 0.0
    with fastmask.backend(backend), torch.autocast("cpu", dtype=dtype):
        loss = net.loss(y, labels, mask_ratio=ratio, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # the blocks really ran in the low precision (the residual stream is not promoted to fp32)
    seen = []
    hook = net.model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    net.eval()
    with torch.no_grad(), fastmask.backend(backend), torch.autocast("cpu", dtype=dtype):
        x = heun_sample(net, torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), labels, steps=2)
    hook.remove()
    assert seen and set(seen) == {dtype}
    assert x.dtype == torch.float32 and x.shape == (2, 4, 4, 4) and torch.isfinite(x).all()


def test_dit_autocast_close_to_fp32():
    """The cast changes only the rounding: the bf16 loss is near the fp32 one."""
    net = _net("dit")
    y = torch.randn(2, 4, 4, 4)
    labels = torch.tensor([1, 3])
    ref = net.loss(y, labels, mask_ratio=0.0, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net.loss(y, labels, mask_ratio=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(low, ref, rtol=5e-2, atol=5e-2)


class _NoSync:
    """Makes every host read of a tensor value raise (item, bool, int, float, tolist, numpy)."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy", "__index__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            def fail(self_t, *a, _name=name, **k):
                raise AssertionError(f"host sync: Tensor.{_name} called")
            monkeypatch.setattr(torch.Tensor, name, fail)


@pytest.mark.parametrize("kind", ["dit", "maskdit"])
def test_loss_makes_no_host_sync_on_its_own_draws(kind, monkeypatch):
    net = _net(kind)
    y = torch.randn(2, 4, 4, 4)
    # one-hot labels: integer labels are user-given values, range-checked (a sync) unless trusted
    labels = torch.nn.functional.one_hot(torch.tensor([1, 3]), 5)
    g = torch.Generator().manual_seed(0)
    calls = []
    import fastmask.ops.checks as checks
    real = checks.sigmas
    monkeypatch.setattr(checks, "sigmas", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    ratio = 0.5 if kind == "maskdit" else 0.0
    with fastmask.backend("torch"):
        _NoSync(monkeypatch)
        loss = net.loss(y, labels, mask_ratio=ratio, generator=g)
        loss.mean().backward()  # nor in the backward pass
        monkeypatch.undo()
    assert calls == [] and loss.shape == (2,)


def test_no_sync_guard_can_fail(monkeypatch):
    """The guard above does catch a sync (a check on a given sigma reads a value)."""
    net = _net("maskdit")
    y = torch.randn(2, 4, 4, 4)
    with fastmask.backend("torch"):
        _NoSync(monkeypatch)
        with pytest.raises(AssertionError, match="host sync"):
            net.loss_given(y, None, torch.ones(2), torch.randn(2, 4, 4, 4), None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_user_given_bad_sigma_refused(bad):
    net = _net("maskdit")
    y = torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([1.0, bad])
    with pytest.raises(ValueError, match="sigma"):
        net.loss_given(y, None, sigma, torch.randn(2, 4, 4, 4), None)
    with pytest.raises(ValueError, match="sigma"):
        net(y, sigma)

"""Shared test utilities: poisoned outputs, error ratios against an fp32 reference."""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(ours, ref_lowp, ref_fp32, factor: float, atol: float = 1e-5, name: str = "output"):
    """flash-attention's rule: error(ours) <= factor * error(PyTorch in the same precision) + atol."""
    e_ours = max_err(ours, ref_fp32)
    e_torch = max_err(ref_lowp, ref_fp32)
    assert e_ours <= factor * e_torch + atol, f"{name}: error {e_ours:.3e} > {factor} x torch's {e_torch:.3e} + {atol}"


def assert_all_written(t: torch.Tensor, name: str = "output"):
    """Outputs are allocated with torch.empty; the tests poison the allocator first (see below),
    so an element a kernel forgot to write shows up as NaN."""
    assert torch.isfinite(t).all(), f"{name}: some elements are not finite (not written by the kernel?)"


class poisoned_empty:
    """Within the block, torch.empty / torch.empty_like return NaN-filled (or max-int) tensors,
    so that any output element a kernel does not write is caught by assert_all_written.
    Kernel launchers allocate their outputs with torch.empty / torch.empty_like."""

    def __enter__(self):
        self._empty, self._empty_like = torch.empty, torch.empty_like
        real_empty, real_like = self._empty, self._empty_like

        def _fill(t):
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool:
                t.fill_(torch.iinfo(t.dtype).max)
            return t

        torch.empty = lambda *a, **k: _fill(real_empty(*a, **k))
        torch.empty_like = lambda *a, **k: _fill(real_like(*a, **k))
        return self

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self._empty, self._empty_like
        return False


def randomise(model, std=0.05, seed=0):
    """Every parameter of ``model`` drawn from N(0, std^2) with a fixed seed (DiT's zero
    initialisation would make many comparisons trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def step_draws(seed: int, B: int = 2, N: int = 16, C: int = 2, H: int = 8, num_classes: int = 3, ratio: float = 0.5):
    """(y, labels, sigma, noise, ids_keep) of one small loss_given step, drawn from ``seed``."""
    from fastmask import ops

    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, C, H, H, generator=g)
    labels = torch.randint(0, num_classes, (B,), generator=g)
    sigma = torch.rand(B, generator=g) + 0.2
    ids = ops.random_mask(B, N, ratio, generator=g)[0]
    noise = torch.randn(B, C, H, H, generator=g)
    return y, labels, sigma, noise, ids

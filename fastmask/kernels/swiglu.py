"""SwiGLU activation: out = silu(a) * b, with a, b the two halves of the last dim of the
gate/up projection's output ab [..., 2F] (a first, as LightningDiT's SwiGLUFFN chunks its
w12 output). The matmuls stay in torch; these kernels fuse the activation so that forward
reads ab once and writes out, and backward reads ab and grad_out once and writes grad_ab
(silu and the sigmoid are recomputed, never stored). Math in fp32.

Why own kernels and not Liger-Kernel's SwiGLU (BSD-2, also Triton): its op takes a and b as
two tensors, which here would mean splitting the fused w12 output (a copy per step, or
strided views it may not accept), and it would add a dependency for a few lines of
elementwise math; RMSNorm-modulate lives in kernels/norm.py for the same reason (Liger's
RMSNorm has no per-sample adaLN modulation or residual fusion).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cdiv, interpreting, launch

__all__ = ["swiglu_fwd", "swiglu_bwd"]


@triton.jit
def _swiglu_fwd_kernel(AB, OUT, n_rows, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    m = (rows < n_rows)[:, None] & (cols < F)[None, :]
    a_ptr = AB + rows[:, None] * (2 * F) + cols[None, :]
    a = tl.load(a_ptr, mask=m, other=0.0).to(tl.float32)
    b = tl.load(a_ptr + F, mask=m, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(OUT + rows[:, None] * F + cols[None, :], out.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(GOUT, AB, GAB, n_rows, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    m = (rows < n_rows)[:, None] & (cols < F)[None, :]
    offs = rows[:, None] * (2 * F) + cols[None, :]
    a = tl.load(AB + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(AB + offs + F, mask=m, other=0.0).to(tl.float32)
    g = tl.load(GOUT + rows[:, None] * F + cols[None, :], mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = g * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(GAB + offs, da.to(GAB.dtype.element_ty), mask=m)
    tl.store(GAB + offs + F, (g * silu).to(GAB.dtype.element_ty), mask=m)


def _config(F: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_F, warps): 4K-element tiles, 16 elements a thread on 8 warps."""
    BLOCK_F = min(1024, triton.next_power_of_2(max(F, 1)))
    if interpreting():
        BLOCK_F = min(BLOCK_F, 32)  # several column tiles (and a ragged one) on the CPU tests
        return 4, BLOCK_F, 4
    return max(1, 4096 // BLOCK_F), BLOCK_F, 8


def swiglu_fwd(ab: torch.Tensor) -> torch.Tensor:
    """ab [..., 2F] (contiguous) -> silu(a) * b [..., F] in ab's dtype."""
    F = ab.shape[-1] // 2
    out = torch.empty((*ab.shape[:-1], F), device=ab.device, dtype=ab.dtype)
    n_rows = ab.numel() // max(2 * F, 1)
    if out.numel() == 0:
        return out
    BR, BF, w = _config(F)
    launch(_swiglu_fwd_kernel)[(cdiv(n_rows, BR), cdiv(F, BF))](ab, out, n_rows, F, BLOCK_R=BR, BLOCK_F=BF,
                                                                num_warps=w)
    return out


def swiglu_bwd(grad_out: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu_fwd`: grad_ab [..., 2F] in ab's dtype."""
    F = ab.shape[-1] // 2
    gab = torch.empty_like(ab)
    n_rows = ab.numel() // max(2 * F, 1)
    if gab.numel() == 0:
        return gab
    BR, BF, w = _config(F)
    launch(_swiglu_bwd_kernel)[(cdiv(n_rows, BR), cdiv(F, BF))](grad_out, ab, gab, n_rows, F, BLOCK_R=BR,
                                                                BLOCK_F=BF, num_warps=w)
    return gab

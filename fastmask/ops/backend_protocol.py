"""What a backend module must provide: written down once, checked against every backend.

A backend module (``fastmask.kernels`` for Triton, ``fastmask.cuda_ext`` for CUDA C++) is
what :func:`fastmask.ops.dispatch.impl` returns; the op modules here call its launchers with
exactly these arguments. ``tests/test_dispatch.py`` compares each backend's functions with
the methods below (parameter names, order and defaults), so a launcher cannot drift from the
call site unnoticed.

Launchers take contiguous tensors and allocate their outputs. ``mean`` / ``rstd`` are the fp32
row statistics [B * L] the forward returned; the parameter gradients (``pos``, mask token,
shift, scale, gate) come back in fp32 or in the parameter's dtype, as the op layer expects.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor


class BackendModule(Protocol):
    #: device types the backend runs on (``torch.device.type`` values)
    DEVICE_TYPES: tuple[str, ...]
    #: floating dtypes it accepts
    DTYPES: tuple[torch.dtype, ...]

    def not_supported_reasons(self, op: str, tensors: Sequence[Tensor]) -> list[str]:
        """Every reason the backend cannot run ``op`` on ``tensors``; empty when it can.

        Looks at shapes, dtypes and devices only (meta tensors are fine), and includes the
        backend's build state (e.g. a missing compiled extension)."""

    # tokens
    def gather_tokens_fwd(self, x: Tensor, ids_keep: Tensor, pos: Optional[Tensor]) -> Tensor: ...

    def gather_tokens_bwd(self, grad_out: Tensor, ids_keep: Tensor, num_tokens: int, pos_grad: bool): ...

    def unmask_tokens_fwd(
        self, x_vis: Tensor, ids_keep: Tensor, mask_token: Tensor, num_tokens: int, pos: Optional[Tensor]
    ) -> Tensor: ...

    def unmask_tokens_bwd(self, grad_out: Tensor, ids_keep: Tensor, pos_grad: bool): ...

    # attention: (out [B, L, H*hd], lse [B, H, L] fp32); backward -> grad qkv
    def attention_fwd(self, qkv: Tensor, scale: float): ...

    # deterministic: None follows torch.are_deterministic_algorithms_enabled()
    def attention_bwd(
        self, grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float, deterministic: bool | None = None
    ) -> Tensor: ...

    # adaLN: forwards return (..., mean, rstd)
    def layernorm_modulate_fwd(self, x: Tensor, shift: Tensor, scale: Tensor, eps: float): ...

    def layernorm_modulate_bwd(self, grad_out: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor): ...

    def gated_residual_fwd(self, x: Tensor, y: Tensor, gate: Tensor) -> Tensor: ...

    # -> (grad_x, grad_y, grad_gate); grad_x is grad_out itself, never a copy
    def gated_residual_bwd(self, grad_out: Tensor, y: Tensor, gate: Tensor): ...

    def residual_layernorm_modulate_fwd(
        self, x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
    ): ...

    def residual_layernorm_modulate_bwd(
        self, grad_x_new: Tensor, grad_out: Tensor, x_new: Tensor, y: Tensor, gate: Tensor, scale: Tensor,
        mean: Tensor, rstd: Tensor,
    ): ...

    # loss: (loss [B], terms [B, 2], dLoss/dF); the backward is a scaling done in fastmask.ops.loss
    def dsm_mae_loss_fwd(
        self, F_out: Tensor, x_noisy: Tensor, y: Tensor, sigma: Tensor, mask: Optional[Tensor],
        mae_coef: float, sigma_data: float, objective: str = "edm",
    ): ...


#: every launcher name of the protocol (the ``<op>_fwd`` / ``<op>_bwd`` functions)
LAUNCHERS: tuple[str, ...] = tuple(n for n in vars(BackendModule) if n.endswith(("_fwd", "_bwd")))
#: the attributes every backend module declares besides its launchers
DECLARATIONS: tuple[str, ...] = ("DEVICE_TYPES", "DTYPES", "not_supported_reasons")


def launchers(op: str) -> tuple[str, ...]:
    """The launcher names of ``op`` (``attention`` -> ``attention_fwd``, ``attention_bwd``)."""
    return tuple(n for n in LAUNCHERS if n.rpartition("_")[0] == op)

"""Triton kernels of fastmask (imported as ``fastmask.kernels``, never as a top-level module).

Each op exposes ``<op>_fwd`` / ``<op>_bwd`` launchers with the signatures that
:mod:`fastmask.ops` calls; see the op modules there for the autograd wiring.
"""
import triton  # noqa: F401  (an ImportError here tells the dispatcher Triton is unavailable)


def unavailable_reason():
    return None


def not_supported_reasons(op, tensors):
    """Why these kernels cannot run ``op`` on ``tensors`` (None if they can); asked by the
    dispatcher, so that an automatic choice falls back to the reference instead of failing."""
    if op == "attention" and tensors:
        return attention_not_supported(tensors[0])
    return None


from .tokens import gather_tokens_bwd, gather_tokens_fwd, unmask_tokens_bwd, unmask_tokens_fwd  # noqa: E402, F401
from .norm import (  # noqa: E402, F401
    gated_residual_bwd,
    gated_residual_fwd,
    layernorm_modulate_bwd,
    layernorm_modulate_fwd,
    residual_layernorm_modulate_bwd,
    residual_layernorm_modulate_fwd,
)
from .loss import dsm_mae_loss_fwd  # noqa: E402, F401
from .attention_launch import attention_bwd, attention_fwd  # noqa: E402, F401
from .attention_launch import not_supported_reason as attention_not_supported  # noqa: E402

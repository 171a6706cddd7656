"""fastmask.ops: functional ops with autograd, one dispatch point, PyTorch reference.

Every op has "equivalent PyTorch code" in :mod:`fastmask.ops.reference`; the public
function here validates its inputs, asks :mod:`fastmask.ops.dispatch` for a backend and
runs either the reference (torch) or a registered ``torch.library`` custom op (Triton or
CUDA kernels, forward and backward). ``record_choices()`` tells which backend each op ran
on; ``op_ranges()`` (or ``FASTMASK_NVTX=1``) names each op in profiler traces.
"""
from . import reference
from .attention import attention
from .dispatch import (
    BackendFallbackWarning,
    BackendUnavailable,
    available_backends,
    backend,
    record_choices,
    reload_environment,
)
from .loss import dsm_mae_loss
from .norm import (
    gated_residual,
    layernorm_modulate,
    residual_layernorm_modulate,
    residual_rmsnorm_modulate,
    rmsnorm_modulate,
)
from .ranges import op_ranges
from .selection import (
    RandomRatioTokens,
    RandomTokens,
    RoutedTokens,
    StructuredTokens,
    TokenStrategy,
    as_strategy,
)
from .swiglu import swiglu
from .tokens import gather_tokens, mask_from_ids, num_kept, random_mask, scatter_tokens, unmask_tokens

__all__ = [
    "attention",
    "as_strategy",
    "available_backends",
    "backend",
    "BackendFallbackWarning",
    "BackendUnavailable",
    "dsm_mae_loss",
    "gated_residual",
    "gather_tokens",
    "layernorm_modulate",
    "mask_from_ids",
    "num_kept",
    "op_ranges",
    "random_mask",
    "RandomRatioTokens",
    "RandomTokens",
    "RoutedTokens",
    "StructuredTokens",
    "TokenStrategy",
    "record_choices",
    "reference",
    "reload_environment",
    "residual_layernorm_modulate",
    "residual_rmsnorm_modulate",
    "rmsnorm_modulate",
    "scatter_tokens",
    "swiglu",
    "unmask_tokens",
]

"""Triton kernels of fastmask (imported as ``fastmask.kernels``, never as a top-level module).

The ``triton`` backend: each op exposes ``<op>_fwd`` / ``<op>_bwd`` launchers with the
signatures declared with the op in :mod:`fastmask.ops.registry`; see the op modules there
for the autograd wiring. What the backend can serve is declared here: :data:`DEVICE_TYPES`,
:data:`DTYPES` and :func:`not_supported_reasons`, which the dispatcher asks before each call.
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (an ImportError here tells the dispatcher Triton is unavailable)

from .._env import interpreting

#: CUDA devices; CPU tensors only in the Triton interpreter (TRITON_INTERPRET=1)
DEVICE_TYPES = ("cuda", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def not_supported_reasons(op: str, tensors) -> list[str]:
    """Every reason these kernels cannot run ``op`` on ``tensors`` (empty if they can).

    Reads only devices, dtypes and shapes, so meta tensors describe a call without memory."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    out = []
    dev = tensors[0].device.type if tensors else "cpu"
    if dev == "cpu" and not interpreting():
        out.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
    elif dev == "cuda" and interpreting():
        out.append("TRITON_INTERPRET=1 is set, the interpreter runs on CPU tensors only")
    elif dev not in DEVICE_TYPES:
        out.append(f"tensors are on {dev}, Triton runs on CUDA devices")
    bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in DTYPES})
    if bad:
        out.append(f"dtype {', '.join(bad)} is not supported (supported: float32, float16, bfloat16)")
    if op in ("attention", "attention_rope") and tensors:
        head_dim = attention_not_supported(tensors[0])
        if head_dim:
            out.append(head_dim)
    return out


# The launchers (``<op>_fwd`` / ``<op>_bwd``), one module per op family, each listing its own in
# ``__all__``; a new family is one more line here.
from .tokens import *  # noqa: E402, F401, F403
from .norm import *  # noqa: E402, F401, F403
from .loss import *  # noqa: E402, F401, F403
from .swiglu import *  # noqa: E402, F401, F403
from .attention_launch import attention_bwd, attention_fwd, attention_rope_bwd, attention_rope_fwd  # noqa: E402, F401
from .attention_launch import not_supported_reason as attention_not_supported  # noqa: E402

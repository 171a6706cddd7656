"""fastmask: fast training of diffusion transformers with masked tokens (MaskDiT).

    from fastmask import MaskedDiTBlock          # drop-in for DiT's block
    from fastmask import MaskDiT, DiT, EDMPrecond
    from fastmask import ops                     # functional ops with autograd
    from fastmask import route_tokens            # TREAD's token routing on any stack of blocks
"""
from . import ops
from .models import DiT, EDMPrecond, MaskDiT, dit, load_published, load_published_file, maskdit
from .nn import MaskedDiTBlock, route_tokens, swap_dit_blocks
from .ops import BackendUnavailable, backend

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable",
    "DiT",
    "EDMPrecond",
    "MaskDiT",
    "MaskedDiTBlock",
    "backend",
    "dit",
    "load_published",
    "load_published_file",
    "maskdit",
    "ops",
    "route_tokens",
    "swap_dit_blocks",
    "__version__",
]

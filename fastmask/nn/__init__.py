"""fastmask.nn: DiT building blocks on top of fastmask.ops."""
from .block import Attention, MaskedDiTBlock, Mlp, SwiGLUMlp, swap_dit_blocks
from .layers import FinalLayer, LabelEmbedder, PatchEmbed, RMSNorm, TimestepEmbedder, rope_2d, sincos_pos_embed_2d
from .routing import TokenRouter, route_tokens

__all__ = [
    "Attention",
    "FinalLayer",
    "LabelEmbedder",
    "MaskedDiTBlock",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "TokenRouter",
    "route_tokens",
    "SwiGLUMlp",
    "TimestepEmbedder",
    "rope_2d",
    "sincos_pos_embed_2d",
    "swap_dit_blocks",
]

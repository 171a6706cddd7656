"""fastmask.nn: DiT building blocks on top of fastmask.ops."""
from .block import Attention, MaskedDiTBlock, Mlp, swap_dit_blocks
from .layers import FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d

__all__ = [
    "Attention",
    "FinalLayer",
    "LabelEmbedder",
    "MaskedDiTBlock",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "sincos_pos_embed_2d",
    "swap_dit_blocks",
]

"""fastmask's fused DiT-block path inside diffusers transformers, weights and state dict kept.

    from diffusers import DiTTransformer2DModel
    from fastmask.nn.diffusers import fuse_transformer, dit_forward_tokens

    model = DiTTransformer2DModel.from_pretrained("facebook/DiT-XL-2-256", subfolder="transformer")
    fuse_transformer(model)                      # every block now runs fastmask's fused ops
    out = model(x, timestep=t, class_labels=y).sample               # same outputs as before
    tokens = dit_forward_tokens(model, x, t, y, ids_keep=ids_keep)  # masked: only the kept tokens

:func:`fuse_transformer` changes the class of each ``BasicTransformerBlock`` of
``model.transformer_blocks`` to a subclass whose ``forward`` computes the same block with
fastmask's ops (:mod:`fastmask.ops`): adaLN LayerNorm + modulate, the fused residual + LayerNorm
+ modulate, the gated residual, and attention on the fused ``[B, L, 3, H, hd]`` layout built from
the block's own projections. No parameter is added, removed or renamed: ``state_dict``,
``save_pretrained`` and optimizers see the same model. :func:`unfuse_transformer` restores
diffusers' classes.

What is fused, and what runs as diffusers' own module (so LoRA and hooks apply):
  * fused: the LayerNorms, the modulation arithmetic, the attention core and the gated residuals;
  * the q/k/v projections: when ``to_q``/``to_k``/``to_v`` are plain ``nn.Linear`` without hooks,
    one matmul on their concatenated weights (gradients reach the original parameters); otherwise
    (a peft LoRA wrapper, any other module, or a hooked Linear) each is called as a module, so
    LoRA, ``set_adapters`` and ``disable_adapters`` are followed exactly. After
    ``attn.fuse_projections()`` (diffusers' ``Attention`` method; ``PixArtTransformer2DModel``
    has ``fuse_qkv_projections()``, which calls it for every attention, ``DiTTransformer2DModel``
    has no such model method) the fused ``to_qkv`` module is called;
  * always called as modules: ``to_out``, the MLP (``ff``), the adaLN embedder and Linear
    (``norm1.emb``, ``norm1.linear``), PixArt's cross-attention ``attn2``.
What the fused path cannot honour is refused, naming the module: a custom attention processor on
``attn1`` (``attn.set_processor``; diffusers' standard processors compute what the fused core
computes), and hooks on the modules the fused path computes without calling them (``attn1``, the
block's LayerNorms and ``norm1``). Before fusing, both raise in :func:`fuse_transformer`; after
fusing, registering such a hook raises at once (those modules' hook tables refuse new entries
until :func:`unfuse_transformer`), and the processor is checked at each forward (one type test).

Supported blocks:
  * ``norm_type="ada_norm_zero"`` (DiT: ``DiTTransformer2DModel``), each block computing its
    conditioning from its own timestep + class embedder, as diffusers does;
  * ``norm_type="ada_norm_single"`` (PixArt-alpha/sigma: ``PixArtTransformer2DModel``): the
    self-attention half and the MLP half are fused; the cross-attention to the text tokens stays
    diffusers' own ``attn2`` (its keys are text tokens of another length under a padding mask,
    which the fused self-attention kernel does not take); its residual is folded into the fused
    residual + LayerNorm + modulate of the MLP half.
Anything else (cross-attention in an adaLN-Zero block, affine LayerNorms, q/k norms, attention
masks on the image tokens) is refused at swap time, or, for a mask given at call time, run by
diffusers' original code.

Masked training: every fused block takes ``ids_keep`` [B, K] and first keeps only those tokens
(fused gather); :func:`dit_forward_tokens` runs a whole ``DiTTransformer2DModel`` on the kept
tokens (patch + position embedding of all tokens, gather, blocks, final adaLN layer) and returns
their output tokens [B, K, p*p*C_out] in (p_row, p_col, channel) order;
:func:`pixart_forward_tokens` does the same for a ``PixArtTransformer2DModel``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops import checks

SUPPORTED_NORMS = ("ada_norm_zero", "ada_norm_single")
_FUSED: dict[type, type] = {}


def _basic_block_class():
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError as e:
        raise ImportError(
            f"fastmask.nn.diffusers needs the optional package diffusers ({e}); pip install 'fastmask-dit[latents]'"
        ) from None
    return BasicTransformerBlock


# --------------------------------------------------------------------------- pieces
# diffusers' standard attention processors: each computes softmax(q k^T scale) v from the
# projections, which is what the fused attention core computes.
_STANDARD_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "XFormersAttnProcessor")
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(m) -> bool:
    return any(getattr(m, t, None) for t in _HOOK_TABLES)


def _plain_linear(m) -> bool:
    """A bare nn.Linear (not a subclass, not a LoRA wrapper) without hooks: safe to read its weight."""
    return type(m) is torch.nn.Linear and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                               or m._backward_pre_hooks)


def _standard_processor(attn) -> bool:
    p = getattr(attn, "processor", None)
    return p is None or (type(p).__name__ in _STANDARD_PROCESSORS and type(p).__module__.startswith("diffusers."))


def _qkv(attn, h: Tensor) -> Tensor:
    """[B, L, 3, H, hd] from the attention's fused or separate input projections."""
    B, L, _ = h.shape
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
        H = attn.heads
        qkv = attn.to_qkv(h)
        return qkv.view(B, L, 3, H, qkv.shape[-1] // (3 * H))
    mods = attn._modules  # read directly: Module.__getattr__ costs about a microsecond a call
    to_q, to_k, to_v = mods["to_q"], mods["to_k"], mods["to_v"]
    if _plain_linear(to_q) and _plain_linear(to_k) and _plain_linear(to_v):
        w = torch.cat([to_q.weight, to_k.weight, to_v.weight])
        b = None if to_q.bias is None else torch.cat([to_q.bias, to_k.bias, to_v.bias])
        qkv = F.linear(h, w, b)
    else:  # LoRA or hooks on a projection: run each as the module it is
        q, k, v = to_q(h), to_k(h), to_v(h)
        H = attn.heads
        return torch.stack([q, k, v], dim=2).view(B, L, 3, H, q.shape[-1] // H)
    H = attn.heads
    return qkv.view(B, L, 3, H, qkv.shape[-1] // (3 * H))


def _self_attention(attn, h: Tensor, where: str = "block") -> Tensor:
    if not _standard_processor(attn):  # set after fusing (fuse_block refuses one set before)
        raise ValueError(
            f"{where}.attn1: a custom attention processor ({type(attn.processor).__name__}) cannot take the fused path, "
            "which computes the attention itself; unfuse_transformer(model) to run it"
        )
    out = ops.attention(_qkv(attn, h), attn.scale)
    out = attn.to_out[0](out)
    if len(attn.to_out) > 1:
        out = attn.to_out[1](out)  # dropout
    return out


def _check_attention(attn, where: str) -> None:
    problems = []
    if getattr(attn, "is_cross_attention", False):
        problems.append("it is cross-attention")
    for name in ("norm_q", "norm_k", "spatial_norm", "group_norm", "norm_cross"):
        if getattr(attn, name, None) is not None:
            problems.append(f"it has {name}")
    if getattr(attn, "residual_connection", False):
        problems.append("it has a residual connection inside")
    if getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        problems.append("it rescales its output")
    if getattr(attn, "to_q", None) is None or getattr(attn, "to_k", None) is None or getattr(attn, "to_v", None) is None:
        problems.append("it has no to_q/to_k/to_v projections")
    if problems:
        raise ValueError(f"{where}: the self-attention cannot take the fused path: {', '.join(problems)}")


def _check_norm(norm, where: str) -> None:
    if not isinstance(norm, torch.nn.LayerNorm) or norm.elementwise_affine:
        raise ValueError(f"{where}: expected a LayerNorm without affine parameters, got {norm!r}")


def _uncalled_modules(block) -> list[tuple[str, torch.nn.Module]]:
    """The block's sub-modules whose work the fused forward computes without calling them."""
    names = ["attn1", "norm1", "norm1.norm", "norm3"] if block.norm_type == "ada_norm_zero" else ["attn1", "norm1", "norm2"]
    return [(n, block.get_submodule(n)) for n in names]


class _RefusingHooks(dict):
    """The hook table of a module that a fused block computes without calling: registering a
    hook there raises (the hook would never run), naming the module."""

    def __init__(self, where: str = "module"):
        super().__init__()
        self.where = where

    def __setitem__(self, key, value):
        raise ValueError(
            f"{self.where}: the fused path computes this module without calling it, so a hook on it would never "
            "run; unfuse_transformer(model) first (hooks on to_q/to_k/to_v/to_out, ff and norm1.linear do run)"
        )

    def __reduce__(self):  # copies and pickles carry the guard, empty
        return (type(self), (self.where,))


def _guard_hooks(block, where: str, on: bool) -> None:
    from collections import OrderedDict

    for name, m in _uncalled_modules(block):
        for t in _HOOK_TABLES:
            if hasattr(m, t):
                setattr(m, t, _RefusingHooks(f"{where}.{name}") if on else OrderedDict())


def check_block(block, where: str = "block") -> None:
    """Raise ValueError saying why ``block`` (a diffusers BasicTransformerBlock) cannot be fused."""
    nt = getattr(block, "norm_type", None)
    if nt not in SUPPORTED_NORMS:
        raise ValueError(f"{where}: norm_type {nt!r} is not supported; fused blocks take {SUPPORTED_NORMS}")
    if getattr(block, "pos_embed", None) is not None or getattr(block, "only_cross_attention", False):
        raise ValueError(f"{where}: blocks with their own positional embedding or only cross-attention are not supported")
    _check_attention(block.attn1, f"{where}.attn1")
    if nt == "ada_norm_zero":
        if block.attn2 is not None:
            raise ValueError(f"{where}: an adaLN-Zero block with a second attention (attn2) is not supported")
        if block.norm1.emb is None:
            raise ValueError(f"{where}: the adaLN-Zero norm has no timestep/class embedder")
        _check_norm(block.norm1.norm, f"{where}.norm1.norm")
        _check_norm(block.norm3, f"{where}.norm3")
    else:
        _check_norm(block.norm1, f"{where}.norm1")
        _check_norm(block.norm2, f"{where}.norm2")
    if not _standard_processor(block.attn1):
        raise ValueError(
            f"{where}.attn1: a custom attention processor ({type(block.attn1.processor).__name__}) cannot take the "
            "fused path, which computes the attention itself"
        )
    for name, m in _uncalled_modules(block):
        if _has_hooks(m):
            raise ValueError(
                f"{where}.{name}: has hooks, which the fused path cannot run (it computes this module without "
                "calling it); remove them first (hooks on to_q/to_k/to_v/to_out, ff and norm1.linear do run)"
            )
    a = block.attn1
    if getattr(a, "fused_projections", False) and getattr(a, "to_qkv", None) is not None and not all(
        _plain_linear(getattr(a, n)) for n in ("to_q", "to_k", "to_v")
    ):
        raise ValueError(
            f"{where}.attn1: has fused projections (to_qkv) while to_q/to_k/to_v carry LoRA or hooks; "
            "call attn.unfuse_projections() first"
        )


# --------------------------------------------------------------------------- the fused forward
def _fused_forward(
    self,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    timestep: Tensor | None = None,
    cross_attention_kwargs: dict | None = None,
    class_labels: Tensor | None = None,
    added_cond_kwargs: dict | None = None,
    ids_keep: Tensor | None = None,
) -> Tensor:
    x = hidden_states
    checks.activation_dtype("hidden_states", x, self.attn1.to_out[0].weight, type(self).__name__)
    if ids_keep is not None:
        x = ops.gather_tokens(x, ids_keep)
    if attention_mask is not None or (cross_attention_kwargs and "gligen" in cross_attention_kwargs):
        # a mask on the image tokens: diffusers' own code (the fused attention takes no mask)
        base = type(self).__mro__[1]
        return base.forward(self, x, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                            cross_attention_kwargs, class_labels, added_cond_kwargs)
    if self.norm_type == "ada_norm_zero":
        n1 = self.norm1
        emb = n1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = n1.linear(n1.silu(emb)).chunk(6, dim=1)
        h = ops.layernorm_modulate(x, shift1, scale1, n1.norm.eps)
        a = _self_attention(self.attn1, h, self._fastmask_where)
        x, h = ops.residual_layernorm_modulate(x, a, gate1, shift2, scale2, self.norm3.eps)
        return ops.gated_residual(x, self.ff(h), gate2)
    # ada_norm_single (PixArt): timestep is the [B, 6 D] output of the model's AdaLayerNormSingle
    B = x.shape[0]
    mods = (self.scale_shift_table[None] + timestep.reshape(B, 6, -1)).unbind(1)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    h = ops.layernorm_modulate(x, shift1, scale1, self.norm1.eps)
    x = ops.gated_residual(x, _self_attention(self.attn1, h, self._fastmask_where), gate1)
    if self.attn2 is not None:
        c = self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                       **(cross_attention_kwargs or {}))
        ones = torch.ones_like(gate2)
        x, h = ops.residual_layernorm_modulate(x, c, ones, shift2, scale2, self.norm2.eps)
    else:
        h = ops.layernorm_modulate(x, shift2, scale2, self.norm2.eps)
    return ops.gated_residual(x, self.ff(h), gate2)


def _fused_class(base: type) -> type:
    if base not in _FUSED:
        _FUSED[base] = type(f"Fused{base.__name__}", (base,), {"forward": _fused_forward, "_fastmask_fused": True,
                                                               "__module__": __name__})
    return _FUSED[base]


def fuse_block(block, where: str = "block"):
    """Switch one diffusers BasicTransformerBlock to the fused forward (in place; returns it)."""
    if getattr(block, "_fastmask_fused", False):
        return block
    BasicTransformerBlock = _basic_block_class()
    if not isinstance(block, BasicTransformerBlock):
        raise ValueError(f"block: expected a diffusers BasicTransformerBlock, got {type(block).__name__}")
    check_block(block, where)
    block._fastmask_where = where
    _guard_hooks(block, where, on=True)
    block.__class__ = _fused_class(type(block))
    return block


def fuse_transformer(model, attr: str = "transformer_blocks"):
    """Fuse every block of a diffusers DiT/PixArt transformer (``model.<attr>``), in place.
    Weights, parameter names and the model's own ``forward`` are unchanged. Returns ``model``."""
    blocks = getattr(model, attr, None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"model: {type(model).__name__} has no ModuleList of transformer blocks named {attr!r}")
    for i, blk in enumerate(blocks):
        fuse_block(blk, f"{attr}[{i}]")
    return model


def unfuse_transformer(model, attr: str = "transformer_blocks"):
    """Give every fused block of ``model.<attr>`` back its diffusers class (in place)."""
    for blk in getattr(model, attr):
        if getattr(blk, "_fastmask_fused", False):
            blk.__class__ = type(blk).__mro__[1]
            _guard_hooks(blk, "", on=False)
    return model


# --------------------------------------------------------------------------- masked DiT forward
def dit_forward_tokens(model, hidden_states: Tensor, timestep: Tensor, class_labels: Tensor,
                       ids_keep: Tensor | None = None) -> Tensor:
    """A ``DiTTransformer2DModel`` (fused or not) on the tokens ``ids_keep`` [B, K] only:
    patch + position embedding of the full grid, keep the K tokens (fused gather), the
    transformer blocks on [B, K, D], the final adaLN layer. Returns output tokens
    [B, K, p*p*C_out] ((p_row, p_col, channel) order, as diffusers unpatchifies them); with
    ``ids_keep=None`` all N tokens, which unpatchify to the model's own output."""
    x = model.pos_embed(hidden_states)
    if ids_keep is not None:
        checks.ids("ids_keep", ids_keep, x.shape[0], x.shape[1])
        x = ops.gather_tokens(x, ids_keep)
    for blk in model.transformer_blocks:
        x = blk(x, timestep=timestep, class_labels=class_labels)
    cond = model.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
    shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    x = ops.layernorm_modulate(x, shift, scale, model.norm_out.eps)
    return model.proj_out_2(x)


def pixart_forward_tokens(model, hidden_states: Tensor, encoder_hidden_states: Tensor, timestep: Tensor,
                          ids_keep: Tensor | None = None, *, encoder_attention_mask: Tensor | None = None,
                          added_cond_kwargs: dict | None = None) -> Tensor:
    """A ``PixArtTransformer2DModel`` (fused or not) on the tokens ``ids_keep`` [B, K] only, as
    :func:`dit_forward_tokens`: [B, K, p*p*C_out]; ``ids_keep=None`` gives all N tokens."""
    if model.use_additional_conditions and added_cond_kwargs is None:
        raise ValueError("added_cond_kwargs: this PixArt model uses resolution/aspect-ratio conditions")
    if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:  # keep = 1 -> additive bias
        encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
    B = hidden_states.shape[0]
    x = model.pos_embed(hidden_states)
    t6, t_emb = model.adaln_single(timestep, added_cond_kwargs, batch_size=B, hidden_dtype=x.dtype)
    if model.caption_projection is not None:
        encoder_hidden_states = model.caption_projection(encoder_hidden_states).view(B, -1, x.shape[-1])
    if ids_keep is not None:
        checks.ids("ids_keep", ids_keep, B, x.shape[1])
        x = ops.gather_tokens(x, ids_keep)
    for blk in model.transformer_blocks:
        x = blk(x, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                timestep=t6)
    shift, scale = (model.scale_shift_table[None] + t_emb[:, None]).unbind(1)
    x = ops.layernorm_modulate(x, shift, scale, model.norm_out.eps)
    return model.proj_out(x)


def tokens_of(images: Tensor, patch_size: int, ids_keep: Tensor | None = None) -> Tensor:
    """Targets in the token layout of :func:`dit_forward_tokens`: [B, C, H, W] -> [B, K or N, p*p*C]."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"images: spatial size {H}x{W} is not divisible by patch size {p}")
    t = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)
    return t if ids_keep is None else ops.gather_tokens(t, ids_keep)

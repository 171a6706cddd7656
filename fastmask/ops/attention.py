"""Non-causal multi-head attention read straight from the fused qkv projection layout."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .registry import declare
from .ranges import profiled
from ._library import compiled_ops, eager_function, kernels
from .reference import QK_NORM_EPS

declare(
    "attention",
    reference=reference.attention,
    # forward -> (out [B, L, H*hd], lse [B, H, L] fp32); backward -> grad qkv. deterministic: None
    # follows torch.are_deterministic_algorithms_enabled()
    launchers=("attention_fwd(qkv, scale)", "attention_bwd(grad_out, qkv, out, lse, scale, deterministic=None)"),
    category="attention",
    example=lambda e: (f"{e.part} qkv [{e.B}, {e.L}, 3, {e.H}, {e.D // e.H}], head dim {e.D // e.H}",
                       (e.t(e.B, e.L, 3, e.H, e.D // e.H),)) if e.part != "output" else None,
)


# ``deterministic`` is resolved when attention is called and travels with the op to its
# backward: False runs the one-pass backward (dq added with fp32 atomics), True the
# bit-reproducible one.
def _attn_fwd(qkv: Tensor, scale: float, backend: str, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    return kernels(backend).attention_fwd(qkv, scale)


def _attn_bwd(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str, deterministic: bool = False
) -> Tensor:
    return kernels(backend).attention_bwd(grad_out, qkv, out, lse, scale, deterministic=deterministic)


def _attn_fake(qkv, scale, backend, deterministic=False):
    B, L, _, H, hd = qkv.shape
    return qkv.new_empty(B, L, H * hd), qkv.new_empty(B, H, L, dtype=torch.float32)


def _attn_bwd_fake(grad_out, qkv, out, lse, scale, backend, deterministic=False):
    return torch.empty_like(qkv)


def _attn_setup(ctx, inputs, output):
    qkv, scale, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.scale = scale
    ctx.backend = backend
    ctx.deterministic = deterministic


def _attn_backward(ctx, grad_out, _glse, bwd):
    qkv, out, lse = ctx.saved_tensors
    dqkv = bwd(grad_out.contiguous(), qkv, out, lse, ctx.scale, ctx.backend, ctx.deterministic)
    return dqkv, None, None, None


_ATTN_OPS = compiled_ops("attention", _attn_fwd, _attn_bwd, _attn_setup, _attn_backward, fake=_attn_fake,
                         fake_backward=_attn_bwd_fake)
_attn_op = _ATTN_OPS["cuda"]  # the custom op (the cuda backend's)
_ATTN = eager_function(
    "Attention", _attn_fwd, _attn_setup, functools.partial(_attn_backward, bwd=_attn_bwd), nondifferentiable=(1,)
)


@dispatch.signature("attention")
def _attention_signature(qkv, scale):
    return (
        qkv.shape, qkv.dtype, qkv.device, scale,
    )


# ------------------------------------------------------------- RoPE / qk-norm prologue
# A separate op, so the plain one keeps its schema: rotary tables and norm weights are optional
# tensors (None skips that part); the backward also returns the norm weights' gradients.
declare(
    "attention_rope",
    reference=reference.attention_rope,
    # forward -> (out, lse) as attention; backward -> (grad qkv, grad q_weight, grad k_weight), the
    # weight gradients fp32 (empty without qk-norm)
    launchers=("attention_rope_fwd(qkv, scale, cos, sin, ids_keep, q_weight, k_weight, eps)",
               "attention_rope_bwd(grad_out, qkv, out, lse, scale, cos, sin, ids_keep, q_weight, k_weight, eps, "
               "deterministic=None)"),
    category="attention",
    example=lambda e: (f"{e.part} qkv [{e.B}, {e.L}, 3, {e.H}, {e.D // e.H}] in LightningDiT-style blocks (RoPE, "
                       f"qk-norm)", (e.t(e.B, e.L, 3, e.H, e.D // e.H),)) if e.part == "encoder" else None,
)


def _attn_rope_fwd(
    qkv: Tensor, scale: float, cos: Optional[Tensor], sin: Optional[Tensor], ids_keep: Optional[Tensor],
    q_weight: Optional[Tensor], k_weight: Optional[Tensor], eps: float, backend: str, deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    return kernels(backend).attention_rope_fwd(qkv, scale, cos, sin, ids_keep, q_weight, k_weight, eps)


def _attn_rope_bwd(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float, cos: Optional[Tensor],
    sin: Optional[Tensor], ids_keep: Optional[Tensor], q_weight: Optional[Tensor], k_weight: Optional[Tensor],
    eps: float, backend: str, deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).attention_rope_bwd(
        grad_out, qkv, out, lse, scale, cos, sin, ids_keep, q_weight, k_weight, eps, deterministic=deterministic
    )


def _attn_rope_fake(qkv, scale, cos, sin, ids_keep, q_weight, k_weight, eps, backend, deterministic=False):
    B, L, _, H, hd = qkv.shape
    return qkv.new_empty(B, L, H * hd), qkv.new_empty(B, H, L, dtype=torch.float32)


def _attn_rope_bwd_fake(grad_out, qkv, out, lse, scale, cos, sin, ids_keep, q_weight, k_weight, eps, backend,
                        deterministic=False):
    hd = qkv.shape[-1] if q_weight is not None else 0
    return torch.empty_like(qkv), qkv.new_empty(hd, dtype=torch.float32), qkv.new_empty(hd, dtype=torch.float32)


def _attn_rope_setup(ctx, inputs, output):
    qkv, scale, cos, sin, ids_keep, q_weight, k_weight, eps, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cos, sin, ids_keep, q_weight, k_weight)
    ctx.scale, ctx.eps, ctx.backend, ctx.deterministic = scale, eps, backend, deterministic


def _attn_rope_backward(ctx, grad_out, _glse, bwd):
    qkv, out, lse, cos, sin, ids_keep, q_weight, k_weight = ctx.saved_tensors
    dqkv, dqw, dkw = bwd(grad_out.contiguous(), qkv, out, lse, ctx.scale, cos, sin, ids_keep, q_weight, k_weight,
                         ctx.eps, ctx.backend, ctx.deterministic)
    if q_weight is None:
        dqw = dkw = None
    else:
        dqw, dkw = dqw.to(q_weight.dtype), dkw.to(k_weight.dtype)
    return dqkv, None, None, None, None, dqw, dkw, None, None, None


_ATTN_ROPE_OPS = compiled_ops("attention_rope", _attn_rope_fwd, _attn_rope_bwd, _attn_rope_setup, _attn_rope_backward,
                              fake=_attn_rope_fake, fake_backward=_attn_rope_bwd_fake)
_attn_rope_op = _ATTN_ROPE_OPS["cuda"]  # the custom op (the cuda backend's)
_ATTN_ROPE = eager_function(
    "AttentionRope", _attn_rope_fwd, _attn_rope_setup, functools.partial(_attn_rope_backward, bwd=_attn_rope_bwd),
    nondifferentiable=(1,),
)


def _check_prologue(qkv, rope, ids_keep, q_norm_weight, k_norm_weight):
    B, L, _, H, hd = qkv.shape
    cos = sin = None
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError("rope: expected a pair (cos, sin) of [positions, head_dim] tensors")
        cos, sin = rope
        for name, t in (("rope cos", cos), ("rope sin", sin)):
            checks.tensor(name, t, ndim=2, floating=True)
            if t.shape[1] != hd or (ids_keep is None and t.shape[0] < L) or t.shape != cos.shape:
                raise ValueError(f"{name}: expected [positions >= {L if ids_keep is None else 1}, head_dim={hd}], "
                                 f"got {tuple(t.shape)}")
            checks.same_device("qkv", qkv, **{name.replace(" ", "_"): t})
    if ids_keep is not None:
        if rope is None:
            raise ValueError("ids_keep: only used with rope (it picks the rotary rows of the kept tokens)")
        checks.ids("ids_keep", ids_keep, B, cos.shape[0], num_kept=L)
        checks.same_device("qkv", qkv, ids_keep=ids_keep)
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight, k_norm_weight: give both (per-head qk-norm) or neither")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            checks.tensor(name, w, shape=(hd,), floating=True)
            checks.same_device("qkv", qkv, **{name: w})
    return cos, sin


def _check_rope_pairs(cos, sin) -> None:
    """A value check (it reads the tables: a device sync), skipped like the other value checks."""
    if checks.value_checks_enabled() and not (torch.equal(cos[:, 0::2], cos[:, 1::2])
                                              and torch.equal(sin[:, 0::2], sin[:, 1::2])):
        raise ValueError("rope: cos and sin must hold one angle per interleaved pair (columns 2i and 2i + 1 "
                         "equal), as every RoPE table does (fastmask.nn.rope_2d, LightningDiT's freqs_cos)")


def _meta(t):
    return None if t is None else (t.shape, t.dtype, t.device)


@dispatch.signature("attention_rope")
def _attention_rope_signature(qkv, scale, rope, ids_keep, q_norm_weight, k_norm_weight, qk_norm_eps):
    if rope is not None and not (isinstance(rope, (tuple, list)) and len(rope) == 2):
        return None  # the checks say what is wrong
    return (
        _meta(qkv), scale, None if rope is None else (_meta(rope[0]), _meta(rope[1])), _meta(ids_keep),
        _meta(q_norm_weight), _meta(k_norm_weight), qk_norm_eps,
    )


def _attention_rope(qkv, scale, deterministic, rope, ids_keep, q_norm_weight, k_norm_weight, qk_norm_eps):
    """:func:`attention` with the prologue; its checks and backend choice run once per signature."""
    sig, backend = _attention_rope_signature(qkv, scale, rope, ids_keep, q_norm_weight, k_norm_weight, qk_norm_eps)
    if backend is None:
        checks.tensor("qkv", qkv, ndim=5, floating=True)
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv: expected shape [B, L, 3, H, head_dim], got {tuple(qkv.shape)}")
        checks.nonempty("qkv", qkv, "B L 3 H head_dim")
        if scale is not None:
            checks.positive_float("scale", scale)
        _check_prologue(qkv, rope, ids_keep, q_norm_weight, k_norm_weight)
        checks.positive_float("qk_norm_eps", qk_norm_eps)
        backend = dispatch.plan("attention_rope", sig, qkv)
    cos, sin = (None, None) if rope is None else rope
    if cos is not None:
        _check_rope_pairs(cos, sin)
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    eps = float(qk_norm_eps)
    if backend == "torch":
        return reference.attention_rope(qkv, scale, cos, sin, ids_keep, q_norm_weight, k_norm_weight, eps)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (qkv.contiguous(), scale, cos, sin, ids_keep, q_norm_weight, k_norm_weight, eps, backend,
            bool(deterministic))
    out, _ = _ATTN_ROPE_OPS[backend](*args) if torch.compiler.is_compiling() else _ATTN_ROPE.apply(*args)
    return out


@profiled("attention")
def attention(
    qkv: Tensor,
    scale: float | None = None,
    *,
    deterministic: bool | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
    ids_keep: Tensor | None = None,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    qk_norm_eps: float = QK_NORM_EPS,
) -> Tensor:
    """``softmax(q k^T * scale) v`` per head, non-causal.

    qkv [B, L, 3, H, hd] (the output of the qkv Linear, viewed; no transposes needed);
    scale defaults to 1/sqrt(hd). Returns [B, L, H * hd], ready for the output projection.
    Equivalent PyTorch code: :func:`fastmask.ops.reference.attention`.

    ``deterministic``: the Triton backward is bit-identical from run to run when True, and
    faster (fewer matmuls, dq added with atomics) when False; None (the default) follows
    ``torch.are_deterministic_algorithms_enabled()``.

    Modern-DiT prologue (LightningDiT, SPRINT), applied to q and k inside the kernels:
    ``q_norm_weight`` / ``k_norm_weight`` [hd]: per-head RMSNorm, eps ``qk_norm_eps``;
    ``rope=(cos, sin)``, each [P, hd]: rotary embedding with interleaved pairs
    (LightningDiT's freqs_cos / freqs_sin layout; see :func:`fastmask.nn.layers.rope_2d`), read
    at row ``ids_keep[b, l]`` when ``ids_keep`` [B, L] is given (the kept tokens' positions),
    else at row l. Norm first, then rotation. Equivalent PyTorch code:
    :func:`fastmask.ops.reference.attention_rope` (dispatched as op ``attention_rope``).
    """
    if rope is not None or ids_keep is not None or q_norm_weight is not None or k_norm_weight is not None:
        return _attention_rope(qkv, scale, deterministic, rope, ids_keep, q_norm_weight, k_norm_weight, qk_norm_eps)
    sig, backend = _attention_signature(qkv, scale)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        checks.tensor("qkv", qkv, ndim=5, floating=True)
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv: expected shape [B, L, 3, H, head_dim], got {tuple(qkv.shape)}")
        if qkv.shape[1] == 0:
            raise ValueError("qkv: sequence length L is 0")
        checks.nonempty("qkv", qkv, "B L 3 H head_dim")
        if scale is not None:
            checks.positive_float("scale", scale)
        backend = dispatch.plan("attention", sig, qkv)
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    if backend == "torch":
        return reference.attention(qkv, scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (qkv.contiguous(), scale, backend, bool(deterministic))
    out, _ = _ATTN_OPS[backend](*args) if compiling else _ATTN.apply(*args)
    return out

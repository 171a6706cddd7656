"""Token ops: random masking, fused gather of visible tokens, fused unmask."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch, reference
from .registry import declare
from .ranges import profiled
from ._library import compiled_ops, eager_function, empty_like_none, kernels

def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """K = int(N * (1 - mask_ratio)), in floating point exactly as the published MaskDiT code
    computes it (so N = 100 at ratio 0.9 keeps 9 tokens, since 1 - 0.9 < 0.1 in binary)."""
    r = checks.mask_ratio(mask_ratio)
    checks.integer("num_tokens", num_tokens, 1)
    K = int(num_tokens * (1 - r))
    if K < 1:
        raise ValueError(f"mask_ratio: {mask_ratio} keeps no token of {num_tokens} (K = 0); lower the ratio")
    return K


@profiled("random_mask")
def random_mask(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
):
    """Per-sample random masking (MaskDiT: argsort of uniform noise, the first K kept).

    Returns ``(ids_keep [B, K] int64, ids_restore [B, N] int64, mask [B, N] float)`` where
    mask is 1 at dropped positions. ``ids_restore`` is the inverse of the shuffle: token n
    sits at position ``ids_restore[b, n]`` of the shuffled order.
    """
    checks.integer("batch", batch, 1)
    checks.integer("num_tokens", num_tokens, 1)
    if batch * num_tokens >= 2**31:  # the int32 index range of the kernels; far beyond any real batch
        raise ValueError(f"batch: {batch} x {num_tokens} tokens exceeds 2**31 - 1 token ids")
    K = num_kept(num_tokens, mask_ratio)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K].contiguous()
    mask = torch.ones(batch, num_tokens, device=device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


@profiled("mask_from_ids")
def mask_from_ids(ids_keep: Tensor, num_tokens: int) -> Tensor:
    """mask [B, N]: 1 at positions not in ids_keep (dropped), 0 at kept ones."""
    mask = torch.ones(ids_keep.shape[0], num_tokens, device=ids_keep.device)
    return mask.scatter(1, ids_keep.long(), 0.0)


# ----------------------------------------------------------------------------- gather
declare(
    "gather_tokens",
    reference=reference.gather_tokens,
    launchers=("gather_tokens_fwd(x, ids_keep, pos)",
               "gather_tokens_bwd(grad_out, ids_keep, num_tokens, pos_grad)"),  # -> (grad_x, grad_pos or None)
    category="gather/unmask",
    example=lambda e: (f"x [{e.B}, {e.N}, {e.D}] -> {e.K} kept", (e.t(e.B, e.N, e.D), e.t(e.N, e.D, dt=torch.float32)))
    if e.part == "encoder" else None,
)
def _gather_fwd(x: Tensor, ids_keep: Tensor, pos: Optional[Tensor], backend: str) -> Tensor:
    return kernels(backend).gather_tokens_fwd(x, ids_keep, pos)


def _gather_bwd(
    grad_out: Tensor, ids_keep: Tensor, num_tokens: int, pos_grad: bool, backend: str
) -> tuple[Tensor, Tensor]:
    gx, gpos = kernels(backend).gather_tokens_bwd(grad_out, ids_keep, num_tokens, pos_grad)
    return gx, (gpos if gpos is not None else empty_like_none(grad_out))


def _gather_fake(x, ids_keep, pos, backend):
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2])


def _gather_bwd_fake(grad_out, ids_keep, num_tokens, pos_grad, backend):
    B, K, D = grad_out.shape
    gpos = grad_out.new_empty(num_tokens, D, dtype=torch.float32) if pos_grad else grad_out.new_empty(0)
    return grad_out.new_empty(B, num_tokens, D), gpos


def _gather_setup(ctx, inputs, output):
    x, ids_keep, pos, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.num_tokens = x.shape[1]
    ctx.backend = backend
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = None if pos is None else pos.dtype


def _gather_backward(ctx, grad_out, bwd):
    (ids_keep,) = ctx.saved_tensors
    pos_grad = ctx.pos_shape is not None and ctx.needs_input_grad[2]
    gx, gpos = bwd(grad_out.contiguous(), ids_keep, ctx.num_tokens, pos_grad, ctx.backend)
    gpos = gpos.reshape(ctx.pos_shape).to(ctx.pos_dtype) if pos_grad else None
    return gx, None, gpos, None


_GATHER_OPS = compiled_ops("gather_tokens", _gather_fwd, _gather_bwd, _gather_setup, _gather_backward,
                           fake=_gather_fake, fake_backward=_gather_bwd_fake)
_gather_op = _GATHER_OPS["cuda"]  # the custom op (the cuda backend's)
_GATHER = eager_function(
    "GatherTokens", _gather_fwd, _gather_setup, functools.partial(_gather_backward, bwd=_gather_bwd)
)


def _token_tensor(name: str, t: Tensor, labels: str) -> tuple[int, int, int]:
    """A non-empty floating [B, L, D] tensor (``labels`` names its dimensions); its shape."""
    checks.tensor(name, t, ndim=3, floating=True)
    checks.nonempty(name, t, labels)
    return tuple(t.shape)


def _pos_table(name: str, pos: Tensor | None, num_tokens: int, width: int) -> Tensor | None:
    """Accept a position embedding as [N, D] or [1, N, D]; return [N, D]."""
    if pos is None:
        return None
    checks.tensor(name, pos, floating=True)
    if pos.dim() == 3 and pos.shape[0] == 1:
        pos = pos[0]
    checks.tensor(name, pos, shape=(num_tokens, width))
    return pos


@dispatch.signature("gather_tokens")
def _gather_tokens_signature(x, ids_keep, pos):
    return (
        x.shape, x.dtype, x.device, ids_keep.shape, ids_keep.dtype, ids_keep.device,
        None if pos is None else (pos.shape, pos.dtype, pos.device),
    )


@profiled("gather_tokens")
def gather_tokens(x: Tensor, ids_keep: Tensor, pos: Tensor | None = None, *, check_ids: bool = True) -> Tensor:
    """Visible tokens: ``x_vis[b, k] = x[b, ids_keep[b, k]] (+ pos[ids_keep[b, k]])``.

    x [B, N, D]; ids_keep [B, K] (distinct ids in [0, N)); pos [N, D] or [1, N, D], added in
    the same pass. Equivalent PyTorch code: :func:`fastmask.ops.reference.gather_tokens`.
    ``check_ids=False`` skips the range/uniqueness check of ids_keep (a device sync); use it
    for ids made by :func:`random_mask`.
    """
    sig, backend = _gather_tokens_signature(x, ids_keep, pos)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        B, N, D = _token_tensor("x", x, "B N D")
        checks.ids("ids_keep", ids_keep, B, N, values=False)
        _pos_table("pos", pos, N, D)
        checks.same_device("x", x, ids_keep=ids_keep, pos=pos)
        backend = dispatch.plan("gather_tokens", sig, x, pos)
    if check_ids:
        checks.ids_values("ids_keep", ids_keep, x.shape[1])
    if pos is not None and pos.dim() == 3:
        pos = pos[0]
    if backend == "torch":
        return reference.gather_tokens(x, ids_keep, pos)
    args = (x.contiguous(), ids_keep.long().contiguous(), None if pos is None else pos.contiguous(), backend)
    return _GATHER_OPS[backend](*args) if compiling else _GATHER.apply(*args)


# ----------------------------------------------------------------------------- unmask
declare(
    "unmask_tokens",
    reference=reference.unmask_tokens,
    launchers=("unmask_tokens_fwd(x_vis, ids_keep, mask_token, num_tokens, pos)",
               "unmask_tokens_bwd(grad_out, ids_keep, pos_grad)"),  # -> (grad_x_vis, grad_mask_token, grad_pos or None)
    category="gather/unmask",
    example=lambda e: (f"x_vis [{e.B}, {e.K}, {e.D}] -> {e.N} tokens",
                       (e.t(e.B, e.K, e.D), e.t(e.D, dt=torch.float32), e.t(e.N, e.D, dt=torch.float32)))
    if e.part == "decoder" else None,
)
def _unmask_fwd(
    x_vis: Tensor, ids_keep: Tensor, mask_token: Tensor, num_tokens: int, pos: Optional[Tensor], backend: str
) -> Tensor:
    return kernels(backend).unmask_tokens_fwd(x_vis, ids_keep, mask_token, num_tokens, pos)


def _unmask_bwd(grad_out: Tensor, ids_keep: Tensor, pos_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    gx, gmask, gpos = kernels(backend).unmask_tokens_bwd(grad_out, ids_keep, pos_grad)
    return gx, gmask, (gpos if gpos is not None else empty_like_none(grad_out))


def _unmask_fake(x_vis, ids_keep, mask_token, num_tokens, pos, backend):
    return x_vis.new_empty(x_vis.shape[0], num_tokens, x_vis.shape[2])


def _unmask_bwd_fake(grad_out, ids_keep, pos_grad, backend):
    B, N, D = grad_out.shape
    gpos = grad_out.new_empty(N, D, dtype=torch.float32) if pos_grad else grad_out.new_empty(0)
    return grad_out.new_empty(B, ids_keep.shape[1], D), grad_out.new_empty(D, dtype=torch.float32), gpos


def _unmask_setup(ctx, inputs, output):
    x_vis, ids_keep, mask_token, num_tokens, pos, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.backend = backend
    ctx.mask_dtype = mask_token.dtype
    ctx.pos_dtype = None if pos is None else pos.dtype


def _unmask_backward(ctx, grad_out, bwd):
    (ids_keep,) = ctx.saved_tensors
    pos_grad = ctx.pos_dtype is not None and ctx.needs_input_grad[4]
    gx, gmask, gpos = bwd(grad_out.contiguous(), ids_keep, pos_grad, ctx.backend)
    return gx, None, gmask.to(ctx.mask_dtype), None, (gpos.to(ctx.pos_dtype) if pos_grad else None), None


_UNMASK_OPS = compiled_ops("unmask_tokens", _unmask_fwd, _unmask_bwd, _unmask_setup, _unmask_backward,
                           fake=_unmask_fake, fake_backward=_unmask_bwd_fake)
_unmask_op = _UNMASK_OPS["cuda"]  # the custom op (the cuda backend's)
_UNMASK = eager_function(
    "UnmaskTokens", _unmask_fwd, _unmask_setup, functools.partial(_unmask_backward, bwd=_unmask_bwd)
)


@dispatch.signature("unmask_tokens")
def _unmask_tokens_signature(x_vis, ids_keep, mask_token, num_tokens, pos):
    return (
        x_vis.shape, x_vis.dtype, x_vis.device, ids_keep.shape, ids_keep.dtype, ids_keep.device,
        mask_token.shape, mask_token.dtype, mask_token.device, num_tokens,
        None if pos is None else (pos.shape, pos.dtype, pos.device),
    )


@profiled("unmask_tokens")
def unmask_tokens(
    x_vis: Tensor,
    ids_keep: Tensor,
    mask_token: Tensor,
    num_tokens: int,
    pos: Tensor | None = None,
    *,
    check_ids: bool = True,
) -> Tensor:
    """All tokens back in place: ``out[b, n] = x_vis[b, j]`` where ``ids_keep[b, j] = n``, else
    ``mask_token``; plus ``pos[n]`` when given.

    x_vis [B, K, D]; ids_keep [B, K]; mask_token [D] (or any shape of D elements, e.g. the
    [1, 1, D] parameter); pos [N, D] or [1, N, D]. Returns [B, N, D].
    Equivalent PyTorch code: :func:`fastmask.ops.reference.unmask_tokens`.
    """
    sig, backend = _unmask_tokens_signature(x_vis, ids_keep, mask_token, num_tokens, pos)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        B, K, D = _token_tensor("x_vis", x_vis, "B K D")
        checks.integer("num_tokens", num_tokens, 1)
        checks.ids("ids_keep", ids_keep, B, num_tokens, num_kept=K, values=False)
        checks.tensor("mask_token", mask_token, floating=True)
        if mask_token.numel() != D:
            raise ValueError(
                f"mask_token: expected {D} elements (the width of x_vis), got shape {tuple(mask_token.shape)}"
            )
        _pos_table("pos", pos, num_tokens, D)
        checks.same_device("x_vis", x_vis, ids_keep=ids_keep, mask_token=mask_token, pos=pos)
        backend = dispatch.plan("unmask_tokens", sig, x_vis, mask_token, pos)
    if check_ids:
        checks.ids_values("ids_keep", ids_keep, num_tokens)
    if pos is not None and pos.dim() == 3:
        pos = pos[0]
    if backend == "torch":
        return reference.unmask_tokens(x_vis, ids_keep, mask_token, num_tokens, pos)
    args = (
        x_vis.contiguous(),
        ids_keep.long().contiguous(),
        mask_token.reshape(x_vis.shape[2]).contiguous(),
        int(num_tokens),
        None if pos is None else pos.contiguous(),
        backend,
    )
    return _UNMASK_OPS[backend](*args) if compiling else _UNMASK.apply(*args)


# ----------------------------------------------------------------------------- scatter
declare(
    "scatter_tokens",
    reference=reference.scatter_tokens,
    launchers=("scatter_tokens_fwd(x_kept, ids_keep, fill, num_tokens)",  # fill None: zeros
               "scatter_tokens_bwd(grad_out, ids_keep, fill_grad)"),  # -> (grad_x_kept, grad_fill or None)
    category="gather/unmask",
    # not in a MaskDiT step: TREAD's put-back of the routed tokens, at the encoder width
    example=lambda e: (f"x_kept [{e.B}, {e.K}, {e.D}] into [{e.B}, {e.N}, {e.D}] (TREAD)",
                       (e.t(e.B, e.K, e.D), e.t(e.B, e.N, e.D)))
    if e.part == "encoder" else None,
)
def _scatter_fwd(x_kept: Tensor, ids_keep: Tensor, fill: Optional[Tensor], num_tokens: int, backend: str) -> Tensor:
    return kernels(backend).scatter_tokens_fwd(x_kept, ids_keep, fill, num_tokens)


def _scatter_bwd(grad_out: Tensor, ids_keep: Tensor, fill_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    gx, gfill = kernels(backend).scatter_tokens_bwd(grad_out, ids_keep, fill_grad)
    return gx, (gfill if gfill is not None else empty_like_none(grad_out))


def _scatter_fake(x_kept, ids_keep, fill, num_tokens, backend):
    return x_kept.new_empty(x_kept.shape[0], num_tokens, x_kept.shape[2])


def _scatter_bwd_fake(grad_out, ids_keep, fill_grad, backend):
    B, N, D = grad_out.shape
    return grad_out.new_empty(B, ids_keep.shape[1], D), (grad_out.new_empty(B, N, D) if fill_grad else grad_out.new_empty(0))


def _scatter_setup(ctx, inputs, output):
    x_kept, ids_keep, fill, num_tokens, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.backend = backend
    ctx.fill_dtype = None if fill is None else fill.dtype


def _scatter_backward(ctx, grad_out, bwd):
    (ids_keep,) = ctx.saved_tensors
    if grad_out is None:  # the eager Function does not materialise a missing gradient
        return None, None, None, None, None
    fill_grad = ctx.fill_dtype is not None and ctx.needs_input_grad[2]
    gx, gfill = bwd(grad_out.contiguous(), ids_keep, fill_grad, ctx.backend)
    return gx, None, (gfill.to(ctx.fill_dtype) if fill_grad else None), None, None


_SCATTER_OPS = compiled_ops("scatter_tokens", _scatter_fwd, _scatter_bwd, _scatter_setup, _scatter_backward,
                            fake=_scatter_fake, fake_backward=_scatter_bwd_fake)
_scatter_op = _SCATTER_OPS["cuda"]  # the custom op (the cuda backend's)
_SCATTER = eager_function(
    "ScatterTokens", _scatter_fwd, _scatter_setup, functools.partial(_scatter_backward, bwd=_scatter_bwd)
)


@dispatch.signature("scatter_tokens")
def _scatter_tokens_signature(x_kept, ids_keep, fill, num_tokens):
    return (
        x_kept.shape, x_kept.dtype, x_kept.device, ids_keep.shape, ids_keep.dtype, ids_keep.device,
        None if fill is None else (fill.shape, fill.dtype, fill.device), num_tokens,
    )


@profiled("scatter_tokens")
def scatter_tokens(
    x_kept: Tensor,
    ids_keep: Tensor,
    fill: Tensor | None = None,
    *,
    num_tokens: int | None = None,
    check_ids: bool = True,
) -> Tensor:
    """Kept rows put back into a saved stream: ``out = fill`` (in x_kept's dtype) with
    ``out[b, ids_keep[b, k]] = x_kept[b, k]``; ``fill`` itself is not changed.

    x_kept [B, K, D]; ids_keep [B, K] (distinct ids in [0, N); K = 0 gives a copy of the fill);
    fill [B, N, D], or None for zeros of ``num_tokens`` = N rows (MicroDiT's output-space fill).
    Returns [B, N, D] in x_kept's dtype. The gradient reaches x_kept at the kept rows and ``fill``
    at the others (zeros at the kept rows): TREAD's route end, where the tokens that skipped the
    routed blocks keep their saved value. (A single mask token as the fill is
    :func:`unmask_tokens`.) ``check_ids=False`` skips the range/uniqueness check of ids_keep (a
    device sync). Equivalent PyTorch code: :func:`fastmask.ops.reference.scatter_tokens`.
    """
    sig, backend = _scatter_tokens_signature(x_kept, ids_keep, fill, num_tokens)
    compiling = sig is None and torch.compiler.is_compiling()
    if backend is None:
        checks.tensor("x_kept", x_kept, ndim=3, floating=True)
        B, K, D = x_kept.shape
        if fill is None:
            checks.integer("num_tokens", num_tokens, 1)
            if B == 0 or D == 0:
                raise ValueError(f"x_kept: {'B' if B == 0 else 'D'} is 0 in shape {tuple(x_kept.shape)}; expected "
                                 "a non-empty batch and width")
        else:
            checks.tensor("fill", fill, ndim=3, floating=True)
            checks.nonempty("fill", fill, "B N D")
            checks.tensor("fill", fill, shape=(B, None, D))
            if num_tokens is not None and num_tokens != fill.shape[1]:
                raise ValueError(f"num_tokens: {num_tokens!r} is not the fill's token count {fill.shape[1]} "
                                 "(give num_tokens only without a fill)")
        N = fill.shape[1] if fill is not None else num_tokens
        checks.ids("ids_keep", ids_keep, B, N, num_kept=K, values=False, allow_empty=True)
        checks.same_device("x_kept", x_kept, ids_keep=ids_keep, fill=fill)
        backend = dispatch.plan("scatter_tokens", sig, x_kept, fill)
    N = fill.shape[1] if fill is not None else num_tokens
    if check_ids:
        checks.ids_values("ids_keep", ids_keep, N)
    if backend == "torch":
        return reference.scatter_tokens(x_kept, ids_keep, fill, N)
    args = (x_kept.contiguous(), ids_keep.long().contiguous(), None if fill is None else fill.contiguous(), int(N),
            backend)
    return _SCATTER_OPS[backend](*args) if compiling else _SCATTER.apply(*args)

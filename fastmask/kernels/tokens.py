"""Token kernels: gather the visible tokens (+ pos), put them back (unmask), and scatter kept
rows into a saved stream (TREAD's put-back), fwd and bwd.

All six are pure data movement, so each element is read and written once:
    gather fwd    one tile of flat (b, k) rows per program; pos added in fp32.
    gather bwd    grad_x written in one pass from an inverse index inv[b, n] -> k or -1
                  (zeros at dropped rows, no separate memset); grad_pos is a batch sum.
    unmask fwd    one tile of flat (b, n) rows; kept rows copy x_vis, dropped rows take
                  mask_token; pos added in fp32.
    unmask bwd    reads grad_out once: scatters the kept rows into grad_x_vis and sums the
                  dropped rows (mask_token) and all rows (pos) in fp32.
    scatter fwd   one tile of flat (b, n) rows; kept rows copy x_kept, the others the fill
                  (each fill row read only where it survives) or zeros (no fill).
    scatter bwd   reads grad_out once: kept rows go to grad_x_kept, grad_fill gets the other
                  rows and zeros at the kept ones (no memset pass). Without a fill gradient it
                  is the gather of the kept rows.
The batch sums use programs that own a tile of token rows n and walk a chunk of samples in
order, writing fp32 partials that a parallel reduction adds up in a fixed order
(:func:`fastmask.kernels._utils.sum_partials`): the gradients are deterministic (no float
atomics).

Ids are not trusted for memory safety: an id outside [0, N) (possible when the caller skips
the id check) reads and writes nothing; the rows it names come out as zeros (gather fwd,
the unmask bwd's grad_x_vis, the scatter bwd's grad_x_kept) or are left to the mask token
(unmask fwd) or the fill (scatter fwd).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import budget_chunks, cdiv, launch, placeholder, row_config, sum_partials, target_programs

# the launchers of the backend protocol (fastmask.ops.registry); fastmask.kernels re-exports them
__all__ = [
    "gather_tokens_fwd", "gather_tokens_bwd", "unmask_tokens_fwd", "unmask_tokens_bwd",
    "scatter_tokens_fwd", "scatter_tokens_bwd",
]


def _inverse_ids(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """inv [B, N] int64: inv[b, n] = k where ids_keep[b, k] = n, else -1 (a tiny torch scatter).
    Ids outside [0, N) are scattered into a spare column that is then dropped."""
    B, K = ids_keep.shape
    N = num_tokens
    inv = torch.full((B, N + 1), -1, device=ids_keep.device, dtype=torch.int64)
    src = torch.arange(K, device=ids_keep.device, dtype=torch.int64).expand(B, K)
    idx = torch.where((ids_keep >= 0) & (ids_keep < N), ids_keep, N)
    return inv.scatter_(1, idx, src)[:, :N].contiguous()


def _batch_chunks(B: int, n_tiles: int, ref: torch.Tensor, part_bytes: int = 0, op_bytes: int = 0) -> int:
    """Samples per program for the batch-sum kernels: enough programs to fill the device, few
    enough chunks that their fp32 partials (``part_bytes`` per chunk, written and read back)
    stay within the byte budget of the op's own traffic ``op_bytes``."""
    chunks = max(1, min(B, cdiv(target_programs(ref), n_tiles)))
    if part_bytes:
        chunks = budget_chunks(chunks, part_bytes, op_bytes)
    return cdiv(B, chunks)


@triton.jit
def _batch_sum_tile(pid, B, N, D, N_TILES, B_PER_PROG, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a batch-sum program owns: token rows n of one tile (with their column mask) and
    the samples [b_start, b_end) of one chunk of the batch."""
    chunk = pid // N_TILES
    n = (pid % N_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = n < N
    n = n.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m = n_ok[:, None] & col_ok[None, :]
    # int64 bounds give an int64 loop variable (row offsets b * N * D overflow int32).
    b_start = (chunk * B_PER_PROG).to(tl.int64)
    b_end = tl.minimum(b_start + B_PER_PROG, B)
    return chunk, n, n_ok, cols, col_ok, m, b_start, b_end


# ------------------------------------------------------------------------------ gather
@triton.jit
def _gather_fwd_kernel(
    X, IDS, POS, OUT, n_rows, K, N, D,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # row * D overflows int32 at real sizes
    ids = tl.load(IDS + rows, mask=row_ok, other=0)
    src = (rows // K) * N + ids
    cols = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (cols < D)[None, :]
    # an id outside [0, N) reads nothing: its output row is zeros
    m_src = m & ((ids >= 0) & (ids < N))[:, None]
    v = tl.load(X + src[:, None] * D + cols[None, :], mask=m_src, other=0.0)
    if HAS_POS:
        # pos may be fp32 next to bf16 activations: add in fp32, round once.
        p = tl.load(POS + ids[:, None] * D + cols[None, :], mask=m_src, other=0.0)
        v = v.to(tl.float32) + p.to(tl.float32)
    tl.store(OUT + rows[:, None] * D + cols[None, :], v.to(OUT.dtype.element_ty), mask=m)


def gather_tokens_fwd(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    B, N, D = x.shape
    K = ids_keep.shape[1]
    out = torch.empty((B, K, D), device=x.device, dtype=x.dtype)
    n_rows = B * K
    if out.numel() == 0:
        return out
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    launch(_gather_fwd_kernel)[(cdiv(n_rows, BLOCK_R),)](
        x, ids_keep, placeholder(x) if pos is None else pos, out, n_rows, K, N, D,
        HAS_POS=pos is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return out


@triton.jit
def _gather_bwd_kernel(
    G, INV, GX, GPOS_PART, B, N, K, D, N_TILES, B_PER_PROG,
    POS_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk, n, n_ok, cols, col_ok, m, b_start, b_end = _batch_sum_tile(
        pid, B, N, D, N_TILES, B_PER_PROG, BLOCK_R, BLOCK_D
    )
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for b64 in range(b_start, b_end):
        k = tl.load(INV + b64 * N + n, mask=n_ok, other=-1)
        kept = k >= 0
        # Dropped rows load the 0.0 fill, so the same store writes both the kept rows
        # and the zeros: grad_x is written exactly once, with no memset pass.
        g = tl.load(G + (b64 * K + k)[:, None] * D + cols[None, :], mask=m & kept[:, None], other=0.0)
        tl.store(GX + (b64 * N + n)[:, None] * D + cols[None, :], g, mask=m)
        if POS_GRAD:
            acc += g.to(tl.float32)
    if POS_GRAD:
        tl.store(GPOS_PART + (chunk.to(tl.int64) * N + n)[:, None] * D + cols[None, :], acc, mask=m)


def gather_tokens_bwd(grad_out: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int, pos_grad: bool):
    B, K, D = grad_out.shape
    N = int(num_tokens)
    grad_x = torch.empty((B, N, D), device=grad_out.device, dtype=grad_out.dtype)
    if grad_x.numel() == 0:
        gpos = torch.zeros((N, D), device=grad_out.device, dtype=torch.float32) if pos_grad else None
        return grad_x, gpos
    inv = _inverse_ids(ids_keep, N)
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    if pos_grad and BLOCK_R > 1:
        # a second (fp32) value per element: half the warps of a plain row copy (with 8,
        # ptxas spilled on sm_80 at D = 512; benchmarks/static_check.py)
        num_warps = max(2, num_warps // 2)
    n_tiles = cdiv(N, BLOCK_R)
    # Without a pos gradient nothing is summed over the batch: one sample per program.
    op_bytes = B * (K + N) * D * grad_out.element_size()
    b_per_prog = _batch_chunks(B, n_tiles, grad_out, N * D * 4, op_bytes) if pos_grad else 1
    chunks = cdiv(B, b_per_prog)
    part = torch.empty((chunks, N, D), device=grad_out.device, dtype=torch.float32) if pos_grad else placeholder(grad_x)
    launch(_gather_bwd_kernel)[(n_tiles * chunks,)](
        grad_out, inv, grad_x, part, B, N, K, D, n_tiles, b_per_prog,
        POS_GRAD=pos_grad, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    if not pos_grad:
        return grad_x, None
    gpos = part[0] if chunks == 1 else sum_partials(part.view(1, chunks, N * D), torch.float32).view(N, D)
    return grad_x, gpos


# ------------------------------------------------------------------------------ unmask
@triton.jit
def _unmask_fwd_kernel(
    XV, INV, MT, POS, OUT, n_rows, K, N, D,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    k = tl.load(INV + rows, mask=row_ok, other=-1)
    kept = k >= 0
    b = rows // N
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    v = tl.load(XV + (b * K + k)[:, None] * D + cols[None, :], mask=m & kept[:, None], other=0.0)
    # The reference casts mask_token to x_vis's dtype first; so do we (fp32 parameter, bf16 stream).
    mt = tl.load(MT + cols, mask=col_ok, other=0.0).to(XV.dtype.element_ty)
    v = tl.where(kept[:, None], v, mt[None, :]).to(tl.float32)
    if HAS_POS:
        n = rows - b * N
        v += tl.load(POS + n[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * D + cols[None, :], v.to(OUT.dtype.element_ty), mask=m)


def _full_rows(x: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int):
    """What a launcher that writes all N rows from K kept ones needs: (out [B, N, D] empty,
    inv [B, N], n_rows, grid, BLOCK_R, BLOCK_D, num_warps); inv is None when out is empty."""
    B, K, D = x.shape
    N = int(num_tokens)
    out = torch.empty((B, N, D), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out, None, 0, (0,), 1, 1, 1
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    return out, _inverse_ids(ids_keep, N), B * N, (cdiv(B * N, BLOCK_R),), BLOCK_R, BLOCK_D, num_warps


def unmask_tokens_fwd(
    x_vis: torch.Tensor, ids_keep: torch.Tensor, mask_token: torch.Tensor, num_tokens: int, pos: torch.Tensor | None
) -> torch.Tensor:
    B, K, D = x_vis.shape
    N = int(num_tokens)
    out, inv, n_rows, grid, BLOCK_R, BLOCK_D, num_warps = _full_rows(x_vis, ids_keep, N)
    if inv is None:
        return out
    launch(_unmask_fwd_kernel)[grid](
        x_vis, inv, mask_token, placeholder(x_vis) if pos is None else pos, out, n_rows, K, N, D,
        HAS_POS=pos is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return out


@triton.jit
def _unmask_bwd_kernel(
    G, INV, GXV, GMASK_PART, GPOS_PART, B, N, K, D, N_TILES, B_PER_PROG,
    POS_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk, n, n_ok, cols, col_ok, m, b_start, b_end = _batch_sum_tile(
        pid, B, N, D, N_TILES, B_PER_PROG, BLOCK_R, BLOCK_D
    )
    acc_mask = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_pos = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for b64 in range(b_start, b_end):
        k = tl.load(INV + b64 * N + n, mask=n_ok, other=-1)
        kept = k >= 0
        g = tl.load(G + (b64 * N + n)[:, None] * D + cols[None, :], mask=m, other=0.0)
        # ids are distinct, so every (b, k) row of grad_x_vis is stored exactly once.
        tl.store(GXV + (b64 * K + k)[:, None] * D + cols[None, :], g, mask=m & kept[:, None])
        g = g.to(tl.float32)
        acc_mask += tl.where(kept[:, None], 0.0, g)
        if POS_GRAD:
            acc_pos += g
    tl.store(GMASK_PART + pid.to(tl.int64) * D + cols, tl.sum(acc_mask, axis=0), mask=col_ok)
    if POS_GRAD:
        tl.store(GPOS_PART + (chunk.to(tl.int64) * N + n)[:, None] * D + cols[None, :], acc_pos, mask=m)


@triton.jit
def _zero_orphan_rows_kernel(IDS, INV, GXV, n_rows, K, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows (b, k) of grad_x_vis that the main kernel never visits: ids outside [0, N), or an
    # id that another k of the same sample also names. They get zeros (only they are written).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    ids = tl.load(IDS + rows, mask=row_ok, other=0)
    valid = (ids >= 0) & (ids < N)
    owner = tl.load(INV + (rows // K) * N + ids, mask=row_ok & valid, other=-1)
    orphan = row_ok & (owner != rows % K)
    cols = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=GXV.dtype.element_ty)
    tl.store(GXV + rows[:, None] * D + cols[None, :], zeros, mask=orphan[:, None] & (cols < D)[None, :])


def unmask_tokens_bwd(grad_out: torch.Tensor, ids_keep: torch.Tensor, pos_grad: bool):
    B, N, D = grad_out.shape
    K = ids_keep.shape[1]
    dev = grad_out.device
    grad_x_vis = torch.empty((B, K, D), device=dev, dtype=grad_out.dtype)
    if grad_out.numel() == 0:
        gpos = torch.zeros((N, D), device=dev, dtype=torch.float32) if pos_grad else None
        return grad_x_vis, torch.zeros(D, device=dev, dtype=torch.float32), gpos
    inv = _inverse_ids(ids_keep, N)
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    n_tiles = cdiv(N, BLOCK_R)
    part_bytes = n_tiles * D * 4 + (N * D * 4 if pos_grad else 0)  # mask-token (and pos) partials per chunk
    b_per_prog = _batch_chunks(B, n_tiles, grad_out, part_bytes, B * (K + N) * D * grad_out.element_size())
    chunks = cdiv(B, b_per_prog)
    n_prog = n_tiles * chunks
    mask_part = torch.empty((n_prog, D), device=dev, dtype=torch.float32)
    pos_part = torch.empty((chunks, N, D), device=dev, dtype=torch.float32) if pos_grad else placeholder(mask_part)
    launch(_unmask_bwd_kernel)[(n_prog,)](
        grad_out, inv, grad_x_vis, mask_part, pos_part, B, N, K, D, n_tiles, b_per_prog,
        POS_GRAD=pos_grad, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    if K > 0:
        launch(_zero_orphan_rows_kernel)[(cdiv(B * K, BLOCK_R),)](
            ids_keep, inv, grad_x_vis, B * K, K, N, D, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps
        )
    grad_mask = sum_partials(mask_part.view(1, n_prog, D), torch.float32).view(D)
    gpos = None
    if pos_grad:
        gpos = pos_part[0] if chunks == 1 else sum_partials(pos_part.view(1, chunks, N * D), torch.float32).view(N, D)
    return grad_x_vis, grad_mask, gpos


# ----------------------------------------------------------------------------- scatter
@triton.jit
def _scatter_fwd_kernel(
    XK, INV, FILL, OUT, n_rows, K, N, D, HAS_FILL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    k = tl.load(INV + rows, mask=row_ok, other=-1)
    kept = k >= 0
    b = rows // N
    cols = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (cols < D)[None, :]
    # Two masked loads, one per source: a kept row never reads its fill row (and vice versa).
    v = tl.load(XK + (b * K + k)[:, None] * D + cols[None, :], mask=m & kept[:, None], other=0.0)
    if HAS_FILL:
        f = tl.load(FILL + rows[:, None] * D + cols[None, :], mask=m & ~kept[:, None], other=0.0)
    else:  # zeros (MicroDiT's output-space fill): nothing to read
        f = tl.zeros([BLOCK_R, BLOCK_D], dtype=OUT.dtype.element_ty)
    # The reference casts the fill to x_kept's dtype (the output's): copies, one cast, no arithmetic.
    v = tl.where(kept[:, None], v.to(OUT.dtype.element_ty), f.to(OUT.dtype.element_ty))
    tl.store(OUT + rows[:, None] * D + cols[None, :], v, mask=m)


def scatter_tokens_fwd(
    x_kept: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor | None, num_tokens: int
) -> torch.Tensor:
    B, K, D = x_kept.shape
    N = int(num_tokens)
    out, inv, n_rows, grid, BLOCK_R, BLOCK_D, num_warps = _full_rows(x_kept, ids_keep, N)
    if inv is None:
        return out
    src = fill if fill is not None else placeholder(out)  # nothing is read from it without a fill
    launch(_scatter_fwd_kernel)[grid](
        x_kept if K > 0 else src, inv, src, out, n_rows, K, N, D,  # K = 0: nothing is read from x_kept
        HAS_FILL=fill is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return out


@triton.jit
def _scatter_bwd_kernel(G, INV, GXK, GFILL, n_rows, K, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    k = tl.load(INV + rows, mask=row_ok, other=-1)
    kept = k >= 0
    b = rows // N
    cols = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (cols < D)[None, :]
    g = tl.load(G + rows[:, None] * D + cols[None, :], mask=m, other=0.0)
    # ids are distinct, so every (b, k) row of grad_x_kept is stored exactly once (rows no id
    # owns are zeroed by _zero_orphan_rows_kernel).
    tl.store(GXK + (b * K + k)[:, None] * D + cols[None, :], g, mask=m & kept[:, None])
    tl.store(GFILL + rows[:, None] * D + cols[None, :], tl.where(kept[:, None], 0.0, g).to(GFILL.dtype.element_ty), mask=m)


def scatter_tokens_bwd(grad_out: torch.Tensor, ids_keep: torch.Tensor, fill_grad: bool):
    B, N, D = grad_out.shape
    K = ids_keep.shape[1]
    if not fill_grad:  # only the kept rows are read: the gather of grad_out by ids_keep
        return gather_tokens_fwd(grad_out, ids_keep, None), None
    dev = grad_out.device
    grad_x_kept = torch.empty((B, K, D), device=dev, dtype=grad_out.dtype)
    grad_fill = torch.empty((B, N, D), device=dev, dtype=grad_out.dtype)
    if grad_fill.numel() == 0:
        return grad_x_kept, grad_fill
    inv = _inverse_ids(ids_keep, N)
    BLOCK_R, BLOCK_D, num_warps = row_config(D)
    launch(_scatter_bwd_kernel)[(cdiv(B * N, BLOCK_R),)](
        grad_out, inv, grad_x_kept if K > 0 else grad_fill, grad_fill, B * N, K, N, D,  # K = 0: nothing stored there
        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    if K > 0:
        launch(_zero_orphan_rows_kernel)[(cdiv(B * K, BLOCK_R),)](
            ids_keep, inv, grad_x_kept, B * K, K, N, D, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps
        )
    return grad_x_kept, grad_fill

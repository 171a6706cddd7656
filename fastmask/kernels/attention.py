"""Flash-style fused attention (non-causal), forward and backward: the Triton kernels.

This module holds the kernel math only; which config each kernel launches with, and the
launchers ``attention_fwd`` / ``attention_bwd``, live in
:mod:`fastmask.kernels.attention_launch`.

Reads q, k, v straight from the fused projection layout qkv [B, L, 3, H, hd] through
strides and writes out [B, L, H * hd] (and dqkv in qkv's layout), so no transposes or
copies surround the kernels. Online softmax in fp32; the L x L score matrix is never
stored; lse [B, H, L] (natural log) is kept for the backward.

Head dims that are not a power of two (DiT-XL/2 has 72) are split into two power-of-two
slices, HD_A + HD_B (72 = 64 + 16, 8 of them masked), each with its own tl.dot, instead of
padding to the next power of two (128 would waste 44% of the matmul work). HD_B is 0 when
one slice fits as tightly; every slice is at least 16 wide (the smallest tl.dot K/N).

Backward, one pass (the default): a small kernel computes delta = rowsum(dO * O); then the
dk/dv kernel, one program per (key block, head), walks the query blocks and does the five
matmuls S^T = K Q^T, dP^T = V dO^T, dv += P^T dO, dk += dS^T Q and dq += dS K, the last one
added into an fp32 dq buffer with atomics (so the order of the additions, and the last bits
of dq, may differ from run to run).

Backward, deterministic (no atomics, every output element written by one program; seven
matmuls, since dq recomputes S and dP):
  1. dq kernel, one program per (query block, head): computes delta = rowsum(dO * O) for its
     rows (stored for step 2), then walks the key blocks: dq = scale * dS @ K.
  2. the dk/dv kernel as above without the dq part: dv = P^T @ dO, dk = scale * dS^T @ Q.

Modern-DiT prologue (constexpr PRO / ROPE / QK_NORM / GATHER; off, the kernels compile as
without it): per-head RMSNorm of q and k and an interleaved-pair rotary embedding, whose table
rows are read at ids_keep[b, l] when tokens were dropped. Applied to the q and k tiles right
after they are loaded, never written back; the backward recomputes them and chains the
gradients of q and k through both in its epilogue (see the section "RoPE / qk-norm prologue").

Offsets: batch and head offsets are int64 (B * L * 3 * H * hd passes 2**31 at large B); the
offsets inside one batch element stay int32. The grid is 1-D, since B * H can pass 65535:
program ``pid`` works on block ``pid % cdiv(L, BLOCK)`` of head ``pid // cdiv(L, BLOCK)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
_MIN_DOT = 16  # smallest K / N of a tl.dot on NVIDIA GPUs


def head_dim_split(hd: int) -> tuple[int, int]:
    """(HD_A, HD_B): power-of-two slices (HD_B may be 0), each >= 16, HD_A + HD_B >= hd,
    with the least padding; on a tie, one slice (one tl.dot instead of two).

    8 -> (16, 0), 32 -> (32, 0), 40 -> (32, 16), 56 -> (64, 0), 72 -> (64, 16),
    96 -> (64, 32), 112 -> (128, 0).
    """
    if hd <= 0 or hd % 8 or hd > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {hd}")
    best = (max(_MIN_DOT, triton.next_power_of_2(hd)), 0)
    a = _MIN_DOT
    while a < hd:
        b = max(_MIN_DOT, triton.next_power_of_2(hd - a))
        if b <= a and a + b < sum(best):
            best = (a, b)
        a *= 2
    return best


def not_supported_reason(qkv: torch.Tensor) -> str | None:
    """None if these kernels can run attention on ``qkv``, else why not."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        return f"expected qkv [B, L, 3, H, head_dim], got shape {tuple(qkv.shape)}"
    hd = qkv.shape[-1]
    if hd % 8 or hd > MAX_HEAD_DIM or hd == 0:
        return f"head dim {hd} is not a multiple of 8 in [8, {MAX_HEAD_DIM}]"
    return None


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _program_start(QKV, L, H, stride_b8, stride_38, stride_ob8, HD: tl.constexpr, BLOCK: tl.constexpr):
    """The opening every kernel shares: which block of L and which (batch, head) this program
    owns, and the int64 bases of its q, k, v rows and of its rows in the [B, L, H * hd]
    tensors (out, grad_out)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(L, BLOCK)
    pid_blk = pid % n_blocks
    pid_bh = pid // n_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = QKV + b * stride_b8 * 8 + h * HD
    k_base = q_base + stride_38 * 8
    v_base = k_base + stride_38 * 8
    o_off = b * stride_ob8 * 8 + h * HD
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    return offs, pid_bh.to(tl.int64), b, h, q_base, k_base, v_base, o_off


@triton.jit
def _load_tile(base, rows, cols, stride_row, L, HD: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            t = tl.load(ptrs, mask=(rows[:, None] < L) & (cols[None, :] < HD), other=0.0)
        else:
            t = tl.load(ptrs, mask=rows[:, None] < L, other=0.0)
    else:
        if MASK_COLS:
            t = tl.load(ptrs, mask=cols[None, :] < HD, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _load_pair(a_base, b_base, rows, cols, stride_a, stride_b, L, HD: tl.constexpr, MASK_ROWS: tl.constexpr,
               MASK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """Two tiles of one head-dim part at the same rows (K and V, or Q and dO), upcast to fp32
    where tl.dot needs it."""
    x = _load_tile(a_base, rows, cols, stride_a, L, HD, MASK_ROWS, MASK_COLS)
    y = _load_tile(b_base, rows, cols, stride_b, L, HD, MASK_ROWS, MASK_COLS)
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return x, y


@triton.jit
def _load_kv(k_base, v_base, rows, cols, stride_row, L, HD: tl.constexpr, MASK_ROWS: tl.constexpr,
             MASK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """The K and V tiles of one head-dim part, upcast to fp32 where tl.dot needs it."""
    return _load_pair(k_base, v_base, rows, cols, stride_row, stride_row, L, HD, MASK_ROWS, MASK_COLS, UPCAST)


@triton.jit
def _row_dot(a_base, b_base, rows, cols, stride_row, L, HD: tl.constexpr, MASK_ROWS: tl.constexpr,
             MASK_COLS: tl.constexpr):
    """rowsum(a * b) over one head-dim part, in fp32."""
    a = _load_tile(a_base, rows, cols, stride_row, L, HD, MASK_ROWS, MASK_COLS)
    b = _load_tile(b_base, rows, cols, stride_row, L, HD, MASK_ROWS, MASK_COLS)
    return tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)


@triton.jit
def _store_tile(
    base, val, rows, cols, stride_row, L, HD: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr
):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    val = val.to(base.dtype.element_ty)
    if MASK_ROWS:
        if MASK_COLS:
            tl.store(ptrs, val, mask=(rows[:, None] < L) & (cols[None, :] < HD))
        else:
            tl.store(ptrs, val, mask=rows[:, None] < L)
    else:
        if MASK_COLS:
            tl.store(ptrs, val, mask=cols[None, :] < HD)
        else:
            tl.store(ptrs, val)


@triton.jit
def _atomic_add_tile(
    base, val, rows, cols, stride_row, L, HD: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr
):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            tl.atomic_add(ptrs, val, mask=(rows[:, None] < L) & (cols[None, :] < HD), sem="relaxed")
        else:
            tl.atomic_add(ptrs, val, mask=rows[:, None] < L, sem="relaxed")
    else:
        if MASK_COLS:
            tl.atomic_add(ptrs, val, mask=cols[None, :] < HD, sem="relaxed")
        else:
            tl.atomic_add(ptrs, val, sem="relaxed")


@triton.jit
def _load_vec(ptr, rows, L, other, MASK: tl.constexpr):
    if MASK:
        v = tl.load(ptr + rows, mask=rows < L, other=other)
    else:
        v = tl.load(ptr + rows)
    return v


@triton.jit
def _store_vec(ptr, val, rows, L, MASK: tl.constexpr):
    if MASK:
        tl.store(ptr + rows, val, mask=rows < L)
    else:
        tl.store(ptr + rows, val)


# ----------------------------------------------------------------------------- RoPE / qk-norm prologue
#
# Optional per-head RMSNorm of q and k (weight [hd], shared by the heads) and a rotary
# embedding, applied to q and k tiles right after they are loaded (PRO = ROPE or QK_NORM):
#     n = x * rsqrt(mean(x^2) + eps) * w                       (QK_NORM; else n = x)
#     (out[2i], out[2i+1]) = (n[2i] c - n[2i+1] s, n[2i+1] c + n[2i] s)    (ROPE; else out = n)
# with c = cos[p, i], s = sin[p, i] the angle of pair i (interleaved pairs; the launcher passes
# the half tables [P, hd / 2], one angle per pair) and p the token's position: its row, or
# ids_keep[b, row] when GATHER (tokens dropped, positions kept). The rotated / normalised tiles
# live in registers only; the backward recomputes them, and chains the gradient of q and k back
# through the rotation and the norm in its epilogue:
#     (dn[2i], dn[2i+1]) = (g[2i] c + g[2i+1] s, g[2i+1] c - g[2i] s)
#     dw += sum_rows(dn * x * r);  dx = r * (w * dn) - x * r^3 * mean(w * dn * x).


@triton.jit
def _positions(IDS, b, rows, stride_idb, L, GATHER: tl.constexpr):
    """The rotary table row of each token: ids_keep[b, row] when GATHER, else the row."""
    if GATHER:
        pos = tl.load(IDS + b * stride_idb + rows, mask=rows < L, other=0)
    else:
        pos = rows
    return pos


@triton.jit
def _rope_tables(COS, SIN, pos, rows, C0: tl.constexpr, L, HD: tl.constexpr, W: tl.constexpr):
    """cos, sin [ROWS, W / 2] (fp32) of the pairs in head-dim columns C0 .. C0 + W."""
    hcols = C0 // 2 + tl.arange(0, W // 2)
    offs = pos.to(tl.int64)[:, None] * (HD // 2) + hcols[None, :]
    m = (rows[:, None] < L) & (hcols[None, :] < HD // 2)
    c = tl.load(COS + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SIN + offs, mask=m, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _rstd_rows(x_a, x_b, eps, HD: tl.constexpr, HD_B: tl.constexpr):
    ss = tl.sum(x_a.to(tl.float32) * x_a.to(tl.float32), 1)
    if HD_B > 0:
        ss += tl.sum(x_b.to(tl.float32) * x_b.to(tl.float32), 1)
    return 1.0 / tl.sqrt(ss / HD + eps)


@triton.jit
def _rotate(y, c, s, ROWS: tl.constexpr, W: tl.constexpr, SIGN: tl.constexpr):
    """Each pair (y[2i], y[2i+1]) rotated by its angle (SIGN 1) or back (SIGN -1)."""
    even, odd = tl.split(tl.reshape(y, [ROWS, W // 2, 2]))
    out_even = even * c - SIGN * odd * s
    out_odd = odd * c + SIGN * even * s
    return tl.reshape(tl.join(out_even, out_odd), [ROWS, W])


@triton.jit
def _pro_part(x, r, pos, rows, cols, C0: tl.constexpr, L, COS, SIN, Wt, HD: tl.constexpr, ROWS: tl.constexpr,
              W: tl.constexpr, ROPE: tl.constexpr, QK_NORM: tl.constexpr):
    y = x.to(tl.float32)
    if QK_NORM:
        w = tl.load(Wt + cols, mask=cols < HD, other=0.0).to(tl.float32)
        y = y * r[:, None] * w[None, :]
    if ROPE:
        c, s = _rope_tables(COS, SIN, pos, rows, C0, L, HD, W)
        y = _rotate(y, c, s, ROWS, W, 1.0)
    return y.to(x.dtype)


@triton.jit
def _prologue(x_a, x_b, pos, rows, da, db, L, COS, SIN, Wt, eps, HD: tl.constexpr, HD_A: tl.constexpr,
              HD_B: tl.constexpr, ROWS: tl.constexpr, ROPE: tl.constexpr, QK_NORM: tl.constexpr):
    """(x_a, x_b) normalised and rotated; x_b is a placeholder (returned as is) when HD_B is 0."""
    r = tl.zeros([ROWS], dtype=tl.float32)
    if QK_NORM:
        r = _rstd_rows(x_a, x_b, eps, HD, HD_B)
    y_a = _pro_part(x_a, r, pos, rows, da, 0, L, COS, SIN, Wt, HD, ROWS, HD_A, ROPE, QK_NORM)
    y_b = x_b
    if HD_B > 0:
        y_b = _pro_part(x_b, r, pos, rows, db, HD_A, L, COS, SIN, Wt, HD, ROWS, HD_B, ROPE, QK_NORM)
    return y_a, y_b


@triton.jit
def _prologue_rows(x_a, x_b, IDS, b, rows, stride_idb, da, db, L, COS, SIN, Wt, eps, HD: tl.constexpr,
                   HD_A: tl.constexpr, HD_B: tl.constexpr, ROWS: tl.constexpr, ROPE: tl.constexpr,
                   QK_NORM: tl.constexpr, GATHER: tl.constexpr):
    """:func:`_prologue` of the tiles at ``rows`` of sample ``b``."""
    pos = _positions(IDS, b, rows, stride_idb, L, GATHER)
    return _prologue(x_a, x_b, pos, rows, da, db, L, COS, SIN, Wt, eps, HD, HD_A, HD_B, ROWS, ROPE, QK_NORM)


@triton.jit
def _chain_rows(g_a, g_b, base, IDS, b, rows, stride_idb, da, db, stride_row, L, COS, SIN, Wt, P_DW, eps,
                HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr, ROWS: tl.constexpr, ROPE: tl.constexpr,
                QK_NORM: tl.constexpr, GATHER: tl.constexpr):
    """:func:`_chain` of the rows ``rows`` of sample ``b``; partials go to row program_id."""
    pos = _positions(IDS, b, rows, stride_idb, L, GATHER)
    return _chain(g_a, g_b, base, pos, rows, da, db, stride_row, L, COS, SIN, Wt, P_DW, tl.program_id(0), eps,
                  HD, HD_A, HD_B, ROWS, ROPE, QK_NORM)


@triton.jit
def _unrope(g, pos, rows, C0: tl.constexpr, L, COS, SIN, HD: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr,
            ROPE: tl.constexpr):
    if ROPE:
        c, s = _rope_tables(COS, SIN, pos, rows, C0, L, HD, W)
        g = _rotate(g, c, s, ROWS, W, -1.0)
    return g


@triton.jit
def _chain(g_a, g_b, base, pos, rows, da, db, stride_row, L, COS, SIN, Wt, P_DW, pid, eps,
           HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr, ROWS: tl.constexpr,
           ROPE: tl.constexpr, QK_NORM: tl.constexpr):
    """Gradient of the raw q (or k) rows from that of their normalised, rotated tiles (fp32
    g_a, g_b); the norm weight's partial sum over these rows goes to row ``pid`` of P_DW.
    g_b is a placeholder when HD_B is 0."""
    ok = rows < L
    dn_a = tl.where(ok[:, None], _unrope(g_a, pos, rows, 0, L, COS, SIN, HD, ROWS, HD_A, ROPE), 0.0)
    dx_a = dn_a
    dx_b = g_b
    if HD_B > 0:
        dn_b = tl.where(ok[:, None], _unrope(g_b, pos, rows, HD_A, L, COS, SIN, HD, ROWS, HD_B, ROPE), 0.0)
        dx_b = dn_b
    if QK_NORM:
        x_a = _load_tile(base, rows, da, stride_row, L, HD, True, HD_A > HD).to(tl.float32)
        x_b = x_a
        if HD_B > 0:
            x_b = _load_tile(base, rows, db, stride_row, L, HD, True, HD_A + HD_B > HD).to(tl.float32)
        r = _rstd_rows(x_a, x_b, eps, HD, HD_B)
        w_a = tl.load(Wt + da, mask=da < HD, other=0.0).to(tl.float32)
        pw = P_DW + pid.to(tl.int64) * HD
        tl.store(pw + da, tl.sum(dn_a * x_a * r[:, None], 0), mask=da < HD)
        dxn_a = dn_a * w_a[None, :]
        dot = tl.sum(dxn_a * x_a, 1)
        if HD_B > 0:
            w_b = tl.load(Wt + db, mask=db < HD, other=0.0).to(tl.float32)
            tl.store(pw + db, tl.sum(dn_b * x_b * r[:, None], 0), mask=db < HD)
            dxn_b = dn_b * w_b[None, :]
            dot += tl.sum(dxn_b * x_b, 1)
        c = r * r * r * dot / HD
        dx_a = r[:, None] * dxn_a - x_a * c[:, None]
        if HD_B > 0:
            dx_b = r[:, None] * dxn_b - x_b * c[:, None]
    return dx_a, dx_b


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_kernel(
    QKV, Out, Lse,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    L, H, L_BUCKET, BH_BUCKET,  # the buckets: autotune key only
    stride_b8, stride_l8, stride_38,  # qkv strides / 8 (see attention_launch._strides8)
    stride_ob8, stride_ol8,  # out [B, L, H * hd] strides / 8
    COS, SIN, IDS, QW, KW, stride_idb, eps,  # RoPE / qk-norm prologue (used when PRO)
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    PRO: tl.constexpr = False, ROPE: tl.constexpr = False, QK_NORM: tl.constexpr = False,
    GATHER: tl.constexpr = False,
):
    # float arguments in fp32 (torch.compile's launcher passes Python floats as fp64)
    qk_scale = tl.full([], qk_scale, tl.float32)
    eps = tl.full([], eps, tl.float32)
    offs_m, pid_bh, b, h, q_base, k_base, v_base, o_off = _program_start(
        QKV, L, H, stride_b8, stride_38, stride_ob8, HD, BLOCK_M
    )
    stride_l = stride_l8 * 8
    arange_n = tl.arange(0, BLOCK_N)
    da = tl.arange(0, HD_A)
    q_a = _load_tile(q_base, offs_m, da, stride_l, L, HD, not EVEN_M, HD_A > HD)
    if UPCAST:
        q_a = q_a.to(tl.float32)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        q_b = _load_tile(q_base, offs_m, db, stride_l, L, HD, not EVEN_M, HD_A + HD_B > HD)
        if UPCAST:
            q_b = q_b.to(tl.float32)
        acc_b = tl.zeros([BLOCK_M, HD_B], dtype=tl.float32)
    if PRO:
        q_a, q_b = _prologue_rows(q_a, q_b if HD_B > 0 else q_a, IDS, b, offs_m, stride_idb, da, db if HD_B > 0 else da,
                                  L, COS, SIN, QW, eps, HD, HD_A, HD_B, BLOCK_M, ROPE, QK_NORM, GATHER)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, HD_A], dtype=tl.float32)

    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + arange_n
        k_a, v_a = _load_kv(k_base, v_base, offs_n, da, stride_l, L, HD, not EVEN_N, HD_A > HD, UPCAST)
        if PRO:
            if HD_B > 0:
                k_b, v_b = _load_kv(k_base, v_base, offs_n, db, stride_l, L, HD, not EVEN_N, HD_A + HD_B > HD, UPCAST)
            k_a, k_b = _prologue_rows(k_a, k_b if HD_B > 0 else k_a, IDS, b, offs_n, stride_idb, da, db if HD_B > 0 else da,
                                    L, COS, SIN, KW, eps, HD, HD_A, HD_B, BLOCK_N, ROPE, QK_NORM, GATHER)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
        if HD_B > 0:
            if not PRO:
                k_b, v_b = _load_kv(k_base, v_base, offs_n, db, stride_l, L, HD, not EVEN_N, HD_A + HD_B > HD, UPCAST)
            s += tl.dot(q_b, tl.trans(k_b), input_precision=DOT_PREC)
        # scale before the max: correct for any sign of the scale
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(offs_n[None, :] < L, s, float("-inf"))
        # every key block holds at least one real key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_a.dtype)
        acc_a = acc_a * alpha[:, None] + tl.dot(p, v_a, input_precision=DOT_PREC)
        if HD_B > 0:
            acc_b = acc_b * alpha[:, None] + tl.dot(p, v_b, input_precision=DOT_PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_base = Out + o_off
    _store_tile(o_base, acc_a * inv_l[:, None], offs_m, da, stride_ol8 * 8, L, HD, not EVEN_M, HD_A > HD)
    if HD_B > 0:
        _store_tile(o_base, acc_b * inv_l[:, None], offs_m, db, stride_ol8 * 8, L, HD, not EVEN_M, HD_A + HD_B > HD)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    _store_vec(Lse + pid_bh * L, lse, offs_m, L, not EVEN_M)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, O, Lse, Delta, DQKV,
    qk_scale, scale,
    L, H, L_BUCKET, BH_BUCKET,
    stride_b8, stride_l8, stride_38,  # qkv strides / 8
    stride_ob8, stride_ol8,  # out and grad_out [B, L, H * hd] strides / 8
    stride_gb8, stride_gl8, stride_g38,  # dqkv strides / 8
    COS, SIN, IDS, QW, KW, P_DW, stride_idb, eps,  # prologue; P_DW: this kernel's q-norm weight partials
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    PRO: tl.constexpr = False, ROPE: tl.constexpr = False, QK_NORM: tl.constexpr = False,
    GATHER: tl.constexpr = False,
):
    qk_scale = tl.full([], qk_scale, tl.float32)
    scale = tl.full([], scale, tl.float32)
    eps = tl.full([], eps, tl.float32)
    offs_m, pid_bh, b, h, q_base, k_base, v_base, o_off = _program_start(
        QKV, L, H, stride_b8, stride_38, stride_ob8, HD, BLOCK_M
    )
    stride_l = stride_l8 * 8
    stride_ol = stride_ol8 * 8
    do_base = DO + o_off
    o_base = O + o_off
    arange_n = tl.arange(0, BLOCK_N)
    da = tl.arange(0, HD_A)

    q_a, do_a = _load_pair(q_base, do_base, offs_m, da, stride_l, stride_ol, L, HD, not EVEN_M, HD_A > HD, UPCAST)
    o_a = _load_tile(o_base, offs_m, da, stride_ol, L, HD, not EVEN_M, HD_A > HD)
    delta = tl.sum(do_a.to(tl.float32) * o_a.to(tl.float32), 1)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        q_b, do_b = _load_pair(
            q_base, do_base, offs_m, db, stride_l, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD, UPCAST
        )
        o_b = _load_tile(o_base, offs_m, db, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD)
        delta += tl.sum(do_b.to(tl.float32) * o_b.to(tl.float32), 1)
        dq_b = tl.zeros([BLOCK_M, HD_B], dtype=tl.float32)
    if PRO:
        q_a, q_b = _prologue_rows(q_a, q_b if HD_B > 0 else q_a, IDS, b, offs_m, stride_idb, da, db if HD_B > 0 else da,
                                  L, COS, SIN, QW, eps, HD, HD_A, HD_B, BLOCK_M, ROPE, QK_NORM, GATHER)

    _store_vec(Delta + pid_bh * L, delta, offs_m, L, not EVEN_M)
    lse2 = _load_vec(Lse + pid_bh * L, offs_m, L, 0.0, not EVEN_M) * 1.4426950408889634

    dq_a = tl.zeros([BLOCK_M, HD_A], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + arange_n
        k_a, v_a = _load_kv(k_base, v_base, offs_n, da, stride_l, L, HD, not EVEN_N, HD_A > HD, UPCAST)
        if PRO:
            if HD_B > 0:
                k_b, v_b = _load_kv(k_base, v_base, offs_n, db, stride_l, L, HD, not EVEN_N, HD_A + HD_B > HD, UPCAST)
            k_a, k_b = _prologue_rows(k_a, k_b if HD_B > 0 else k_a, IDS, b, offs_n, stride_idb, da,
                                      db if HD_B > 0 else da, L, COS, SIN, KW, eps, HD, HD_A, HD_B, BLOCK_N, ROPE,
                                      QK_NORM, GATHER)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PREC)
        if HD_B > 0:
            if not PRO:
                k_b, v_b = _load_kv(k_base, v_base, offs_n, db, stride_l, L, HD, not EVEN_N, HD_A + HD_B > HD, UPCAST)
            s += tl.dot(q_b, tl.trans(k_b), input_precision=DOT_PREC)
            dp += tl.dot(do_b, tl.trans(v_b), input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if not EVEN_N:
            # padded keys are zeros: score 0, and exp2(0 - lse) overflows when every real
            # score is very negative (inf * 0 = NaN in dq), so drop them explicitly
            p = tl.where(offs_n[None, :] < L, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a += tl.dot(ds, k_a, input_precision=DOT_PREC)
        if HD_B > 0:
            dq_b += tl.dot(ds, k_b, input_precision=DOT_PREC)

    dq_base = DQKV + b * stride_gb8 * 8 + h * HD
    dq_a = dq_a * scale
    if HD_B > 0:
        dq_b = dq_b * scale
    if PRO:
        dq_a, dq_b = _chain_rows(dq_a, dq_b if HD_B > 0 else dq_a, q_base, IDS, b, offs_m, stride_idb, da,
                                 db if HD_B > 0 else da, stride_l, L, COS, SIN, QW, P_DW, eps, HD, HD_A, HD_B,
                                 BLOCK_M, ROPE, QK_NORM, GATHER)
    _store_tile(dq_base, dq_a, offs_m, da, stride_gl8 * 8, L, HD, not EVEN_M, HD_A > HD)
    if HD_B > 0:
        _store_tile(dq_base, dq_b, offs_m, db, stride_gl8 * 8, L, HD, not EVEN_M, HD_A + HD_B > HD)


@triton.jit
def _attn_bwd_delta_kernel(
    DO, O, Delta,
    L, H, L_BUCKET, BH_BUCKET,
    stride_ob8, stride_ol8,  # out and grad_out [B, L, H * hd] strides / 8
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr,
):
    # delta = rowsum(dO * O) for one (query block, head); the one-pass backward reads it.
    # _program_start on grad_out's layout: its "q" base is this head's dO rows.
    offs_m, pid_bh, b, h, do_base, _k, _v, o_off = _program_start(DO, L, H, stride_ob8, 0, stride_ob8, HD, BLOCK_M)
    stride_ol = stride_ol8 * 8
    o_base = O + o_off
    da = tl.arange(0, HD_A)
    delta = _row_dot(do_base, o_base, offs_m, da, stride_ol, L, HD, not EVEN_M, HD_A > HD)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        delta += _row_dot(do_base, o_base, offs_m, db, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD)
    _store_vec(Delta + pid_bh * L, delta, offs_m, L, not EVEN_M)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, Lse, Delta, DQKV, DQ_ACC,
    qk_scale, scale,
    L, H, L_BUCKET, BH_BUCKET,
    stride_b8, stride_l8, stride_38,  # qkv strides / 8
    stride_ob8, stride_ol8,  # grad_out [B, L, H * hd] strides / 8
    stride_gb8, stride_gl8, stride_g38,  # dqkv strides / 8
    stride_ab8, stride_al8,  # DQ_ACC (fp32 [B, L, H, hd], heads packed) strides / 8
    COS, SIN, IDS, QW, KW, P_DW, stride_idb, eps,  # prologue; P_DW: this kernel's k-norm weight partials
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ONE_PASS: tl.constexpr,  # also add scale * dS @ K into DQ_ACC (atomics)
    PRO: tl.constexpr = False, ROPE: tl.constexpr = False, QK_NORM: tl.constexpr = False,
    GATHER: tl.constexpr = False,
):
    qk_scale = tl.full([], qk_scale, tl.float32)
    scale = tl.full([], scale, tl.float32)
    eps = tl.full([], eps, tl.float32)
    # Works on transposed scores (keys x queries) so that dk, dv accumulate as [BLOCK_N, hd].
    offs_n, pid_bh, b, h, q_base, k_base, v_base, o_off = _program_start(
        QKV, L, H, stride_b8, stride_38, stride_ob8, HD, BLOCK_N
    )
    stride_l = stride_l8 * 8
    stride_ol = stride_ol8 * 8
    do_base = DO + o_off
    lse_base = Lse + pid_bh * L
    delta_base = Delta + pid_bh * L
    stride_al = stride_al8 * 8
    dq_base = DQ_ACC + b * stride_ab8 * 8 + h * HD
    arange_m = tl.arange(0, BLOCK_M)
    da = tl.arange(0, HD_A)

    k_a, v_a = _load_kv(k_base, v_base, offs_n, da, stride_l, L, HD, not EVEN_N, HD_A > HD, UPCAST)
    dk_a = tl.zeros([BLOCK_N, HD_A], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, HD_A], dtype=tl.float32)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        k_b, v_b = _load_kv(k_base, v_base, offs_n, db, stride_l, L, HD, not EVEN_N, HD_A + HD_B > HD, UPCAST)
        dk_b = tl.zeros([BLOCK_N, HD_B], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, HD_B], dtype=tl.float32)
    if PRO:
        k_a, k_b = _prologue_rows(k_a, k_b if HD_B > 0 else k_a, IDS, b, offs_n, stride_idb, da, db if HD_B > 0 else da,
                                  L, COS, SIN, KW, eps, HD, HD_A, HD_B, BLOCK_N, ROPE, QK_NORM, GATHER)

    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + arange_m
        q_a, do_a = _load_pair(q_base, do_base, offs_m, da, stride_l, stride_ol, L, HD, not EVEN_M, HD_A > HD, UPCAST)
        if PRO:
            if HD_B > 0:
                q_b, do_b = _load_pair(
                    q_base, do_base, offs_m, db, stride_l, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD, UPCAST
                )
            q_a, q_b = _prologue_rows(q_a, q_b if HD_B > 0 else q_a, IDS, b, offs_m, stride_idb, da,
                                      db if HD_B > 0 else da, L, COS, SIN, QW, eps, HD, HD_A, HD_B, BLOCK_M, ROPE,
                                      QK_NORM, GATHER)
        # padded query rows: lse = +inf makes their probabilities exactly 0. (Rows of padded
        # keys may hold inf/NaN when all scores are very negative; they are never stored.)
        lse2 = _load_vec(lse_base, offs_m, L, float("inf"), not EVEN_M) * 1.4426950408889634
        delta = _load_vec(delta_base, offs_m, L, 0.0, not EVEN_M)
        s_t = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PREC)
        dp_t = tl.dot(v_a, tl.trans(do_a), input_precision=DOT_PREC)
        if HD_B > 0:
            if not PRO:
                q_b, do_b = _load_pair(
                    q_base, do_base, offs_m, db, stride_l, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD, UPCAST
                )
            s_t += tl.dot(k_b, tl.trans(q_b), input_precision=DOT_PREC)
            dp_t += tl.dot(v_b, tl.trans(do_b), input_precision=DOT_PREC)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        if ONE_PASS and not EVEN_N:
            # padded keys may give inf/NaN probabilities; dq sums over keys, so drop them
            p_t = tl.where(offs_n[:, None] < L, p_t, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        p_t = p_t.to(do_a.dtype)
        dv_a += tl.dot(p_t, do_a, input_precision=DOT_PREC)
        dk_a += tl.dot(ds_t, q_a, input_precision=DOT_PREC)
        if HD_B > 0:
            dv_b += tl.dot(p_t, do_b, input_precision=DOT_PREC)
            dk_b += tl.dot(ds_t, q_b, input_precision=DOT_PREC)
        if ONE_PASS:
            ds = tl.trans(ds_t)
            _atomic_add_tile(dq_base, tl.dot(ds, k_a, input_precision=DOT_PREC) * scale, offs_m, da, stride_al,
                             L, HD, not EVEN_M, HD_A > HD)
            if HD_B > 0:
                _atomic_add_tile(dq_base, tl.dot(ds, k_b, input_precision=DOT_PREC) * scale, offs_m, db, stride_al,
                                 L, HD, not EVEN_M, HD_A + HD_B > HD)

    stride_gl = stride_gl8 * 8
    dk_base = DQKV + b * stride_gb8 * 8 + h * HD + stride_g38 * 8
    dv_base = dk_base + stride_g38 * 8
    dk_a = dk_a * scale
    if HD_B > 0:
        dk_b = dk_b * scale
    if PRO:
        # dv first: its registers are free for the chain's fp32 tiles
        _store_tile(dv_base, dv_a, offs_n, da, stride_gl, L, HD, not EVEN_N, HD_A > HD)
        if HD_B > 0:
            _store_tile(dv_base, dv_b, offs_n, db, stride_gl, L, HD, not EVEN_N, HD_A + HD_B > HD)
        dk_a, dk_b = _chain_rows(dk_a, dk_b if HD_B > 0 else dk_a, k_base, IDS, b, offs_n, stride_idb, da,
                                 db if HD_B > 0 else da, stride_l, L, COS, SIN, KW, P_DW, eps, HD, HD_A, HD_B,
                                 BLOCK_N, ROPE, QK_NORM, GATHER)
    _store_tile(dk_base, dk_a, offs_n, da, stride_gl, L, HD, not EVEN_N, HD_A > HD)
    if not PRO:
        _store_tile(dv_base, dv_a, offs_n, da, stride_gl, L, HD, not EVEN_N, HD_A > HD)
    if HD_B > 0:
        _store_tile(dk_base, dk_b, offs_n, db, stride_gl, L, HD, not EVEN_N, HD_A + HD_B > HD)
        if not PRO:
            _store_tile(dv_base, dv_b, offs_n, db, stride_gl, L, HD, not EVEN_N, HD_A + HD_B > HD)


@triton.jit
def _attn_bwd_qchain_kernel(
    QKV, DQ_ACC, DQKV,
    L, H, L_BUCKET, BH_BUCKET,
    stride_b8, stride_l8, stride_38,  # qkv strides / 8
    stride_gb8, stride_gl8, stride_g38,  # dqkv strides / 8
    stride_ab8, stride_al8,  # DQ_ACC strides / 8
    COS, SIN, IDS, QW, P_DW, stride_idb, eps,
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr,
    ROPE: tl.constexpr, QK_NORM: tl.constexpr, GATHER: tl.constexpr,
):
    eps = tl.full([], eps, tl.float32)
    # The one-pass backward with a prologue: dq of the rotated / normalised q, summed in fp32
    # by the dk/dv kernel's atomics, chained back to the raw q once every addition is done.
    offs_m, pid_bh, b, h, q_base, _k, _v, _o = _program_start(QKV, L, H, stride_b8, stride_38, 0, HD, BLOCK_M)
    stride_al = stride_al8 * 8
    acc_base = DQ_ACC + b * stride_ab8 * 8 + h * HD
    da = tl.arange(0, HD_A)
    g_a = _load_tile(acc_base, offs_m, da, stride_al, L, HD, True, HD_A > HD)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        g_b = _load_tile(acc_base, offs_m, db, stride_al, L, HD, True, HD_A + HD_B > HD)
    dq_a, dq_b = _chain_rows(g_a, g_b if HD_B > 0 else g_a, q_base, IDS, b, offs_m, stride_idb, da,
                             db if HD_B > 0 else da, stride_l8 * 8, L, COS, SIN, QW, P_DW, eps, HD, HD_A, HD_B,
                             BLOCK_M, ROPE, QK_NORM, GATHER)
    dq_base = DQKV + b * stride_gb8 * 8 + h * HD
    _store_tile(dq_base, dq_a, offs_m, da, stride_gl8 * 8, L, HD, not EVEN_M, HD_A > HD)
    if HD_B > 0:
        _store_tile(dq_base, dq_b, offs_m, db, stride_gl8 * 8, L, HD, not EVEN_M, HD_A + HD_B > HD)


# Kernel per launch kind; ``attention_launch`` picks each one's config. "bwd" is the dk/dv
# kernel launched with ONE_PASS (it then also accumulates dq), "delta" its preprocessing.
KERNELS = {
    "fwd": _attn_fwd_kernel,
    "dq": _attn_bwd_dq_kernel,
    "dkdv": _attn_bwd_dkdv_kernel,
    "bwd": _attn_bwd_dkdv_kernel,
    "delta": _attn_bwd_delta_kernel,
    "qchain": _attn_bwd_qchain_kernel,
}

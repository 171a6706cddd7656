"""Flash-style fused attention (non-causal), forward and backward, in Triton.

Reads q, k, v straight from the fused projection layout qkv [B, L, 3, H, hd] through
strides and writes out [B, L, H * hd] (and dqkv in qkv's layout), so no transposes or
copies surround the kernels. Online softmax in fp32; the L x L score matrix is never
stored; lse [B, H, L] (natural log) is kept for the backward.

Head dims that are not a power of two (DiT-XL/2 has 72) are split into two power-of-two
slices, HD_A + HD_B (72 = 64 + 16, 8 of them masked), each with its own tl.dot, instead of
padding to the next power of two (128 would waste 44% of the matmul work). HD_B is 0 when
one slice fits as tightly; every slice is at least 16 wide (the smallest tl.dot K/N).

Backward, deterministic (no atomics, every output element written by one program):
  1. dq kernel, one program per (query block, head): computes delta = rowsum(dO * O) for its
     rows (stored for step 2), then walks the key blocks: dq = scale * dS @ K.
  2. dk/dv kernel, one program per (key block, head): walks the query blocks:
     dv = P^T @ dO, dk = scale * dS^T @ Q.

Launch configs: on a GPU, 16-bit inputs are autotuned over a few configs keyed on
(power-of-two bucket of L, head dim, dtype), pruned of configs that would spill registers;
``FASTMASK_ATTN_AUTOTUNE=0`` uses the heuristic config of :func:`heuristic_config` instead
(no timing runs on the first call of a new shape), as do fp32 inputs. The interpreter (CPU
tests) always uses a fixed small config.

Offsets: batch and head offsets are int64 (B * L * 3 * H * hd passes 2**31 at large B); the
offsets inside one batch element stay int32. The grid is 1-D, since B * H can pass 65535.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
_MIN_DOT = 16  # smallest K / N of a tl.dot on NVIDIA GPUs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
def _load_kv(k_base, v_base, rows, cols, stride_row, L, HD: tl.constexpr, MASK_ROWS: tl.constexpr,
             MASK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """The K and V tiles of one head-dim part, upcast to fp32 where tl.dot needs it."""
    k = _load_tile(k_base, rows, cols, stride_row, L, HD, MASK_ROWS, MASK_COLS)
    v = _load_tile(v_base, rows, cols, stride_row, L, HD, MASK_ROWS, MASK_COLS)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


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
def _load_vec(ptr, rows, L, other, MASK: tl.constexpr):
    if MASK:
        v = tl.load(ptr + rows, mask=rows < L, other=other)
    else:
        v = tl.load(ptr + rows)
    return v


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_kernel(
    QKV, Out, Lse,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    L, H, L_BUCKET,  # L_BUCKET: autotune key only
    stride_b8, stride_l8, stride_38,  # qkv strides / 8 (see _strides8)
    stride_ob8, stride_ol8,  # out [B, L, H * hd] strides / 8
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(L, BLOCK_M)
    pid_m = pid % n_blocks
    pid_bh = pid // n_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    stride_l = stride_l8 * 8
    q_base = QKV + b * stride_b8 * 8 + h * HD
    k_base = q_base + stride_38 * 8
    v_base = k_base + stride_38 * 8

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, HD_A], dtype=tl.float32)

    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + arange_n
        k_a, v_a = _load_kv(k_base, v_base, offs_n, da, stride_l, L, HD, not EVEN_N, HD_A > HD, UPCAST)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
        if HD_B > 0:
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
    o_base = Out + b * stride_ob8 * 8 + h * HD
    _store_tile(o_base, acc_a * inv_l[:, None], offs_m, da, stride_ol8 * 8, L, HD, not EVEN_M, HD_A > HD)
    if HD_B > 0:
        _store_tile(o_base, acc_b * inv_l[:, None], offs_m, db, stride_ol8 * 8, L, HD, not EVEN_M, HD_A + HD_B > HD)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    lse_ptr = Lse + pid_bh.to(tl.int64) * L + offs_m
    if EVEN_M:
        tl.store(lse_ptr, lse)
    else:
        tl.store(lse_ptr, lse, mask=offs_m < L)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, O, Lse, Delta, DQKV,
    qk_scale, scale,
    L, H, L_BUCKET,
    stride_b8, stride_l8, stride_38,  # qkv strides / 8
    stride_ob8, stride_ol8,  # out and grad_out [B, L, H * hd] strides / 8
    stride_gb8, stride_gl8, stride_g38,  # dqkv strides / 8
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(L, BLOCK_M)
    pid_m = pid % n_blocks
    pid_bh = pid // n_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    stride_l = stride_l8 * 8
    stride_ol = stride_ol8 * 8
    q_base = QKV + b * stride_b8 * 8 + h * HD
    k_base = q_base + stride_38 * 8
    v_base = k_base + stride_38 * 8
    o_off = b * stride_ob8 * 8 + h * HD
    do_base = DO + o_off
    o_base = O + o_off

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    arange_n = tl.arange(0, BLOCK_N)
    da = tl.arange(0, HD_A)

    q_a = _load_tile(q_base, offs_m, da, stride_l, L, HD, not EVEN_M, HD_A > HD)
    do_a = _load_tile(do_base, offs_m, da, stride_ol, L, HD, not EVEN_M, HD_A > HD)
    o_a = _load_tile(o_base, offs_m, da, stride_ol, L, HD, not EVEN_M, HD_A > HD)
    delta = tl.sum(do_a.to(tl.float32) * o_a.to(tl.float32), 1)
    if UPCAST:
        q_a = q_a.to(tl.float32)
        do_a = do_a.to(tl.float32)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        q_b = _load_tile(q_base, offs_m, db, stride_l, L, HD, not EVEN_M, HD_A + HD_B > HD)
        do_b = _load_tile(do_base, offs_m, db, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD)
        o_b = _load_tile(o_base, offs_m, db, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD)
        delta += tl.sum(do_b.to(tl.float32) * o_b.to(tl.float32), 1)
        if UPCAST:
            q_b = q_b.to(tl.float32)
            do_b = do_b.to(tl.float32)
        dq_b = tl.zeros([BLOCK_M, HD_B], dtype=tl.float32)

    row_ptr = pid_bh.to(tl.int64) * L + offs_m
    if EVEN_M:
        tl.store(Delta + row_ptr, delta)
    else:
        tl.store(Delta + row_ptr, delta, mask=offs_m < L)
    lse2 = _load_vec(Lse + pid_bh.to(tl.int64) * L, offs_m, L, 0.0, not EVEN_M) * 1.4426950408889634

    dq_a = tl.zeros([BLOCK_M, HD_A], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + arange_n
        k_a, v_a = _load_kv(k_base, v_base, offs_n, da, stride_l, L, HD, not EVEN_N, HD_A > HD, UPCAST)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PREC)
        if HD_B > 0:
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
    _store_tile(dq_base, dq_a * scale, offs_m, da, stride_gl8 * 8, L, HD, not EVEN_M, HD_A > HD)
    if HD_B > 0:
        _store_tile(dq_base, dq_b * scale, offs_m, db, stride_gl8 * 8, L, HD, not EVEN_M, HD_A + HD_B > HD)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, Lse, Delta, DQKV,
    qk_scale, scale,
    L, H, L_BUCKET,
    stride_b8, stride_l8, stride_38,  # qkv strides / 8
    stride_ob8, stride_ol8,  # grad_out [B, L, H * hd] strides / 8
    stride_gb8, stride_gl8, stride_g38,  # dqkv strides / 8
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Works on transposed scores (keys x queries) so that dk, dv accumulate as [BLOCK_N, hd].
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(L, BLOCK_N)
    pid_n = pid % n_blocks
    pid_bh = pid // n_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    stride_l = stride_l8 * 8
    stride_ol = stride_ol8 * 8
    q_base = QKV + b * stride_b8 * 8 + h * HD
    k_base = q_base + stride_38 * 8
    v_base = k_base + stride_38 * 8
    do_base = DO + b * stride_ob8 * 8 + h * HD
    lse_base = Lse + pid_bh.to(tl.int64) * L
    delta_base = Delta + pid_bh.to(tl.int64) * L

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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

    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + arange_m
        q_a = _load_tile(q_base, offs_m, da, stride_l, L, HD, not EVEN_M, HD_A > HD)
        do_a = _load_tile(do_base, offs_m, da, stride_ol, L, HD, not EVEN_M, HD_A > HD)
        if UPCAST:
            q_a = q_a.to(tl.float32)
            do_a = do_a.to(tl.float32)
        # padded query rows: lse = +inf makes their probabilities exactly 0. (Rows of padded
        # keys may hold inf/NaN when all scores are very negative; they are never stored.)
        lse2 = _load_vec(lse_base, offs_m, L, float("inf"), not EVEN_M) * 1.4426950408889634
        delta = _load_vec(delta_base, offs_m, L, 0.0, not EVEN_M)
        s_t = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PREC)
        dp_t = tl.dot(v_a, tl.trans(do_a), input_precision=DOT_PREC)
        if HD_B > 0:
            q_b = _load_tile(q_base, offs_m, db, stride_l, L, HD, not EVEN_M, HD_A + HD_B > HD)
            do_b = _load_tile(do_base, offs_m, db, stride_ol, L, HD, not EVEN_M, HD_A + HD_B > HD)
            if UPCAST:
                q_b = q_b.to(tl.float32)
                do_b = do_b.to(tl.float32)
            s_t += tl.dot(k_b, tl.trans(q_b), input_precision=DOT_PREC)
            dp_t += tl.dot(v_b, tl.trans(do_b), input_precision=DOT_PREC)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        p_t = p_t.to(do_a.dtype)
        dv_a += tl.dot(p_t, do_a, input_precision=DOT_PREC)
        dk_a += tl.dot(ds_t, q_a, input_precision=DOT_PREC)
        if HD_B > 0:
            dv_b += tl.dot(p_t, do_b, input_precision=DOT_PREC)
            dk_b += tl.dot(ds_t, q_b, input_precision=DOT_PREC)

    stride_gl = stride_gl8 * 8
    dk_base = DQKV + b * stride_gb8 * 8 + h * HD + stride_g38 * 8
    dv_base = dk_base + stride_g38 * 8
    _store_tile(dk_base, dk_a * scale, offs_n, da, stride_gl, L, HD, not EVEN_N, HD_A > HD)
    _store_tile(dv_base, dv_a, offs_n, da, stride_gl, L, HD, not EVEN_N, HD_A > HD)
    if HD_B > 0:
        _store_tile(dk_base, dk_b * scale, offs_n, db, stride_gl, L, HD, not EVEN_N, HD_A + HD_B > HD)
        _store_tile(dv_base, dv_b, offs_n, db, stride_gl, L, HD, not EVEN_N, HD_A + HD_B > HD)


# ----------------------------------------------------------------------------- launch configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages). In the dk/dv kernel BLOCK_N is the key block the
# program owns and BLOCK_M the query block it walks over.
_GPU_CONFIGS = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 2)],
}
# Fixed blocks in the interpreter: small, and different for queries and keys, so the CPU
# tests cover several blocks on each side, ragged tails, and M != N.
_INTERPRET_BLOCKS = {"fwd": (16, 32), "dq": (16, 32), "dkdv": (32, 16)}


def _l_bucket(L: int) -> int:
    return min(triton.next_power_of_2(max(L, 1)), 4096)


def heuristic_config(kind: str, L: int, hd: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel ``kind`` without autotuning.

    After the Triton flash-attention tutorial's H100 settings (128-row query tiles in the
    forward and dq, 128-row key tiles walked by 32-row query tiles in dk/dv), adjusted with
    ptxas register counts for sm_90 (see :func:`_regs_estimate`): 8 warps, or 64-row tiles,
    for wide padded head dims, so that no chosen config spills.

    fp32 inputs (a correctness path, not a fast one: no tensor cores with "ieee" dots) get
    32 x 32 tiles, the largest that ptxas compiled without spills at head dim 72.
    """
    if dtype == torch.float32:
        return (32, 32, 4, 2)
    width = sum(head_dim_split(hd))
    if L <= 64:
        return (32, 64, 4, 2) if kind == "dkdv" else (64, 64, 4, 2)
    if kind == "fwd":
        return (128, 64, 8, 3) if width > 64 else (128, 64, 4, 3)
    if kind == "dq":
        return (64, 64, 4, 3) if width > 64 else (128, 32, 4, 3)
    if kind == "dkdv":  # holds two fp32 accumulators of 128 x width: 8 warps from width 48 on
        return (32, 128, 8, 2) if width > 32 else (32, 128, 4, 3)
    raise ValueError(kind)


# A rough per-thread register count: fp32 accumulators + fp32 score tiles + 16-bit tiles held
# across the loop. Calibrated on ptxas -v for sm_90a (triton 3.8, bf16): configs above the
# limit spilled (e.g. dk/dv with a 128 x 80 key tile on 4 warps: 180 bytes of spills).
_REG_LIMIT = {"fwd": 300, "dq": 300, "dkdv": 250}


def _regs_estimate(kind: str, BM: int, BN: int, warps: int, width: int) -> float:
    t = 32 * warps
    if kind == "fwd":  # acc [BM, W], s/p [BM, BN], q [BM, W]
        return (BM * width + 2 * BM * BN + BM * width / 2) / t
    if kind == "dq":  # dq [BM, W], s/p and dp [BM, BN], q and dO [BM, W]
        return (BM * width + 2 * BM * BN + BM * width) / t
    # dk, dv [BN, W]; s^T, dp^T [BN, BM] plus the transposes; k, v [BN, W]
    return (2 * BN * width + 3 * BN * BM + BN * width) / t


def _prune(kind, configs, named_args, **kwargs):
    # Blocks much longer than the sequence only add masked work; configs that would spill
    # registers are never the fastest and each costs a compile.
    args = {**named_args, **kwargs}
    cap = max(64, args["L_BUCKET"])
    width = args["HD_A"] + args["HD_B"] if "HD_A" in args and "HD_B" in args else 0

    def ok(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return m <= cap and n <= cap and _regs_estimate(kind, m, n, c.num_warps, width) <= _REG_LIMIT[kind]

    return [c for c in configs if ok(c)] or configs[:1]


_EVEN = {
    "EVEN_M": lambda a: a["L"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0,
}
_KERNELS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}
_tuned: dict[str, object] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("FASTMASK_ATTN_AUTOTUNE", "1") != "0"


def _tuned_kernel(kind: str):
    k = _tuned.get(kind)
    if k is None:
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in _GPU_CONFIGS[kind]
        ]
        k = triton.autotune(
            configs=configs,
            key=["L_BUCKET", "HD"],  # the autotuner adds the tensors' dtypes to the key
            prune_configs_by={"early_config_prune": functools.partial(_prune, kind)},
        )(triton.heuristics(_EVEN)(_KERNELS[kind]))
        _tuned[kind] = k
    return k


_fixed_choice: dict[tuple, tuple[int, int, int, int]] = {}


def _fixed_candidates(kind: str, L: int, hd: int, dtype: torch.dtype):
    # The heuristic config, then cheaper ones for GPUs with less shared memory than an H100
    # (fewer pipeline stages, then small tiles).
    BM, BN, w, st = heuristic_config(kind, L, hd, dtype)
    yield BM, BN, w, st
    for stages in range(st - 1, 0, -1):
        yield BM, BN, w, stages
    yield (32, 64, 4, 1) if kind == "dkdv" else (64, 32, 4, 1)
    yield 32, 32, 4, 1


def _launch(kind: str, grid_dim: str, L: int, BH: int, hd: int, args: tuple, meta: dict) -> None:
    """Run kernel ``kind`` on a 1-D grid of (blocks of L along ``grid_dim``) x (B * H) programs,
    the blocks of one head adjacent (they share its K/V, or Q/dO, in L2). 1-D because B * H
    can exceed the 65535 limit of the grid's second axis."""
    kernel = _KERNELS[kind]

    def run(BLOCK_M, BLOCK_N, warps, stages):
        block = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}
        kernel[(_cdiv(L, block[grid_dim]) * BH,)](
            *args, **meta, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            EVEN_M=L % BLOCK_M == 0, EVEN_N=L % BLOCK_N == 0,
            num_warps=warps, num_stages=stages,
        )

    if _interpreting():
        run(*_INTERPRET_BLOCKS[kind], 4, 1)
        return
    qkv = args[0]
    if _autotune_enabled() and qkv.dtype != torch.float32:
        grid = lambda META: (_cdiv(L, META[grid_dim]) * BH,)  # noqa: E731
        _tuned_kernel(kind)[grid](*args, **meta)
        return
    key = (kind, _l_bucket(L), hd, qkv.dtype, qkv.device.index)
    if key in _fixed_choice:
        run(*_fixed_choice[key])
        return
    from triton.runtime.errors import OutOfResources

    err = None
    for cfg in _fixed_candidates(kind, L, hd, qkv.dtype):
        try:
            run(*cfg)  # raises before launching when the config does not fit the GPU
        except OutOfResources as e:
            err = e
            continue
        _fixed_choice[key] = cfg
        return
    raise err


def _common_meta(qkv: torch.Tensor) -> dict:
    hd = qkv.shape[-1]
    HD_A, HD_B = head_dim_split(hd)
    upcast = _interpreting() and qkv.dtype == torch.bfloat16  # interpreter bf16 tl.dot is wrong
    if qkv.dtype == torch.float32 and qkv.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
        prec = "ieee"
    else:
        prec = "tf32"  # ignored for 16-bit operands
    return dict(HD=hd, HD_A=HD_A, HD_B=HD_B, UPCAST=upcast, DOT_PREC=prec)


def _check(qkv: torch.Tensor) -> None:
    reason = not_supported_reason(qkv)
    if reason:
        raise ValueError(f"attention (triton): {reason}")


def _strides8(t: torch.Tensor, dims: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of ``dims`` divided by 8. The kernels multiply them back by the literal 8 (and
    address heads as h * HD), so the compiler can prove every row starts 16-byte aligned and
    vectorise the loads; Triton itself only specialises integer arguments divisible by 16,
    which a row stride like 3 * H * 72 with odd H is not."""
    return tuple(t.stride(d) // 8 for d in dims)


def _qkv_layout_ok(qkv: torch.Tensor) -> bool:
    # head dim contiguous, heads packed (stride hd), other strides multiples of 8 elements
    hd = qkv.shape[-1]
    return qkv.stride(4) == 1 and qkv.stride(3) == hd and all(qkv.stride(d) % 8 == 0 for d in (0, 1, 2))


def _rows_layout_ok(t: torch.Tensor) -> bool:
    # [B, L, H * hd] with the last dim contiguous and row strides multiples of 8
    return t.stride(2) == 1 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0


# ----------------------------------------------------------------------------- launchers


def attention_fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, L, 3, H, hd] -> (out [B, L, H * hd] in qkv's dtype, lse [B, H, L] fp32, natural log)."""
    _check(qkv)
    if not _qkv_layout_ok(qkv):
        qkv = qkv.contiguous()
    B, L, _, H, hd = qkv.shape
    out = torch.empty((B, L, H * hd), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, L), device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    scale = float(scale)
    args = (
        qkv, out, lse, scale * LOG2E, L, H, _l_bucket(L),
        *_strides8(qkv, (0, 1, 2)), *_strides8(out, (0, 1)),
    )
    _launch("fwd", "BLOCK_M", L, B * H, hd, args, _common_meta(qkv))
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """Gradient of :func:`attention_fwd`'s out: dqkv [B, L, 3, H, hd] (qkv's shape and dtype,
    contiguous)."""
    _check(qkv)
    if not _qkv_layout_ok(qkv):
        qkv = qkv.contiguous()
    B, L, _, H, hd = qkv.shape
    if not (_rows_layout_ok(grad_out) and _rows_layout_ok(out) and grad_out.stride() == out.stride()):
        grad_out, out = grad_out.contiguous(), out.contiguous()
    lse = lse.contiguous()
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return dqkv
    delta = torch.empty((B, H, L), device=qkv.device, dtype=torch.float32)
    scale = float(scale)
    strides = (*_strides8(qkv, (0, 1, 2)), *_strides8(grad_out, (0, 1)), *_strides8(dqkv, (0, 1, 2)))
    meta = _common_meta(qkv)
    # dq first: it also writes delta = rowsum(dO * O), which the dk/dv kernel reads.
    _launch(
        "dq", "BLOCK_M", L, B * H, hd,
        (qkv, grad_out, out, lse, delta, dqkv, scale * LOG2E, scale, L, H, _l_bucket(L), *strides), meta,
    )
    _launch(
        "dkdv", "BLOCK_N", L, B * H, hd,
        (qkv, grad_out, lse, delta, dqkv, scale * LOG2E, scale, L, H, _l_bucket(L), *strides), meta,
    )
    return dqkv

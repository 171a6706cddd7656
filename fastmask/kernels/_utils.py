"""Launch helpers shared by the memory-bound kernels (tokens, norm, loss).

Autotuning needs a GPU driver to time configs, so launch configs are chosen here from
the width alone: the same rule on the GPU and in the interpreter (CPU tests), except
that the interpreter gets bigger row tiles (it runs programs one after another, so fewer,
wider programs finish sooner) and a small "program target" that still splits reductions
into several partials, so the CPU tests exercise the partial-sum paths.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._env import interpreting  # noqa: F401  (the kernels import it from here)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(t: torch.Tensor) -> int:
    """How many programs a split reduction should aim for: enough to fill the GPU several
    times over (memory-bound loops need many warps in flight to hide latency)."""
    if t.device.type != "cuda":
        return 4
    return 8 * _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


# The fp32 partial buffers of a split reduction (per-sample parameter gradients, batch sums)
# are written and read back: traffic the op itself does not need. Their chunk counts are
# capped so that this traffic stays within this fraction of the bytes the op moves anyway, so
# that every op stays within 10% of its minimum (benchmarks/static_check.py counts it).
PARTIAL_BYTES_BUDGET = 0.06


def budget_chunks(chunks: int, partial_bytes_per_chunk: int, op_bytes: int) -> int:
    """``chunks`` capped (at least 1) so that writing and reading back ``partial_bytes_per_chunk``
    per chunk costs at most PARTIAL_BYTES_BUDGET of ``op_bytes``."""
    cap = int(PARTIAL_BYTES_BUDGET * op_bytes) // max(1, 2 * partial_bytes_per_chunk)
    return max(1, min(int(chunks), cap))


def row_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_D columns, num_warps) for a row-wise kernel on width D.

    A whole row per tile (BLOCK_D = next power of two) so statistics need one read; small
    widths stack rows until a tile holds ~2K elements (one row of D=72 alone would leave
    most lanes of a warp idle), and warps grow with the tile so each thread moves about
    8 elements, i.e. 16-byte vectors in bf16.
    """
    BLOCK_D = triton.next_power_of_2(max(int(D), 1))
    if interpreting():
        return max(1, min(16, 4096 // BLOCK_D)), BLOCK_D, 4
    BLOCK_R = max(1, min(32, 2048 // BLOCK_D))
    num_warps = max(2, min(16, (BLOCK_R * BLOCK_D) // 256))
    return BLOCK_R, BLOCK_D, num_warps


@triton.jit
def _sum_partials_kernel(PART, OUT, R, M, M_TILES, R_CHUNKS, R_PER_PROG, BLOCK_M: tl.constexpr):
    # One program per (group, chunk of R_PER_PROG partial rows, column block); it walks its
    # rows in a fixed order, so the sum is bit-identical from run to run (no atomics).
    # OUT [G, R_CHUNKS, M] holds one row per chunk.
    pid = tl.program_id(0)
    m_tile = pid % M_TILES
    gc = pid // M_TILES
    g = (gc // R_CHUNKS).to(tl.int64)
    c = gc % R_CHUNKS
    cols = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = cols < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_start = c * R_PER_PROG
    for r in range(r_start, tl.minimum(r_start + R_PER_PROG, R)):
        acc += tl.load(PART + (g * R + r) * M + cols, mask=ok, other=0.0)
    tl.store(OUT + (g * R_CHUNKS + c) * M + cols, acc.to(OUT.dtype.element_ty), mask=ok)


def sum_rows_per_program() -> int:
    """The most partial rows one program of :func:`sum_partials` adds up (small in the
    interpreter, so the CPU tests run the two-pass path)."""
    return 4 if interpreting() else 32


def sum_partials(part: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[G, R, M] fp32 partials -> [G, M] in ``out_dtype``, summed over R in fp32.

    A parallel reduction in a fixed order: while R is longer than
    :func:`sum_rows_per_program`, each program sums one chunk of rows into an fp32 row of a
    shorter partial buffer; a last pass sums the remaining rows. Deterministic (no atomics).
    """
    G, R, M = part.shape
    out = torch.empty((G, M), device=part.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    BLOCK_M = 256 if M <= 2048 else 1024
    m_tiles = cdiv(M, BLOCK_M)
    per_prog = sum_rows_per_program()
    while R > per_prog:
        chunks = cdiv(R, per_prog)
        nxt = torch.empty((G, chunks, M), device=part.device, dtype=torch.float32)
        _sum_partials_kernel[(G * chunks * m_tiles,)](
            part, nxt, R, M, m_tiles, chunks, per_prog, BLOCK_M=BLOCK_M, num_warps=4
        )
        part, R = nxt, chunks
    _sum_partials_kernel[(G * m_tiles,)](part, out, R, M, m_tiles, 1, R, BLOCK_M=BLOCK_M, num_warps=4)
    return out

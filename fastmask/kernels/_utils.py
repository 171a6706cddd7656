"""Launch helpers shared by the memory-bound kernels (tokens, norm, loss).

Autotuning needs a GPU driver to time configs, so launch configs are chosen here from
the width alone: the same rule on the GPU and in the interpreter (CPU tests), except
that the interpreter gets bigger row tiles (it runs programs one after another, so fewer,
wider programs finish sooner) and a small "program target" that still splits reductions
into several partials, so the CPU tests exercise the partial-sum paths.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import types

import torch
import triton
import triton.language as tl

from .._env import interpreting  # noqa: F401  (the kernels import it from here)


# ----------------------------------------------------------------- launches under torch.compile
# Every launcher starts its kernels with ``launch(kernel)[grid](...)``. An eager call gets the
# kernel itself (one global read more than ``kernel[grid](...)``). While torch.compile traces the
# body of one of fastmask's ``torch.library.triton_op`` ops (fastmask.ops._library), it gets
# ``torch.library.wrap_triton(kernel)``: the launch is recorded in the graph as a
# ``triton_kernel_wrapper`` call that Inductor launches from its own generated code.
_traced = 0  # > 0 while a triton_op body runs under a tracing mode (see traced_launches)

try:  # torch >= 2.6
    from torch._library.triton import is_wrap_triton_enabled as _wrap_enabled
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch: no triton_op either, launches stay direct
    _wrap_enabled = _wrap_triton = None


@contextlib.contextmanager
def traced_launches():
    """Inside the block, :func:`launch` hands out traceable kernels (when torch asks for them:
    ``torch.library.triton_op`` switches wrapping off around a plain call with real tensors)."""
    global _traced
    _traced += 1
    try:
        yield
    finally:
        _traced -= 1


def tracing() -> bool:
    """True while launches are traced (nothing runs: the compiled graph launches them later)."""
    return bool(_traced) and _wrap_enabled is not None and _wrap_enabled()


def placeholder(t: torch.Tensor) -> torch.Tensor:
    """What a launcher passes for a pointer that a constexpr switch leaves unused: ``t`` itself in
    an eager call; while traced, a separate one-element tensor, so that no tensor reaches a
    launch twice (torch takes every argument of a kernel as written where it cannot read the
    kernel's TTIR, the interpreter's case, and two written aliases would be merged wrongly)."""
    return t.new_empty(1) if _traced and tracing() else t


def launch(kernel):
    """``kernel``, or its traceable wrapper while a triton_op body is traced (see above)."""
    return _traceable(kernel) if _traced and tracing() else kernel


_interpreted_jit: dict[int, object] = {}


def _traceable(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        return _wrap_triton(kernel)
    # TRITON_INTERPRET=1 (the CPU tests): ``@triton.jit`` made an InterpretedFunction, which
    # ``wrap_triton`` passes through untraced (the graph would then run it on fake tensors).
    # A JITFunction over the same Python function gives the tracer what it reads (argument
    # names, source) and runs the interpreter when the graph launches it. (torch cannot build
    # its TTIR here, with no GPU target, so it takes every argument of such a launch as written:
    # correct, with clones of the inputs; on a GPU it reads the kernel's stores.)
    jit = _interpreted_jit.get(id(kernel))
    if jit is None:
        _jit_module(kernel.fn.__globals__)
        jit = _interpreted_jit[id(kernel)]
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    return TraceableTritonKernelWrapper(jit, None, None)


def _jit_module(module_globals: dict) -> None:
    """A :class:`_InterpretedJIT` for every interpreted kernel and helper of one module, all over
    one copy of its globals in which the helpers are JITFunctions too (what triton's code
    generator resolves a call to a helper with)."""
    from triton.runtime.interpreter import InterpretedFunction

    shared = dict(module_globals)
    for name, v in module_globals.items():
        if isinstance(v, InterpretedFunction) and v.fn.__globals__ is module_globals:
            shared[name] = _interpreted_jit[id(v)] = _InterpretedJIT(v, shared)
    for name, v in module_globals.items():  # helpers imported from other modules
        if isinstance(v, InterpretedFunction) and v.fn.__globals__ is not module_globals:
            if id(v) not in _interpreted_jit:
                _jit_module(v.fn.__globals__)
            shared[name] = _interpreted_jit[id(v)]


class _InterpretedJIT(triton.runtime.jit.JITFunction):
    """A JITFunction whose launches run ``interpreted`` (an InterpretedFunction of the same
    function), its globals ``module_globals``. Only made while tracing under TRITON_INTERPRET=1."""

    def __init__(self, interpreted, module_globals: dict):
        f = interpreted.fn
        fn = types.FunctionType(f.__code__, module_globals, f.__name__, f.__defaults__, f.__closure__)
        fn.__kwdefaults__, fn.__qualname__, fn.__module__ = f.__kwdefaults__, f.__qualname__, f.__module__
        fn.__annotations__ = f.__annotations__
        super().__init__(fn)
        self.interpreted = interpreted
        # The source alone keys it: the hash triton derives from the globals it reads refuses the
        # interpreted functions left in them (and it is never compiled for a device).
        self.hash = hashlib.sha256(f"{f.__module__}.{f.__qualname__}\n{self.src}".encode()).hexdigest()
        self.used_global_vals = {}

    def run(self, *args, grid, warmup, **kwargs):
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)


def jit_kernels(*modules) -> list:
    """Every compiled Triton kernel (JITFunction) defined in ``modules`` (none in the
    interpreter): what a triton_op declares as its kernels, so that torch's compile caches key
    on their source."""
    from triton.runtime.jit import JITFunction

    return [v for m in modules for v in vars(m).values() if type(v) is JITFunction]


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


# The fp32 partial buffers of a split reduction (the token ops' batch sums) are written and read
# back: traffic the op itself does not need. Their chunk counts are capped so that this traffic
# stays within this fraction of the bytes the op moves anyway, so that the op stays within 10%
# of its minimum (benchmarks/static_check.py counts it). The adaLN backwards split by the SM
# count instead: more partial traffic, measured faster (fastmask/kernels/norm.py).
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
        launch(_sum_partials_kernel)[(G * chunks * m_tiles,)](
            part, nxt, R, M, m_tiles, chunks, per_prog, BLOCK_M=BLOCK_M, num_warps=4
        )
        part, R = nxt, chunks
    launch(_sum_partials_kernel)[(G * m_tiles,)](part, out, R, M, m_tiles, 1, R, BLOCK_M=BLOCK_M, num_warps=4)
    return out

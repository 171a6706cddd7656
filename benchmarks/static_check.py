#!/usr/bin/env python
"""Static GPU evidence without a GPU: every Triton kernel the launchers would launch, compiled
ahead of time for Hopper (sm_90) and Ampere (sm_80), and the CUDA sources through nvcc.

    python benchmarks/static_check.py OUT.md [--json OUT.json] [--defaults-only]
                                      [--dtypes bf16,fp16,fp32] [--targets 90,80] [--no-cuda]

How the launches are found: the real launchers (``fastmask.kernels.*_fwd/_bwd``) are called on
meta tensors of DiT-XL/2 shapes (D 1152 and 512, N 256, K 128, head dims 72 / 64 / 32) with
``JITFunction.run`` and ``Autotuner.run`` intercepted, so each launch records its arguments,
constexprs, warps and stages instead of running. Attention is called twice: with
``FASTMASK_ATTN_AUTOTUNE=0`` (the heuristic config: the *default*) and with autotuning on
(every autotune config, whether the pruning keeps it or not). Each launch is then compiled by
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and ``("cuda", 80, 32)`` through the
same binder/specialisation path a real launch takes; ptxas' own report gives registers and
spills, the kernel metadata shared memory; wgmma is looked up in the PTX.

Results are cached per compile (Triton's source hash of the kernel and its dependencies, the
signature, constexprs, options, target, Triton version) in ``~/.cache/fastmask-static`` (or
``$FASTMASK_STATIC_CACHE``), so a rerun after no kernel change compiles nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("FASTMASK_STATIC_CACHE", Path.home() / ".cache" / "fastmask-static"))
TARGETS = {90: "sm_90 (H100/H200)", 80: "sm_80 (A100)"}
# Shared memory one block may use (the per-SM pool is 1 KB larger per block), and per SM.
SMEM_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
SMEM_SM = {90: 228 * 1024, 80: 164 * 1024}
REGS_SM, MAX_WARPS_SM, MAX_BLOCKS_SM = 65536, 64, 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# DiT-XL/2 at 256 px: N = 256 tokens, K = 128 kept; encoder width 1152 (16 heads of 72; 18 of
# 64 as in DiT-B/L's head dim), MaskDiT decoder 512 (16 heads of 32); P = 2 * 2 * 4.
N, K, P, B = 256, 128, 16, 64
ATTENTION = [(K, 1152, 16), (N, 1152, 16), (K, 1152, 18), (N, 1152, 18), (N, 512, 16)]  # (L, D, H)
WIDTHS = (1152, 512)


@dataclasses.dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    op: str
    shape: str
    dtype: str
    role: str  # "default" or "autotune"
    kind: str = ""  # attention kernel kind (fwd / dq / dkdv / bwd / delta), else ""
    config: tuple = ()  # (BLOCK_M, BLOCK_N, warps, stages) for attention
    arch: int = 90  # the target the launch policy planned for


# ----------------------------------------------------------------------------- capture
class _Capture:
    """Intercepts JITFunction.run / Autotuner.run: launches are recorded, never run."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.context: dict = {}

    def __enter__(self):
        from triton.runtime import autotuner, jit

        self._jit, self._auto = jit.JITFunction.run, autotuner.Autotuner.run
        cap = self

        def jit_run(fn, *args, grid=None, warmup=False, **kwargs):
            ctx = dict(cap.context)
            role = ctx.pop("role", "default")
            cfg = ()
            if "BLOCK_M" in kwargs and "BLOCK_N" in kwargs:
                cfg = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
            cap.launches.append(Launch(fn, args, dict(kwargs), role=ctx.pop("autotune_role", role), config=cfg, **ctx))
            return None

        def auto_run(tuner, *args, **kwargs):
            saved = dict(cap.context)
            cap.context["autotune_role"] = "autotune"
            try:
                for c in tuner.configs:
                    kw = {**kwargs, **c.all_kwargs()}
                    tuner.fn.run(*args, **kw)
            finally:
                cap.context = saved
            return None

        jit.JITFunction.run = jit_run
        autotuner.Autotuner.run = auto_run
        return self

    def __exit__(self, *exc):
        from triton.runtime import autotuner, jit

        jit.JITFunction.run, autotuner.Autotuner.run = self._jit, self._auto
        return False

    @contextlib.contextmanager
    def tag(self, **kw):
        saved = dict(self.context)
        self.context.update(kw)
        try:
            yield
        finally:
            self.context = saved


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def capture_launches(dtypes: list[str], defaults_only: bool, archs=(90,)) -> list[Launch]:
    """Every launch the launchers make at the shapes, planned for each target in turn (the
    launch policy may choose per target)."""
    from fastmask.kernels import attention_launch as al

    launches = []
    real = al._device_arch
    try:
        for arch in archs:
            al._device_arch = lambda arch=arch: arch
            for ln in _capture(dtypes, defaults_only):
                ln.arch = arch
                launches.append(ln)
    finally:
        al._device_arch = real
    return launches


def _capture(dtypes: list[str], defaults_only: bool) -> list[Launch]:
    from fastmask import _env
    from fastmask import kernels as fk
    from fastmask.kernels import attention_launch as al

    cap = _Capture()
    with cap:
        for dname in dtypes:
            dt = DTYPES[dname]
            for L, D, H in ATTENTION:
                hd = D // H
                qkv = _meta(B, L, 3, H, hd, dtype=dt)
                out, lse = _meta(B, L, D, dtype=dt), _meta(B, H, L, dtype=torch.float32)
                modes = [("0", "default")] if (defaults_only or dt == torch.float32) else [("0", "default"), ("1", "autotune")]
                for flag, _ in modes:  # launches through the autotuner are tagged by auto_run
                    os.environ["FASTMASK_ATTN_AUTOTUNE"] = flag
                    _env.reload()  # fastmask reads its variables at import and on reload only
                    al._fixed_choice.clear()
                    shape = f"L={L} H={H} hd={hd}"
                    # forward; one-pass backward (delta + bwd); deterministic backward (dq + dkdv)
                    for call in (lambda: fk.attention_fwd(qkv, hd**-0.5),
                                 lambda: fk.attention_bwd(out, qkv, out, lse, hd**-0.5, deterministic=False),
                                 lambda: fk.attention_bwd(out, qkv, out, lse, hd**-0.5, deterministic=True)):
                        before = len(cap.launches)
                        with cap.tag(op="attention", shape=shape, dtype=dname):
                            call()
                        for ln in cap.launches[before:]:
                            ln.kind = _attention_kind(ln)
            # modern blocks: RoPE (rows gathered by ids_keep on the kept tokens) + qk-norm, in the
            # heuristic config (the prologue bypasses the autotuner)
            os.environ["FASTMASK_ATTN_AUTOTUNE"] = "0"
            for L, D, H in ATTENTION:
                hd = D // H
                al._fixed_choice.clear()
                qkv = _meta(B, L, 3, H, hd, dtype=dt)
                out, lse = _meta(B, L, D, dtype=dt), _meta(B, H, L, dtype=torch.float32)
                cs = _meta(N, hd, dtype=torch.float32)
                ids = torch.empty(B, L, dtype=torch.int64, device="meta") if L < N else None
                w = _meta(hd, dtype=torch.float32)
                pro = (cs, cs, ids, w, w, 1e-6)
                for call in (lambda: fk.attention_rope_fwd(qkv, hd**-0.5, *pro),
                             lambda: fk.attention_rope_bwd(out, qkv, out, lse, hd**-0.5, *pro, deterministic=False),
                             lambda: fk.attention_rope_bwd(out, qkv, out, lse, hd**-0.5, *pro, deterministic=True)):
                    before = len(cap.launches)
                    with cap.tag(op="attention_rope", shape=f"L={L} H={H} hd={hd}" + (" ids" if ids is not None else ""),
                                 dtype=dname):
                        call()
                    for ln in cap.launches[before:]:
                        ln.kind = _attention_kind(ln)
            for D in WIDTHS:
                L = K if D == 1152 else N
                x, y = _meta(B, L, D, dtype=dt), _meta(B, L, D, dtype=dt)
                vec = _meta(B, D, dtype=dt)
                mean = rstd = _meta(B, L, dtype=torch.float32)
                shape = f"L={L} D={D}"
                calls = {
                    "layernorm_modulate": lambda: (fk.layernorm_modulate_fwd(x, vec, vec, 1e-6),
                                                   fk.layernorm_modulate_bwd(x, x, vec, mean, rstd)),
                    "gated_residual": lambda: (fk.gated_residual_fwd(x, y, vec), fk.gated_residual_bwd(x, y, vec)),
                    "residual_layernorm_modulate": lambda: (
                        fk.residual_layernorm_modulate_fwd(x, y, vec, vec, vec, 1e-6),
                        fk.residual_layernorm_modulate_bwd(x, x, x, y, vec, vec, mean, rstd)),
                }
                w = _meta(D, dtype=torch.float32)
                calls["rmsnorm_modulate"] = lambda: (fk.rmsnorm_modulate_fwd(x, vec, vec, w, 1e-6),
                                                     fk.rmsnorm_modulate_bwd(x, x, vec, w, rstd))
                calls["residual_rmsnorm_modulate"] = lambda: (
                    fk.residual_rmsnorm_modulate_fwd(x, y, vec, vec, vec, w, 1e-6),
                    fk.residual_rmsnorm_modulate_bwd(x, x, x, y, vec, vec, w, rstd))
                F_mlp = int(2 / 3 * 4 * D)
                ab = _meta(B, L, 2 * F_mlp, dtype=dt)
                calls["swiglu"] = lambda: (fk.swiglu_fwd(ab), fk.swiglu_bwd(_meta(B, L, F_mlp, dtype=dt), ab))
                ids = torch.empty(B, K, dtype=torch.int64, device="meta")
                pos = _meta(N, D, dtype=torch.float32)
                full, vis = _meta(B, N, D, dtype=dt), _meta(B, K, D, dtype=dt)
                calls["gather_tokens"] = lambda: (fk.gather_tokens_fwd(full, ids, pos), fk.gather_tokens_bwd(vis, ids, N, True))
                calls["unmask_tokens"] = lambda: (fk.unmask_tokens_fwd(vis, ids, _meta(D, dtype=torch.float32), N, pos),
                                                  fk.unmask_tokens_bwd(full, ids, True))
                calls["scatter_tokens"] = lambda: (fk.scatter_tokens_fwd(vis, ids, full, N),
                                                   fk.scatter_tokens_fwd(vis, ids, None, N),  # zero fill
                                                   fk.scatter_tokens_bwd(full, ids, True))
                for op, call in calls.items():
                    with cap.tag(op=op, shape=shape if "tokens" not in op else f"N={N} K={K} D={D}", dtype=dname):
                        call()
            F = _meta(B, N, P, dtype=dt)
            with cap.tag(op="dsm_mae_loss", shape=f"N={N} P={P}", dtype=dname):
                fk.dsm_mae_loss_fwd(F, _meta(B, N, P, dtype=torch.float32), _meta(B, N, P, dtype=torch.float32),
                                    _meta(B, dtype=torch.float32), _meta(B, N, dtype=torch.float32), 0.1, 0.5)
    os.environ.pop("FASTMASK_ATTN_AUTOTUNE", None)
    _env.reload()
    return cap.launches


def _attention_kind(ln: Launch) -> str:
    """The launch policy's kind of a captured attention launch (kinds may share one kernel
    and differ in constexprs, as the one-pass and deterministic dk/dv do)."""
    from fastmask.kernels import attention_launch as al

    for kind, k in al.KERNELS.items():
        if (k is ln.fn or getattr(k, "fn", None) is ln.fn) and all(
            ln.kwargs.get(c) == v for c, v in al.kind_constexprs(kind).items()
        ):
            return kind
    return ""


# ----------------------------------------------------------------------------- bytes moved
# The memory-bound ops at DiT-XL/2 shapes (LightningDiT's RMSNorm and SwiGLU ops at the same widths): the bytes their launches move, counted from the
# captured launches, against the bytes the op must move (benchmarks/bench_ops.minimum_bytes).
# The launchers plan their programs for an H100/H200 (132 SMs): split reductions size their
# fp32 partial buffers from the SM count, and those partials are traffic no op needs.
SM90_SMS = 132
BYTES_LIMIT = 1.10  # every op within 10% of its minimum (tests/test_static_gpu.py) ...
# ... except the adaLN backwards, whose fp32 per-sample partials (about four programs per SM)
# may add up to 20%: more, smaller programs ran them 1.15-2.3x faster on an H200 than a plan
# that kept the partials within 6% (benchmarks/tune_norm.py; fastmask/kernels/norm.py)
BYTES_LIMIT_NORM_BWD = 1.20
NORM_OPS = ("layernorm_modulate", "residual_layernorm_modulate", "rmsnorm_modulate", "residual_rmsnorm_modulate",
            "gated_residual")


def bytes_limit(op: str, mode: str) -> float:
    """The most bytes an op's launches may move, as a multiple of its minimum."""
    return BYTES_LIMIT_NORM_BWD if op in NORM_OPS and mode == "backward" else BYTES_LIMIT

# Tensor arguments a kernel touches only in part; every other tensor argument is read or
# written whole (each tensor counted once per launch: the launchers pass one tensor for the
# pointers a constexpr switch leaves unused). kernel -> {argument: fraction touched}.
_PARTIAL_ARGS = {
    "_gather_fwd_kernel": {"X": lambda a: a["K"] / a["N"]},  # the kept rows of x
    # the fill's rows no kept token overwrites (without a fill the output stands in for it: written whole)
    "_scatter_fwd_kernel": {"FILL": lambda a: 1 - a["K"] / a["N"] if a["HAS_FILL"] else 1.0},
    # reads the inverse ids at the kept tokens, writes only rows no kept token owns (none here)
    "_zero_orphan_rows_kernel": {"INV": lambda a: a["K"] / a["N"], "GXV": lambda a: 0.0},
}


def launch_bytes(ln: Launch) -> int:
    """Bytes a captured launch reads and writes (see _PARTIAL_ARGS for the exceptions)."""
    names = ln.fn.arg_names
    args = dict(zip(names, ln.args))
    args.update({k: v for k, v in ln.kwargs.items() if k in names})
    partial = _PARTIAL_ARGS.get(ln.fn.__name__, {})
    seen, total = set(), 0
    for name, v in args.items():
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            frac = partial[name](args) if name in partial else 1.0
            total += int(v.numel() * v.element_size() * frac)
    return total


def byte_count(dtypes: list[str]) -> list[dict]:
    """One row per (op, shape, dtype, mode, variant): bytes moved, the minimum, their ratio."""
    from benchmarks.bench_ops import minimum_bytes
    from fastmask import kernels as fk
    from fastmask.kernels import _utils, norm, tokens

    def F_of(D):  # LightningDiT's SwiGLU width for a block of width D
        return int(2 / 3 * 4 * D)

    rows = []
    cap = _Capture()
    saved = {m: m.target_programs for m in (norm, tokens)}
    try:
        for m in saved:
            m.target_programs = lambda t: 8 * SM90_SMS  # what _utils.target_programs gives on that GPU
        with cap:
            for dname in dtypes:
                dt = DTYPES[dname]
                e = torch.empty((), dtype=dt).element_size()
                for D in WIDTHS:
                    L = K if D == 1152 else N
                    # one tensor per argument (a launch counts each tensor once)
                    act = lambda: _meta(B, L, D, dtype=dt)  # noqa: E731
                    vec = lambda: _meta(B, D, dtype=dt)  # noqa: E731
                    stat = lambda: _meta(B, L, dtype=torch.float32)  # noqa: E731
                    ids = torch.empty(B, K, dtype=torch.int64, device="meta")
                    pos = _meta(N, D, dtype=torch.float32)
                    full, vis = _meta(B, N, D, dtype=dt), _meta(B, K, D, dtype=dt)
                    mt = _meta(D, dtype=torch.float32)
                    calls = [
                        ("layernorm_modulate", "", "forward", lambda: fk.layernorm_modulate_fwd(act(), vec(), vec(), 1e-6)),
                        ("layernorm_modulate", "", "backward",
                         lambda: fk.layernorm_modulate_bwd(act(), act(), vec(), stat(), stat())),
                        ("gated_residual", "", "forward", lambda: fk.gated_residual_fwd(act(), act(), vec())),
                        ("gated_residual", "", "backward", lambda: fk.gated_residual_bwd(act(), act(), vec())),
                        ("residual_layernorm_modulate", "", "forward",
                         lambda: fk.residual_layernorm_modulate_fwd(act(), act(), vec(), vec(), vec(), 1e-6)),
                        ("residual_layernorm_modulate", "", "backward",
                         lambda: fk.residual_layernorm_modulate_bwd(act(), act(), act(), act(), vec(), vec(), stat(), stat())),
                        ("rmsnorm_modulate", "", "forward",
                         lambda: fk.rmsnorm_modulate_fwd(act(), vec(), vec(), _meta(D, dtype=torch.float32), 1e-6)),
                        ("rmsnorm_modulate", "", "backward",
                         lambda: fk.rmsnorm_modulate_bwd(act(), act(), vec(), _meta(D, dtype=torch.float32), stat())),
                        ("residual_rmsnorm_modulate", "", "forward",
                         lambda: fk.residual_rmsnorm_modulate_fwd(act(), act(), vec(), vec(), vec(),
                                                                  _meta(D, dtype=torch.float32), 1e-6)),
                        ("residual_rmsnorm_modulate", "", "backward",
                         lambda: fk.residual_rmsnorm_modulate_bwd(act(), act(), act(), act(), vec(), vec(),
                                                                  _meta(D, dtype=torch.float32), stat())),
                        ("swiglu", "", "forward", lambda: fk.swiglu_fwd(_meta(B, L, 2 * F_of(D), dtype=dt))),
                        ("swiglu", "", "backward", lambda: fk.swiglu_bwd(_meta(B, L, F_of(D), dtype=dt),
                                                                         _meta(B, L, 2 * F_of(D), dtype=dt))),
                        ("gather_tokens", "", "forward", lambda: fk.gather_tokens_fwd(full, ids, pos)),
                        ("gather_tokens", "", "backward", lambda: fk.gather_tokens_bwd(vis, ids, N, False)),
                        ("gather_tokens", "pos_grad", "backward", lambda: fk.gather_tokens_bwd(vis, ids, N, True)),
                        ("unmask_tokens", "", "forward", lambda: fk.unmask_tokens_fwd(vis, ids, mt, N, pos)),
                        ("unmask_tokens", "", "backward", lambda: fk.unmask_tokens_bwd(full, ids, False)),
                        ("unmask_tokens", "pos_grad", "backward", lambda: fk.unmask_tokens_bwd(full, ids, True)),
                        ("scatter_tokens", "", "forward", lambda: fk.scatter_tokens_fwd(vis, ids, full, N)),
                        ("scatter_tokens", "zero_fill", "forward", lambda: fk.scatter_tokens_fwd(vis, ids, None, N)),
                        ("scatter_tokens", "", "backward", lambda: fk.scatter_tokens_bwd(full, ids, True)),
                        ("scatter_tokens", "no_fill_grad", "backward", lambda: fk.scatter_tokens_bwd(full, ids, False)),
                    ]
                    for op, variant, mode, call in calls:
                        before = len(cap.launches)
                        with cap.tag(op=op, shape="", dtype=dname):
                            call()
                        moved = sum(launch_bytes(ln) for ln in cap.launches[before:])
                        dims = dict(B=B, D=D, L=L) if "tokens" not in op else dict(B=B, D=D, N=N, K=K)
                        least = minimum_bytes(op, e=e, pos_grad=variant == "pos_grad", fill=variant != "zero_fill",
                                              fill_grad=variant != "no_fill_grad", **dims)[mode]
                        shape = f"L={L} D={D}" if "tokens" not in op else f"N={N} K={K} D={D}"
                        rows.append(dict(op=op, variant=variant, mode=mode, dtype=dname, shape=shape, bytes=moved,
                                         minimum=least, ratio=moved / least,
                                         launches=[ln.fn.__name__ for ln in cap.launches[before:]]))
                F = _meta(B, N, P, dtype=dt)
                before = len(cap.launches)
                with cap.tag(op="dsm_mae_loss", shape="", dtype=dname):
                    fk.dsm_mae_loss_fwd(F, _meta(B, N, P, dtype=torch.float32), _meta(B, N, P, dtype=torch.float32),
                                        _meta(B, dtype=torch.float32), _meta(B, N, dtype=torch.float32), 0.1, 0.5)
                moved = sum(launch_bytes(ln) for ln in cap.launches[before:])
                # one pass gives the loss and dLoss/dF: against the minimum of both
                least = minimum_bytes("dsm_mae_loss", B=B, N=N, P=P, e=e)["backward"]
                rows.append(dict(op="dsm_mae_loss", variant="", mode="forward+backward", dtype=dname,
                                 shape=f"N={N} P={P}", bytes=moved, minimum=least, ratio=moved / least,
                                 launches=[ln.fn.__name__ for ln in cap.launches[before:]]))
    finally:
        for m, f in saved.items():
            m.target_programs = f
    return rows


def bytes_markdown(rows: list[dict]) -> list[str]:
    worst = max(rows, key=lambda r: r["ratio"]) if rows else None
    lines = ["", "## Bytes moved by the memory-bound ops", "",
             f"Counted from the launches the launchers make at DiT-XL/2 shapes (batch {B}), planned for an "
             f"H100/H200 ({SM90_SMS} SMs): each tensor argument of a launch read or written once (the kept rows "
             "of a gather's input), fp32 partial buffers included; against `benchmarks/bench_ops.minimum_bytes`. "
             f"Limit {BYTES_LIMIT:.2f}x ({BYTES_LIMIT_NORM_BWD:.2f}x for the adaLN backwards: their per-sample "
             "partials buy parallelism, measured faster)" + (f"; worst {worst['ratio']:.3f}x ({worst['op']} {worst['mode']}, "
                                              f"{worst['dtype']}, {worst['shape']})." if worst else "."), "",
             "| op | mode | dtype | shape | MB moved | MB minimum | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        op = r["op"] + (f" ({r['variant']})" if r["variant"] else "")
        ratio = f"{r['ratio']:.3f}"
        lines.append(f"| {op} | {r['mode']} | {r['dtype']} | {r['shape']} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['minimum'] / 1e6:.2f} | {'**' + ratio + '**' if r['ratio'] > bytes_limit(r['op'], r['mode']) else ratio} |")
    return lines


# ----------------------------------------------------------------------------- compile
def _source(launch: Launch, target):
    """(ASTSource, options) exactly as JITFunction.run builds them for this target."""
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def _cache_key(src, options, target) -> str:
    h = hashlib.sha256()
    h.update(src.hash().encode())
    h.update(repr(sorted((k, str(v)) for k, v in options.__dict__.items() if k != "extern_libs")).encode())
    h.update(f"{target}|{triton.__version__}".encode())
    return h.hexdigest()[:32]


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _ptxas_report(log: str, ptx: str, arch: int) -> dict:
    if not _PTXAS.search(log):  # an older Triton that does not print the log: run ptxas -v ourselves
        log = _run_ptxas(ptx, arch)
    m, s, st = _PTXAS.search(log), _SPILL.search(log), _STACK.search(log)
    return {
        "regs": int(m.group(1)) if m else None,
        "spill_stores": int(s.group(1)) if s else None,
        "spill_loads": int(s.group(2)) if s else None,
        "stack": int(st.group(1)) if st else None,
    }


def _run_ptxas(ptx: str, arch: int) -> str:
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    exe = str(exe) if exe.exists() else shutil.which("ptxas")
    if not exe:
        return ""
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([exe, "-v", f"--gpu-name={sm}", str(p), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, timeout=600)
        return r.stdout + r.stderr


_JOBS: list = []


def _compile_job(i: int) -> dict:
    launch, arch = _JOBS[i]
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    t0 = time.time()
    try:
        src, options = _source(launch, target)
        key = _cache_key(src, options, target)
        hit = CACHE / f"{key}.json"
        if hit.exists():
            return {**json.loads(hit.read_text()), "cached": True}
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=target, options=options.__dict__)
        ptx = k.asm.get("ptx", "")
        res = {
            "name": k.metadata.name,
            "shared": int(k.metadata.shared),
            "num_warps": int(k.metadata.num_warps),
            "num_stages": int(k.metadata.num_stages),
            "wgmma": "wgmma.mma_async" in ptx,
            "mma": "mma.sync" in ptx,
            **_ptxas_report(buf.getvalue(), ptx, arch),
            "compile_s": round(time.time() - t0, 2),
        }
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = hit.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, hit)
        return {**res, "cached": False}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:400]}", "compile_s": round(time.time() - t0, 2)}


def blocks_per_sm(regs: int | None, warps: int, shared: int, arch: int) -> int | None:
    """Resident blocks per SM from registers (allocated per warp in units of 256), warps
    and shared memory (1 KB reserved per block)."""
    if regs is None:
        return None
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_SM // (per_warp * warps)
    by_warps = MAX_WARPS_SM // warps
    by_smem = SMEM_SM[arch] // (shared + 1024) if shared else MAX_BLOCKS_SM
    return max(0, min(by_regs, by_warps, by_smem, MAX_BLOCKS_SM))


def compile_all(launches: list[Launch], archs: list[int], jobs: int) -> list[dict]:
    """One row per (unique compile, target)."""
    rows, seen = [], {}
    global _JOBS
    _JOBS = []
    for ln in launches:
        for arch in archs:
            if arch != ln.arch:
                continue
            ident = (id(ln.fn), _launch_ident(ln), arch)
            if ident in seen:
                seen[ident]["uses"].append(ln)
                continue
            entry = {"launch": ln, "arch": arch, "uses": [ln]}
            seen[ident] = entry
            rows.append(entry)
            _JOBS.append((ln, arch))
    if jobs > 1 and len(_JOBS) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_job, range(len(_JOBS)), chunksize=1)
    else:
        results = [_compile_job(i) for i in range(len(_JOBS))]
    out = []
    for entry, res in zip(rows, results):
        ln, arch = entry["launch"], entry["arch"]
        roles = sorted({u.role for u in entry["uses"]})
        r = {
            "kernel": getattr(ln.fn, "__name__", str(ln.fn)),
            "op": ln.op,
            "kind": ln.kind,
            "shape": ln.shape,
            "shapes": sorted({u.shape for u in entry["uses"]}),
            "dtype": ln.dtype,
            "role": "default" if "default" in roles else roles[0],
            "roles": roles,
            "config": list(ln.config) if ln.config else [ln.kwargs.get("num_warps", 4), ln.kwargs.get("num_stages", 3)],
            "constexprs": {k: v for k, v in ln.kwargs.items() if isinstance(v, (int, bool, str)) and k.isupper()},
            "arch": arch,
            **res,
        }
        if "error" not in r:
            r["fits_smem"] = r["shared"] <= SMEM_BLOCK[arch]
            r["blocks_per_sm"] = blocks_per_sm(r.get("regs"), r["num_warps"], r["shared"], arch)
            if ln.kind:
                r["pruned"] = _pruned(ln, arch)
        out.append(r)
    return out


def _launch_ident(ln: Launch) -> str:
    def norm(v):
        if isinstance(v, torch.Tensor):
            return f"T[{v.dtype}]"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"i{'1' if v == 1 else ('16' if v % 16 == 0 else '')}"
        return repr(v)

    # runtime integers specialise only as == 1 / divisible by 16; keyword arguments are
    # constexprs and launch options, compiled per value
    kw = {k: v for k, v in ln.kwargs.items() if v is not None}
    return repr([norm(a) for a in ln.args]) + repr(sorted((k, repr(v)) for k, v in kw.items()))


def _pruned(ln: Launch, arch: int) -> bool:
    """Whether the autotuner's pruning drops this config on this target."""
    from fastmask.kernels import attention_launch as al

    if not ln.config:
        return False
    m, n, w, s = ln.config
    named = dict(zip([p.name for p in ln.fn.params], ln.args))
    named.update({k: v for k, v in ln.kwargs.items()})
    cfg = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    kept = al.prune_for_target(ln.kind, [cfg], named, arch=arch, keep_one=False)
    return not kept


# ----------------------------------------------------------------------------- CUDA C++
def cuda_report(archs: list[int], jobs: int | None = None) -> list[dict]:
    """nvcc -Xptxas -v of every kernel source, per arch; cached by source + flags hash. The
    (source, arch) compiles run in parallel (``jobs``, default the CPU count); rows come in
    source order, then arch order."""
    import concurrent.futures

    from fastmask.cuda_ext import build_module  # csrc/build.py, loaded in one place

    build = build_module()
    build.ensure_cuda_home()
    if build.nvcc_path() is None:
        return [{"error": "nvcc not found"}]
    pairs = [(source, arch) for source in build.KERNEL_SOURCES for arch in archs]
    workers = max(1, min(len(pairs), jobs or os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: _nvcc_report(build, *p), pairs))
    return [row for rows in results for row in rows]


def _nvcc_report(build, source: str, arch: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        cmd = build.nvcc_command(str(ROOT / "csrc" / source), str(Path(d) / "k.o"), (str(arch),)) + ["-Xptxas", "-v"]
        h = hashlib.sha256(" ".join(c for c in cmd if d not in c).encode())
        for name in (source,) + tuple(build.HEADERS):
            h.update((ROOT / "csrc" / name).read_bytes())
        hit = CACHE / f"nvcc2-{source}-{arch}-{h.hexdigest()[:24]}.json"
        if hit.exists():
            return json.loads(hit.read_text())
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            return [{"source": source, "arch": arch, "error": (r.stderr or r.stdout)[-400:]}]
        found = _parse_nvcc(r.stdout + r.stderr, source, arch, time.time() - t0)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = hit.with_suffix(f".{os.getpid()}.{arch}.tmp")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, hit)
        return found


def _parse_nvcc(log: str, source: str, arch: int, seconds: float) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)", line)
        if m:
            cur = {"source": source, "arch": arch, "mangled": m.group(1)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        if (s := _SPILL.search(line)):
            cur["spill_stores"], cur["spill_loads"] = int(s.group(1)), int(s.group(2))
        if (st := _STACK.search(line)):
            cur["stack"] = int(st.group(1))
        if (u := _PTXAS.search(line)):
            cur["regs"] = int(u.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["shared"] = int(sm.group(1)) if sm else 0
    for r in rows:
        r["compile_s"] = round(seconds, 1)
    return rows


def _demangle(name: str) -> str:
    """``unmask_bwd_kernel<bf16, 4>`` from a mangled kernel name (as is without c++filt)."""
    exe = shutil.which("c++filt")
    if not exe:
        return name
    try:
        out = subprocess.run([exe, name], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return name
    out = out.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth, end = 0, len(out)
    for i, ch in enumerate(out):  # the argument list starts at the first '(' outside <...>
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            end = i
            break
    out = out[:end].removeprefix("fastmask::")
    for a, b in (("__nv_bfloat16", "bf16"), ("c10::BFloat16", "bf16"), ("__half", "fp16"), ("c10::Half", "fp16"),
                 ("float", "fp32"), ("(bool)1", "true"), ("(bool)0", "false")):
        out = out.replace(a, b)
    return out or name


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict], cuda_rows: list[dict], meta: dict) -> str:
    lines = [f"# Static GPU check ({meta['date']})", "",
             f"triton {meta['triton']}, torch {meta['torch']}; targets " + ", ".join(TARGETS[a] for a in meta["archs"])
             + f"; {meta['compiles']} compiles ({meta['cached']} cached) in {meta['seconds']:.0f} s.", "",
             "Shapes: DiT-XL/2 at 256 px (N 256, K 128; D 1152 with 16 heads of 72 or 18 of 64; decoder D 512, "
             "16 heads of 32). Blocks/SM from registers, warps and shared memory. `role` default = what runs "
             "without autotuning; autotune configs marked `pruned` are dropped for that target.", ""]
    bad = [r for r in rows if r.get("error") or (r["role"] == "default" and (r.get("spill_stores") or not r.get("fits_smem")))]
    lines.append(f"**Default configs**: {sum(1 for r in rows if r['role'] == 'default')} compiles, "
                 f"{len(bad)} with spills, errors or too much shared memory.")
    lines.append("")
    lines += ["| kernel | op | dtype | shape | config | role | target | regs | spill B | smem KB | blocks/SM | wgmma | pruned |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"default": 0, "autotune": 1}
    for r in sorted(rows, key=lambda r: (r["op"], r["kind"], r["kernel"], r["dtype"], order.get(r["role"], 2), r["shape"],
                                          r["config"], -r["arch"])):
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['op']} | {r['dtype']} | {r['shape']} | {r['config']} | {r['role']} | "
                         f"sm_{r['arch']} | ERROR: {r['error'][:120]} | | | | | |")
            continue
        cfg = "x".join(str(c) for c in r["config"][:2]) + (f" w{r['config'][2]} s{r['config'][3]}" if len(r["config"]) == 4
                                                           else "") if r["kind"] else f"w{r['num_warps']}"
        spill = r.get("spill_stores")
        op = f"{r['op']} ({r['kind']})" if r["kind"] else r["op"]
        lines.append(
            f"| {r['kernel']} | {op} | {r['dtype']} | {r['shape']} | {cfg} | {r['role']} | sm_{r['arch']} | {r.get('regs')} "
            f"| {'**' + str(spill) + '**' if spill else spill} | {r['shared'] / 1024:.1f} | {r.get('blocks_per_sm')} "
            f"| {'yes' if r.get('wgmma') else ('mma' if r.get('mma') else '-')} | {'yes' if r.get('pruned') else '-'} |")
    if meta.get("bytes"):
        lines += bytes_markdown(meta["bytes"])
    if cuda_rows:
        bad = [r for r in cuda_rows if r.get("error") or r.get("spill_stores") or r.get("spill_loads")]
        lines += ["", "## CUDA C++ (nvcc -Xptxas -v)", "",
                  f"**Kernel instantiations**: {sum(1 for r in cuda_rows if not r.get('error'))} compiles, "
                  f"{len(bad)} with spills or errors.", "",
                  "| source | kernel | target | regs | spill B | stack B | smem B |",
                  "|---|---|---|---|---|---|---|"]
        for r in cuda_rows:
            if r.get("error"):
                lines.append(f"| {r.get('source', '-')} | ERROR: {r['error'][:200]} | sm_{r.get('arch', '?')} | | | | |")
                continue
            spill = r.get("spill_stores")
            lines.append(f"| {r['source']} | {_demangle(r['mangled'])} | sm_{r['arch']} | {r.get('regs')} | "
                         f"{'**' + str(spill) + '**' if spill else spill} | {r.get('stack')} | {r.get('shared')} |")
    return "\n".join(lines) + "\n"


def _prepare_env() -> None:
    """Compile for real, always run ptxas (its -v report is what we read) and let it print
    that report. Must run before fastmask.kernels is imported: under TRITON_INTERPRET=1 the
    kernels would be interpreter functions, which do not compile."""
    if "fastmask.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("static_check: fastmask.kernels was imported under TRITON_INTERPRET=1; run it as a script")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    if "fastmask._env" in sys.modules:  # imported before (as a module, not a script): read it again
        sys.modules["fastmask._env"].reload()


def run(dtypes, archs, defaults_only=False, with_cuda=True, jobs=None, ops=None) -> tuple[list[dict], list[dict], dict]:
    _prepare_env()
    t0 = time.time()
    launches = capture_launches(dtypes, defaults_only, archs)
    if ops:
        launches = [ln for ln in launches if ln.op in ops]
    rows = compile_all(launches, archs, jobs or min(os.cpu_count() or 1, 16))
    cuda_rows = cuda_report(archs, jobs) if with_cuda else []
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "archs": archs,
        "compiles": len(rows),
        "cached": sum(1 for r in rows if r.get("cached")),
        "seconds": time.time() - t0,
        "sources": kernel_sources_hash(),
        "bytes": byte_count(dtypes),
        "arguments_left_out": arguments_left_out(launches),
        "floats_not_fp32": floats_not_fp32(launches),
    }
    return rows, cuda_rows, meta


def floats_not_fp32(launches) -> list[str]:
    """``kernel: parameter`` for each float argument a kernel uses as it arrives. Triton's own
    launcher passes a Python float as fp32, torch.compile's as fp64, which promoted the attention
    kernel's loop-carried accumulators to fp64 and failed its compile (torch 2.11, H200): each
    kernel takes its float arguments as ``tl.full([], name, tl.float32)`` first."""
    import re

    out = set()
    for ln in launches:
        names = ln.fn.arg_names
        given = dict(zip(names, ln.args))
        given.update({k: v for k, v in ln.kwargs.items() if k in names})
        src = ln.fn.src
        constexprs = {names[i] for i in ln.fn.constexprs}
        for n, v in given.items():
            if isinstance(v, float) and n not in constexprs and not re.search(
                    rf"tl\.full\(\[\],\s*{re.escape(n)},\s*tl\.float32\)", src):
                out.add(f"{ln.fn.__name__}: {n}")
    return sorted(out)


def arguments_left_out(launches) -> list[str]:
    """``kernel: parameter`` for each kernel parameter a launch leaves to its default. Under
    torch.compile the launches go through ``wrap_triton``, whose mutation analysis and
    Inductor's generated launcher failed on such a launch (torch 2.11, H200): every launch names
    every parameter."""
    out = set()
    for ln in launches:
        names = ln.fn.arg_names
        given = set(names[: len(ln.args)]) | set(ln.kwargs)
        out |= {f"{ln.fn.__name__}: {n}" for n in names if n not in given}
    return sorted(out)


def kernel_sources_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "fastmask" / "kernels").glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile every Triton launch for sm_90 / sm_80 on the CPU and report resources")
    ap.add_argument("out", nargs="?", help="markdown report (default benchmarks/results/static_<date>.md)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--targets", default="90,80")
    ap.add_argument("--defaults-only", action="store_true", help="only the configs used without autotuning")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc report of csrc/")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count, at most 16)")
    ap.add_argument("--ops", default=None, help="only these ops' launches, comma-separated (default: every op)")
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; expected some of {list(DTYPES)}")
    try:
        archs = [int(a) for a in args.targets.split(",") if a.strip()]
    except ValueError:
        ap.error("--targets: expected compute capabilities like 90,80")
    if any(a not in TARGETS for a in archs):
        ap.error(f"--targets: expected some of {list(TARGETS)}")
    ops = {o.strip() for o in args.ops.split(",") if o.strip()} if args.ops else None
    rows, cuda_rows, meta = run(dtypes, archs, args.defaults_only, not args.no_cuda, args.jobs, ops)
    md = markdown(rows, cuda_rows, meta)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"static_{_dt.date.today():%Y%m%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "triton": rows, "cuda": cuda_rows}, indent=1, default=str) + "\n")
    print(md)
    errors = [r for r in rows if r.get("error")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared machinery of the benchmark suite: run mode, environment record, timing, ceilings, results.

Run modes (environment variables, read once per process):
    FASTMASK_BENCH_MODE   ``full`` (default), ``quick`` (the GPU script's mode) or ``dry``
                          (tiny shapes, 2 rounds: proves the code paths, measures nothing).
                          On a machine without a GPU ``full`` and ``quick`` both run the reduced
                          CPU set (fp32, small shapes).
    FASTMASK_BENCH_JSON   where the session writes its JSON (default: benchmarks/results/
                          <device>_<date>_<mode>.json); rows are also appended to
                          ``<json>.partial.jsonl`` as they come, so a killed run keeps them.
    FASTMASK_BENCH_PART   ``headline`` (the GPU script's first benchmark stages: the 256 px
                          training rows, the ops at the headline shape), ``rest`` (everything
                          else) or ``all`` (default).
    FASTMASK_BENCH_PROVIDERS  comma-separated op providers to keep (default: all).
    FASTMASK_BENCH_JSONL  a JSON-lines file every row (and the session's environment and
                          ceilings) is also appended to, tagged ``gpu_stage`` =
                          ``FASTMASK_BENCH_STAGE`` (the GPU script's one results stream).
    FASTMASK_BENCH_DEADLINE  Unix time after which the remaining cases are skipped (the GPU
                          script uses it so that a stage ends cleanly inside its time cap).
    FASTMASK_BENCH_COMPILE   ``1`` runs the torch.compile providers on the CPU too (skipped there
                          by default: Inductor's C++ compile takes 10-50 s per graph on 2 cores).
    FASTMASK_BENCH_THREADS   torch threads on the CPU (default 1: see configure_torch).
    FASTMASK_BENCH_COMPILE_SCOPE  ``blocks`` (default: every transformer block compiled, quick to
                          compile) or ``model`` (the whole network forward) for the compiled
                          training-step variants.

Timing: every case runs inside pytest-benchmark's ``pedantic`` loop (so ``--benchmark-only``
and pytest-benchmark's own statistics work), and each round is also timed by the device
itself: CUDA events on a GPU (the L2 cache flushed before every round, as
``triton.testing.do_bench`` does), ``perf_counter`` on the CPU. The recorded figures are the
median and the 20/80 % quantiles of those device times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
SCHEMA = 1


# ----------------------------------------------------------------------------- mode, device
def bench_mode() -> str:
    mode = os.environ.get("FASTMASK_BENCH_MODE", "").strip().lower() or "full"
    if mode not in ("full", "quick", "dry"):
        raise ValueError(f"FASTMASK_BENCH_MODE: expected full, quick or dry, got {mode!r}")
    return mode


def bench_part() -> str:
    part = os.environ.get("FASTMASK_BENCH_PART", "").strip().lower() or "all"
    if part not in ("all", "headline", "rest"):
        raise ValueError(f"FASTMASK_BENCH_PART: expected all, headline or rest, got {part!r}")
    return part


def in_part(headline: bool) -> bool:
    """Whether a case (on the headline list or not) belongs to this run's part."""
    part = bench_part()
    return part == "all" or (part == "headline") == headline


def providers_kept() -> set[str] | None:
    v = os.environ.get("FASTMASK_BENCH_PROVIDERS", "").strip()
    return {p.strip() for p in v.split(",") if p.strip()} or None


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def on_gpu() -> bool:
    return device().type == "cuda"


def size_set() -> str:
    """Which grid the suites use: ``dry``, ``cpu``, ``quick`` (GPU) or ``full`` (GPU)."""
    mode = bench_mode()
    if mode == "dry":
        return "dry"
    if not on_gpu():
        return "cpu"
    return mode


def bench_dtype() -> torch.dtype:
    """bf16 on a GPU (how MaskDiT trains); fp32 on the CPU (bf16 there measures nothing useful)."""
    return torch.bfloat16 if on_gpu() else torch.float32


def compile_allowed() -> str | None:
    """None if torch.compile providers run here, else the reason they are skipped."""
    if on_gpu() or os.environ.get("FASTMASK_BENCH_COMPILE", "0") == "1":
        return None
    return "torch.compile is skipped on the CPU (Inductor's C++ build takes 10-50 s per graph); FASTMASK_BENCH_COMPILE=1 runs it"


def time_left() -> float | None:
    """Seconds until FASTMASK_BENCH_DEADLINE (None if no deadline)."""
    d = os.environ.get("FASTMASK_BENCH_DEADLINE")
    return None if not d else float(d) - time.time()


def configure_torch() -> None:
    """Settings every benchmark process shares (called once from conftest)."""
    # Microbenchmarks time the kernels, not the argument checks that sync with the device.
    os.environ.setdefault("FASTMASK_CHECK_VALUES", "0")
    import fastmask.ops

    fastmask.ops.reload_environment()  # fastmask reads its variables at import and on reload only
    dyn = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(dyn, name):
            setattr(dyn, name, max(64, getattr(dyn, name)))
    if hasattr(dyn, "accumulated_recompile_limit"):
        dyn.accumulated_recompile_limit = max(4096, dyn.accumulated_recompile_limit)
    if on_gpu():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # One thread by default: on a shared 2-core machine two OpenMP threads that wait for
        # each other make the timings erratic (a 5x spread seen); FASTMASK_BENCH_THREADS=N.
        torch.set_num_threads(int(os.environ.get("FASTMASK_BENCH_THREADS", "1")))


# ----------------------------------------------------------------------------- environment
def git_commit() -> dict:
    """The commit measured: ``FASTMASK_COMMIT`` when set (the GPU script sets it from its
    ``--commit``), else git's HEAD, but only where this source tree is itself the root of a git
    checkout: a copy of the tree inside another repository must not record that one's HEAD."""
    given = os.environ.get("FASTMASK_COMMIT", "").strip()
    if given:
        return {"commit": given, "dirty": None}

    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except Exception:
            return None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != ROOT.resolve():
        return {"commit": "unknown", "dirty": None}
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha or "uncommitted", "dirty": bool(status) if status is not None else None}


def device_name() -> str:
    if on_gpu():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def device_slug(name: str | None = None) -> str:
    name = name or device_name()
    name = re.sub(r"\(R\)|\(TM\)|CPU @.*|NVIDIA ", "", name)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40] or "device"


def env_info() -> dict:
    """Device, versions, commit and date: stored in every JSON and every extra_info."""
    info = {
        "device": device_name(),
        "device_type": device().type,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mode": bench_mode(),
        "size_set": size_set(),
        "dtype": str(bench_dtype()).replace("torch.", ""),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        **git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = None
        info["triton_error"] = f"{type(e).__name__}: {e}"
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except Exception:
        info["xformers"] = None
    try:
        import fastmask

        info["fastmask"] = fastmask.__version__
        info["backends"] = fastmask.ops.available_backends()
    except Exception as e:  # the JSON should still say why
        info["fastmask_error"] = f"{type(e).__name__}: {e}"
    if on_gpu():
        p = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["gpu_sm_count"] = p.multi_processor_count
        info["gpu_capability"] = f"{p.major}.{p.minor}"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    info["fastmask_check_values"] = os.environ.get("FASTMASK_CHECK_VALUES", "1") != "0"
    return info


@contextlib.contextmanager
def record_backends():
    """Yields a dict filled with {op: set of backends that really ran} inside the block.

    Uses ``fastmask.ops.dispatch.record_choices`` where the dispatcher has it; otherwise it
    wraps ``dispatch.select`` (the one point every op asks) for the duration of the block.
    """
    from fastmask.ops import dispatch

    native = getattr(dispatch, "record_choices", None)
    if native is not None:
        with native() as got:
            yield got
        return
    got: dict = {}
    real = dispatch.select

    def select(op, *tensors):
        name = real(op, *tensors)
        got.setdefault(op, set()).add(name)
        return name

    dispatch.select = select
    try:
        yield got
    finally:
        dispatch.select = real


def backends_field(got: dict) -> dict:
    """{op: "triton"} (or "torch+triton" where one op ran on several) for a result row."""
    return {op: "+".join(sorted(v)) for op, v in sorted(got.items())}


# ----------------------------------------------------------------------------- timing
def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def profile_step_ms(fn: Callable[[], object], steps: int = 3) -> dict:
    """torch.profiler over ``steps`` calls of ``fn``: ``host_issue_ms``, the CPU self time of all
    ops and runtime calls per step (waits in a device synchronize excluded), and ``gpu_ms``, the
    summed CUDA kernel time per step (None on the CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync()
    events = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in events if "Synchronize" not in e.key)
    gpu = None
    if on_gpu():
        gpu = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type == DeviceType.CUDA)
        gpu = gpu / 1e3 / steps
    return {"host_issue_ms": host / 1e3 / steps, "gpu_ms": gpu}


class RoundTimer:
    """Times each call of ``fn`` on the device: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.gpu = on_gpu()
        self._events: list = []
        self._host: list[float] = []

    def __call__(self, *args, **kwargs):
        if self.gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            torch.cuda.synchronize()  # so that pytest-benchmark's host timer sees the work too
        else:
            t0 = time.perf_counter()
            out = self.fn(*args, **kwargs)
            self._host.append((time.perf_counter() - t0) * 1e3)
        return out

    def times_ms(self) -> list[float]:
        if self.gpu:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self._events]
        return list(self._host)


_FLUSH: torch.Tensor | None = None


def flush_cache() -> None:
    """Evict the GPU's L2 (a 256 MB write, as triton.testing.do_bench does); no-op on the CPU."""
    global _FLUSH
    if not on_gpu():
        return
    if _FLUSH is None:
        _FLUSH = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")
    _FLUSH.zero_()


def summarize(times_ms: list[float]) -> dict:
    t = sorted(times_ms)
    if not t:
        return {}

    def q(p):  # linear-interpolated quantile
        x = (len(t) - 1) * p
        lo, hi = math.floor(x), math.ceil(x)
        return t[lo] + (t[hi] - t[lo]) * (x - lo)

    return {
        "median_ms": statistics.median(t),
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "min_ms": t[0],
        "max_ms": t[-1],
        "mean_ms": statistics.fmean(t),
        "rounds": len(t),
    }


@dataclasses.dataclass
class Budget:
    """How long to measure one case: rounds = target / estimated time, clamped."""

    warmup: int
    target_ms: float
    min_rounds: int
    max_rounds: int


def budget() -> Budget:
    return {
        "dry": Budget(warmup=1, target_ms=0.0, min_rounds=2, max_rounds=2),
        "cpu": Budget(warmup=1, target_ms=150.0, min_rounds=3, max_rounds=15),
        "quick": Budget(warmup=3, target_ms=60.0, min_rounds=8, max_rounds=100),
        "full": Budget(warmup=5, target_ms=300.0, min_rounds=20, max_rounds=500),
    }[size_set()]


def measure(benchmark, fn: Callable, setup: Callable | None = None, b: Budget | None = None) -> dict:
    """Time ``fn(*setup())`` (or ``fn()``) through pytest-benchmark's pedantic loop.

    ``setup`` runs before every round, untimed (e.g. the forward before a timed backward); the
    L2 cache is flushed after it. Returns the device-time summary (see :func:`summarize`) plus
    the warm-up time (which includes torch.compile's compile time on a first call).
    """
    b = b or budget()

    def _setup():
        args = setup() if setup is not None else ()
        flush_cache()
        return tuple(args), {}

    t0 = time.perf_counter()
    for _ in range(b.warmup):  # first calls: compile, autotune, allocator warm-up
        args, _ = _setup()
        fn(*args)
    sync()
    warmup_s = time.perf_counter() - t0
    rounds = b.min_rounds
    if b.target_ms > 0:
        probe = RoundTimer(fn)
        for _ in range(3):
            args, _ = _setup()
            probe(*args)
        est = max(statistics.median(probe.times_ms()), 1e-3)
        rounds = int(min(b.max_rounds, max(b.min_rounds, b.target_ms / est)))
    timed = RoundTimer(fn)
    benchmark.pedantic(timed, setup=_setup, rounds=rounds, iterations=1, warmup_rounds=0)
    out = summarize(timed.times_ms())
    out["warmup_s"] = warmup_s
    return out


def graph_ms(fn: Callable, calls: int = 10, rounds: int = 5) -> dict:
    """Device time of ``fn`` alone (ms per call), apart from the host's: ``calls`` calls captured
    in one CUDA graph, each after an L2 flush, replayed ``rounds`` times; the flushes, captured
    the same way in a graph of their own, are subtracted. A replay costs the host a few
    microseconds, so this is the kernels' time even where an eager call is host-bound.

    Returns ``{"gpu_ms": ...}``, or ``{"gpu_ms_error": why}`` where the call cannot be captured
    (a host sync inside it, an op without graph support). GPU only; ``{}`` on the CPU."""
    if not on_gpu():
        return {}

    def replay_ms(body) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, autotune, lazy init)
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end))
        del graph
        return best / calls

    def with_flush():
        flush_cache()
        fn()

    try:
        flush_cache()  # allocate the flush buffer outside any capture
        total = replay_ms(with_flush)
        flush = replay_ms(flush_cache)
    except Exception as e:  # capture refused: the row keeps its host-inclusive time only
        torch.cuda.synchronize()
        return {"gpu_ms_error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"gpu_ms": max(total - flush, 0.0)}


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings() -> dict:
    """The two rooflines, measured in this session: device copy bandwidth and matmul rate.

    Copy: ``dst.copy_(src)`` of a large buffer, bytes = read + written. Matmul: a large square
    matmul in the benchmark dtype (bf16 on a GPU, fp32 on the CPU), 2 n^3 FLOPs.
    """
    dev, dtype = device(), bench_dtype()
    sset = size_set()
    copy_numel = {"dry": 2**20, "cpu": 2**24}.get(sset, 2**28)  # fp32 elements: 4 MiB / 64 MiB / 1 GiB
    n = {"dry": 256, "cpu": 1024}.get(sset, 8192)
    reps = 5 if sset in ("dry", "cpu") else 30

    def timed(fn, reps):
        for _ in range(2):
            fn()
        t = RoundTimer(fn)
        for _ in range(reps):
            t()
        return statistics.median(t.times_ms())

    src = torch.randn(copy_numel, device=dev)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src), reps)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n, n, device=dev, dtype=dtype)
    bm = torch.randn(n, n, device=dev, dtype=dtype)
    mm_ms = timed(lambda: a @ bm, reps)
    del a, bm
    if on_gpu():
        torch.cuda.empty_cache()
    return {
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_gbps": copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_ms": mm_ms,
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
    }


def roofline(row: dict, ceilings: dict) -> dict:
    """GB/s and TFLOP/s of a timed row, and their share of the session's ceilings: from the
    device time alone (``gpu_ms``, CUDA-graph replay) where the row has it, else from the
    host-inclusive median (``roofline_from`` says which)."""
    t = row.get("gpu_ms") or row.get("median_ms")
    out = {}
    if not t:
        return out
    if row.get("bytes"):
        out["gbps"] = row["bytes"] / (t * 1e-3) / 1e9
        if ceilings.get("copy_gbps"):
            out["pct_copy_bw"] = 100.0 * out["gbps"] / ceilings["copy_gbps"]
    if row.get("flops"):
        out["tflops"] = row["flops"] / (t * 1e-3) / 1e12
        if ceilings.get("matmul_tflops"):
            out["pct_matmul"] = 100.0 * out["tflops"] / ceilings["matmul_tflops"]
    out["roofline_from"] = "gpu_ms" if row.get("gpu_ms") else "median_ms"
    bound = row.get("bound")
    if bound == "memory" and "pct_copy_bw" in out:
        out["roofline_pct"] = out["pct_copy_bw"]
    elif bound == "compute" and "pct_matmul" in out:
        out["roofline_pct"] = out["pct_matmul"]
    return out


# ----------------------------------------------------------------------------- results
def default_json_path() -> Path:
    date = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    return RESULTS_DIR / f"{device_slug()}_{date}_{size_set()}.json"


def json_path() -> Path:
    p = os.environ.get("FASTMASK_BENCH_JSON")
    return Path(p) if p else default_json_path()


class ResultLog:
    """Collects result rows; appends each to a .partial.jsonl as it comes, writes the JSON at the end."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial.jsonl")
        self.rows: list[dict] = []
        self.env: dict = {}
        self.ceilings: dict = {}
        self.summary: dict = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            self.partial.unlink()

    def add(self, row: dict) -> None:
        row = {k: v for k, v in row.items() if v is not None}
        self.rows.append(row)
        with open(self.partial, "a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
        self.stream(row)

    @staticmethod
    def stream(row: dict) -> None:
        """Append to FASTMASK_BENCH_JSONL (the GPU script's results stream), if set."""
        path = os.environ.get("FASTMASK_BENCH_JSONL")
        if path:
            row = {**row, "gpu_stage": os.environ.get("FASTMASK_BENCH_STAGE", "bench")}
            with open(path, "a") as f:
                f.write(json.dumps(row, default=_jsonable) + "\n")

    def document(self) -> dict:
        return {
            "schema": SCHEMA,
            "env": self.env,
            "ceilings": self.ceilings,
            "summary": self.summary,
            "results": self.rows,
        }

    def write(self) -> Path:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.document(), indent=1, default=_jsonable) + "\n")
        tmp.replace(self.path)
        if self.partial.exists():
            self.partial.unlink()
        return self.path


def _jsonable(x):
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    if isinstance(x, torch.Size):
        return list(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def load_rows_from_partial(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the last line of a killed run may be cut
    return rows


"""The CUDA C++ backend: csrc/ (kernels, bindings) and fastmask.cuda_ext (launchers).

Without a GPU (CI): every kernel source compiles with nvcc for one arch and the bindings
pass a host-compiler syntax check against the torch headers (``-m cuda_build``; results
cached by content hash in ~/.cache/fastmask-nvcc, so reruns are instant), and the backend
explains itself when fastmask._C is not built.

With a GPU (``-m gpu``; the extension is built with build_jit() when it is not installed):
each launcher against fastmask.ops.reference, forward and backward, fp32 / bf16 / fp16,
bf16/fp16 activations with fp32 modulation vectors, awkward shapes (D = 72, 1152, 20 and
1154 (scalar path, rows wider than the register cache), N = 59, B = 1, K = N), misaligned
inputs, poisoned outputs, bit-identical repeats of every backward; the same checks on the
Triton launchers (fastmask.kernels) where they import; and the public ops with
``fastmask.backend("cuda")``. Judged by flash-attention's rule: error vs an fp32 reference
<= 2x (outputs) / 3x (gradients) PyTorch's own error in the same precision, + a small atol.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import fastmask
from fastmask import cuda_ext
from fastmask.ops import dispatch
from fastmask.ops import reference as R
from helpers import assert_all_written, assert_close_to_ref, poisoned_empty

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


build = cuda_ext.build_module()

# ============================================================= compile check (no GPU)
CACHE = Path.home() / ".cache" / "fastmask-nvcc"
CHECK_ARCH = ("80",)  # one arch keeps the check fast; the real build adds sm_90
ALL_SOURCES = build.KERNEL_SOURCES + build.BINDING_SOURCES


def _tool_version(exe: str) -> str:
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _job(source: str):
    """(command, cache file) for one source; the cache key covers the sources, headers,
    command line, compiler version and torch version."""
    src = CSRC / source
    h = hashlib.sha256()
    for name in (source,) + build.HEADERS:
        h.update((CSRC / name).read_bytes())
    if source.endswith(".cu"):
        out = CACHE / f"{source}.@KEY@.o"
        cmd = build.nvcc_command(str(src), str(out), CHECK_ARCH)
    else:
        out = CACHE / f"{source}.@KEY@.ok"
        cmd = build.cxx_syntax_command(str(src))
    h.update(" ".join(c for c in cmd if "@KEY@" not in c).encode())
    h.update(_tool_version(cmd[0]).encode())
    h.update(torch.__version__.encode())
    key = h.hexdigest()[:20]
    return [c.replace("@KEY@", key) for c in cmd], Path(str(out).replace("@KEY@", key))


def _compile(source: str):
    cmd, done = _job(source)
    if done.exists():
        return True, "cached", 0.0
    done.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    partial = done.with_name(done.name + f".{os.getpid()}.tmp")  # never cache a half-written object
    cmd = [partial.as_posix() if c == done.as_posix() else c for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    secs = time.monotonic() - t0
    log = f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    if proc.returncode == 0:
        if source.endswith(".cpp"):
            partial.write_text(f"syntax ok in {secs:.0f} s\n")
        partial.replace(done)
    else:
        partial.unlink(missing_ok=True)
    return proc.returncode == 0, log, secs


@pytest.fixture(scope="module")
def compiled():
    """Compile every source once, in parallel (the cold run takes one to three minutes on
    2 cores, mostly the torch headers of the bindings); cached runs take a second."""
    if build.nvcc_path() is None:
        pytest.skip("nvcc not found (no CUDA toolkit: set CUDA_HOME); the CUDA compile check needs it")
    workers = max(1, min(len(ALL_SOURCES), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {s: pool.submit(_compile, s) for s in ALL_SOURCES}
        return {s: f.result() for s, f in futures.items()}


@pytest.mark.cuda_build
@pytest.mark.parametrize("source", ALL_SOURCES)
def test_source_compiles(compiled, source):
    ok, log, secs = compiled[source]
    assert ok, f"{source} failed to compile ({secs:.0f} s):\n{log[-8000:]}"


# ============================================================== build config (no GPU)
def test_extension_kwargs():
    kw = build.extension_kwargs()
    assert [Path(s).name for s in kw["sources"]] == list(build.SOURCES)
    assert all((ROOT / s).is_file() for s in kw["sources"]), "sources are relative to the repository root"
    nvcc = kw["extra_compile_args"]["nvcc"]
    assert "-O3" in nvcc and "-std=c++17" in nvcc and "--use_fast_math" not in nvcc
    assert "arch=compute_80,code=sm_80" in nvcc and "arch=compute_90,code=sm_90" in nvcc
    assert str(CSRC) in kw["include_dirs"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []) or []:
        cu13 = os.path.join(root, "cu13", "include")
        if os.path.isdir(cu13):
            assert cu13 in kw["include_dirs"]
    jit = build.jit_kwargs(("90",))
    assert all(os.path.isabs(s) for s in jit["sources"])
    assert "arch=compute_90,code=sm_90" in jit["extra_cuda_cflags"]
    assert not any("sm_80" in f for f in jit["extra_cuda_cflags"])


def test_arch_env(monkeypatch):
    monkeypatch.setenv(build.ARCH_ENV, "8.0;9.0")
    assert build.archs() == ("80", "90")
    monkeypatch.delenv(build.ARCH_ENV)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.archs() is None and build.gencode_flags(build.archs()) == []  # torch's own arch flags


def test_unavailable_reason_names_the_build(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_import_error", "No module named 'fastmask._C'")
    reason = cuda_ext.unavailable_reason()
    if torch.version.cuda is None:
        assert "CPU-only" in reason
    else:
        assert "not built" in reason and "FASTMASK_BUILD_CUDA=1" in reason and "build_jit()" in reason
    monkeypatch.setattr(cuda_ext, "_import_error", "undefined symbol: _ZN3c10...")
    if torch.version.cuda is not None:
        assert "could not be loaded" in cuda_ext.unavailable_reason()


def test_dispatcher_reports_missing_extension(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_import_error", "No module named 'fastmask._C'")
    why = dispatch.available_backends()["cuda"]
    assert why is not None and "fastmask._C" in why
    assert cuda_ext.unavailable_reason() in dispatch.why_not("cuda", "gather_tokens", [torch.zeros(1)])


def test_build_jit_explains_missing_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_ext, "csrc_dir", lambda: tmp_path / "csrc")
    with pytest.raises(FileNotFoundError, match="source checkout"):
        cuda_ext.build_jit()


# The launcher signatures: tests/test_dispatch.py checks both backends against
# fastmask.ops.registry.


def test_bindings_refuse_cpu_tensors():
    if cuda_ext._extension() is None:
        pytest.skip("fastmask._C is not built here (the compile check covers the sources)")
    x = torch.randn(2, 8, 16)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cuda_ext._C().gather_tokens_fwd(torch.empty(2, 4, 16), x, torch.zeros(2, 4, dtype=torch.long), None)


# ================================================ launcher tests: emulated, CUDA, Triton
# The same checks run on three implementations of the launchers:
#   emu     the real csrc/ kernels and bindings, compiled for the CPU emulator in
#           tests/cuda_emu (threads of a block are std::threads), on CPU tensors: CI runs
#           it, so indexing, synchronisation and reductions are tested without a GPU;
#   cuda    fastmask.cuda_ext with the compiled extension, on the GPU;
#   triton  fastmask.kernels (the Triton backend), on the GPU, for comparison.
EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"


def _load_emu_build():
    return cuda_ext.load_file(EMU_DIR / "build.py", "_fastmask_cuda_emu_build")


@pytest.fixture(scope="session")
def emu_module():
    """fastmask._C compiled for the CPU emulator (cached by torch per source hash; a cold
    build takes one to two minutes, mostly the torch headers)."""
    emu = _load_emu_build()
    if emu.cuda_include_dir() is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h): set CUDA_HOME; the emulated kernels need them")
    return emu.load_emulated()


@pytest.fixture(scope="session")
def cuda_backend():
    """fastmask.cuda_ext with a loaded extension: the installed fastmask._C, else build_jit()."""
    if cuda_ext.unavailable_reason() is not None:
        try:
            cuda_ext.build_jit()
        except Exception as e:  # a GPU machine must be able to build it: fail, don't skip
            pytest.fail(f"the CUDA extension is not installed and build_jit() failed: {type(e).__name__}: {e}")
    assert cuda_ext.unavailable_reason() is None
    return cuda_ext


class Impl:
    def __init__(self, name, mod, device):
        self.name, self.mod, self.device = name, mod, device

    def __getattr__(self, op):
        return getattr(self.mod, op)


IMPLS = [
    pytest.param("emu", marks=pytest.mark.cuda_build, id="emu"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
    pytest.param("triton", marks=pytest.mark.gpu, id="triton"),
]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    if request.param == "emu":
        monkeypatch.setattr(cuda_ext, "_ext", request.getfixturevalue("emu_module"))
        return Impl("emu", cuda_ext, "cpu")
    if request.param == "cuda":
        return Impl("cuda", request.getfixturevalue("cuda_backend"), "cuda")
    try:
        import fastmask.kernels as fk
    except Exception as e:  # Triton missing or broken: CUDA is still compared with the reference
        pytest.skip(f"fastmask.kernels (Triton) does not import: {e}")
    return Impl("triton", fk, "cuda")


def _emu_light(impl, size, primary):
    """The emulator runs every CUDA thread as a fiber: it takes the large cases (wide rows,
    many warps per row) in one dtype combination only, and skips the largest."""
    if impl.name == "emu" and (size > 1_000_000 or (size > 100_000 and not primary)):
        pytest.skip("too slow for the CPU emulator (covered on the GPU)")


DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (activations, modulation vectors / position table / mask token)
DTYPE_PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp16", "fp32")]


def _dirty_allocator(device):
    """Fill the CUDA caching allocator's free blocks with NaN, so that an internal buffer that
    at::empty hands out and a kernel forgets to write shows up as NaN downstream."""
    if device != "cuda":
        return
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (2**k for k in range(8, 25, 2)) for _ in range(2)]
    del blocks


def _gen(impl, seed):
    return torch.Generator(device=impl.device).manual_seed(seed)


def _rand(gen, *shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, device=gen.device) * scale + shift).to(dtype)


def _ids(gen, B, N, K):
    return torch.stack([torch.randperm(N, generator=gen, device=gen.device)[:K] for _ in range(B)])


def _misalign(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous tensor that starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _ref(fn, inputs, grads, upcast):
    """Run the reference on (optionally fp32-upcast) leaf copies; return outputs and grads."""
    leaves = []
    for t in inputs:
        if t is None or not t.is_floating_point():
            leaves.append(t)
        else:
            leaves.append((t.float() if upcast else t).detach().clone().requires_grad_())
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    torch.autograd.backward(outs, [g.float() if upcast else g for g in grads])
    return [o.detach() for o in outs], [None if t is None or not t.is_floating_point() else t.grad for t in leaves]


def _check(ours, lo, hi, factor, name, exact_dtype=None, tight=None):
    """fp32 results tightly against the fp32 reference; lower precision by the ratio rule.

    ``tight`` (default: ours and lo are fp32) says whether every input was fp32: an fp32
    parameter gradient computed from bf16 activations carries their rounding (x_new, the
    gradient reaching it), so it is judged by the ratio rule like the activations."""
    assert_all_written(ours, name)
    if exact_dtype is not None:
        assert ours.dtype == exact_dtype, f"{name}: dtype {ours.dtype}, expected {exact_dtype}"
    scale = max(hi.abs().max().item(), 1e-30)  # tolerances relative to the result's magnitude
    if tight is None:
        tight = lo.dtype == torch.float32 and ours.dtype == torch.float32
    if tight:
        torch.testing.assert_close(ours, hi.float(), atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        assert_close_to_ref(ours.float(), lo.float(), hi.float(), factor, atol=1e-4 * scale, name=name)


def _same(impl, ours, ref, name):
    """The C++ kernels do the reference's exact arithmetic for copies and single adds."""
    if impl.mod is cuda_ext:
        assert torch.equal(ours, ref), f"{name}: differs from the reference"
    else:
        assert_all_written(ours, name)
        torch.testing.assert_close(ours.float(), ref.float(), atol=0, rtol=1e-2 if ours.dtype != torch.float32 else 0)


def _repeat_equal(fn, name):
    a, b = fn(), fn()
    for i, (u, v) in enumerate(zip(a, b)):
        if u is not None:
            assert torch.equal(u, v), f"{name}: output {i} differs between two identical runs"


# ------------------------------------------------------------------------------ tokens
TOKEN_SHAPES = [  # (B, N, K, D); the last two take the scalar path (D % 8 != 0 in half precision)
    (1, 59, 29, 72),
    (3, 64, 32, 1152),
    (2, 59, 59, 72),  # K = N: nothing dropped
    (4, 16, 5, 20),
    (2, 256, 128, 1154),
]


@pytest.mark.parametrize("B,N,K,D", TOKEN_SHAPES)
@pytest.mark.parametrize("dt,pdt", DTYPE_PAIRS)
@pytest.mark.parametrize("with_pos", [True, False])
def test_gather_tokens(impl, B, N, K, D, dt, pdt, with_pos):
    _emu_light(impl, B * N * D, primary=(dt, pdt, with_pos) == ("bf16", "fp32", True))
    dtype = DT[dt]
    gen = _gen(impl, B * 1000 + N + K + D)
    x = _rand(gen, B, N, D, dtype=dtype)
    ids = _ids(gen, B, N, K)
    pos = _rand(gen, N, D, dtype=DT[pdt]) if with_pos else None
    g = _rand(gen, B, K, D, dtype=dtype)
    _dirty_allocator(impl.device)
    with poisoned_empty():
        out = impl.gather_tokens_fwd(x, ids, pos)
        gx, gpos = impl.gather_tokens_bwd(g, ids, N, with_pos)
    # A gather (+ pos added in fp32 and rounded once to x's dtype, as the reference does).
    _same(impl, out, R.gather_tokens(x, ids, pos), "gather forward")
    assert torch.equal(gx, torch.zeros_like(x).scatter(1, ids[..., None].expand(-1, -1, D), g)), "grad_x"
    if with_pos:
        assert gpos.shape == (N, D)
        fn = lambda x_, p_: R.gather_tokens(x_, ids, p_)  # noqa: E731
        _, (_, gp_lo) = _ref(fn, [x, pos], [g], upcast=False)
        _, (_, gp32) = _ref(fn, [x, pos], [g], upcast=True)
        _check(gpos, gp_lo.float() if dtype != torch.float32 else gp32, gp32, 3, "grad_pos", torch.float32)
        _repeat_equal(lambda: impl.gather_tokens_bwd(g, ids, N, True), "gather_tokens_bwd")
    else:
        assert gpos is None


@pytest.mark.parametrize("B,N,K,D", TOKEN_SHAPES)
@pytest.mark.parametrize("dt,pdt", DTYPE_PAIRS)
@pytest.mark.parametrize("with_pos", [True, False])
def test_unmask_tokens(impl, B, N, K, D, dt, pdt, with_pos):
    _emu_light(impl, B * N * D, primary=(dt, pdt, with_pos) == ("bf16", "fp32", True))
    dtype = DT[dt]
    gen = _gen(impl, B * 1000 + N + K + D + 1)
    xv = _rand(gen, B, K, D, dtype=dtype)
    ids = _ids(gen, B, N, K)
    mt = _rand(gen, D, dtype=DT[pdt], scale=0.02)
    pos = _rand(gen, N, D, dtype=DT[pdt]) if with_pos else None
    g = _rand(gen, B, N, D, dtype=dtype)
    _dirty_allocator(impl.device)
    with poisoned_empty():
        out = impl.unmask_tokens_fwd(xv, ids, mt, N, pos)
        gxv, gmt, gpos = impl.unmask_tokens_bwd(g, ids, with_pos)
    _same(impl, out, R.unmask_tokens(xv, ids, mt, N, pos), "unmask forward")
    assert torch.equal(gxv, torch.gather(g, 1, ids[..., None].expand(-1, -1, D))), "grad_x_vis"
    fn = lambda x_, m_, p_: R.unmask_tokens(x_, ids, m_, N, p_)  # noqa: E731
    _, (_, gm_lo, gp_lo) = _ref(fn, [xv, mt, pos], [g], upcast=False)
    _, (_, gm32, gp32) = _ref(fn, [xv, mt, pos], [g], upcast=True)
    lo = (lambda t, t32: t32 if dtype == torch.float32 else t.float())  # noqa: E731
    _check(gmt, lo(gm_lo, gm32), gm32, 3, "grad_mask_token", torch.float32)
    if K == N:
        assert torch.equal(gmt, torch.zeros_like(gmt)), "no dropped token: the mask token's gradient is 0"
    if with_pos:
        _check(gpos, lo(gp_lo, gp32), gp32, 3, "grad_pos", torch.float32)
    else:
        assert gpos is None
    _repeat_equal(lambda: impl.unmask_tokens_bwd(g, ids, with_pos), "unmask_tokens_bwd")


def test_tokens_misaligned_inputs(impl):
    """Inputs one element off a 16-byte boundary take the scalar path and give the same bits."""
    if impl.name == "triton":
        pytest.skip("the CUDA launchers' scalar path")
    gen = _gen(impl, 7)
    B, N, K, D = 2, 59, 29, 72
    x = _rand(gen, B, N, D, dtype=torch.bfloat16)
    ids = _ids(gen, B, N, K)
    pos = _rand(gen, N, D, dtype=torch.bfloat16)
    ref = impl.gather_tokens_fwd(x, ids, pos)
    assert torch.equal(impl.gather_tokens_fwd(_misalign(x), ids, _misalign(pos)), ref)
    xv = _rand(gen, B, K, D, dtype=torch.bfloat16)
    mt = _rand(gen, D, dtype=torch.bfloat16)
    ref = impl.unmask_tokens_fwd(xv, ids, mt, N, pos)
    assert torch.equal(impl.unmask_tokens_fwd(_misalign(xv), ids, _misalign(mt), N, pos), ref)


@pytest.mark.parametrize("D", [72, 20])  # vector and scalar paths
def test_tokens_out_of_range_ids(impl, D):
    """Unchecked ids outside [0, N) never read or write outside the tensors: the gathered row
    is zeros, no token is kept for them, and their grad_x_vis rows are zeros; ids a sample
    repeats leave no grad_x_vis row unwritten."""
    gen = _gen(impl, 8)
    B, N, K = 2, 19, 7
    ids = _ids(gen, B, N, K)
    ids[0, 0], ids[0, 3], ids[1, 6], ids[1, 1] = -1, N, 2**40, ids[1, 2]
    valid = (ids >= 0) & (ids < N)
    safe = ids.clamp(0, N - 1)
    x = _rand(gen, B, N, D, dtype=torch.float32)
    pos = _rand(gen, N, D, dtype=torch.float32)
    with poisoned_empty():
        out = impl.gather_tokens_fwd(x, ids, pos)
    assert torch.equal(out, torch.where(valid[..., None], R.gather_tokens(x, safe, pos), 0.0))
    g = _rand(gen, B, K, D, dtype=torch.float32)
    with poisoned_empty():
        gx, gpos = impl.gather_tokens_bwd(g, ids, N, True)
    assert_all_written(gx, "grad_x")
    kept_rows = torch.zeros(B, N + 1, dtype=torch.bool).to(ids.device).scatter(1, torch.where(valid, ids, N), True)
    kept = kept_rows[:, :N]
    assert (gx[~kept] == 0).all() and torch.isfinite(gpos).all()
    xv = _rand(gen, B, K, D, dtype=torch.float32)
    mt = _rand(gen, D, dtype=torch.float32)
    with poisoned_empty():
        out = impl.unmask_tokens_fwd(xv, ids, mt, N, pos)
    torch.testing.assert_close(out[~kept], (mt + pos).expand(B, N, D)[~kept])
    gu = _rand(gen, B, N, D, dtype=torch.float32)
    with poisoned_empty():
        gxv, gmt, gpos = impl.unmask_tokens_bwd(gu, ids, True)
    assert_all_written(gxv, "grad_x_vis")
    assert (gxv[~valid] == 0).all()
    torch.testing.assert_close(gmt, gu[~kept].sum(0))
    torch.testing.assert_close(gpos, gu.sum(0))


@pytest.mark.parametrize("B,N,K,D", TOKEN_SHAPES + [(2, 16, 0, 72)])  # and K = 0: a copy of the fill
@pytest.mark.parametrize("dt,fdt", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")])
def test_scatter_tokens(impl, B, N, K, D, dt, fdt):
    """TREAD's put-back, a copy: the output (also into zeros) and both gradients bit for bit
    (unsorted ids)."""
    _emu_light(impl, B * N * D, primary=(dt, fdt) == ("bf16", "fp32"))
    dtype = DT[dt]
    gen = _gen(impl, B * 1000 + N + K + D + 2)
    xk = _rand(gen, B, K, D, dtype=dtype)
    ids = _ids(gen, B, N, K)
    fill = _rand(gen, B, N, D, dtype=DT[fdt])
    g = _rand(gen, B, N, D, dtype=dtype)
    _dirty_allocator(impl.device)
    with poisoned_empty():
        out = impl.scatter_tokens_fwd(xk, ids, fill, N)
        out0 = impl.scatter_tokens_fwd(xk, ids, None, N)  # no fill: zeros (MicroDiT)
        gxk, gfill = impl.scatter_tokens_bwd(g, ids, True)
        gxk_only, none = impl.scatter_tokens_bwd(g, ids, False)
    _same(impl, out, R.scatter_tokens(xk, ids, fill), "scatter forward")
    _same(impl, out0, R.scatter_tokens(xk, ids, None, N), "scatter forward, zero fill")
    want_gx = torch.gather(g, 1, ids[..., None].expand(-1, -1, D))
    assert torch.equal(gxk, want_gx) and torch.equal(gxk_only, want_gx) and none is None, "grad_x_kept"
    assert torch.equal(gfill, g.scatter(1, ids[..., None].expand(-1, -1, D), 0.0)), "grad_fill"
    _repeat_equal(lambda: impl.scatter_tokens_bwd(g, ids, True), "scatter_tokens_bwd")


def test_scatter_out_of_range_and_misaligned(impl):
    """Unchecked ids outside [0, N) put nothing back (the row keeps the fill, its grad_x_kept row
    is zeros); inputs one element off a 16-byte boundary take the scalar path, same bits."""
    gen = _gen(impl, 9)
    B, N, K, D = 2, 19, 7, 72
    ids = _ids(gen, B, N, K)
    ids[0, 0], ids[0, 3], ids[1, 6] = -1, N, 2**40
    valid = (ids >= 0) & (ids < N)
    xk = _rand(gen, B, K, D, dtype=torch.bfloat16)
    fill = _rand(gen, B, N, D, dtype=torch.bfloat16)
    g = _rand(gen, B, N, D, dtype=torch.bfloat16)
    with poisoned_empty():
        out = impl.scatter_tokens_fwd(xk, ids, fill, N)
        gxk, gfill = impl.scatter_tokens_bwd(g, ids, True)
        gxk2, _ = impl.scatter_tokens_bwd(g, ids, False)
    safe_ids = torch.where(valid, ids, N)
    want = torch.cat([fill, fill[:, :1]], 1).scatter(1, safe_ids[..., None].expand(-1, -1, D), xk)[:, :N]
    assert torch.equal(out, want)
    want_gx = torch.where(valid[..., None], torch.gather(g, 1, ids.clamp(0, N - 1)[..., None].expand(-1, -1, D)), 0.0)
    assert torch.equal(gxk, want_gx) and torch.equal(gxk2, want_gx)
    assert torch.equal(gfill, torch.cat([g, g[:, :1]], 1).scatter(1, safe_ids[..., None].expand(-1, -1, D), 0.0)[:, :N])
    if impl.name != "triton":
        ids = _ids(gen, B, N, K)
        ref = impl.scatter_tokens_fwd(xk, ids, fill, N)
        assert torch.equal(impl.scatter_tokens_fwd(_misalign(xk), ids, _misalign(fill), N), ref)
        ref = impl.scatter_tokens_bwd(g, ids, True)
        got = impl.scatter_tokens_bwd(_misalign(g), ids, True)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ---------------------------------------------------------------------------- norm ops
NORM_SHAPES = [  # (B, L, D)
    (1, 59, 72),
    (2, 59, 1152),
    (3, 17, 20),  # scalar path
    (2, 9, 1154),  # scalar path, rows wider than the backward's register cache
    (1, 3, 8256),  # vector path, rows wider than the forward's register cache
    (1, 2048, 64),  # many row units: multi-pass partial reduction
]
EPS = 1e-6


def _norm_case(impl, B, L, D, dt, vdt, seed):
    gen = _gen(impl, seed)
    dtype, vdtype = DT[dt], DT[vdt]
    return dict(
        x=_rand(gen, B, L, D, dtype=dtype, shift=0.5),  # a non-zero mean exercises the centring
        y=_rand(gen, B, L, D, dtype=dtype),
        gate=_rand(gen, B, D, dtype=vdtype, scale=0.5),
        shift=_rand(gen, B, D, dtype=vdtype, scale=0.5),
        scale=_rand(gen, B, D, dtype=vdtype, scale=0.5),
        g1=_rand(gen, B, L, D, dtype=dtype),
        g2=_rand(gen, B, L, D, dtype=dtype),
    )


def _checks(ours, lo, hi, factor, names, dtypes, tight):
    for o, l_, h, n, d in zip(ours, lo, hi, names, dtypes):
        _check(o, l_, h, factor, n, d, tight=tight and o.dtype == torch.float32)


@pytest.mark.parametrize("B,L,D", NORM_SHAPES)
@pytest.mark.parametrize("dt,vdt", DTYPE_PAIRS)
def test_layernorm_modulate(impl, B, L, D, dt, vdt):
    _emu_light(impl, B * L * D, primary=(dt, vdt) == ("bf16", "fp32"))
    c = _norm_case(impl, B, L, D, dt, vdt, seed=B * 7 + L + D)
    x, shift, scale, g = c["x"], c["shift"], c["scale"], c["g1"]
    _dirty_allocator(impl.device)
    with poisoned_empty():
        out, mean, rstd = impl.layernorm_modulate_fwd(x, shift, scale, EPS)
        gx, gshift, gscale = impl.layernorm_modulate_bwd(g, x, scale, mean, rstd)
    fn = lambda x_, s_, c_: R.layernorm_modulate(x_, s_, c_, EPS)  # noqa: E731
    (o_lo,), g_lo = _ref(fn, [x, shift, scale], [g], upcast=False)
    (o32,), g32 = _ref(fn, [x, shift, scale], [g], upcast=True)
    _check(out, o_lo, o32, 2, "out", x.dtype)
    x32 = x.float()
    torch.testing.assert_close(mean, x32.mean(-1).reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x32.var(-1, unbiased=False) + EPS).reshape(-1), atol=1e-4, rtol=1e-4)
    _checks([gx, gshift, gscale], g_lo, g32, 3, ["grad_x", "grad_shift", "grad_scale"],
            [x.dtype, scale.dtype, scale.dtype], tight=dt == "fp32")
    _repeat_equal(lambda: impl.layernorm_modulate_bwd(g, x, scale, mean, rstd), "layernorm_modulate_bwd")


@pytest.mark.parametrize("B,L,D", NORM_SHAPES)
@pytest.mark.parametrize("dt,vdt", DTYPE_PAIRS)
def test_gated_residual(impl, B, L, D, dt, vdt):
    _emu_light(impl, B * L * D, primary=(dt, vdt) == ("bf16", "fp32"))
    c = _norm_case(impl, B, L, D, dt, vdt, seed=B * 11 + L + D)
    x, y, gate, g = c["x"], c["y"], c["gate"], c["g1"]
    _dirty_allocator(impl.device)
    with poisoned_empty():
        out = impl.gated_residual_fwd(x, y, gate)
        gx, gy, ggate = impl.gated_residual_bwd(g, y, gate)
    assert gx.data_ptr() == g.data_ptr()  # grad_x is grad_out itself, never a copy
    (o_lo,), g_lo = _ref(R.gated_residual, [x, y, gate], [g], upcast=False)
    (o32,), g32 = _ref(R.gated_residual, [x, y, gate], [g], upcast=True)
    _check(out, o_lo, o32, 2, "out", x.dtype)
    _checks([gx, gy, ggate], g_lo, g32, 3, ["grad_x", "grad_y", "grad_gate"], [x.dtype, y.dtype, gate.dtype],
            tight=dt == "fp32")
    _repeat_equal(lambda: impl.gated_residual_bwd(g, y, gate), "gated_residual_bwd")


@pytest.mark.parametrize("B,L,D", NORM_SHAPES)
@pytest.mark.parametrize("dt,vdt", DTYPE_PAIRS)
def test_residual_layernorm_modulate(impl, B, L, D, dt, vdt):
    _emu_light(impl, B * L * D, primary=(dt, vdt) == ("bf16", "fp32"))
    c = _norm_case(impl, B, L, D, dt, vdt, seed=B * 13 + L + D)
    x, y, gate, shift, scale, g1, g2 = (c[k] for k in ("x", "y", "gate", "shift", "scale", "g1", "g2"))
    _dirty_allocator(impl.device)
    with poisoned_empty():
        x_new, out, mean, rstd = impl.residual_layernorm_modulate_fwd(x, y, gate, shift, scale, EPS)
        grads = impl.residual_layernorm_modulate_bwd(g1, g2, x_new, y, gate, scale, mean, rstd)
    fn = lambda *a: R.residual_layernorm_modulate(*a, EPS)  # noqa: E731
    (xn_lo, o_lo), g_lo = _ref(fn, [x, y, gate, shift, scale], [g1, g2], upcast=False)
    (xn32, o32), g32 = _ref(fn, [x, y, gate, shift, scale], [g1, g2], upcast=True)
    _check(x_new, xn_lo, xn32, 2, "x_new", x.dtype)
    _check(out, o_lo, o32, 2, "out", x.dtype)
    # The LN statistics are those of the rounded x_new, as in the reference.
    torch.testing.assert_close(mean, x_new.float().mean(-1).reshape(-1), atol=1e-5, rtol=1e-5)
    _checks(grads, g_lo, g32, 3, ["grad_x", "grad_y", "grad_gate", "grad_shift", "grad_scale"],
            [x.dtype, y.dtype, gate.dtype, scale.dtype, scale.dtype], tight=dt == "fp32")
    _repeat_equal(lambda: impl.residual_layernorm_modulate_bwd(g1, g2, x_new, y, gate, scale, mean, rstd),
                  "residual_layernorm_modulate_bwd")


def test_norm_misaligned_inputs(impl):
    if impl.name == "triton":
        pytest.skip("the CUDA launchers' scalar path")
    c = _norm_case(impl, 2, 59, 72, "bf16", "fp32", seed=3)
    x, y, gate, shift, scale = (c[k] for k in ("x", "y", "gate", "shift", "scale"))
    ref = impl.residual_layernorm_modulate_fwd(x, y, gate, shift, scale, EPS)
    got = impl.residual_layernorm_modulate_fwd(_misalign(x), _misalign(y), gate, shift, scale, EPS)
    assert torch.equal(ref[0], got[0])  # x_new: elementwise, the same bits on both paths
    for a, b in zip(ref[1:], got[1:]):  # row sums in another order: within a rounding
        torch.testing.assert_close(a.float(), b.float(), atol=8e-3 * a.float().abs().max().item(), rtol=8e-3)


# -------------------------------------------------------------------------------- loss
LOSS_SHAPES = [(1, 59, 16), (3, 64, 16), (2, 59, 12), (2, 16, 4), (2, 59, 1030), (4, 256, 768)]  # (B, N, P)
MAE_COEF, SIGMA_DATA = 0.1, 0.5


def _loss_case(impl, B, N, P, dt, xdt, with_mask, seed):
    gen = _gen(impl, seed)
    dev = impl.device
    y = torch.randn(B, N, P, generator=gen, device=dev)
    sigma = torch.exp(torch.randn(B, generator=gen, device=dev) * 1.2 - 1.2)
    xn = y + sigma.view(-1, 1, 1) * torch.randn(B, N, P, generator=gen, device=dev)
    F = torch.randn(B, N, P, generator=gen, device=dev)
    mask = None
    if with_mask:
        mask = (torch.rand(B, N, generator=gen, device=dev) < 0.5).float()
        if B > 1:
            mask[-1] = 0.0  # a sample with no dropped token: its mae is 0, not 0/0
    return F.to(DT[dt]), xn.to(DT[xdt]), y.to(DT[xdt]), sigma, mask


def _loss_ref(F, xn, y, sigma, mask, upcast):
    Fl = (F.float() if upcast else F).detach().clone().requires_grad_()
    dsm, mae = R.dsm_mae_loss_terms(Fl, xn.float() if upcast else xn, y.float() if upcast else y, sigma, mask,
                                    SIGMA_DATA)
    loss = dsm + MAE_COEF * mae
    loss.sum().backward()  # each sample's loss depends on its own F only
    return loss.detach(), dsm.detach(), mae.detach(), Fl.grad


@pytest.mark.parametrize("B,N,P", LOSS_SHAPES)
@pytest.mark.parametrize("dt,xdt", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")])
@pytest.mark.parametrize("with_mask", [True, False])
def test_dsm_mae_loss(impl, B, N, P, dt, xdt, with_mask):
    _emu_light(impl, B * N * P, primary=(dt, xdt, with_mask) == ("bf16", "fp32", True))
    F, xn, y, sigma, mask = _loss_case(impl, B, N, P, dt, xdt, with_mask, seed=B + N + P)
    _dirty_allocator(impl.device)
    with poisoned_empty():
        loss, terms, grad = impl.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA)
    l32, d32, m32, g32 = _loss_ref(F, xn, y, sigma, mask, upcast=True)
    for t, n in [(loss, "loss"), (terms, "terms"), (grad, "grad_F")]:
        assert_all_written(t, n)
    assert loss.dtype == terms.dtype == torch.float32 and grad.dtype == F.dtype
    # The reference computes in fp32 from the given (rounded) inputs: the scalars match
    # closely in every dtype; the gradient is rounded once to F's dtype.
    torch.testing.assert_close(loss, l32, atol=1e-5, rtol=2e-5)
    torch.testing.assert_close(terms, torch.stack([d32, m32], 1), atol=1e-5, rtol=2e-5)
    if not with_mask:
        assert torch.equal(terms[:, 1], torch.zeros_like(terms[:, 1]))
    elif B > 1:
        assert terms[-1, 1].item() == 0.0
    _, _, _, g_lo = _loss_ref(F, xn, y, sigma, mask, upcast=False)
    _check(grad, g_lo if F.dtype != torch.float32 else g32, g32, 3, "grad_F", F.dtype)
    _repeat_equal(lambda: impl.dsm_mae_loss_fwd(F, xn, y, sigma, mask, MAE_COEF, SIGMA_DATA), "dsm_mae_loss_fwd")


@pytest.mark.parametrize("with_mask", [True, False])
def test_dsm_mae_loss_flow(impl, with_mask):
    """The flow objective (c_skip = 0, c_out = 1, weight 1; sigma unread) against the reference."""
    B, N, P = 3, 37, 12
    F, xn, y, sigma, mask = _loss_case(impl, B, N, P, "fp32", "fp32", with_mask, seed=7)
    with poisoned_empty():
        loss, terms, grad = impl.dsm_mae_loss_fwd(F, xn, y, torch.full_like(sigma, float("nan")), mask, MAE_COEF,
                                                  SIGMA_DATA, "flow")
    Fl = F.detach().clone().requires_grad_()
    fm, mae = R.dsm_mae_loss_terms(Fl, xn, y, sigma, mask, objective="flow")
    (fm + MAE_COEF * mae).sum().backward()
    torch.testing.assert_close(loss, (fm + MAE_COEF * mae).detach(), atol=1e-5, rtol=2e-5)
    torch.testing.assert_close(terms, torch.stack([fm, mae], 1).detach(), atol=1e-5, rtol=2e-5)
    torch.testing.assert_close(grad, Fl.grad, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------ public ops, CUDA backend forced
@pytest.mark.parametrize("dt,vdt", [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")])
def test_public_ops_cuda_backend(impl, monkeypatch, dt, vdt):
    """The public ops (autograd wiring, torch.library registration, gradient dtypes) with the
    CUDA backend forced, against the torch backend. The emulated variant lets the
    dispatcher accept CPU tensors for the ``cuda`` backend."""
    if impl.name == "triton":
        pytest.skip("the CUDA backend only")
    if impl.name == "emu":
        why_not = dispatch.why_not
        monkeypatch.setattr(dispatch, "why_not", lambda name, op, ts: None if name == "cuda" else why_not(name, op, ts))
    dev = impl.device
    dtype, vdtype = DT[dt], DT[vdt]
    gen = _gen(impl, 11)
    B, N, D = 2, 59, 72
    ids, _, mask = fastmask.ops.random_mask(B, N, 0.5, generator=gen, device=dev)
    K = ids.shape[1]
    x = _rand(gen, B, N, D, dtype=dtype)
    pos = _rand(gen, 1, N, D, dtype=vdtype)
    mt = _rand(gen, 1, 1, D, dtype=vdtype, scale=0.02)
    y = _rand(gen, B, K, D, dtype=dtype)
    gate, shift, scale = (_rand(gen, B, D, dtype=vdtype, scale=0.5) for _ in range(3))

    def run(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (x, pos, mt, y, gate, shift, scale)]
        xl, pl, ml, yl, gl, sl, cl = leaves
        with fastmask.backend(backend):
            xv = fastmask.ops.gather_tokens(xl, ids, pl)
            h = fastmask.ops.layernorm_modulate(xv, sl, cl)
            r = fastmask.ops.gated_residual(xv, h * yl, gl)
            r2, h2 = fastmask.ops.residual_layernorm_modulate(r, yl, gl, sl, cl)
            full = fastmask.ops.unmask_tokens(h2 + r2, ids, ml, N, pl)
            full = fastmask.ops.scatter_tokens(h2, ids, full)  # TREAD's put-back, into the unmasked stream
            P = 16
            Fo = full[..., :P].float()
            xn = x[..., :P].float().detach()
            loss = fastmask.ops.dsm_mae_loss(Fo, xn, xn * 0.5, torch.full((B,), 0.7, device=dev), mask)
        loss.sum().backward()
        return [loss.detach(), full.detach()] + [t.grad for t in leaves]

    ours = run("cuda")
    ref = run("torch")
    names = ["loss", "unmasked", "grad_x", "grad_pos", "grad_mask_token", "grad_y", "grad_gate", "grad_shift",
             "grad_scale"]
    for o, r, n in zip(ours, ref, names):
        assert o.dtype == r.dtype and o.shape == r.shape, f"{n}: {o.dtype}{tuple(o.shape)} vs {r.dtype}{tuple(r.shape)}"
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        scale_ = max(1.0, r.abs().max().item())
        torch.testing.assert_close(o.float(), r.float(), atol=tol * scale_, rtol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.gpu
def test_cuda_backend_is_selectable(cuda_backend):
    assert dispatch.available_backends()["cuda"] is None
    x = torch.randn(2, 8, 16, device="cuda")
    ids = torch.stack([torch.randperm(8, device="cuda")[:4] for _ in range(2)])
    with fastmask.backend("cuda"):
        assert dispatch.select("gather_tokens", x) == "cuda"
        out = fastmask.ops.gather_tokens(x, ids)
    assert torch.equal(out, R.gather_tokens(x, ids))

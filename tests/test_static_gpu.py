"""Static GPU checks without a GPU: the Triton kernels compiled ahead of time for sm_90 and sm_80.

``benchmarks/static_check.py`` calls the real launchers on meta tensors of DiT-XL/2 shapes,
intercepts each launch and compiles it for ``GPUTarget("cuda", 90, 32)`` and
``("cuda", 80, 32)``. Here: every default config (what runs without autotuning) compiles for
both targets with no register spills and fits shared memory, attention uses wgmma on sm_90,
and every bf16 autotune config that spills on a target is pruned for that target. The CUDA
kernels of csrc/ (the .cu sources; bindings.cpp has none) go through nvcc -Xptxas -v for
both targets: every instantiation without spills. Results are cached by kernel source hash +
Triton version / nvcc flags (~/.cache/fastmask-static), so only a kernel change recompiles
(the nvcc part: about 50 s cold on 2 cores, a second warm).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.static_gpu

try:
    import triton
    from triton.backends.compiler import GPUTarget  # noqa: F401

    _REASON = None if hasattr(triton, "compile") else "this triton has no triton.compile"
except Exception as e:  # pragma: no cover
    _REASON = f"triton is not importable: {e}"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if _REASON:
        pytest.skip(_REASON)
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # defaults in bf16 and fp32, and the bf16 autotune configs (fp16 compiles to the same
    # register use as bf16; the full report, fp16 included, is static_check.py's default)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "static_check.py"), str(out / "static.md"),
           "--json", str(out / "static.json"), "--dtypes", "bf16,fp32", "--no-cuda"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "static.json").read_text())
    doc["markdown"] = (out / "static.md").read_text()
    return doc


def test_every_default_config_compiles_without_spills(report):
    rows = report["triton"]
    assert not [r for r in rows if r.get("error")], [r for r in rows if r.get("error")][:3]
    defaults = [r for r in rows if r["role"] == "default"]
    kernels = {r["kernel"] for r in defaults}
    # every launcher's kernels were captured: attention (4: forward, delta, the one-pass
    # backward and the deterministic pair share the dk/dv kernel), norm (2 + partial sums),
    # tokens (gather/unmask/scatter fwd/bwd), loss (2)
    assert {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_delta_kernel",
            "_norm_fwd_kernel",
            "_norm_bwd_kernel", "_gather_fwd_kernel", "_gather_bwd_kernel", "_unmask_fwd_kernel",
            "_unmask_bwd_kernel", "_scatter_fwd_kernel", "_scatter_bwd_kernel", "_dsm_mae_fwd_kernel",
            "_sum_partials_kernel"} <= kernels, kernels
    for arch in (90, 80):
        assert {r["kernel"] for r in defaults if r["arch"] == arch} == kernels  # both targets
    limit = {90: 227 * 1024, 80: 163 * 1024}
    for r in defaults:
        what = (r["kernel"], r["dtype"], r["shape"], r["config"], f"sm_{r['arch']}")
        assert r["regs"] is not None and 0 < r["regs"] <= 255, what
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (what, r["spill_stores"])
        assert r["shared"] <= limit[r["arch"]] and r["fits_smem"], (what, r["shared"])
        assert r["blocks_per_sm"] >= 1, what


def test_attention_uses_wgmma_on_sm90(report):
    # every kernel with a tl.dot ("delta" only reads rows of dO and O)
    attn = [r for r in report["triton"] if r["op"] == "attention" and r["dtype"] == "bf16" and r["role"] == "default"
            and r["kind"] != "delta"]
    assert {r["kind"] for r in attn} == {"fwd", "dq", "dkdv", "bwd"}
    assert all(r["wgmma"] for r in attn if r["arch"] == 90), [r["kind"] for r in attn if not r["wgmma"]]
    assert all(r["mma"] and not r["wgmma"] for r in attn if r["arch"] == 80)


def test_autotune_configs_that_spill_are_pruned_for_that_target(report):
    auto = [r for r in report["triton"] if "autotune" in r["roles"] and r["kind"]]
    assert {r["kind"] for r in auto} == {"fwd", "dq", "dkdv", "bwd"}
    spilling = [r for r in auto if r["spill_stores"]]
    unpruned = [(r["kind"], r["shape"], r["config"], r["arch"], r["spill_stores"]) for r in spilling if not r["pruned"]]
    assert not unpruned, unpruned
    # and the register model does not throw away what compiles cleanly: on each target at
    # least one config per (kind, head dim) survives without spilling
    for arch in (90, 80):
        for kind in ("fwd", "dq", "dkdv"):
            for hd in ("hd=72", "hd=64", "hd=32"):
                kept = [r for r in auto if r["arch"] == arch and r["kind"] == kind and any(hd in s for s in r["shapes"])
                        and not r["pruned"] and not r["spill_stores"]]
                assert kept, (arch, kind, hd)


def test_memory_bound_ops_move_close_to_their_minimum(report):
    """The bytes each memory-bound op's launches move at DiT-XL/2 shapes, planned for an
    H100/H200 (fp32 partial buffers included), against the bytes the op must move: every op,
    forward and backward (and the position-gradient variants), within 10%; the adaLN backwards,
    whose per-sample partials were measured worth their bytes, within 20%."""
    rows = report["meta"]["bytes"]
    ops = {r["op"] for r in rows}
    assert ops == {"layernorm_modulate", "gated_residual", "residual_layernorm_modulate", "rmsnorm_modulate",
                   "residual_rmsnorm_modulate", "swiglu", "gather_tokens", "unmask_tokens", "scatter_tokens",
                   "dsm_mae_loss"}, ops
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"} and {r["shape"] for r in rows} >= {"L=128 D=1152", "L=256 D=512"}
    from benchmarks.static_check import bytes_limit

    over = [(r["op"], r["variant"], r["mode"], r["dtype"], r["shape"], round(r["ratio"], 3)) for r in rows
            if r["ratio"] > bytes_limit(r["op"], r["mode"])]
    assert max(bytes_limit(op, m) for op in ops for m in ("forward", "backward")) <= 1.20
    assert not over, over
    assert all(r["ratio"] > 0.99 for r in rows), [r for r in rows if r["ratio"] <= 0.99]  # the count misses nothing
    assert "## Bytes moved by the memory-bound ops" in report["markdown"]


def test_report_table(report):
    md = report["markdown"]
    assert "| _attn_fwd_kernel | attention (fwd) | bf16 |" in md and "sm_90" in md and "sm_80" in md
    assert "**Default configs**" in md


@pytest.fixture(scope="module")
def cuda_rows():
    """ptxas' report of every kernel in csrc/*.cu, compiled as the extension build does, for
    sm_90 and sm_80 (the same rows as the static report's CUDA table)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.static_check import cuda_report

    rows = cuda_report([90, 80])
    if rows and rows[0].get("error") == "nvcc not found":
        pytest.skip("nvcc not found (no CUDA toolkit: set CUDA_HOME); the CUDA spill check needs it")
    return rows


def test_every_cuda_kernel_compiles_without_spills(cuda_rows):
    from fastmask.cuda_ext import build_module  # csrc/build.py, loaded in one place

    build = build_module()
    errors = [(r.get("source"), r.get("arch"), r["error"]) for r in cuda_rows if r.get("error")]
    assert not errors, errors
    for source in build.KERNEL_SOURCES:
        # every __global__ function of the source shows up in ptxas' report on both targets
        text = (ROOT / "csrc" / source).read_text()
        names = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text))
        assert names, source
        for arch in (90, 80):
            seen = {r["mangled"] for r in cuda_rows if r["source"] == source and r["arch"] == arch}
            missing = [n for n in names if not any(f"{len(n)}{n}" in m for m in seen)]
            assert not missing, (source, f"sm_{arch}", missing)
    for r in cuda_rows:
        what = (r["source"], r["mangled"], f"sm_{r['arch']}")
        assert r.get("regs") is not None and 0 < r["regs"] <= 255, what
        assert r.get("spill_stores") == 0 and r.get("spill_loads") == 0, (what, r.get("spill_stores"), r.get("spill_loads"))


def test_blocks_per_sm_model():
    sys.path.insert(0, str(ROOT))
    from benchmarks.static_check import blocks_per_sm

    assert blocks_per_sm(32, 8, 0, 90) == 8  # 64 warps per SM / 8
    assert blocks_per_sm(255, 4, 0, 90) == 2  # 256 regs x 128 threads = 32K of 64K
    assert blocks_per_sm(128, 4, 100 * 1024, 90) == 2  # shared memory: 228 KB / 101 KB
    assert blocks_per_sm(128, 4, 100 * 1024, 80) == 1  # 164 KB



def test_every_launch_passes_every_kernel_argument(report):
    """Each Triton launch names every parameter of its kernel, defaulted ones included (what
    torch.compile's wrap_triton needs; static_check.arguments_left_out)."""
    kernels = {r["kernel"] for r in report["triton"]}
    assert {"_norm_fwd_kernel", "_norm_bwd_kernel", "_attn_fwd_kernel"} <= kernels, kernels
    assert report["meta"]["arguments_left_out"] == []


def test_float_arguments_are_taken_as_fp32(report):
    """Each kernel casts its float arguments to fp32 before use: torch.compile's launcher passes
    Python floats as fp64 (Triton's as fp32), which would turn fp32 math into fp64 (and broke the
    attention kernel's compile on a GPU); static_check.floats_not_fp32."""
    assert report["meta"]["floats_not_fp32"] == []

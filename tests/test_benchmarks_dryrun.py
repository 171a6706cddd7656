"""The benchmark suite, the GPU script and the profiler cannot rot: run them on the CPU.

- the GPU script's dry run (same stages and code paths as on the GPU, tiny sizes), and a
  run killed with SIGKILL in the middle;
- ``fastmask.profiling.run`` on a tiny config (what ``fastmask profile`` calls);
- the explicit FLOP count behind MFU against torch's FlopCounterMode;
- the report (markdown + plots) from a synthetic GPU-style result file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from fastmask.models import ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the source tree, not an installed package
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def one_thread():
    """Single-threaded torch: on a shared 2-core machine two OpenMP threads make steps erratic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run_script(out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMASK_BENCH_")}
    env.pop("TRITON_INTERPRET", None)  # the script sets it where a dry run needs it
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_script.py"), str(out), "--dry-run", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "results.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    """The same stages as on the GPU, on tiny sizes: at most 4 files come back, every stage
    leaves its rows, and each fastmask row names the backend that really ran."""
    out = tmp_path / "out"
    proc = _run_script(out, "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "results.json", "results.tar.gz", "summary.md"]  # <= 8 come back
    doc = json.loads((out / "results.json").read_text())
    assert doc["env"]["mode"] == "dry" and doc["env"]["torch"] == torch.__version__
    assert doc["env"]["probe"]["python_h"] in (True, False) and doc["env"]["commit"]
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
    stages = [(s["name"], s["status"]) for s in doc["stages"]]
    assert stages == [(n, "ok") for n in ("probe", "quick", "train", "ops", "hostcost", "train512", "opgrid")], (
        stages, (out / "log.txt").read_text()[-4000:])
    assert doc["tests"]["quick"]["counts"]["passed"] >= 20 and not doc["tests"]["quick"]["failed"]
    rows = doc["results"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert not failed, failed[:3]
    ops_ok = {r["op"] for r in rows if r["kind"] == "op" and r["status"] == "ok" and r["provider"] == "torch"}
    assert ops_ok == {"attention", "layernorm_modulate", "gated_residual", "residual_layernorm_modulate",
                      "gather_tokens", "unmask_tokens", "scatter_tokens", "dsm_mae_loss", "attention_rope",
                      "rmsnorm_modulate",
                      "residual_rmsnorm_modulate", "swiglu"}
    for r in rows:
        if r["kind"] == "op" and r["status"] == "ok":
            assert r["median_ms"] > 0 and r["bytes"] > 0 and "roofline_pct" in r, r
            assert r["ran"] == ("triton" if r["provider"] == "fastmask-triton" else r["ran"]), r
            assert r["ran"], r
        assert r["status"] != "skipped" or r["reason"], r  # every skip says why
    # the headline stages hold only the headline: forward and backward at the first shape
    head_ops = [r for r in rows if r["gpu_stage"] == "ops"]
    assert head_ops and {r["mode"] for r in head_ops} == {"forward", "backward"}
    assert {r["mode"] for r in rows if r["gpu_stage"] == "opgrid"} >= {"full"}
    steps = [r for r in rows if r["kind"] == "train_step"]
    head = [r["variant"] for r in steps if r["gpu_stage"] == "train"]
    families = [f"{f}-fastmask" for f in ARCHITECTURES if f not in ("maskdit", "dit")]  # one row per other family
    assert head == ["maskdit-fastmask", "maskdit-fastmask-graph", "dit-torch", "maskdit-torch-graph",
                    "maskdit-fastmask-compile", "maskdit-torch-compile", "maskdit-torch",
                    "dit-torch-compile", *families]  # ordered by value, compiled and graphed rows included
    assert not [r for r in steps if r["status"] == "failed"], [(r["variant"], r.get("error")) for r in steps]
    ok = [r for r in steps if r["status"] == "ok"]
    assert {(r["variant"], r["mask_ratio"]) for r in ok} >= {("dit-torch", 0.0), ("maskdit-torch", 0.5)}
    assert all(r["images_per_s"] > 0 and r["flops"] > 0 and r["mfu_pct"] > 0 for r in ok)
    # the graphed reference row ran (CPU emulation of the capture) and every row was profiled
    assert ("maskdit-torch-graph", 0.5) in {(r["variant"], r["mask_ratio"]) for r in ok}
    assert all(r["host_issue_ms"] > 0 and r.get("gpu_ms") is None for r in ok), ok
    assert all(set(r["backends"].values()) == {"torch"} and "attention" in r["backends"] for r in ok), ok
    assert doc["summary"]["train"]["masked_speedup"]
    host = {r["op"] for r in doc["host_cost"]}  # the host-cost stage's rows
    assert {"gated_residual", "attention", "dsm_mae_loss"} <= host
    md = (out / "summary.md").read_text()
    assert "| quick | ok |" in md and "Training step" in md and "| attention (encoder) |" in md
    assert proc.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the summary is printed last
    packed = _archive(out)
    names = {Path(n).name for n in packed}
    assert {"results.jsonl", "quick.xml", "summary.md"} <= names
    assert any(n.endswith("_dry.json") for n in names) and any(n.endswith("roofline.png") for n in names)
    streamed = [json.loads(x) for x in packed["results/results.jsonl"].decode().splitlines()]
    assert {r.get("gpu_stage") for r in streamed if r["kind"] in ("op", "train_step")} == {
        "train", "ops", "train512", "opgrid"}


def test_gpu_script_cuda_ext_mode_layout(tmp_path):
    """The second device call's stages, dry: the build is skipped on the CPU, the CUDA tests
    are collected (and skip without a GPU), and the same four files come back."""
    out = tmp_path / "out"
    proc = _run_script(out, "--mode", "cuda-ext", "--skip", "cuda_ops", "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / "results.json").read_text())
    stages = {s["name"]: s["status"] for s in doc["stages"]}
    assert stages == {"probe": "ok", "build": "skipped", "cuda_tests": "ok", "cuda_ops": "skipped"}, stages
    assert doc["tests"]["cuda_tests"]["counts"]["skipped"] > 100  # collected, GPU-only
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.tar.gz", "summary.md"]


def test_gpu_script_survives_sigkill(tmp_path):
    """Killed at any moment, the run leaves its log and an archive at most one period old,
    and no stage process outlives it."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMASK_BENCH_")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_script.py"), str(out), "--dry-run", "--stages",
         "probe,quick", "--pack-every", "1", "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "== quick" not in _read(out / "log.txt"):
            time.sleep(0.2)
        time.sleep(2.5)  # inside the quick stage, after at least one pack
    finally:
        proc.kill()
        proc.wait()
    log = _read(out / "log.txt")
    assert "== quick" in log and "probe: ok" in log
    packed = _archive(out)
    assert b'"kind": "probe"' in packed["results/results.jsonl"]
    assert len(list(out.iterdir())) <= 8
    # the quick stage's pytest died with the script (PR_SET_PDEATHSIG)
    time.sleep(1.0)
    stray = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout.split()
    assert not stray, stray


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def test_profile_run_cpu(tmp_path, one_thread, capsys):
    import fastmask
    from fastmask import profiling

    attention_before = fastmask.ops.attention
    parser = profiling.add_arguments(argparse.ArgumentParser())
    trace, out = tmp_path / "trace.json", tmp_path / "profile.json"
    args = parser.parse_args(
        ["--config", "T/2", "--input-size", "8", "--batch", "2", "--steps", "2", "--warmup", "1",
         "--trace", str(trace), "--json", str(out)]
    )
    assert profiling.run(args) == 0  # what `fastmask profile` returns as its exit code
    res = json.loads(out.read_text())
    cats = res["categories"]
    assert set(cats) == set(profiling.CATEGORIES)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    for kind in ("matmul", "attention", "norm/modulate", "gather/unmask", "loss", "optimizer"):
        assert cats[kind]["ms"] > 0, (kind, cats)
    assert res["step_ms"] > 0 and res["flops_per_step"] > 0
    assert res["backends"]["attention"] == "torch" and "gather_tokens" in res["backends"]  # what really ran
    assert trace.exists() and trace.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "gather/unmask" in printed and "ms/step" in printed
    # the profiler leaves the public ops as they were (it opens ranges, it patches nothing)
    import fastmask

    assert fastmask.ops.attention is attention_before
    # and the op ranges are off again once the profile is done
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fastmask.ops.attention(torch.randn(1, 4, 3, 2, 8))
    if os.environ.get("FASTMASK_NVTX", "0") != "1":
        assert not [e.name for e in prof.events() if e.name.startswith("fastmask.op.")]


@pytest.mark.parametrize(
    "model,config,ratio", [("maskdit", "T/2", 0.5), ("maskdit", "T/2", 0.0), ("dit", "T/2", 0.0), ("maskdit", "Digits/2", 0.75)]
)
def test_count_flops_matches_flop_counter(model, config, ratio, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.setups import build_training
    from fastmask.models import count_flops
    from fastmask.ops import reference

    # the counter sees bmm; SDPA's CPU kernel is not in its table
    monkeypatch.setattr(reference, "attention", reference.attention_math)
    ts = build_training(config, model=model, input_size=16, batch=3, num_classes=10, mask_ratio=ratio, device="cpu")
    x = torch.randn(3, 4, 16, 16)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ts.model.model.forward_tokens(x, torch.randn(3), torch.randint(0, 10, (3,)), mask_ratio=ratio)
    counted = count_flops(ts.model, 3, ratio)
    assert counted["forward"] == fc.get_total_flops()
    assert counted["train_step"] == 3 * counted["forward"]


def _synthetic_doc():
    env = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "dtype": "bfloat16", "torch": "2.11.0", "mode": "quick"}
    rows = []
    for ratio in (0.0, 0.5, 0.75):
        for prov, ms in (("fastmask-triton", 1.0), ("torch", 2.5), ("torch-compile", 1.5)):
            rows.append(
                dict(kind="op", op="gather_tokens", stage="encoder", provider=prov, mode="full", config="XL/2", input_size=32,
                     res=256, batch=64, mask_ratio=ratio, status="ok", median_ms=ms * (1 - ratio / 2), bytes=1e9,
                     bound="memory", gbps=1000.0, roofline_pct=30.0 / ms, dims={"B": 64, "N": 256, "K": 128, "D": 1152})
            )
    rows.append(dict(kind="op", op="attention", stage="encoder", provider="fastmask-cuda", mode="full", config="XL/2",
                     input_size=32, res=256, batch=64, mask_ratio=0.5, status="failed", error="RuntimeError: boom"))
    for variant, model, ratio, ms in (
        ("dit-torch", "dit", 0.0, 300.0),
        ("maskdit-fastmask", "maskdit", 0.5, 120.0),
        ("maskdit-fastmask", "maskdit", 0.0, 250.0),
        ("maskdit-fastmask", "maskdit", 0.75, 90.0),
    ):
        rows.append(dict(kind="train_step", variant=variant, model=model, config="XL/2", input_size=32, res=256, batch=64,
                         mask_ratio=ratio, status="ok", median_ms=ms, images_per_s=64 / ms * 1e3, peak_mem_gib=20.0,
                         mfu_pct=40.0))
    from benchmarks.summary import summarize_rows

    return {"schema": 1, "env": env, "ceilings": {"copy_gbps": 3000.0, "matmul_n": 8192, "matmul_dtype": "bfloat16",
            "matmul_tflops": 700.0}, "results": rows, "summary": summarize_rows(rows)}


def test_report_markdown_and_plots(tmp_path, capsys):
    from benchmarks import report

    p = tmp_path / "h100.json"
    p.write_text(json.dumps(_synthetic_doc()))
    assert report.main([str(p), "--md", str(tmp_path / "t.md"), "--plots", str(tmp_path), "--all-ops"]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "NVIDIA H100" in md
    assert "| gather_tokens (encoder) |" in md and "2.50x" in md  # fastmask vs torch at ratio 0.5
    assert "2.08x" in md  # masked (0.5) vs unmasked (0.0) step of maskdit-fastmask
    assert "FAILED" in md and "boom" in md
    assert (tmp_path / "speedup_vs_mask_ratio.png").stat().st_size > 0
    assert (tmp_path / "roofline.png").stat().st_size > 0


def test_report_writes_the_readme_section(tmp_path):
    from benchmarks import report

    p = tmp_path / "h100.json"
    p.write_text(json.dumps(_synthetic_doc()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\nafter\n")
    assert report.main([str(p), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "NVIDIA H100" in text and text.endswith("after\n")
    readme.write_text("no markers\n")
    assert report.main([str(p), "--readme", str(readme)]) == 2


def test_device_command_in_readme():
    """The command to paste into the device tool: one line under 2,000 characters that runs
    this very script with its results under $OUT."""
    import re

    text = (ROOT / "benchmarks" / "README.md").read_text()
    section = text[text.index("### The command to paste into the device tool"):]
    cmd = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)
    assert "\n" not in cmd and len(cmd) <= 2000
    assert 'benchmarks/gpu_script.py "$OUT"' in cmd and "timeout" in cmd


#!/usr/bin/env python
"""The one GPU run, ordered by value, that leaves results whenever it is stopped.

    python benchmarks/gpu_script.py OUTDIR                   # default mode, ~7.5 min on an H200
    python benchmarks/gpu_script.py OUTDIR --mode cuda-ext   # build the CUDA extension + its tests
    python benchmarks/gpu_script.py OUTDIR --dry-run         # the same stages on the CPU, tiny sizes

Every stage is a subprocess in its own process group with its own time cap (taken from one
budget, ``--budget``; later stages keep a guaranteed minimum); a stage that overruns is
killed with its whole group and the run goes on. Default mode, in order of value:

    probe     GPU, driver, versions, Python.h, nvcc, whether xformers' compiled part loads
    quick     ``pytest tests -m gpu_quick`` (every Triton kernel, forward + backward, at
              DiT-XL/2 shapes, bf16 and fp32, against the reference) under pytest-timeout
    train     the headline: MaskDiT-XL/2 256 px bf16 training step -- fastmask eager and
              compiled, reference MaskDiT eager and compiled, DiT-XL/2 eager and compiled
              (img/s, peak memory, MFU)
    ops       every op forward and backward at the headline shape against the copy bandwidth
              and matmul rate measured in the same process; attention against SDPA flash /
              efficient / cuDNN (and xformers where its compiled part loads)
    train512  512 px training rows and the other mask ratios, as time remains
    opgrid    the rest of the op grid, as time remains

``--mode cuda-ext`` (a second call, <= 9 min): probe, ``build`` (setup.py build_ext --inplace,
all cores, this GPU's arch), ``cuda_tests`` (tests/test_cuda_ext.py -m gpu), ``cuda_ops``
(fastmask-cuda against fastmask-triton at the headline shape).

Results are appended as they are produced to ``results.jsonl`` in a work folder (outside
OUTDIR); a thread packs that folder into ``OUTDIR/results.tar.gz`` at least every 30 s.
OUTDIR holds at most 4 files: ``log.txt`` (everything, written as it comes),
``summary.md`` (rewritten after every stage), ``results.tar.gz`` and, at the end,
``results.json`` (the merged document to commit under benchmarks/results/). A SIGKILL at
any moment leaves the log, the last summary and an archive at most 30 s old.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as _dt
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_OUT_FILES = 4


@dataclasses.dataclass
class Stage:
    name: str
    cap: float  # seconds at most
    keep: float  # seconds guaranteed to this stage from the budget of the stages before it
    about: str


DEFAULT_STAGES = [
    Stage("probe", 40, 15, "GPU, driver, versions, Python.h, nvcc, xformers"),
    Stage("quick", 100, 45, "pytest -m gpu_quick: every Triton kernel fwd+bwd at DiT-XL/2 shapes"),
    Stage("train", 210, 90, "MaskDiT-XL/2 256 px bf16 training step: 6 headline rows"),
    Stage("ops", 140, 60, "ops fwd/bwd at the headline shape vs copy bandwidth; attention vs SDPA"),
    Stage("train512", 90, 0, "512 px training rows and other mask ratios"),
    Stage("opgrid", 10_000, 0, "the rest of the op grid"),
]
CUDA_STAGES = [
    Stage("probe", 40, 15, "GPU, driver, versions, Python.h, nvcc"),
    Stage("build", 300, 120, "setup.py build_ext --inplace, all cores, this GPU's arch"),
    Stage("cuda_tests", 200, 60, "pytest tests/test_cuda_ext.py -m gpu"),
    Stage("cuda_ops", 10_000, 0, "fastmask-cuda vs fastmask-triton at the headline shape"),
]
MODES = {"default": (DEFAULT_STAGES, 450.0), "cuda-ext": (CUDA_STAGES, 510.0)}


# ----------------------------------------------------------------------------- the runner
class Runner:
    def __init__(self, out: Path, work: Path, stages: list[Stage], budget: float, dry: bool, pack_every: float):
        self.out, self.work, self.stages, self.budget, self.dry = out, work, stages, budget, dry
        self.t0 = time.time()
        self.done: list[dict] = []
        self.logf = open(out / "log.txt", "a", buffering=1, errors="replace")
        self.jsonl = work / "results.jsonl"
        self.lock = threading.RLock()
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env["PYTHONUNBUFFERED"] = "1"
        if not dry:
            self.env.pop("TRITON_INTERPRET", None)
        self._stop = threading.Event()
        self._packer = threading.Thread(target=self._pack_loop, args=(pack_every,), daemon=True)
        self._packer.start()

    # -- output
    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        with self.lock:
            self.logf.write(line + "\n")

    def add_row(self, row: dict) -> None:
        with self.lock, open(self.jsonl, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def pack(self) -> None:
        """Write the work folder into OUTDIR/results.tar.gz (atomically: a tmp file, renamed)."""
        with self.lock:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
                for p in sorted(self.work.rglob("*")):
                    if p.is_file():
                        try:
                            tar.add(p, arcname=str(Path("results") / p.relative_to(self.work)))
                        except OSError:
                            pass  # a file being rewritten: the next pack takes it
            tmp = self.out / "results.tar.gz.tmp"
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, self.out / "results.tar.gz")

    def _pack_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.pack()
            except Exception as e:  # packing must never stop the run
                self.say(f"   pack failed: {type(e).__name__}: {e}")

    def close(self) -> None:
        self._stop.set()
        self.pack()
        self.logf.close()

    # -- time
    def elapsed(self) -> float:
        return time.time() - self.t0

    def cap(self, name: str) -> float:
        names = [s.name for s in self.stages]
        i = names.index(name)
        later = sum(s.keep for s in self.stages[i + 1 :])
        return max(0.0, min(self.stages[i].cap, self.budget - self.elapsed() - later))

    # -- stages
    def run(self, name: str, cmd: list[str], env: dict | None = None, cap: float | None = None) -> dict:
        cap = self.cap(name) if cap is None else cap
        self.say(f"== {name} (cap {cap:.0f} s): {' '.join(cmd)}")
        t = time.time()
        tail: list[str] = []
        self.proc = proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True, preexec_fn=_die_with_parent,
        )

        def pump():
            for line in proc.stdout:
                with self.lock:
                    self.logf.write(f"  {name}| {line}")
                tail.append(line.rstrip("\n"))
                del tail[:-300]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=max(cap, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = proc.wait()
        reader.join(timeout=10)
        self.proc = None
        st = {"kind": "stage", "name": name, "rc": rc, "seconds": round(time.time() - t, 1), "cap_s": round(cap),
              "status": "timeout" if timed_out else ("ok" if rc == 0 else "failed"), "tail": tail}
        self.say(f"   {name}: {st['status']} (rc {rc}) in {st['seconds']} s")
        return st

    def finish(self, st: dict, detail: str = "") -> None:
        st["detail"] = detail or st.get("detail", "")
        if st["status"] not in ("failed", "timeout"):
            st.pop("tail", None)
        else:
            st["tail"] = st.get("tail", [])[-40:]
        if detail:
            self.say(f"   {detail}")
        self.done.append(st)
        self.add_row(st)
        write_summary(self)

    def skip(self, name: str, why: str) -> None:
        self.say(f"== {name}: skipped ({why})")
        self.finish({"kind": "stage", "name": name, "status": "skipped", "seconds": 0.0, "cap_s": 0}, why)


def _die_with_parent() -> None:
    # The stage's own process gets SIGKILL if this script dies (even by SIGKILL), so no stage
    # outlives the run; Linux only, a no-op elsewhere.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; members of its group may remain
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return


# ----------------------------------------------------------------------------- probe
PROBE_PY = r"""
import json, os, platform, shutil, subprocess, sys, sysconfig
info = {"python": platform.python_version(), "executable": sys.executable}
inc = sysconfig.get_paths().get("include") or ""
info["python_h"] = os.path.exists(os.path.join(inc, "Python.h"))
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
if shutil.which("nvidia-smi"):  # read-only queries
    info["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu,power.draw", "--format=csv,noheader"])
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
info["nvcc"] = run([nvcc, "--version"]).splitlines()[-1] if nvcc else None
info["ninja"] = bool(shutil.which("ninja"))
info["cpu_count"] = os.cpu_count()
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.is_available(),
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("triton", "pytest", "pytest_timeout", "pytest_benchmark", "timm", "numpy", "matplotlib", "xformers"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "present")
    except Exception as e:
        info[mod] = None
if info.get("xformers"):
    try:
        import xformers
        info["xformers_compiled"] = bool(getattr(xformers, "_has_cpp_library", False))
    except Exception as e:
        info["xformers_compiled"] = False
try:
    import fastmask
    info["fastmask"] = fastmask.__version__
    info["backends"] = fastmask.ops.available_backends()
except Exception as e:
    info["fastmask_error"] = f"{type(e).__name__}: {e}"
print("PROBE_JSON " + json.dumps(info))
"""


def stage_probe(r: Runner, commit: str | None) -> dict:
    st = r.run("probe", [sys.executable, "-c", PROBE_PY])
    info = {}
    for line in st.get("tail", []):
        if line.startswith("PROBE_JSON "):
            info = json.loads(line[len("PROBE_JSON ") :])
    info["commit"] = commit or _git_commit()
    info["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    r.add_row({"kind": "probe", **info})
    keys = ("device", "nvidia_smi", "torch", "cuda", "triton", "python", "python_h", "xformers_compiled", "commit")
    r.finish(st, ", ".join(f"{k}={info.get(k)}" for k in keys if k in info))
    return info


def _git_commit() -> str:
    """``FASTMASK_COMMIT``, else this tree's own git HEAD (never an enclosing repository's: see
    benchmarks/common.git_commit, the one rule every stage's rows follow)."""
    from benchmarks import common

    c = common.git_commit()
    return c["commit"] + ("-dirty" if c.get("dirty") else "")


# ----------------------------------------------------------------------------- tests
def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _pytest_timeout_args(per_test: float) -> list[str]:
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        return []
    return [f"--timeout={int(per_test)}", "--timeout-method=signal"]


def stage_tests(r: Runner, name: str, args: list[str], env: dict, per_test: float) -> None:
    cap = r.cap(name)
    if cap < 5:
        r.skip(name, "no time left in the budget")
        return
    junit = r.work / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", *args, "-v", "-p", "no:cacheprovider", "-rfE", "--durations=8",
           f"--junitxml={junit}", *_pytest_timeout_args(min(per_test, max(cap - 10, 5)))]
    st = r.run(name, cmd, env=env, cap=cap)
    counts, failed = _count_tests(junit, st.get("tail", []))
    st.update(counts=counts, failed_tests=failed[:60])
    r.add_row({"kind": "tests", "gpu_stage": name, "counts": counts, "failed": failed})
    r.finish(st, ", ".join(f"{v} {k}" for k, v in counts.items()))


def _count_tests(junit: Path, tail: list[str]) -> tuple[dict, list[str]]:
    if junit.exists():
        try:
            import xml.etree.ElementTree as ET

            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            failed = [tc.get("classname", "") + "::" + tc.get("name", "") for s in suites for tc in s.iter("testcase")
                      if tc.find("failure") is not None or tc.find("error") is not None]
            passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
            return dict(passed=passed, failed=tot["failures"], errors=tot["errors"], skipped=tot["skipped"]), failed
        except Exception:
            pass
    # cut short before the XML was written: count the verbose lines that came through
    c = {k.lower(): sum(1 for x in tail if re.search(rf" {k}\b", x)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = [x.split(" ")[0] for x in tail if re.search(r" (FAILED|ERROR)\b", x)]
    return {**c, "cut_short": True}, failed


# ----------------------------------------------------------------------------- benchmarks
def stage_bench(r: Runner, name: str, files: list[str], part: str, extra_env: dict | None = None) -> None:
    cap = r.cap(name)
    if cap < 15:
        r.skip(name, f"no time left in the budget ({cap:.0f} s)")
        return
    json_path = r.work / f"{name}.json"
    env = dict(r.env)
    env.update(
        FASTMASK_BENCH_MODE="dry" if r.dry else "quick",
        FASTMASK_BENCH_PART=part,
        FASTMASK_BENCH_JSON=str(json_path),
        FASTMASK_BENCH_JSONL=str(r.jsonl),
        FASTMASK_BENCH_STAGE=name,
        # cases end cleanly before the cap; the kill is the last resort
        FASTMASK_BENCH_DEADLINE=str(time.time() + max(5.0, cap - 20.0)),
    )
    if r.dry:
        env["TRITON_INTERPRET"] = "1"  # the fastmask-triton rows run in the interpreter (dry only)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "pytest", *[f"benchmarks/{f}" for f in files], "--benchmark-only", "-q",
           "-p", "no:cacheprovider", "-rfE", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    st = r.run(name, cmd, env=env, cap=cap)
    rows = _stage_rows(r, name)
    c: dict = {}
    for row in rows:
        c[row.get("status")] = c.get(row.get("status"), 0) + 1
    r.finish(st, ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "no rows")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # the last line of a killed writer may be cut
    return rows


def _stage_rows(r: Runner, name: str) -> list[dict]:
    return [x for x in _read_jsonl(r.jsonl) if x.get("gpu_stage") == name and x.get("kind") in ("op", "train_step")]


def stage_build(r: Runner, info: dict) -> None:
    name = "build"
    if r.dry:
        r.skip(name, "dry run: the CUDA build needs the GPU machine's torch")
        return
    if not (ROOT / "csrc").is_dir():
        r.skip(name, "no csrc/ folder in this checkout")
        return
    env = dict(r.env, FASTMASK_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 8))
    if info.get("capability"):
        env.setdefault("FASTMASK_CUDA_ARCHS", info["capability"].replace(".", ""))
    st = r.run(name, [sys.executable, "setup.py", "build_ext", "--inplace"], env=env)
    chk = r.run("build_check", [sys.executable, "-c", "import fastmask; print('BACKENDS', fastmask.ops.available_backends())"],
                cap=60)
    line = next((x for x in chk.get("tail", []) if x.startswith("BACKENDS")), "BACKENDS ?")
    r.finish(st, "backends: " + line[len("BACKENDS ") :])


# ----------------------------------------------------------------------------- report
def merged_document(r: Runner, info: dict | None = None) -> dict:
    from benchmarks import common
    from benchmarks.summary import summarize_rows

    rows = _read_jsonl(r.jsonl)
    probe = next((x for x in rows if x.get("kind") == "probe"), {})
    doc = {"schema": common.SCHEMA, "env": {}, "ceilings": {}, "ceilings_by_stage": {}, "results": [], "tests": {}}
    for p in sorted(r.work.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        doc["env"] = doc["env"] or d.get("env", {})
        if d.get("ceilings"):
            doc["ceilings"] = doc["ceilings"] or d["ceilings"]
            doc["ceilings_by_stage"][p.stem] = d["ceilings"]
    for x in rows:
        if x.get("kind") in ("op", "train_step"):
            doc["results"].append(x)
        elif x.get("kind") == "ceilings" and not doc["ceilings"]:
            doc["ceilings"] = {k: v for k, v in x.items() if k not in ("kind", "gpu_stage")}
        elif x.get("kind") == "env" and not doc["env"]:
            doc["env"] = {k: v for k, v in x.items() if k not in ("kind", "gpu_stage")}
        elif x.get("kind") == "tests":
            doc["tests"][x["gpu_stage"]] = {"counts": x.get("counts"), "failed": x.get("failed")}
    if not doc["env"]:
        doc["env"] = {k: probe.get(k) for k in ("device", "torch", "triton", "cuda", "python")}
    for k in ("commit", "date", "nvidia_smi", "python_h", "xformers", "xformers_compiled", "backends"):
        if k in probe:
            doc["env"].setdefault(k, probe[k])
    doc["env"]["commit"] = probe.get("commit", doc["env"].get("commit"))
    doc["env"]["probe"] = probe
    doc["env"]["gpu_script"] = {"dry_run": r.dry, "budget_s": r.budget, "elapsed_s": round(r.elapsed(), 1)}
    doc["stages"] = list(r.done)
    doc["summary"] = summarize_rows(doc["results"])
    return doc


def write_summary(r: Runner) -> str:
    """OUTDIR/summary.md (and a copy in the archive): the stages, then the results table."""
    lines = ["# fastmask GPU run", ""]
    try:
        doc = merged_document(r)
        env = doc["env"]
        lines.append(f"{env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | "
                     f"CUDA {env.get('cuda')} | Python {env.get('python')} | commit {env.get('commit')} | {env.get('date')}")
    except Exception as e:
        doc = None
        lines.append(f"(document not readable yet: {type(e).__name__}: {e})")
    lines += ["", "| stage | status | s | cap s | detail |", "|---|---|---|---|---|"]
    for st in r.done:
        lines.append(f"| {st['name']} | {st['status']} | {st.get('seconds', 0)} | {st.get('cap_s', '')} | "
                     f"{str(st.get('detail', '')).replace('|', '/')[:300]} |")
    for st in r.done:
        if st.get("failed_tests"):
            lines += ["", f"Failed in {st['name']}: " + ", ".join(st["failed_tests"][:20])]
    md = "\n".join(lines) + "\n"
    if doc is not None and doc["results"]:
        try:
            from benchmarks import report

            md += "\n" + report.markdown([{k: v for k, v in doc.items() if k != "stages"}], all_ops=False)
        except Exception as e:
            md += f"\n(table failed: {type(e).__name__}: {e})\n"
    with r.lock:
        (r.work / "summary.md").write_text(md)
        tmp = r.out / "summary.md.tmp"
        tmp.write_text(md)
        os.replace(tmp, r.out / "summary.md")
    return md


def final_report(r: Runner) -> str:
    doc = merged_document(r)
    from benchmarks import common, report

    dev = doc["env"].get("device") or "unknown"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    tag = "dry" if r.dry else ("cuda-ext" if any(s["name"] == "build" for s in r.done) else "gpu")
    name = f"{common.device_slug(dev)}_{stamp}_{tag}"
    text = json.dumps(doc, indent=1, default=str) + "\n"
    (r.work / f"{name}.json").write_text(text)
    tmp = r.out / "results.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, r.out / "results.json")
    try:
        (r.work / f"{name}.md").write_text(report.markdown([doc], all_ops=False))
        (r.work / f"{name}_all_ops.md").write_text(report.markdown([doc], all_ops=True))
        for png in report.plots([doc], r.work):
            png.rename(r.work / f"{name}_{png.name}")
    except Exception as e:  # a plot must never cost the results
        r.say(f"   report extras failed: {type(e).__name__}: {e}")
    r.say(f"results: {r.out / 'results.json'} (commit as benchmarks/results/{name}.json), archive results.tar.gz")
    return write_summary(r)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fastmask: the one GPU run (tests, benchmarks, report), ordered by value")
    ap.add_argument("outdir", help="folder for log.txt, summary.md, results.tar.gz, results.json (at most 4 files)")
    ap.add_argument("--mode", choices=list(MODES), default="default",
                    help="default: tests + benchmarks; cuda-ext: build the CUDA extension and run its GPU tests")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreter: proves the stages and files")
    ap.add_argument("--budget", type=float, default=None, help="overall seconds (default 450; cuda-ext 510)")
    ap.add_argument("--stages", default=None, help="comma-separated stages to run (default: all of the mode)")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    ap.add_argument("--cap", action="append", default=[], metavar="STAGE=S", help="override a stage's cap; repeatable")
    ap.add_argument("--work", default=None, help="folder for the raw files (default: a new temporary folder)")
    ap.add_argument("--pack-every", type=float, default=30.0, help="seconds between archive refreshes (<= 30)")
    ap.add_argument("--commit", default=None, help="the commit being run (default: git, or $FASTMASK_COMMIT)")
    args = ap.parse_args(argv)

    stages, default_budget = MODES[args.mode]
    stages = [dataclasses.replace(s) for s in stages]
    names = [s.name for s in stages]
    chosen = set(names if not args.stages else [x.strip() for x in args.stages.split(",") if x.strip()])
    chosen -= {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = chosen - set(names)
    if unknown:
        ap.error(f"--stages/--skip: unknown stage(s) {sorted(unknown)}; the {args.mode} mode has {names}")
    for item in args.cap:
        stage, _, sec = item.partition("=")
        if stage not in names or not sec:
            ap.error(f"--cap: expected STAGE=SECONDS with STAGE in {names}, got {item!r}")
        s = stages[names.index(stage)]
        s.cap, s.keep = float(sec), min(s.keep, float(sec))
    for s in stages:  # a stage that will not run keeps nothing back
        if s.name not in chosen:
            s.keep = 0.0
    if not 1 <= args.pack_every <= 30:
        ap.error("--pack-every: expected 1..30 seconds")

    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="fastmask-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    if out == work or work in out.parents or out in work.parents:
        ap.error("--work must lie outside OUTDIR (OUTDIR gets at most 4 files)")
    r = Runner(out, work, stages, args.budget or default_budget, args.dry_run, args.pack_every)
    # one commit for the whole run: the probe and every stage's rows record the one given
    r.env["FASTMASK_COMMIT"] = args.commit or _git_commit()

    def on_signal(signum, frame):  # SIGTERM / SIGINT: stop the stage, keep what is there
        r.say(f"signal {signum}: stopping")
        if r.proc is not None:
            kill_group(r.proc)
        try:
            final_report(r)
        except Exception as e:  # the archive and the log are what matters now
            r.say(f"   final report failed: {type(e).__name__}: {e}")
        finally:
            r.close()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    r.say(f"fastmask gpu_script: mode {args.mode}, budget {r.budget:.0f} s, dry run {args.dry_run}, "
          f"out {out}, work {work}, stages {[n for n in names if n in chosen]}")

    info: dict = {}
    for s in stages:
        if s.name not in chosen:
            r.skip(s.name, "not selected")
            continue
        if s.name == "probe":
            info = stage_probe(r, r.env["FASTMASK_COMMIT"])
            if not args.dry_run and not info.get("gpu"):
                r.say("   WARNING: torch sees no GPU here; the stages run their CPU sets")
        elif s.name == "quick":
            # the default (heuristic) attention configs: autotuning each shape from cold caches
            # would not fit the cap; kernels compile in 4 pytest-xdist workers where it is there
            env = dict(r.env, FASTMASK_ATTN_AUTOTUNE="0")
            if args.dry_run:
                env.update(FASTMASK_QUICK_CPU="1", TRITON_INTERPRET="1")
            workers = [] if args.dry_run or not _has_module("xdist") else ["-n", "4"]
            stage_tests(r, "quick", ["tests", "-m", "gpu_quick", *workers], env, per_test=60)
        elif s.name == "train":
            # heuristic attention configs: autotuning every shape from cold caches would cost
            # the headline a minute; the ops stage measures the autotuned kernels
            stage_bench(r, "train", ["bench_train_step.py"], "headline", {"FASTMASK_ATTN_AUTOTUNE": "0"})
        elif s.name == "ops":
            stage_bench(r, "ops", ["bench_ops.py"], "headline")
        elif s.name == "train512":
            stage_bench(r, "train512", ["bench_train_step.py"], "rest")
        elif s.name == "opgrid":
            stage_bench(r, "opgrid", ["bench_ops.py"], "rest")
        elif s.name == "build":
            stage_build(r, info)
        elif s.name == "cuda_tests":
            args_ = ["tests/test_cuda_ext.py", "-m", "gpu", "-k", "not triton and not emu"]
            args_ += ["-n", "8"] if _has_module("xdist") else []
            stage_tests(r, "cuda_tests", args_, dict(r.env), per_test=120)
        elif s.name == "cuda_ops":
            stage_bench(r, "cuda_ops", ["bench_ops.py"], "headline",
                        {"FASTMASK_BENCH_PROVIDERS": "fastmask-cuda,fastmask-triton,torch"})
    md = final_report(r)
    r.say(f"total {r.elapsed():.0f} s")
    r.close()
    files = sorted(p.name for p in out.iterdir())
    if len(files) > MAX_OUT_FILES:
        print(f"WARNING: {out} holds {len(files)} files: {files}", file=sys.stderr)
    print()
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The one GPU run: build, test, benchmark, report -- in about 8 minutes, whatever hangs.

    python benchmarks/gpu_script.py OUTDIR             # on the GPU machine
    python benchmarks/gpu_script.py OUTDIR --dry-run   # the same code paths on the CPU, tiny sizes

Stages, each a subprocess with its own time cap taken from one overall budget (``--budget``,
default 480 s; every later stage keeps a guaranteed minimum), all output in OUTDIR/log.txt:

    env          device, driver and package versions
    install      ``import fastmask`` outside the source tree; if it fails,
                 ``pip install --no-deps --no-build-isolation -e .`` (never in a dry run)
    build_cuda   ``FASTMASK_BUILD_CUDA=1 python setup.py build_ext --inplace`` with MAX_JOBS = all
                 cores and FASTMASK_CUDA_ARCHS = this GPU only, if nvcc and csrc/ are present;
                 a failure is recorded, the run goes on (the cuda backend is then unavailable)
    gpu_tests    ``pytest tests -m gpu`` (junit XML and counts recorded)
    bench_ops    ``pytest benchmarks/bench_ops.py --benchmark-only`` in quick mode
    bench_train  ``pytest benchmarks/bench_train_step.py --benchmark-only`` in quick mode
    report       OUTDIR/results.json (environment, stages, every raw number), results.md,
                 PNG plots, and the table printed last

The benchmark stages stop cleanly before their cap (FASTMASK_BENCH_DEADLINE: the remaining
cases are recorded as skipped), and every result row is also appended to a .partial.jsonl as
it is measured, so even a killed stage leaves its numbers. No network is needed. Commit the
returned OUTDIR/<device>_<date>_quick.json under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name: (cap s, guaranteed minimum s)
STAGES = {
    "env": (30, 5),
    "install": (90, 5),
    "build_cuda": (200, 0),
    "gpu_tests": (120, 45),
    "bench_ops": (150, 90),
    "bench_train": (150, 90),
    "report": (40, 15),
}


class Runner:
    def __init__(self, out: Path, budget: float, dry: bool, interpret: bool = False):
        self.out, self.budget, self.dry, self.interpret = out, budget, dry, interpret
        self.t0 = time.time()
        self.stages: list[dict] = []
        self.logf = open(out / "log.txt", "a", buffering=1)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env["PYTHONUNBUFFERED"] = "1"
        if dry:
            self.env.setdefault("FASTMASK_BENCH_THREADS", "1")
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")

    def cap(self, name: str) -> float:
        names = list(STAGES)
        later = sum(STAGES[n][1] for n in names[names.index(name) + 1 :])
        remaining = self.budget - (time.time() - self.t0)
        return max(1.0, min(STAGES[name][0], remaining - later))

    def run(
        self, name: str, cmd: list[str], env: dict | None = None, cwd: Path = ROOT, cap: float | None = None, label: str = ""
    ) -> dict:
        cap = self.cap(name) if cap is None else cap
        self.say(f"== {name} (cap {cap:.0f} s): {label or ' '.join(cmd)}")
        t = time.time()
        tail: list[str] = []
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a timeout kills children too
        )

        def pump():
            for line in proc.stdout:
                self.logf.write(f"  {name}| {line}")
                tail.append(line.rstrip("\n"))
                del tail[:-200]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill(proc)
            rc = proc.wait()
        reader.join(timeout=10)
        st = {
            "name": name,
            "cmd": cmd,
            "rc": rc,
            "seconds": round(time.time() - t, 1),
            "cap_s": round(cap),
            "status": "timeout" if timed_out else ("ok" if rc == 0 else "failed"),
            "tail": tail[-40:],
        }
        self.say(f"   {name}: {st['status']} (rc {rc}) in {st['seconds']} s")
        self.stages.append(st)
        return st

    @staticmethod
    def _kill(proc) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def skip(self, name: str, why: str) -> dict:
        self.say(f"== {name}: skipped ({why})")
        st = {"name": name, "status": "skipped", "detail": why, "seconds": 0.0}
        self.stages.append(st)
        return st


# ----------------------------------------------------------------------------- stages
ENV_PY = r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("triton", "xformers", "pytest_benchmark", "matplotlib", "numpy"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = None
print("ENV_JSON " + json.dumps(info))
"""


def stage_env(r: Runner) -> dict:
    st = r.run("env", [sys.executable, "-c", ENV_PY], label="python -c <version probe>")
    info = {}
    for line in st.get("tail", []):
        if line.startswith("ENV_JSON "):
            info = json.loads(line[len("ENV_JSON ") :])
    if shutil.which("nvidia-smi"):  # read-only query; nothing about the card is changed
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = q.stdout.strip()
        except Exception as e:
            info["nvidia_smi"] = repr(e)
    st["detail"] = ", ".join(f"{k}={info.get(k)}" for k in ("device", "torch", "triton", "cuda", "python") if k in info)
    r.say(f"   {st['detail']}")
    return info


def stage_install(r: Runner) -> None:
    # Outside the source tree and without our PYTHONPATH: is fastmask really installed?
    env = {k: v for k, v in r.env.items() if k != "PYTHONPATH"}
    st = r.run("install", [sys.executable, "-c", "import fastmask, sys; print(fastmask.__file__)"], env=env, cwd=r.out, cap=30)
    if st["rc"] == 0:
        st["detail"] = "fastmask importable"
        return
    if r.dry:
        st["status"], st["detail"] = "skipped", "not installed; a dry run never installs (PYTHONPATH is used)"
        r.say(f"   {st['detail']}")
        return
    env = dict(r.env, FASTMASK_BUILD_CUDA="0")  # the extension is built in place by the next stage
    st2 = r.run("install", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."], env=env)
    st2["detail"] = "pip install -e ." + ("" if st2["rc"] == 0 else " failed: the stages run with PYTHONPATH instead")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return None


def stage_build(r: Runner, info: dict) -> None:
    if r.dry:
        r.skip("build_cuda", "dry run (a CUDA build needs the GPU machine's torch)")
        return
    if not (ROOT / "csrc").is_dir():
        r.skip("build_cuda", "no csrc/ folder in this checkout")
        return
    nvcc = _nvcc()
    if nvcc is None:
        r.skip("build_cuda", "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
        return
    env = dict(r.env)
    env["FASTMASK_BUILD_CUDA"] = "1"
    env["MAX_JOBS"] = str(os.cpu_count() or 8)
    if info.get("capability"):  # this GPU only (e.g. "90"): a third of the default build's work
        env.setdefault("FASTMASK_CUDA_ARCHS", info["capability"].replace(".", ""))
    # CUDA_HOME and the nvidia-wheel include folders are found by csrc/build.py itself.
    st = r.run("build_cuda", [sys.executable, "setup.py", "build_ext", "--inplace"], env=env)
    chk = r.run(
        "build_check",
        [sys.executable, "-c", "import fastmask; print('BACKENDS', fastmask.ops.available_backends())"],
        cap=60,
    )
    line = next((x for x in chk.get("tail", []) if x.startswith("BACKENDS")), "BACKENDS ?")
    st["detail"] = line[len("BACKENDS ") :]
    r.say(f"   backends: {st['detail']}")


def _count_tests(st: dict, junit: Path, log_lines: list[str]) -> str:
    if junit.exists():
        try:
            import xml.etree.ElementTree as ET

            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
            st["counts"] = dict(passed=passed, failed=tot["failures"], errors=tot["errors"], skipped=tot["skipped"])
            failed = [
                tc.get("classname", "") + "::" + tc.get("name", "")
                for s in suites
                for tc in s.iter("testcase")
                if tc.find("failure") is not None or tc.find("error") is not None
            ]
            st["failed_tests"] = failed[:50]
            return f"{passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped"
        except Exception as e:
            return f"junit unreadable: {e}"
    # killed before the XML was written: count the verbose lines that came through
    c = {k: sum(1 for x in log_lines if re.search(rf"\b{k}\b", x)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    st["counts"] = {k.lower(): v for k, v in c.items()}
    return f"(cut short) {c['PASSED']} passed, {c['FAILED']} failed, {c['ERROR']} errors, {c['SKIPPED']} skipped so far"


def stage_tests(r: Runner, k: str | None = None) -> None:
    junit = r.out / "gpu-tests.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfE", "--durations=10", f"--junitxml={junit}"]
    if k:
        cmd += ["-k", k]
    st = r.run("gpu_tests", cmd)
    st["detail"] = _count_tests(st, junit, _log_lines(r, "gpu_tests"))
    r.say(f"   {st['detail']}")


def _log_lines(r: Runner, name: str) -> list[str]:
    r.logf.flush()
    prefix = f"  {name}| "
    return [ln[len(prefix) :] for ln in (r.out / "log.txt").read_text(errors="replace").splitlines() if ln.startswith(prefix)]


def stage_bench(r: Runner, name: str, file: str, mode: str) -> Path:
    json_path = r.out / f"{name}.json"
    cap = r.cap(name)
    env = dict(r.env)
    env.update(
        FASTMASK_BENCH_MODE=mode,
        FASTMASK_BENCH_JSON=str(json_path),
        FASTMASK_BENCH_DEADLINE=str(time.time() + max(5.0, cap - 25.0)),
    )
    if r.dry and r.interpret:
        env["TRITON_INTERPRET"] = "1"
    else:  # never time the interpreter (and on a GPU it would refuse CUDA tensors)
        env.pop("TRITON_INTERPRET", None)
    json_path.unlink(missing_ok=True)  # a rerun into the same OUTDIR must not report stale rows
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        f"benchmarks/{file}",
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfE",
        f"--benchmark-json={r.out / ('pytest-benchmark-' + name + '.json')}",
        "--benchmark-columns=min,median,iqr,rounds",
        "--benchmark-sort=name",
    ]
    st = r.run(name, cmd, env=env, cap=cap)
    if not json_path.exists():
        partial = json_path.with_name(json_path.name + ".partial.jsonl")
        st["detail"] = "no JSON written" + (" (rows recovered from the partial log)" if partial.exists() else "")
    else:
        rows = json.loads(json_path.read_text()).get("results", [])
        c = {}
        for row in rows:
            c[row.get("status")] = c.get(row.get("status"), 0) + 1
        st["detail"] = ", ".join(f"{v} {k}" for k, v in sorted(c.items()))
    r.say(f"   {st['detail']}")
    return json_path


def merge(r: Runner, parts: list[Path], info: dict) -> dict:
    from benchmarks import common
    from benchmarks.summary import summarize_rows

    doc = {"schema": common.SCHEMA, "env": {}, "ceilings": {}, "ceilings_by_stage": {}, "results": []}
    for p in parts:
        if p.exists():
            d = json.loads(p.read_text())
        else:
            partial = p.with_name(p.name + ".partial.jsonl")
            if not partial.exists():
                continue
            d = {"results": common.load_rows_from_partial(partial), "env": {}, "ceilings": {}}
        doc["env"] = doc["env"] or d.get("env", {})
        if d.get("ceilings"):
            doc["ceilings"] = doc["ceilings"] or d["ceilings"]
            doc["ceilings_by_stage"][p.stem] = d["ceilings"]
        doc["results"] += d.get("results", [])
    if not doc["env"]:
        doc["env"] = {"device": info.get("device", "unknown"), **{k: info.get(k) for k in ("torch", "triton", "cuda", "python")}}
    doc["env"]["machine"] = info
    doc["env"]["gpu_script"] = {"dry_run": r.dry, "budget_s": r.budget, "total_s": round(time.time() - r.t0, 1)}
    # the output tail is kept only where a stage went wrong
    doc["stages"] = [
        {k: v for k, v in s.items() if k != "tail" or s["status"] in ("failed", "timeout")} for s in r.stages
    ]
    doc["summary"] = summarize_rows(doc["results"])
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fastmask: the one GPU run (build, tests, quick benchmarks, report)")
    ap.add_argument("outdir", help="folder for log.txt, the JSON results, the markdown table and plots")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, reference backend: proves the code paths")
    ap.add_argument("--interpret", action="store_true", help="dry run: also run the Triton kernels in the interpreter")
    ap.add_argument("--budget", type=float, default=480.0, help="overall time budget in seconds (default 480)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests-k", default=None, help="pytest -k expression for the GPU tests (default: all gpu-marked)")
    ap.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="STAGE=S",
        help=f"override a stage's time cap in seconds (stages: {', '.join(STAGES)}); repeatable",
    )
    args = ap.parse_args(argv)
    for item in args.cap:
        stage, _, sec = item.partition("=")
        if stage not in STAGES or not sec:
            ap.error(f"--cap: expected STAGE=SECONDS with STAGE in {list(STAGES)}, got {item!r}")
        STAGES[stage] = (float(sec), min(STAGES[stage][1], float(sec)))

    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out, args.budget, args.dry_run, args.interpret)
    r.say(f"fastmask gpu_script: root {ROOT}, out {out}, budget {args.budget:.0f} s, dry run {args.dry_run}")
    info = stage_env(r)
    if not args.dry_run and not info.get("gpu"):
        r.say("   WARNING: torch sees no GPU; the benchmarks will run the CPU set")
    stage_install(r)
    if args.skip_build:
        r.skip("build_cuda", "--skip-build")
    else:
        stage_build(r, info)
    if args.skip_tests:
        r.skip("gpu_tests", "--skip-tests")
    else:
        stage_tests(r, args.tests_k)
    mode = "dry" if args.dry_run else "quick"
    parts = [stage_bench(r, "bench_ops", "bench_ops.py", mode), stage_bench(r, "bench_train", "bench_train_step.py", mode)]

    t = time.time()
    doc = merge(r, parts, info)
    from benchmarks import common, report

    dev = doc["env"].get("device") or "unknown"
    date = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    name = f"{common.device_slug(dev)}_{date}_{mode}.json"
    r.stages.append({"name": "report", "status": "ok", "seconds": round(time.time() - t, 1)})
    doc["stages"].append(r.stages[-1])
    for p in (out / "results.json", out / name):
        p.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = report.markdown([doc], all_ops=False)
    (out / "results.md").write_text(md)
    (out / "results_all_ops.md").write_text(report.markdown([doc], all_ops=True))
    try:
        pngs = report.plots([doc], out)
    except Exception as e:  # a plot must never cost the table
        pngs = []
        r.say(f"   plots failed: {type(e).__name__}: {e}")
    r.say(f"wrote {out / 'results.json'}, {name}, results.md, results_all_ops.md, {', '.join(p.name for p in pngs)}")
    r.say(f"total {time.time() - r.t0:.0f} s")
    print()
    print(md, flush=True)
    r.logf.write(md)
    r.logf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

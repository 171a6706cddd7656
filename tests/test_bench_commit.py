"""The benchmarks record the commit they were given (FASTMASK_COMMIT) and never the HEAD of a
repository that merely encloses the checkout."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def enclosed_copy(tmp_path):
    """benchmarks/common.py and gpu_script.py copied into a folder inside another git repository."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    outer = tmp_path / "outer"
    (outer / "copy" / "benchmarks").mkdir(parents=True)
    for f in ("common.py", "gpu_script.py", "__init__.py"):
        shutil.copy(ROOT / "benchmarks" / f, outer / "copy" / "benchmarks" / f)
    run = lambda *a: subprocess.run(["git", *a], cwd=outer, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    run("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "outer")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=outer, capture_output=True, text=True).stdout.strip()
    return outer / "copy" / "benchmarks", head


def test_given_commit_wins(enclosed_copy, monkeypatch):
    folder, outer_head = enclosed_copy
    common = _load(folder / "common.py", "_enclosed_common")
    gpu = _load(folder / "gpu_script.py", "_enclosed_gpu_script")
    monkeypatch.setenv("FASTMASK_COMMIT", "b923b2b")
    assert common.git_commit()["commit"] == "b923b2b"
    assert gpu._git_commit() == "b923b2b"
    monkeypatch.delenv("FASTMASK_COMMIT")
    assert common.git_commit()["commit"] == "unknown"  # not the enclosing repository's HEAD
    assert gpu._git_commit() == "unknown"
    assert outer_head not in (common.git_commit()["commit"], gpu._git_commit())


def test_own_checkout_reports_its_head(monkeypatch):
    monkeypatch.delenv("FASTMASK_COMMIT", raising=False)
    common = _load(ROOT / "benchmarks" / "common.py", "_own_common")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip("this checkout is not a git repository of its own")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert common.git_commit()["commit"] == head

"""pytest wiring of the benchmark suite: ``pytest benchmarks/ --benchmark-only``.

- collects ``bench_*.py`` files of this folder (pyproject's ``testpaths`` only names tests/,
  so the benchmarks run when the folder is named on the command line);
- measures the two ceilings (copy bandwidth, matmul rate) once per session;
- records one row per case -- measured, skipped (with the reason) or failed (with the error) --
  and writes them with the environment to one JSON per run (see :mod:`benchmarks.common`);
- runs the most informative cases first, and skips the rest cleanly once
  ``FASTMASK_BENCH_DEADLINE`` has passed.
"""
from __future__ import annotations

import os

import pytest

from benchmarks import common

_LOG_KEY = pytest.StashKey()
_ROW_KEY = pytest.StashKey()
_PATH_KEY = pytest.StashKey()
_DEADLINE_MARGIN_S = 5.0


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    common.configure_torch()
    config.addinivalue_line("markers", "bench_case: a benchmark case (one row of the results JSON)")
    log = common.ResultLog(common.json_path())
    config.stash[_LOG_KEY] = log


def _log(config) -> common.ResultLog:
    return config.stash[_LOG_KEY]


def pytest_collection_modifyitems(config, items):
    # FASTMASK_BENCH_PART / FASTMASK_BENCH_PROVIDERS: cases of other parts are deselected
    # (not skipped: they are no rows of this run).
    keep, drop = [], []
    providers = common.providers_kept()
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        ok = case is None or common.in_part(getattr(case, "headline", False))
        if ok and providers and case is not None and hasattr(case, "provider"):
            ok = case.provider in providers
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # Most informative first (the headline shape, eager providers), so that a run cut short by
    # its deadline still has them. sort() is stable: the file order stays within one priority.
    def key(item):
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        return getattr(case, "priority", (0,))

    items.sort(key=key)


@pytest.fixture(scope="session")
def bench_env(pytestconfig):
    log = _log(pytestconfig)
    if not log.env:
        log.env = common.env_info()
        common.ResultLog.stream({"kind": "env", **log.env})
    return log.env


@pytest.fixture(scope="session")
def ceilings(pytestconfig, bench_env):
    log = _log(pytestconfig)
    if not log.ceilings:
        log.ceilings = common.measure_ceilings()
        common.ResultLog.stream({"kind": "ceilings", **log.ceilings})
    return log.ceilings


@pytest.fixture
def result_row(request):
    """The row this case fills in; the report hook below adds the status and logs it."""
    row = {}
    request.node.stash[_ROW_KEY] = row
    return row


@pytest.fixture(autouse=True)
def _deadline(request):
    left = common.time_left()
    if left is not None and left < _DEADLINE_MARGIN_S and request.node.get_closest_marker("bench_case"):
        pytest.skip("the time budget of this run is spent (FASTMASK_BENCH_DEADLINE)")


@pytest.hookimpl(hookwrapper=True)  # old-style wrapper: works with the pytest 7 of other machines too
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    if case is None or not hasattr(case, "row"):
        return
    done = report.when == "call" or (report.when == "setup" and not report.passed)
    if not done:
        return
    row = {**case.row(), **item.stash.get(_ROW_KEY, {})}
    if report.passed:
        row["status"] = "ok"
    elif report.skipped:
        row["status"] = "skipped"
        longrepr = report.longrepr
        row["reason"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        row["reason"] = row["reason"].removeprefix("Skipped: ")
    else:
        row["status"] = "failed"
        row["error"] = _short_error(call)
    row["test"] = item.nodeid
    _log(item.config).add(row)


def _short_error(call) -> str:
    exc = call.excinfo
    if exc is None:
        return "failed"
    msg = f"{exc.typename}: {exc.value}"
    return msg if len(msg) < 2000 else msg[:2000] + " ..."


def pytest_sessionfinish(session, exitstatus):
    log = _log(session.config)
    if not log.rows:
        return
    if not log.env:
        log.env = common.env_info()
    from benchmarks.summary import summarize_rows

    log.summary = summarize_rows(log.rows)
    path = log.write()
    session.config.stash[_PATH_KEY] = str(path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    log = _log(config)
    if not log.rows:
        return
    tr = terminalreporter
    tr.section("fastmask benchmarks")
    counts = {}
    for r in log.rows:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    tr.write_line(f"device: {log.env.get('device')}  mode: {log.env.get('mode')}  cases: {counts}")
    if log.ceilings:
        c = log.ceilings
        tr.write_line(
            f"ceilings: copy {c['copy_gbps']:.1f} GB/s, matmul ({c['matmul_dtype']}, n={c['matmul_n']}) "
            f"{c['matmul_tflops']:.2f} TFLOP/s"
        )
    for line in log.summary.get("lines", []):
        tr.write_line(line)
    path = config.stash.get(_PATH_KEY, None)
    if path:
        tr.write_line(f"results JSON: {os.path.relpath(path)}")

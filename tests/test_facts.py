"""Each fact has one home: every FASTMASK_* variable that the code reads is in the README's table,
and the numbers the code uses are imported from one place, not typed again."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A variable read by Python (a quoted name: os.environ.get("X"), setenv("X"), env.update(X=...)
# is caught as X=) or named by shell code ($X, X=...).
_PY_NAME = re.compile(r"""["'](FASTMASK_[A-Z0-9_]*[A-Z0-9])["']|\b(FASTMASK_[A-Z0-9_]*[A-Z0-9])=""")
_SH_NAME = re.compile(r"\$\{?(FASTMASK_[A-Z0-9_]*[A-Z0-9])|\b(FASTMASK_[A-Z0-9_]*[A-Z0-9])=")


def _sources():
    for folder in ("fastmask", "benchmarks", "tests", "scripts", "csrc"):
        yield from (p for p in (REPO / folder).rglob("*.py"))
    yield REPO / "setup.py"


def variables_read() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in _sources():
        for m in _PY_NAME.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(m.group(1) or m.group(2), str(path.relative_to(REPO)))
    for path in [REPO / ".ci" / "run", *(REPO / "scripts").rglob("*.sh")]:
        if path.exists():
            for m in _SH_NAME.finditer(path.read_text(encoding="utf-8")):
                found.setdefault(m.group(1) or m.group(2), str(path.relative_to(REPO)))
    return found


def test_every_variable_read_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `(FASTMASK_[A-Z0-9_]+)` \|", readme, flags=re.M))
    found = variables_read()
    assert {"FASTMASK_BACKEND", "FASTMASK_COMMIT", "FASTMASK_QUICK_CPU"} <= set(found), "the scan finds nothing"
    missing = {name: where for name, where in found.items() if name not in table}
    assert not missing, f"read by the code but not in the README's environment table: {missing}"
    stale = table - set(found)
    assert not stale, f"in the README's table but read nowhere: {sorted(stale)}"


def test_constants_are_not_typed_again():
    """LN_EPS (1e-6) and MAE_EPS live in fastmask/constants.py; the layers import them."""
    offenders = []
    for path in (REPO / "fastmask" / "nn").rglob("*.py"):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"eps\s*=\s*1e-6", line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "use fastmask.constants.LN_EPS:\n" + "\n".join(offenders)

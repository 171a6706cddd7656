"""The package's import structure: one table of layers, imports only downwards, no cycles.

Every module of ``fastmask`` is parsed with :mod:`ast` (nothing is imported) and every import of
another ``fastmask`` module is collected: module level and inside functions, absolute and
relative, ``importlib.import_module("fastmask.x")`` with a literal name, and a module path
written as a string constant (the command table of ``fastmask.cli`` names the modules it imports
that way). A module may import modules of its own layer or of a lower one, never of a higher
one, and no chain of imports may lead back to where it started.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "fastmask"

# --------------------------------------------------------------------------- the architecture
# Top to bottom. A module belongs to the entry naming it, or to the entry naming the package it
# lives in (the longest match wins: ``fastmask.ops.reference`` sits below ``fastmask.ops``). The
# root package (``fastmask/__init__.py``, the public API) matches only itself, so that every new
# top-level module has to be placed here by hand.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("tools: command line, training, sampling, evaluation, reporting, latents, FID, info, profiling", (
        "fastmask",  # the public API: re-exports ops, nn and models; `fastmask.__version__`
        "fastmask.__main__",
        "fastmask.cli",
        "fastmask.presets",  # TrainConfig and the presets (checks model config names)
        "fastmask.values",  # value checks of the config and of every command's flags; path and device helpers
        "fastmask.train",  # train() and the training loop; the Trainer (a run's state)
        "fastmask.train_step",  # one training step: draws, batch, loss, backward, AdamW, EMA
        "fastmask.phases",  # phase and step arithmetic of a run, the schedules (mask ratio, lr, EMA)
        "fastmask.step_graph",  # the trainer's step captured as a CUDA graph (imports only torch)
        "fastmask.data",
        "fastmask.checkpoint_io",
        "fastmask.run_folder",  # a run's folder: lock, probe, log, checkpoint listing
        "fastmask.sampling",
        "fastmask.flow_sampling",  # flow-matching ODE/SDE samplers (imported lazily by sampling)
        "fastmask.evaluate",
        "fastmask.report",
        "fastmask.compare",  # fastmask train --compare: families trained for the same time, one table
        "fastmask.vae",
        "fastmask.latents",
        "fastmask.generate",
        "fastmask.fid",
        "fastmask.info",
        "fastmask.profiling",
    )),
    ("models: DiT, MaskDiT, SPRINT, TREAD, preconditioners, configs, FLOP count, checkpoint loading", (
        "fastmask.models",
    )),
    ("nn: DiT blocks and layers (fastmask.nn.diffusers included)", (
        "fastmask.nn",
    )),
    ("ops: public ops, autograd, dispatch, torch.library registration", (
        "fastmask.ops",
    )),
    ("backends: Triton kernels, the CUDA extension, the torch reference", (
        "fastmask.kernels",
        "fastmask.cuda_ext",
        "fastmask._C",  # the compiled extension (no Python source)
        "fastmask.ops.reference",
    )),
    ("leaves: import nothing from fastmask", (
        "fastmask._env",
        "fastmask.constants",
        "fastmask.errors",
    )),
]
LEAF_LAYER = len(LAYERS) - 1


# --------------------------------------------------------------------------- the checker
def discover(src: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the package rooted at ``src``."""
    modules = {}
    for path in sorted(src.rglob("*.py")):
        parts = [package, *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of ``name`` that is a known module (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, package: str, known: set[str]) -> list[tuple[str, int]]:
    """The package modules ``module`` imports, each with the line of the import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module if _is_package(path) else module.rpartition(".")[0]
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found: list[tuple[str, int]] = []

    def add(name: str | None, line: int) -> None:
        if name and (name == package or name.startswith(package + ".")):
            target = _resolve(name, known)
            if target is not None and target != module:
                found.append((target, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
                full = f"{source}.{alias.name}"
                add(full if full in known else source, node.lineno)
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if fname in ("import_module", "__import__") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                name = node.args[0].value
                if name.startswith("."):
                    anchor = next((k.value for k in node.keywords if k.arg == "package"
                                   and isinstance(k.value, ast.Constant)), None)
                    dots = len(name) - len(name.lstrip("."))
                    if isinstance(anchor, str):
                        base = anchor.split(".")
                        name = ".".join(base[:len(base) - (dots - 1)] + [name.lstrip(".")])
                add(name, node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            # a module path as data, imported later (e.g. a command table): an exact, dotted match
            # only (the bare package name is also the torch.library namespace, a logger name...)
            if node.value in known and node.value != package:
                add(node.value, node.lineno)
    return sorted(set(found))


def build_graph(src: Path, package: str, extra: set[str] = frozenset()) -> dict[str, list[tuple[str, int]]]:
    """Module -> [(imported module, line)]. ``extra``: modules without source (compiled ones)."""
    modules = discover(src, package)
    known = set(modules) | set(extra)
    return {m: imports_of(m, p, package, known) for m, p in modules.items()}


def layer_index(module: str, layers, root: str) -> int | None:
    best, best_len = None, -1
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            matches = module == entry or (entry != root and module.startswith(entry + "."))
            if matches and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def unplaced(graph, layers, root: str) -> list[str]:
    return sorted(m for m in graph if layer_index(m, layers, root) is None)


def upward_imports(graph, layers, root: str, leaf_layer: int | None = None) -> list[str]:
    """Each import of a higher layer (or, from the leaf layer, of anything), as ``a -> b``."""
    bad = []
    for module, targets in sorted(graph.items()):
        mine = layer_index(module, layers, root)
        if mine is None:
            continue
        for target, line in targets:
            theirs = layer_index(target, layers, root)
            if theirs is None:
                continue
            if target.startswith(module + "."):
                continue  # a package's __init__ re-exports its own modules
            if mine == leaf_layer:
                bad.append(f"{module} -> {target} (line {line}): a leaf module imports nothing from the package")
            elif theirs < mine:
                bad.append(f"{module} -> {target} (line {line}): layer '{layers[mine][0].split(':')[0]}' "
                           f"imports the higher layer '{layers[theirs][0].split(':')[0]}'")
    return bad


def cycles(graph) -> list[list[str]]:
    """One cycle (a path back to its start) for each strongly connected group of modules."""
    adjacency = {m: sorted({t for t, _ in ts if t in graph}) for m, ts in graph.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adjacency[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in adjacency[v]:
                groups.append(sorted(group))

    for v in sorted(adjacency):
        if v not in index:
            strongconnect(v)

    found = []
    for group in groups:  # the shortest way from the group's first module back to itself
        members, start = set(group), group[0]
        paths, seen = [[start]], set()
        while paths:
            path = paths.pop(0)
            if start in adjacency[path[-1]]:
                found.append([*path, start])
                break
            for w in adjacency[path[-1]]:
                if w in members and w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return found


def _report(title: str, lines: list[str]) -> str:
    return title + "\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------- the package
def _graph():
    extra = {e for _, entries in LAYERS for e in entries}
    return build_graph(REPO / PACKAGE, PACKAGE, extra)


def test_every_module_is_placed_in_the_layer_table():
    missing = unplaced(_graph(), LAYERS, PACKAGE)
    assert not missing, _report(
        "modules missing from LAYERS in tests/test_layers.py; add each to the layer it belongs to "
        "(the table is the project's drawn architecture):", missing)


def test_imports_run_downwards_only():
    bad = upward_imports(_graph(), LAYERS, PACKAGE, LEAF_LAYER)
    assert not bad, _report("imports against the layer order (top to bottom: "
                            + " -> ".join(name.split(":")[0] for name, _ in LAYERS) + "):", bad)


def test_no_import_cycles():
    found = cycles(_graph())
    assert not found, _report("import cycles:", [" -> ".join(c) for c in found])


def test_the_checker_sees_the_package():
    graph = _graph()
    assert {"fastmask.cli", "fastmask.ops.dispatch", "fastmask.kernels.attention"} <= set(graph)
    edges = {(m, t) for m, ts in graph.items() for t, _ in ts}
    assert ("fastmask.nn.layers", "fastmask.ops") in edges  # from .. import ops
    assert ("fastmask.ops.dispatch", "fastmask.kernels") in edges  # inside a function
    assert ("fastmask.cli", "fastmask.generate") in edges  # a module path in the command table
    assert ("fastmask.cuda_ext", "fastmask._C") in edges  # importlib.import_module("fastmask._C")


def test_no_top_level_kernels_shadows_the_hub_package():
    # a top-level `kernels` would shadow the hub ecosystem's `kernels` package for our own users
    assert (REPO / "fastmask/kernels/__init__.py").exists() and not any((REPO / n).exists() for n in ("kernels", "kernels.py"))


# --------------------------------------------------------------------------- the checker fails
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


FAKE_LAYERS = [
    ("top: the tools", ("pkg", "pkg.app", "pkg.low.front")),
    ("low: the ops", ("pkg.low",)),
    ("leaves: nothing", ("pkg.base",)),
]


def test_checker_finds_upward_imports_cycles_and_unplaced_modules(tmp_path):
    src = _write(tmp_path, {
        "__init__.py": "from . import app\n",
        "app.py": "from .low import step\n",
        "low/__init__.py": "from .core import step\n",
        "low/core.py": "def step():\n    from .. import app  # upward, inside a function\n",
        "low/lazy.py": 'import importlib\nMOD = importlib.import_module("pkg.app")\n',
        "low/table.py": 'COMMANDS = {"run": "pkg.app"}\n',
        "base.py": "from pkg.low.core import step\n",
        "extra.py": "",
    })
    graph = build_graph(src, "pkg")
    assert unplaced(graph, FAKE_LAYERS, "pkg") == ["pkg.extra"]

    bad = upward_imports(graph, FAKE_LAYERS, "pkg", leaf_layer=2)
    edges = sorted(line.split(" (")[0] for line in bad)
    assert edges == ["pkg.base -> pkg.low.core", "pkg.low.core -> pkg.app", "pkg.low.lazy -> pkg.app",
                     "pkg.low.table -> pkg.app"], bad
    assert "layer 'low' imports the higher layer 'top'" in "\n".join(bad)

    found = cycles(graph)
    assert found == [["pkg.app", "pkg.low", "pkg.low.core", "pkg.app"]], found


def test_checker_passes_a_clean_package(tmp_path):
    src = _write(tmp_path, {
        "__init__.py": "from .app import run\nfrom . import low\n",
        "app.py": "from . import low\nfrom .low.core import step\nfrom . import base\n",
        "low/__init__.py": "from .core import step\nfrom . import front  # re-exported by its package\n",
        "low/front.py": "",
        "low/core.py": '"""pkg.app"""\nfrom ..base import VALUE\nimport pkg.base\n',
        "base.py": "import os\nVALUE = 1\n",
    })
    graph = build_graph(src, "pkg")
    assert unplaced(graph, FAKE_LAYERS, "pkg") == []
    assert upward_imports(graph, FAKE_LAYERS, "pkg", leaf_layer=2) == []
    assert cycles(graph) == []
    assert {t for t, _ in graph["pkg.low.core"]} == {"pkg.base"}  # not pkg.app: a docstring is not a path
    assert {t for t, _ in graph["pkg.low"]} == {"pkg.low.core", "pkg.low.front"}

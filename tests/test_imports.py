"""Import hygiene of the package.

Every module imports in a fresh interpreter, with the modules taken in sorted and in reverse order (so each
import cycle is entered from two sides); no module under lossatlas/probes imports lossatlas.analysis, viz,
store or cli (anywhere in the file, function bodies included); the engine (lossatlas.curvature,
lossatlas.estimators and the batches, losses and distributed modules they build on) imports none of those
nor lossatlas.probes; the imports between lossatlas.probes.* modules form no cycle, neither the
module-level ones nor those counting imports inside functions (a cycle hidden in a function body is still
a cycle); no file of the repository names a deprecated module path or name (lossatlas._moved) outside
the shims that keep them working.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from lossatlas._moved import MOVED, RENAMED

PACKAGE_DIR = Path(importlib.util.find_spec("lossatlas").origin).parent
REPO_DIR = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_PROBES = ("lossatlas.analysis", "lossatlas.viz", "lossatlas.store", "lossatlas.cli")
ENGINE_PACKAGES = ("curvature", "estimators")
ENGINE_MODULES = ("batches", "losses", "distributed")  # the plain modules the engine packages build on
FORBIDDEN_IN_ENGINE = ("lossatlas.probes", "lossatlas.api", *FORBIDDEN_IN_PROBES)


def module_name(path: Path) -> str:
    """``lossatlas/probes/grid.py`` → ``lossatlas.probes.grid``; a package's ``__init__.py`` → the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def package_modules(under: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every Python module below ``under`` by dotted name."""
    return {module_name(p): p for p in sorted(under.rglob("*.py")) if "__pycache__" not in p.parts}


def imported_modules(tree: ast.Module, module: str, is_package: bool, *, in_functions: bool) -> set[str]:
    """Dotted names of the modules a module's source imports.

    ``import a.b`` → a.b; ``from a import b`` → a.b when that is a module of the package, else a;
    relative imports are resolved against ``module``. Without ``in_functions``, only statements that
    run at import time count: the module body and the bodies of classes and of ``if``/``try``/``with``
    blocks, never a function body nor an ``if TYPE_CHECKING:`` block.
    """
    known = package_modules()
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            names.update(f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names)
        if not in_functions:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    visit(child)
                return
        for child in ast.iter_child_nodes(node):
            visit(child)

    for stmt in tree.body:
        visit(stmt)
    return names


def import_graph(modules: dict[str, Path], *, in_functions: bool) -> dict[str, set[str]]:
    """Edges module → the modules of ``modules`` it imports (implicit parent-package imports left out)."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = imported_modules(tree, name, path.name == "__init__.py", in_functions=in_functions)
        graph[name] = {n for n in found if n in modules and n != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        return list(err.args[1])
    return None


# ----------------------------------------------------------------------------------------- fresh interpreters
_IMPORT_ALL = """
import importlib, sys, traceback
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:
        print(f"importing {name} failed:")
        traceback.print_exc(file=sys.stdout)
        sys.exit(1)
"""


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(package_modules())
    assert {"lossatlas.probes.grid", "lossatlas.probes.surface", "lossatlas.probes.trajectory"} <= set(names)
    if order == "reversed":
        names = names[::-1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, *names],
        cwd=PACKAGE_DIR.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------- layering
def test_the_import_scanner_sees_every_form_of_import():
    src = (
        "import lossatlas.store as s\n"
        "from lossatlas import viz\n"
        "from ..analysis import tracking\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lossatlas import cli\n"
        "class A:\n    from . import grid\n"
        "def f():\n    from .trajectory import Trajectory\n"
    )
    tree = ast.parse(src)
    top = imported_modules(tree, "lossatlas.probes.surface", False, in_functions=False)
    everything = imported_modules(tree, "lossatlas.probes.surface", False, in_functions=True)
    assert {"lossatlas.store", "lossatlas.viz", "lossatlas.analysis.tracking", "lossatlas.probes.grid"} <= top
    assert "lossatlas.cli" not in top and "lossatlas.probes.trajectory" not in top
    assert {"lossatlas.cli", "lossatlas.probes.trajectory"} <= everything
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def forbidden_imports(modules: dict[str, Path], forbidden: tuple[str, ...]) -> list[str]:
    """``"a imports b"`` for every import (function bodies included) of a module under ``forbidden``."""
    offenders = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for imported in imported_modules(tree, name, path.name == "__init__.py", in_functions=True):
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                offenders.append(f"{name} imports {imported}")
    return offenders


def engine_modules() -> dict[str, Path]:
    modules = {}
    for pkg in ENGINE_PACKAGES:
        modules.update(package_modules(PACKAGE_DIR / pkg))
    for mod in ENGINE_MODULES:
        modules[f"lossatlas.{mod}"] = PACKAGE_DIR / f"{mod}.py"
    return modules


def test_probes_never_import_analysis_viz_store_or_cli():
    offenders = forbidden_imports(package_modules(PACKAGE_DIR / "probes"), FORBIDDEN_IN_PROBES)
    assert not offenders, "\n".join(offenders)


def test_the_engine_never_imports_probes_analysis_viz_store_or_cli():
    modules = engine_modules()
    # the scan covers the real engine: both packages with their solvers, and the modules they build on
    assert {"lossatlas.curvature.base", "lossatlas.estimators.lanczos", "lossatlas.losses"} <= set(modules)
    assert all(path.is_file() for path in modules.values())
    graph = import_graph(package_modules(), in_functions=True)
    assert {"lossatlas.batches", "lossatlas.losses", "lossatlas.distributed"} <= graph["lossatlas.curvature.base"]
    assert forbidden_imports({"lossatlas.probes.hessian": PACKAGE_DIR / "probes" / "hessian.py"}, FORBIDDEN_IN_ENGINE)
    offenders = forbidden_imports(modules, FORBIDDEN_IN_ENGINE)
    assert not offenders, "\n".join(offenders)


def test_only_the_store_imports_h5py():
    outside = {n: p for n, p in package_modules().items() if not n.startswith("lossatlas.store")}
    offenders = forbidden_imports(outside, ("h5py",))
    assert not offenders, "\n".join(offenders)
    assert forbidden_imports({"lossatlas.store.h5": PACKAGE_DIR / "store" / "h5.py"}, ("h5py",))  # the scan sees it


def test_viz_never_imports_torch():
    offenders = forbidden_imports(package_modules(PACKAGE_DIR / "viz"), ("torch",))
    assert not offenders, "\n".join(offenders)


def repository_files() -> list[Path]:
    """The package, its tests, benchmarks and experiments (.py) and the Markdown pages, if this is a checkout."""
    roots = [REPO_DIR / d for d in ("lossatlas", "tests", "benchmarks", "experiments")]
    files = [p for r in roots if r.is_dir() for p in sorted(r.rglob("*.py")) if "__pycache__" not in p.parts]
    pages = [p for d in (REPO_DIR, *roots) if d.is_dir() for p in sorted(d.glob("*.md"))]
    return files + pages


def test_no_file_names_a_deprecated_module_path():
    shims = {PACKAGE_DIR / "_moved.py"} | {
        PACKAGE_DIR.parent.joinpath(*old.split(".")).with_suffix(".py") for old in MOVED
    } | {PACKAGE_DIR.parent.joinpath(*old.split("."), "__init__.py") for old in MOVED}
    shims.add(REPO_DIR / "tests" / "test_api.py")  # the test of the shims imports the old paths on purpose
    files = [p for p in repository_files() if p not in shims]
    assert PACKAGE_DIR / "probes" / "hessian.py" in files and shims & set(package_modules().values())
    old_names = {old.rpartition(".")[2] for old in RENAMED}  # renamed functions and classes, by their old name
    alternatives = sorted(set(MOVED) | old_names, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(old) for old in alternatives) + r")\b")
    found = [f"{p.relative_to(REPO_DIR)}:{i}: {m.group(1)}"
             for p in files for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             for m in pattern.finditer(line)]
    assert not found, "deprecated paths or names (use the new ones of lossatlas._moved):\n" + "\n".join(found)


@pytest.mark.parametrize("in_functions", [False, True], ids=["module_level", "with_function_level"])
def test_probe_imports_have_no_cycle(in_functions):
    graph = import_graph(package_modules(PACKAGE_DIR / "probes"), in_functions=in_functions)
    # the graph is the real one: the landscape probes depend on the shared grid engine and the directions
    assert {"lossatlas.probes.grid", "lossatlas.probes.directions"} <= graph["lossatlas.probes.surface"]
    assert {"lossatlas.probes.grid", "lossatlas.probes.directions"} <= graph["lossatlas.probes.trajectory"]
    assert "lossatlas.probes.surface" in graph["lossatlas.probes.registry"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)

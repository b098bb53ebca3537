"""The project's import structure: no import cycle among its modules, and imports point one way,
workbench -> panels -> engine (the engine never imports panels, workbench.* or gradio; panels never
import workbench.*). Read from the source with `ast`, imports inside functions included: a lazy import
still ties two modules together, it only hides the cycle until run time. (`importlib.import_module` with
a computed name, as the app uses to load its panels, is not read: keep such imports pointing downward.)"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it is installed as (pyproject's package-dir)
PACKAGES = {"workbench": "workbench", "panels": "workbench.panels", "engine": "workbench.engine"}
ENGINE, PANELS = "workbench.engine", "workbench.panels"


def module_files(root: Path) -> dict[str, Path]:
    """Every project module under `root` -> its file: 'workbench.engine.ops.prune' -> engine/ops/prune.py."""
    mods = {}
    for folder, package in PACKAGES.items():
        base = root / folder
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = f
    return mods


def imported_names(module: str, path: Path, is_package: bool, modules) -> set[str]:
    """Absolute dotted names a module imports anywhere in its file (module level or inside functions).
    `from X import a` names X.a where that is one of `modules` (a submodule), else X; relative imports
    are resolved against the module's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                src = f"{base}.{node.module}" if node.module else base
            else:
                src = node.module
            names.update(f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names)
    return names


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """-> (edges between project modules, every name each module imports, external ones included).
    An import of a.b.c is a dependency on the deepest project module it names (a package's
    `__init__` that it passes through is not counted, as import linters do)."""
    files = module_files(root)
    graph, raw = {}, {}
    for mod, f in files.items():
        raw[mod] = imported_names(mod, f, f.name == "__init__.py", files)
        deps = set()
        for name in raw[mod]:
            parts = name.split(".")
            hit = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files), None)
            if hit is not None and hit != mod:
                deps.add(hit)
        graph[mod] = deps
    return graph, raw


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search; every back edge closes one cycle, returned as [a, b, ..., a]."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in graph}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        colour[n] = GREY
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m, WHITE) == GREY:
                cycles.append(stack[stack.index(m):] + [m])
            elif colour.get(m, WHITE) == WHITE:
                visit(m)
        stack.pop()
        colour[n] = BLACK

    for n in sorted(graph):
        if colour[n] == WHITE:
            visit(n)
    return cycles


def layer(mod: str) -> str:
    if mod == ENGINE or mod.startswith(ENGINE + "."):
        return "engine"
    if mod == PANELS or mod.startswith(PANELS + "."):
        return "panels"
    return "workbench"


def direction_violations(raw: dict[str, set[str]]) -> list[str]:
    """Imports against workbench -> panels -> engine: the engine importing panels, workbench.* or gradio;
    a panel importing workbench.* (anything but the engine and the panels)."""
    bad = []
    for mod, names in sorted(raw.items()):
        for name in sorted(names):
            top = name.split(".")[0]
            ours = top == "workbench"
            if layer(mod) == "engine" and (top in ("gradio", "gradio_client") or (ours and layer(name) != "engine")):
                bad.append(f"{mod} imports {name}")
            if layer(mod) == "panels" and ours and layer(name) == "workbench" and name != "workbench":
                bad.append(f"{mod} imports {name}")
    return bad


# ---- the checks ----------------------------------------------------------------------------------
def test_no_import_cycle_among_the_project_modules():
    graph, _ = import_graph()
    assert len(graph) > 50 and "workbench.panels.blocks" in graph and "workbench.engine.ops.prune" in graph
    assert find_cycles(graph) == []


def test_imports_point_workbench_to_panels_to_engine():
    _, raw = import_graph()
    assert direction_violations(raw) == []


def test_no_panel_imports_the_app():
    _, raw = import_graph()
    assert not [m for m, names in raw.items() if layer(m) == "panels" and "workbench.app" in names]


# ---- the checker itself: it finds what it is meant to find ---------------------------------------
def test_find_cycles_on_synthetic_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []  # a diamond, no cycle
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    two = find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}})
    assert sorted(map(tuple, two)) == [("a", "b", "a"), ("c", "d", "c")]


def _copy_tree(tmp_path: Path) -> Path:
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def _add_function(path: Path, body: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n\ndef _planted():\n    {body}\n", encoding="utf-8")


def test_a_lazy_absolute_import_that_closes_a_cycle_is_found(tmp_path):
    root = _copy_tree(tmp_path)
    graph, _ = import_graph(root)
    assert "workbench.panels.chart" in graph["workbench.panels.workbench"]  # workbench imports chart at its top
    assert find_cycles(graph) == []
    _add_function(root / "panels" / "chart.py", "from workbench.panels.workbench import MODES")
    cycles = find_cycles(import_graph(root)[0])
    assert any({"workbench.panels.chart", "workbench.panels.workbench"} <= set(c) for c in cycles), cycles


def test_a_relative_import_that_closes_a_cycle_is_found(tmp_path):
    root = _copy_tree(tmp_path)
    assert "workbench.engine.errors" in import_graph(root)[0]["workbench.engine.ops.prune"]  # from ..errors import
    _add_function(root / "engine" / "errors.py", "from .ops import prune")
    cycles = find_cycles(import_graph(root)[0])
    assert any({"workbench.engine.errors", "workbench.engine.ops.prune"} <= set(c) for c in cycles), cycles


def test_imports_against_the_direction_are_found(tmp_path):
    root = _copy_tree(tmp_path)
    _add_function(root / "engine" / "errors.py", "import gradio")
    _add_function(root / "engine" / "data.py", "from workbench.panels import chart")
    _add_function(root / "panels" / "chart.py", "from workbench.store import Store")
    bad = direction_violations(import_graph(root)[1])
    assert "workbench.engine.errors imports gradio" in bad
    assert "workbench.engine.data imports workbench.panels.chart" in bad
    assert "workbench.panels.chart imports workbench.store" in bad

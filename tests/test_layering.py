"""The layering rules: the supervisor never imports mlx, the runner never imports the supervisor."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_supervisor_never_imports_mlx() -> None:
    # Import every supervisor module in a fresh interpreter, then look at sys.modules:
    # an indirect import (through transformers, say) counts too.
    modules = sorted(
        ".".join(("corral", *p.relative_to(ROOT).with_suffix("").parts))
        for p in (ROOT / "supervisor").rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'transformers') or m == 'corral.runner.engine')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"supervisor pulled in: {out.stdout.strip()}"


def test_runner_never_imports_supervisor() -> None:
    for path in (ROOT / "runner").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("corral.supervisor", "supervisor")), f"{path.name} imports {name}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("corral", *parts))


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module name an import statement may load, absolute ones and relative ones
    resolved; `from pkg import name` counts both pkg and pkg.name (a submodule or not)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def import_graph() -> dict[str, set[str]]:
    """corral.supervisor and corral.runner modules -> the ones among them each imports,
    from the AST: every import statement counts, at module level or inside a function."""
    paths = [p for d in ("supervisor", "runner") for p in (ROOT / d).rglob("*.py")]
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            edges.update(m for m in _imported(node, name, is_package) if m in modules and m != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    # supervisor.pull imports the manifest reader inside a function only
    assert "corral.supervisor.manifest" in graph["corral.supervisor.pull"]
    assert "corral.supervisor.api.completion" in graph["corral.supervisor.api.ollama"]


def test_no_import_cycles_in_supervisor_or_runner() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])

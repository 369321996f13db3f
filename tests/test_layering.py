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

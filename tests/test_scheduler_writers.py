"""One writer: only the scheduler's dispatcher assigns to, deletes from or mutates its state.

A static check of supervisor/scheduler.py. The dispatcher is `_dispatch_loop`
and every Scheduler method it reaches by plain calls. Code that runs elsewhere
(public methods, the lease, background tasks handed to `_spawn` or
`create_task`, callbacks in lambdas) reaches its own set of methods; no method in that set may write
`self._table` or `self._queue`, and every method that does must be the
dispatcher's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "supervisor" / "scheduler.py"
OWNED = {"_table", "_queue"}
MUTATORS = {"pop", "popitem", "clear", "update", "setdefault", "append", "appendleft", "extend",
            "extendleft", "insert", "remove", "popleft", "rotate", "__setitem__", "__delitem__"}
DISPATCHER = "_dispatch_loop"
HAND_OFF = {"_spawn", "create_task", "ensure_future"}  # what these are given runs in another task


def _is_owned(node: ast.AST) -> bool:
    """`self._table` / `self._queue`, or a subscript of one."""
    if isinstance(node, ast.Subscript):
        return _is_owned(node.value)
    return (isinstance(node, ast.Attribute) and node.attr in OWNED
            and isinstance(node.value, ast.Name) and node.value.id == "self")


def _writes(fn: ast.AST) -> list[int]:
    """Lines in `fn` that write the owned state (or take an alias that could)."""
    lines = []
    for node in ast.walk(fn):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
            if _is_owned(node.value) and not isinstance(node.value, ast.Subscript):
                lines.append(node.lineno)  # an alias: writes through it would go unseen
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in MUTATORS and _is_owned(node.func.value)):
            lines.append(node.lineno)
        lines.extend(node.lineno for t in targets if _is_owned(t))
    return lines


def _refs(fn: ast.AST, methods: set[str]) -> tuple[set[str], set[str]]:
    """Methods `fn` runs itself, and methods it hands off (to a task or in a lambda)."""
    inline: set[str] = set()
    handed: set[str] = set()

    def visit(node: ast.AST, elsewhere: bool) -> None:
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                and node.attr in methods):
            (handed if elsewhere else inline).add(node.attr)
        if isinstance(node, ast.Lambda):
            elsewhere = True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in HAND_OFF):
            visit(node.func, elsewhere)
            for arg in node.args:
                visit(arg, True)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, elsewhere)

    for stmt in fn.body if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else []:
        visit(stmt, False)
    return inline, handed


def _closure(start: set[str], calls: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(calls[name])
    return seen


def check(source: str) -> list[str]:
    """Violations of the one-writer rule in `source` (a module with class Scheduler)."""
    tree = ast.parse(source)
    problems = []
    scheduler = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler")
    fns = {f.name: f for f in scheduler.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names = set(fns)
    for node in tree.body:  # outside the Scheduler class: no writes, and no private methods but _release
        if node is not scheduler:
            problems += [f"line {line}: outside Scheduler" for line in _writes(node)]
            problems += [f"line {n.lineno}: outside Scheduler uses {n.attr}" for n in ast.walk(node)
                         if isinstance(n, ast.Attribute) and n.attr.startswith("_") and n.attr != "_release"
                         and (n.attr in names or n.attr in OWNED)]
    inline = {n: _refs(f, names)[0] for n, f in fns.items()}
    handed = set().union(*(_refs(f, names)[1] for f in fns.values()))
    dispatcher = _closure({DISPATCHER}, inline)
    # Everything that runs outside the dispatcher: public methods, `_release` (the lease calls it),
    # and whatever is handed to tasks or callbacks.
    entry_points = {n for n in names if not n.startswith("_")} | {"_release"} | handed
    elsewhere = _closure(entry_points - {DISPATCHER, "__init__"}, inline)
    for name, fn in fns.items():
        lines = _writes(fn)
        if not lines:
            continue
        if name == "__init__":
            # construction creates the containers, nothing else
            ok = all(isinstance(s, ast.AnnAssign) and _is_owned(s.target)
                     and isinstance(s.value, (ast.Call, ast.Dict))
                     for s in fn.body if isinstance(s, (ast.Assign, ast.AnnAssign)) and _writes(s))
            if not ok:
                problems.append("__init__ does more than create the containers")
            continue
        if name not in dispatcher:
            problems.append(f"{name} (line {lines[0]}) writes but is not the dispatcher's")
        if name in elsewhere:
            problems.append(f"{name} (line {lines[0]}) writes and runs outside the dispatcher")
    return problems


def test_only_the_dispatcher_writes_the_table() -> None:
    assert check(SOURCE.read_text()) == []


def test_the_dispatcher_does_write_it() -> None:
    """Guard against a vacuous pass: the writers found are dispatcher methods."""
    tree = ast.parse(SOURCE.read_text())
    scheduler = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler")
    writers = {f.name for f in scheduler.body
               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and _writes(f)} - {"__init__"}
    assert {"_start_load", "_drop", "_take_tickets", "_on_acquire"} <= writers


def test_no_other_module_touches_the_table() -> None:
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        if path == SOURCE:
            continue
        tree = ast.parse(path.read_text())
        hits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "_table"]
        assert hits == [], f"{path.name} uses the scheduler's table at lines {hits}"


BAD = '''
class Scheduler:
    def __init__(self):
        self._table: dict = {}
    async def _dispatch_loop(self):
        self._handle()
    def _handle(self):
        self._table["a"] = 1
        self._spawn(self._task())
    async def _task(self):
        self._forget()
    def _forget(self):
        self._table.pop("a")
    def unload(self, name):
        del self._table[name]
    def loaded(self):
        t = self._table
        return t
    def _release(self):
        self._handle()

class Lease:
    async def release(self):
        self._scheduler._handle()
'''


@pytest.mark.parametrize("needle", [
    "_forget (line 13) writes but is not the dispatcher's",
    "unload (line 15) writes but is not the dispatcher's",
    "loaded (line 17) writes but is not the dispatcher's",
    "_handle (line 8) writes and runs outside the dispatcher",
    "line 24: outside Scheduler uses _handle",
])
def test_the_check_catches_other_writers(needle: str) -> None:
    assert needle in check(BAD)

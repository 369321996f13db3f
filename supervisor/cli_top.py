"""`corral top`: the status page's snapshot (GET /ui/state) as a live terminal view.

`render(snapshot)` builds one frame (a rich renderable) from the snapshot alone,
so tests and `--once` see exactly what the live view shows. The live view
redraws about once a second; q (or Ctrl-C) quits and gives the terminal back.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

from corral.supervisor.cli_client import CannotConnect, ClientError, CorralClient
from rich.console import Console, Group, RenderableType
from rich.filesize import decimal as human_size
from rich.live import Live
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 60
PART_STYLES = (("weights", "blue"), ("kv", "green"), ("prompt_cache", "yellow"), ("overhead", "bright_black"))
STATE_STYLES = {"ready": "green", "busy": "yellow", "loading": "magenta", "draining": "magenta",
                "stopping": "magenta", "failed": "bold red", "stalled": "bold red", "crashed": "bold red"}
REQUESTS_SHOWN = 8


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def memory_bar(snapshot: dict[str, Any], width: int = BAR_WIDTH) -> Text:
    """The limit as a bar: each model's parts, the standby runner, then what is free."""
    mem = snapshot["memory"]
    standby = (mem.get("standby") or {}).get("rss", 0)
    scale = max(mem["limit"], mem["used"] + standby, 1)
    bar = Text()
    used_cells = 0
    for model in snapshot["models"]:
        for part, style in PART_STYLES:
            cells = round(width * model["parts"].get(part, 0) / scale)
            bar.append("█" * cells, style=style)
            used_cells += cells
    cells = round(width * standby / scale)
    bar.append("█" * cells, style="magenta")
    bar.append("░" * max(0, width - used_cells - cells), style="bright_black")
    return bar


def _memory(snapshot: dict[str, Any]) -> Group:
    mem = snapshot["memory"]
    standby = mem.get("standby")
    facts = Text.assemble(
        ("limit ", "bold"), f"{human_size(mem['limit'])} ({mem['limit_source']})  ",
        ("models ", "bold"), f"{human_size(mem['used'])}  ",
        ("standby ", "bold"), f"{human_size(standby['rss']) if standby else 'none'}  ",
        ("OS free ", "bold"), f"{human_size(mem['os_free'])} of {human_size(mem['os_total'])}",
    )
    legend = Text.assemble(*[(f"█ {label}  ", style) for label, style in
                             (("weights", "blue"), ("KV cache", "green"), ("prompt cache", "yellow"),
                              ("overhead", "bright_black"), ("standby", "magenta"))])
    return Group(memory_bar(snapshot), facts, legend)


def _expires(model: dict[str, Any], now: float) -> str:
    if model["pinned"]:
        return "pinned"
    at = model.get("expires_at")
    if at is None:
        return "-" if model["state"] == "loading" else "never"
    return "now" if at <= now else f"in {_seconds(at - now)}"


def _models(snapshot: dict[str, Any]) -> Table:
    table = Table(title="models", title_justify="left", expand=False, box=None, header_style="bold")
    for name, right in (("NAME", False), ("STATE", False), ("PID", True), ("ACTIVE", True), ("QUEUED", True),
                        ("CTX", True), ("PAR", True), ("EXPIRES", False), ("PINNED", False),
                        ("SIZE", True), ("WEIGHTS/KV/CACHE/OVERHEAD", False)):
        table.add_column(name, justify="right" if right else "left", no_wrap=name == "NAME")
    now = snapshot["time"]
    for m in snapshot["models"]:
        parts = m["parts"]
        split = " / ".join(human_size(parts.get(p, 0)) for p, _ in PART_STYLES)
        table.add_row(m["name"], Text(m["state"], style=STATE_STYLES.get(m["state"], "")), str(m["pid"] or "-"),
                      str(m["active"]), str(m["queued"]), str(m["context_length"]), str(m["num_parallel"]),
                      _expires(m, now), "yes" if m["pinned"] else "no", human_size(m["footprint"]), split)
    for p in snapshot["problems"]:
        table.add_row(p["name"], Text(p["state"], style=STATE_STYLES.get(p["state"], "red")), "-", "", "", "", "",
                      "", "", "", Text(p["error"][:200], style="red"))
    for name, n in (snapshot.get("waiting") or {}).items():
        table.add_row(name, Text("waiting", style="magenta"), "-", "0", str(n), "", "", "", "", "", "")
    if not table.rows:
        table.add_row(Text("no model is loaded", style="italic bright_black"), *[""] * 10)
    return table


def _requests(snapshot: dict[str, Any]) -> Table:
    table = Table(title="recent requests", title_justify="left", box=None, header_style="bold")
    for name, right in (("TIME", False), ("FAMILY", False), ("MODEL", False), ("STATUS", True),
                        ("TTFT", True), ("TOK/S", True), ("TOKENS", True), ("DURATION", True)):
        table.add_column(name, justify="right" if right else "left")
    for r in snapshot["requests"][:REQUESTS_SHOWN]:
        status = Text(str(r["status"]), style="red" if r["status"] >= 400 or r["error"] else "green")
        table.add_row(_clock(r["time"]), r["family"], r["model"] or "-", status, _seconds(r["ttft"]),
                      "-" if r["tok_s"] is None else f"{r['tok_s']:.1f}", f"{r['tokens_in']}/{r['tokens_out']}",
                      _seconds(r["duration"]))
    if not table.rows:
        table.add_row(Text("no request yet", style="italic bright_black"), *[""] * 7)
    return table


def render(snapshot: dict[str, Any], *, footer: str = "") -> RenderableType:
    """One frame of `corral top` from a /ui/state snapshot."""
    up = _seconds(snapshot["time"] - snapshot["started_at"])
    head = Text.assemble(("corral ", "bold"), f"v{snapshot['version']}  up {up}  ",
                         ("queue ", "bold"), f"{snapshot['queue_depth']}  ",
                         ("at ", "bold"), _clock(snapshot["time"]))
    parts: list[RenderableType] = [head, Text(), _memory(snapshot), Text(), _models(snapshot), Text(),
                                   _requests(snapshot)]
    if footer:
        parts += [Text(), Text(footer, style="bright_black")]
    return Group(*parts)


def _frame(client: CorralClient, footer: str) -> RenderableType:
    try:
        return render(client.status(), footer=footer)
    except CannotConnect as e:
        return Group(Text(str(e), style="bold red"), Text(footer, style="bright_black"))


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """Single keys from a terminal stdin (cbreak, so Ctrl-C still interrupts); False when
    stdin is not a terminal (then only Ctrl-C quits)."""
    if not sys.stdin.isatty():
        yield False
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(keys: bool, timeout: float) -> bool:
    """Wait up to `timeout`; True when q was typed meanwhile."""
    if not keys:
        time.sleep(timeout)
        return False
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready and os.read(sys.stdin.fileno(), 32).lower().startswith(b"q"):
            return True
    return False


def run_top(client: CorralClient, *, once: bool = False, interval: float = 1.0) -> int:
    # Piped (--once in a script), there is no width to fit: wide enough for every column.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if once:
        console.print(render(client.status()))
        return 0
    if interval <= 0:
        raise ClientError("--interval must be more than 0 seconds")
    footer = "q or Ctrl-C quits"
    try:
        with _keys() as keys, Live(_frame(client, footer), console=console, auto_refresh=False,
                                   screen=console.is_terminal) as live:
            live.refresh()  # the first frame at once (auto_refresh is off: frames follow the data)
            while not _quit_pressed(keys, interval):
                live.update(_frame(client, footer), refresh=True)
    except KeyboardInterrupt:
        pass
    return 0

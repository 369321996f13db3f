"""The status snapshot's pure parts, fast: the scheduler's overview on fake runners (the
in-memory world of test_scheduler_unit.py), the rings of recent requests and problems,
the log tail, the event stream's idea of a change, and `corral top`'s frame.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.status import status_snapshot
from corral.supervisor.api.ui import LOG_READ_BYTES, _signature, tail_lines
from corral.supervisor.cli import confirm_delete
from corral.supervisor.cli_client import ClientError
from corral.supervisor.cli_top import memory_bar, render
from corral.supervisor.memory import NeedEstimate
from corral.supervisor.metrics import RECENT_REQUESTS, Metrics, RequestRecord
from corral.supervisor.process import runner_log_path
from rich.console import Console

from tests.test_scheduler_unit import GB, Behaviour, World, make, settle, until

__all__ = ["make"]  # the fixture, shared with test_scheduler_unit.py


def context(w: World) -> AppContext:
    return AppContext(settings=w.settings, store=w.store, scheduler=w.sched)  # type: ignore[arg-type]


def split_estimate(m: Any, num_ctx: int, num_parallel: int, **_: Any) -> NeedEstimate:
    weights = m.weight_bytes
    return NeedEstimate(weights=weights, kv=weights // 4, overhead=weights // 8,
                        total=weights + weights // 4 + weights // 8 + weights // 16, prompt_cache=weights // 16)


def record(model: str = "a", **kw: Any) -> RequestRecord:
    values: dict[str, Any] = dict(family="ollama", route="/api/chat", model=model, status=200, ttft=0.5,
                                  duration=1.5, tokens_in=7, tokens_out=10)
    values.update(kw)
    return RequestRecord(**values)


async def test_overview_splits_each_footprint_into_parts_that_sum_to_it(make: Callable[..., Any]) -> None:
    w = await make({"a": GB, "b": 2 * GB})
    w.sched.estimate = split_estimate
    for name in ("a", "b"):
        lease = await w.acquire(name)
        await lease.release()
    snap = status_snapshot(context(w))
    models = {m["name"]: m for m in snap["models"]}
    ps = {m.name: m.size for m in w.sched.loaded()}
    assert set(models) == {"a", "b"}
    for name, size in (("a", GB), ("b", 2 * GB)):
        m = models[name]
        assert m["parts"] == {"weights": size, "kv": size // 4, "prompt_cache": size // 16,
                              "overhead": size // 8}
        assert sum(m["parts"].values()) == m["footprint"] == ps[name]
        assert m["state"] == "ready" and m["queued"] == 0 and m["active"] == 0
    assert snap["memory"]["used"] == sum(m.size for m in w.sched.loaded())
    assert snap["memory"]["limit"] == 10 * GB and snap["memory"]["standby"] is None


async def test_runner_reporting_more_than_its_estimate_shows_the_rest_as_overhead(
        make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    w.sched.estimate = split_estimate
    lease = await w.acquire("a")
    entry = w.sched._table["a"]
    entry.status = {"device": "cpu", "memory": {"rss": 3 * GB}}  # what a /status refresh would bring
    view = w.sched.overview()[0]
    assert view.footprint == 3 * GB and sum(view.parts.values()) == 3 * GB
    assert view.parts["weights"] == GB and view.parts["overhead"] == 3 * GB - GB - GB // 4 - GB // 16
    assert view.active == 1 and status_snapshot(context(w))["models"][0]["state"] == "busy"
    await lease.release()


async def test_loading_and_queued_requests_show(make: Callable[..., Any]) -> None:
    gate = asyncio.Event()
    w = await make({"a": GB}, {"a": Behaviour(gate=gate)})
    waiting = [asyncio.create_task(w.acquire("a")) for _ in range(3)]
    await until(lambda: len(w.starts()) == 1)
    await settle()
    snap = status_snapshot(context(w))
    assert [(m["name"], m["state"], m["queued"]) for m in snap["models"]] == [("a", "loading", 3)]
    assert snap["queue_depth"] == 3
    gate.set()
    for lease in await asyncio.gather(*waiting):
        await lease.release()


async def test_failed_load_shows_its_error_until_the_model_loads(make: Callable[..., Any]) -> None:
    w = await make({"bad": GB}, {"bad": Behaviour(fail="weights are missing")})
    with pytest.raises(Exception, match="weights are missing"):
        await w.acquire("bad")
    snap = status_snapshot(context(w))
    assert snap["models"] == []
    [problem] = snap["problems"]
    assert problem["name"] == "bad" and problem["state"] == "failed"
    assert "weights are missing" in problem["error"]
    w.behaviour["bad"] = Behaviour()  # fixed: once it loads, the old error is gone
    lease = await w.acquire("bad")
    assert status_snapshot(context(w))["problems"] == []
    await lease.release()


async def test_crashed_runner_shows_as_crashed(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    lease = await w.acquire("a")
    await lease.release()
    w.runner("a").crash()
    await until(lambda: not w.sched.loaded())
    [problem] = status_snapshot(context(w))["problems"]
    assert (problem["name"], problem["state"]) == ("a", "crashed")


async def test_stalled_runner_shows_as_stalled(make: Callable[..., Any]) -> None:
    w = await make({"a": GB}, stall_timeout=0.05)
    lease = await w.acquire("a")
    runner = w.runner("a")
    killed: list[str] = []

    async def silent(request: Any) -> Any:
        await asyncio.sleep(3600)
        yield None

    async def unhealthy(timeout: float = 2.0) -> bool:
        return False

    runner.client.events = silent  # type: ignore[method-assign]
    runner.client.health = unhealthy  # type: ignore[attr-defined]
    runner.kill_now = killed.append  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="stalled"):
        async for _ in lease.completion(None):  # type: ignore[arg-type]
            pass
    assert killed and "stalled" in killed[0]
    runner.crash()  # what the kill leads to: the watcher reports the exit
    await until(lambda: not w.sched.loaded())
    [problem] = status_snapshot(context(w))["problems"]  # the kill's exit is no separate crash
    assert (problem["name"], problem["state"]) == ("a", "stalled") and "no progress" in problem["error"]
    await lease.release()


def test_a_crash_long_after_a_stall_is_a_crash() -> None:
    now = [0.0]
    metrics = Metrics(clock=lambda: now[0])
    metrics.observe_problem("a", "stalled", "no progress")
    metrics.observe_problem("a", "crashed", "killed")
    now[0] += 3600
    metrics.observe_problem("a", "crashed", "segfault")
    metrics.observe_problem("b", "crashed", "oom")
    assert [(p.model, p.kind) for p in metrics.problems] == [("a", "stalled"), ("a", "crashed"), ("b", "crashed")]


def test_recent_requests_ring_is_bounded_and_newest_first() -> None:
    now = [100.0]
    metrics = Metrics(clock=lambda: now[0])
    for i in range(RECENT_REQUESTS + 5):
        now[0] += 1
        metrics.observe_request(record(model=f"m{i}"))
    assert len(metrics.recent) == RECENT_REQUESTS
    assert metrics.recent[0][1].model == "m5" and metrics.recent[-1][1].model == f"m{RECENT_REQUESTS + 4}"


async def test_snapshot_requests_carry_ttft_and_tokens_per_second(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    w.sched.metrics.observe_request(record(ttft=0.5, duration=1.5, tokens_out=10))
    w.sched.metrics.observe_request(record(status=507, ttft=None, duration=0.01, tokens_in=0, tokens_out=0,
                                           error="needs more memory"))
    rows = status_snapshot(context(w))["requests"]
    assert [r["status"] for r in rows] == [507, 200]  # newest first
    assert rows[1]["tok_s"] == pytest.approx(10.0) and rows[1]["ttft"] == 0.5
    assert rows[0]["tok_s"] is None and rows[0]["error"] == "needs more memory"


def test_tail_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert tail_lines(log, 5) == []
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    assert tail_lines(log, 3) == ["line 7", "line 8", "line 9"]
    assert tail_lines(log, 0) == []
    big = "x" * 100 + "\n"
    log.write_text(big * (LOG_READ_BYTES // len(big) + 10) + "last\n")
    lines = tail_lines(log, 10_000)
    assert lines[-1] == "last" and all(line == "x" * 100 for line in lines[:-1])  # no cut first line


def test_log_path_stays_in_the_logs_folder(tmp_path: Path) -> None:
    for name in ("../../etc/passwd", "org/model", "/abs"):
        path = runner_log_path(tmp_path, name)
        assert path.parent == tmp_path / "logs" and "/" not in path.name


def _snapshot(**memory: Any) -> dict[str, Any]:
    return {
        "time": 1000.0, "version": "0.1.0", "started_at": 900.0, "queue_depth": 1,
        "memory": {"limit": 1000, "limit_source": "physical memory", "reserve": 0, "used": 600,
                   "os_total": 2000, "os_free": 1500, "standby": {"pid": 9, "rss": 100}, **memory},
        "models": [{"name": "org/a", "state": "ready", "pid": 42, "active": 0, "queued": 0,
                    "context_length": 2048, "num_parallel": 4, "expires_at": 1300.0, "pinned": False,
                    "footprint": 600, "parts": {"weights": 300, "kv": 100, "prompt_cache": 50, "overhead": 150},
                    "prompt_cache_used": 0, "error": ""}],
        "problems": [{"name": "org/bad", "state": "failed", "time": 990.0, "error": "cannot load: boom"}],
        "waiting": {"org/next": 1},
        "requests": [{"time": 995.0, "family": "openai", "route": "/v1/chat/completions", "model": "org/a",
                      "status": 200, "ttft": 0.25, "duration": 1.0, "tokens_in": 12, "tokens_out": 30,
                      "tok_s": 40.0, "error": ""}],
    }


def test_event_stream_change_ignores_drifting_figures() -> None:
    base = _signature(_snapshot())
    assert _signature({**_snapshot(os_free=1), "time": 5.0}) == base
    assert _signature(_snapshot(standby={"pid": 9, "rss": 101})) == base
    assert _signature(_snapshot(used=601)) != base


def test_top_frame_shows_the_snapshot() -> None:
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(render(_snapshot(), footer="q quits"))
    text = out.getvalue()
    for expected in ("org/a", "ready", "42", "2048", "in 5m00s", "600 bytes", "300 bytes / 100 bytes / 50 bytes / 150 bytes",
                     "org/bad", "failed", "cannot load: boom", "org/next", "waiting", "openai", "250ms",
                     "40.0", "12/30", "limit", "OS free", "q quits"):
        assert expected in text, expected
    bar = memory_bar(_snapshot(), width=20)
    assert len(bar.plain) == 20 and bar.plain.count("░") == 6  # 300+100+50+150+100 of 1000 used


def test_rm_confirmation() -> None:
    err = io.StringIO()
    assert confirm_delete("org/a", yes=True, ask=None, err=err)
    assert "shared Hugging Face cache" in err.getvalue()
    with pytest.raises(ClientError, match=r"corral rm --yes org/a"):
        confirm_delete("org/a", yes=False, ask=None, err=err)
    assert confirm_delete("org/a", yes=False, ask=lambda prompt: "y", err=err)
    assert not confirm_delete("org/a", yes=False, ask=lambda prompt: "", err=err)
    assert not confirm_delete("org/a", yes=False, ask=lambda prompt: "nope", err=err)

    def eof(prompt: str) -> str:
        raise EOFError

    assert not confirm_delete("org/a", yes=False, ask=eof, err=err)


@pytest.mark.slow
def test_wheel_ships_the_page(tmp_path: Path) -> None:
    """The page is package data: a wheel built from this checkout carries it (no build step)."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "corral", "supervisor", "runner"):
        if (root / name).is_dir():
            shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(root / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "whl"),
                            str(src)], capture_output=True, text=True, timeout=240)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip()[-300:]}")
    [wheel] = (tmp_path / "whl").glob("corral-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("corral/supervisor/static/ui.html").decode()
    assert shipped == (root / "supervisor" / "static" / "ui.html").read_text()

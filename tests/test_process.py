"""RunnerProcess with tests/fake_runner.py: real subprocesses, real signals, real HTTP."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from corral.supervisor.errors import BadRequest, LoadTimeout, RunnerFailed
from corral.supervisor.process import RunnerProcess, RunnerState, cleanup_orphans, free_port

FAKE = str(Path(__file__).with_name("fake_runner.py"))


def fake(home: Path, *flags: str, name: str = "m", grace: float = 5.0) -> RunnerProcess:
    return RunnerProcess(name, home / "model", home=home, num_ctx=256, num_parallel=2,
                         command=(sys.executable, FAKE), extra_args=flags, stop_grace=grace)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_start_serve_stop(tmp_path: Path) -> None:
    p = fake(tmp_path)
    await p.start(timeout=60)
    assert p.state is RunnerState.READY
    rec = json.loads((tmp_path / "runners" / f"{p.pid}.json").read_text())
    assert rec["pid"] == p.pid and rec["supervisor_pid"] == os.getpid()
    assert os.getpgid(p.pid) == p.pid  # own process group
    lines = [line async for line in p.client.completion({"prompt": "hi"})]
    assert lines[-1]["done"] is True and len(lines) == 6
    assert await p.client.tokenize("ab") == [97, 98]
    assert await p.client.detokenize([97, 98]) == "ab"
    with pytest.raises(BadRequest):
        [line async for line in p.client.completion({})]
    status = await p.client.status()
    assert status["memory"]["rss"] == 50_000_000
    pid = p.pid
    await p.stop()
    assert p.state is RunnerState.STOPPED and gone(pid)
    assert not (tmp_path / "runners" / f"{pid}.json").exists()
    assert "ready" in (tmp_path / "logs" / "runner-m.log").read_text()


async def test_token_is_required(tmp_path: Path) -> None:
    import httpx

    p = fake(tmp_path)
    await p.start(timeout=60)
    try:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{p.port}/health")
        assert r.status_code == 401
    finally:
        await p.stop()


async def test_sigterm_ignored_gets_sigkill_within_bound(tmp_path: Path) -> None:
    p = fake(tmp_path, "--ignore-sigterm", grace=1.0)
    await p.start(timeout=60)
    pid = p.pid
    t0 = time.monotonic()
    await p.stop()
    elapsed = time.monotonic() - t0
    assert gone(pid) and p.state is RunnerState.STOPPED
    assert p.returncode == -9
    assert 0.9 <= elapsed < 15


async def test_load_delay_waits_for_health(tmp_path: Path) -> None:
    p = fake(tmp_path, "--load-delay", "1.0")
    t0 = time.monotonic()
    await p.start(timeout=60)
    assert time.monotonic() - t0 >= 0.9
    await p.stop()


async def test_load_timeout_stops_the_runner(tmp_path: Path) -> None:
    p = fake(tmp_path, "--load-delay", "30")
    with pytest.raises(LoadTimeout):
        await p.start(timeout=1.0)
    assert p.state is RunnerState.STOPPED and gone(p.pid)


async def test_fail_at_load_quotes_last_stderr_line(tmp_path: Path) -> None:
    p = fake(tmp_path, "--fail-load", "--load-delay", "0.2")
    with pytest.raises(RunnerFailed) as ei:
        await p.start(timeout=60)
    assert "fake load failure" in ei.value.message
    assert "code 1" in ei.value.message
    assert p.state is RunnerState.FAILED


async def test_crash_mid_stream_is_noticed(tmp_path: Path) -> None:
    p = fake(tmp_path, "--crash-after", "2", "--token-delay", "0.05")
    exits: list[RunnerProcess] = []
    p.on_exit = exits.append
    await p.start(timeout=60)
    got = []
    with pytest.raises(RunnerFailed):
        async for line in p.client.completion({"prompt": "x"}):
            got.append(line)
    assert len(got) == 2
    assert await p.wait_exited(10)
    for _ in range(100):
        if exits:
            break
        await asyncio.sleep(0.05)
    assert exits == [p] and p.state is RunnerState.FAILED
    assert "crashed after 2 tokens" in p.last_line
    await p.stop()  # harmless after a crash


async def test_illegal_transition_is_refused(tmp_path: Path) -> None:
    p = fake(tmp_path)
    with pytest.raises(RuntimeError):
        p._set_state(RunnerState.STOPPED)


def _record(home: Path, pid: int, sup_pid: int, sup_ctime: float, ctime: float | None = None) -> None:
    (home / "runners").mkdir(parents=True, exist_ok=True)
    rec = {"pid": pid, "create_time": ctime if ctime is not None else psutil.Process(pid).create_time(),
           "supervisor_pid": sup_pid, "supervisor_create_time": sup_ctime, "model": "x"}
    (home / "runners" / f"{pid}.json").write_text(json.dumps(rec))


def test_cleanup_orphans(tmp_path: Path) -> None:
    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, FAKE, "--model", "x", "--port", str(free_port())],
                                start_new_session=True, stderr=subprocess.DEVNULL)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_ctime = time.time() - 1000
    orphan, recycled, owned = spawn(), spawn(), spawn()
    try:
        _record(tmp_path, orphan.pid, dead.pid, dead_ctime)  # supervisor gone: kill
        _record(tmp_path, recycled.pid, dead.pid, dead_ctime, ctime=123.0)  # pid reused: spare
        _record(tmp_path, owned.pid, os.getpid(), psutil.Process().create_time())  # live supervisor: spare
        killed = cleanup_orphans(tmp_path)
        assert killed == [orphan.pid]
        orphan.wait(timeout=10)  # (cleanup_orphans already reaped it: it was our child)
        assert gone(orphan.pid)
        assert recycled.poll() is None and owned.poll() is None
        assert not (tmp_path / "runners" / f"{orphan.pid}.json").exists()
        assert not (tmp_path / "runners" / f"{recycled.pid}.json").exists()
        assert (tmp_path / "runners" / f"{owned.pid}.json").exists()
    finally:
        for p in (orphan, recycled, owned):
            p.kill()
            p.wait()


async def test_closing_a_stream_early_cancels_it(tmp_path: Path) -> None:
    p = fake(tmp_path, "--token-delay", "0.05")
    await p.start(timeout=60)
    try:
        stream = p.client.completion({"prompt": "x", "options": {"num_predict": 1000}})
        first = await stream.__anext__()
        assert first["done"] is False
        assert (await p.client.status())["active"] == 1
        await stream.aclose()
        for _ in range(200):
            if (await p.client.status())["active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await p.client.status())["active"] == 0
    finally:
        await p.stop()
    with pytest.raises(RunnerFailed):  # the client is closed with its runner
        await p.client.tokenize("x")


async def test_stop_before_start_spawns_nothing(tmp_path: Path) -> None:
    p = fake(tmp_path)
    await p.stop()
    with pytest.raises(RunnerFailed, match="stopped before it started"):
        await p.start(timeout=5)
    assert not p.spawned and p.state is RunnerState.STOPPED


async def test_stop_while_loading_ends_the_start(tmp_path: Path) -> None:
    p = fake(tmp_path, "--load-delay", "60")
    loading = asyncio.create_task(p.start(timeout=60))
    for _ in range(200):
        if p.spawned:
            break
        await asyncio.sleep(0.01)
    await p.stop()
    with pytest.raises(RunnerFailed, match="stopped while loading"):
        await loading
    assert p.state is RunnerState.STOPPED and gone(p.pid)


async def test_runner_port_comes_from_the_configured_range(tmp_path: Path) -> None:
    port = free_port()
    p = RunnerProcess("m", tmp_path / "model", home=tmp_path, num_ctx=256, num_parallel=2,
                      command=(sys.executable, FAKE), ports=(port, port))
    await p.start(timeout=60)
    try:
        assert p.port == port and p.state is RunnerState.READY
        assert await p.client.tokenize("ab") == [97, 98]
    finally:
        await p.stop()


def test_free_port_in_a_range() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        with pytest.raises(RunnerFailed, match=f"CORRAL_RUNNER_PORTS {busy}-{busy}"):
            free_port("127.0.0.1", (busy, busy))
    low = free_port()
    assert low <= free_port("127.0.0.1", (low, low + 5)) <= low + 5


async def test_the_port_is_held_from_spawn_on(tmp_path: Path) -> None:
    # A standby waits minutes for its model before it serves. Its port is bound
    # from spawn on (the runner inherits the socket), so no other socket on the
    # machine, an outgoing connection's local port included, can take it
    # meanwhile and make the load fail.
    p = fake(tmp_path, "--load-delay", "0.5")
    await p.spawn()
    try:
        with socket.socket() as other, pytest.raises(OSError) as e:
            other.bind(("127.0.0.1", p.port))  # at once: the child may not even have started Python yet
        assert e.value.errno == errno.EADDRINUSE
        await p.start(timeout=60)
        assert await p.client.tokenize("ab") == [97, 98]  # it listens on the socket it was given
        assert "--fd" in p.argv(3)
    finally:
        await p.stop()

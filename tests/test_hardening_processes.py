"""Issue 9, items 1, 4 and 9 against real runner processes (real MLX, tiny models).

- a SIGSTOPped runner is noticed (silent stream + /health silent), killed, its
  stream fails in-band, and the next request loads the model afresh;
- a load that waits for a busy model to drain gets 503 + Retry-After after drain_timeout;
- on a full file system (a small tmpfs) a standby that cannot be recorded is
  reaped, a runner whose log cannot be written keeps serving, and stop is bounded;
- runners never see the supervisor's API key; a failure quotes an error line, not INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
from corral.runner.protocol import Done, RunnerRequest
from corral.supervisor.config import Settings
from corral.supervisor.errors import Busy, RunnerFailed
from corral.supervisor.memory import estimate_need
from corral.supervisor.process import RunnerProcess, RunnerState
from corral.supervisor.scheduler import PlainFactory, RunnerSpec, Scheduler, default_runner_factory
from corral.supervisor.store import ModelStore

from tests.conftest import TINY, TINY_B

CTX = 512


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_for(predicate: object, timeout: float = 20.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
async def sched(hf_cache: Path, tmp_path: Path) -> AsyncIterator[tuple[Scheduler, list[RunnerProcess]]]:
    store = ModelStore(tmp_path / "home", hf_cache)
    needs = [estimate_need(store.manifest(store.resolve(n)), CTX, 1).total for n in (TINY, TINY_B)]
    settings = Settings(home=tmp_path / "home", context_length=CTX, num_parallel=1, load_timeout=180.0,
                        memory_limit=max(needs) + min(needs) // 2, reserve=0, keep_alive=-1,
                        stall_timeout=1.5, drain_timeout=1.0)
    built: list[RunnerProcess] = []

    def build(spec: RunnerSpec) -> RunnerProcess:
        p = default_runner_factory(spec)
        built.append(p)
        return p

    s = Scheduler(settings, store, runner_factory=PlainFactory(build))
    await s.start()
    yield s, built
    for p in built:  # a stopped runner must not outlive the test, whatever it asserted
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
    await s.shutdown()
    assert all(gone(p.pid) for p in built if p.pid)


async def test_sigstopped_runner_is_killed_and_reloaded(sched: tuple[Scheduler, list[RunnerProcess]]) -> None:
    s, built = sched
    lease = await s.acquire(await s.resolve(TINY))
    pid = lease.pid
    started = time.monotonic()
    with pytest.raises(RunnerFailed) as ei:
        async for _ in lease.completion(RunnerRequest({"num_predict": 500, "temperature": 0}, prompt="hi")):
            os.kill(pid, signal.SIGSTOP)  # hung mid-stream: no more lines, no /health
    took = time.monotonic() - started
    await lease.release()
    assert "stalled" in ei.value.message and "killed" in ei.value.message
    assert took < 1.5 + 5.0 + 5.0, took  # stall limit + health wait, with slack for a loaded box
    assert await wait_for(lambda: gone(pid)), "the hung runner was not killed"
    assert await wait_for(lambda: s.loaded() == [])
    async with await s.acquire(await s.resolve(TINY)) as again:
        assert again.pid != pid
        events = [e async for e in again.completion(RunnerRequest({"num_predict": 3, "temperature": 0},
                                                                   prompt="hi"))]
        assert isinstance(events[-1], Done)
    assert len(built) == 2


async def test_busy_runner_that_answers_health_is_not_killed(
        sched: tuple[Scheduler, list[RunnerProcess]]) -> None:
    s, _ = sched
    async with await s.acquire(await s.resolve(TINY)) as lease:
        events = [e async for e in lease.completion(RunnerRequest({"num_predict": 40, "temperature": 0},
                                                                   prompt="hi"))]
        assert isinstance(events[-1], Done) and events[-1].eval_count == 40


async def test_drain_wait_is_bounded_with_503(sched: tuple[Scheduler, list[RunnerProcess]]) -> None:
    s, _ = sched
    held = await s.acquire(await s.resolve(TINY))  # busy: never released during the wait
    started = time.monotonic()
    with pytest.raises(Busy) as ei:
        await s.acquire(await s.resolve(TINY_B))
    assert 0.9 <= time.monotonic() - started < 10
    assert ei.value.status == 503 and "Retry-After" in ei.value.headers()
    assert [m.name for m in s.loaded()] == [TINY]  # the busy model kept serving
    await held.release()
    async with await s.acquire(await s.resolve(TINY_B)) as lease:  # once idle it gives way
        assert lease.ref.name == TINY_B


async def test_runner_env_has_no_api_key_and_failures_quote_errors(
        hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_API_KEY", "top-secret")
    store = ModelStore(tmp_path / "home", hf_cache)
    ref = store.resolve(TINY)
    p = RunnerProcess(ref.name, ref.path, home=tmp_path / "home", num_ctx=CTX, num_parallel=1)
    await p.start(180.0)
    try:
        env = psutil.Process(p.pid).environ()
        assert "CORRAL_API_KEY" not in env and "top-secret" not in " ".join(env.values())
        assert "top-secret" not in " ".join(psutil.Process(p.pid).cmdline())
    finally:
        await p.stop()
    p.stderr_tail.extend(["INFO runner[1]: request end: reason=stop", "INFO loaded"])
    assert p.failure_message("runner exited") == "runner exited"  # no unrelated INFO line
    p.stderr_tail.extend(["ValueError: bad weights", "INFO shutting down"])
    assert p.failure_message("runner exited") == "runner exited: ValueError: bad weights"


# ---- a full disk ------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, filled. Skipped where this machine cannot mount one (not root, a container)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        (mnt / "logs").mkdir()
        (mnt / "runners").mkdir()
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError), open(mnt / "filler2", "wb") as f:
            while True:
                f.write(b"\0")
                f.flush()
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_full_disk_standby_is_reaped(full_disk: Path) -> None:
    spare = RunnerProcess("standby", Path("-"), home=full_disk, num_ctx=0, num_parallel=1, standby=True)
    with pytest.raises(OSError):
        await spare.spawn()
    assert spare.pid and await wait_for(lambda: gone(spare.pid), 15.0), "standby left running"


async def test_full_disk_runner_keeps_serving_and_stops_in_bounded_time(
        hf_cache: Path, full_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref = ModelStore(full_disk, hf_cache).resolve(TINY)
    # its record cannot be written either: the record goes elsewhere, the log stays on the full disk
    p = RunnerProcess(ref.name, ref.path, home=full_disk, num_ctx=CTX, num_parallel=1)
    p._write_record = lambda: None  # type: ignore[method-assign]
    await p.start(180.0)
    try:
        # far more log output than a pipe holds (64 KiB): every request logs lines
        for _ in range(30):
            events = [e async for e in p.client.events(RunnerRequest({"num_predict": 2, "temperature": 0},
                                                                      prompt="x" * 200))]
            assert isinstance(events[-1], Done)
        assert p.state is RunnerState.READY
        # the pump still reads: a dead one would leave the pipe to fill and the runner to block
        assert p._stderr_task is not None and not p._stderr_task.done()
        assert any("request end" in line for line in p.stderr_tail)
        assert sum("dropping its log lines" in r.message for r in caplog.records) >= 1
    finally:
        started = time.monotonic()
        await p.stop()
        assert time.monotonic() - started < p.stop_grace + 6
    assert gone(p.pid)


# ---- a loaded model whose files are gone (item 6) -----------------------------


@pytest.mark.parametrize("how", ["delete", "stop"])
async def test_loaded_model_with_files_gone_can_be_stopped_and_deleted(
        tiny_model: Path, hf_cache: Path, tmp_path: Path, how: str) -> None:
    import shutil

    import httpx2
    from corral.supervisor.api.context import AppContext
    from corral.supervisor.app import create_app

    copy = tmp_path / "models" / "doomed"
    shutil.copytree(tiny_model, copy)
    settings = Settings(home=tmp_path / "home", context_length=CTX, num_parallel=1, reserve=0,
                        load_timeout=180.0, keep_alive=-1, models_dirs=[tmp_path])
    store = ModelStore(settings.home, hf_cache)
    s = Scheduler(settings, store, runner_factory=PlainFactory(default_runner_factory))
    app = create_app(AppContext(settings=settings, store=store, scheduler=s))
    await s.start()
    try:
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1",
                                      timeout=180) as c:
            r = await c.post("/api/create", json={"model": "doomed", "from": str(copy), "stream": False})
            assert r.status_code == 200, r.text
            r = await c.post("/api/generate", json={"model": "doomed", "prompt": "hi", "stream": False,
                                                    "options": {"num_predict": 2}})
            assert r.status_code == 200, r.text
            pid = s.loaded()[0].pid
            shutil.rmtree(copy)  # the disk changed under a loaded model
            if how == "stop":
                r = await c.post("/api/generate", json={"model": "doomed", "keep_alive": 0})
            else:
                r = await c.request("DELETE", "/api/delete", json={"model": "doomed"})
            assert r.status_code == 200, r.text
            assert await wait_for(lambda: s.loaded() == [] and gone(pid))
            if how == "delete":
                assert "doomed" not in [m["name"].split(":")[0] for m in (await c.get("/api/tags")).json()["models"]]
            # nothing loaded and nothing registered under the name: a plain 404 again
            again = await c.request("DELETE", "/api/delete", json={"model": "never-there"})
            assert again.status_code == 404
    finally:
        await s.shutdown()


async def test_scheduler_limit_follows_the_runners_device_report(
        sched: tuple[Scheduler, list[RunnerProcess]]) -> None:
    s, _ = sched
    s.settings.memory_limit = None
    async with await s.acquire(await s.resolve(TINY)):
        pass
    await asyncio.sleep(0)
    limit, source = s.memory_limit()
    # this machine's runner reports its device; on the Linux CPU backend that is RAM
    assert source in ("physical memory", "metal recommended working set", "cuda device memory")
    assert limit > 0
    s.settings.memory_limit = 123
    assert s.memory_limit() == (123, "memory_limit setting")


async def test_overlong_prompt_is_handled_before_tokenizing(hf_cache: Path, tmp_path: Path) -> None:
    """Item 7: 8 MiB of prompt is refused at once without truncation, and cut to its tail with it."""
    ref = ModelStore(tmp_path / "home", hf_cache).resolve(TINY)
    p = RunnerProcess(ref.name, ref.path, home=tmp_path / "home", num_ctx=CTX, num_parallel=1)
    await p.start(180.0)
    try:
        http = p.client._http  # type: ignore[attr-defined]
        prompt = "lorem ipsum dolor sit amet " * (8 * 2**20 // 27)
        started = time.monotonic()
        r = await http.post("/completion", json={"prompt": prompt, "truncate": False,
                                                 "options": {"num_predict": 2}}, timeout=120)
        refused_in = time.monotonic() - started
        assert r.status_code == 400 and "truncate is false" in r.json()["error"]
        started = time.monotonic()
        r = await http.post("/completion", json={"prompt": prompt, "options": {"num_predict": 2}}, timeout=120)
        assert r.status_code == 200 and '"done": true' in r.text.replace('"done":true', '"done": true')
        assert refused_in < 5.0 and time.monotonic() - started < 30.0
    finally:
        await p.stop()

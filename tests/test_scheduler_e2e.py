"""Scheduler end to end: the real runner (`python -m corral.runner`), real MLX, real store and memory model."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from corral.runner.protocol import Done, RunnerRequest
from corral.supervisor.config import Settings
from corral.supervisor.errors import RunnerFailed
from corral.supervisor.memory import estimate_need
from corral.supervisor.process import RunnerProcess
from corral.supervisor.runner_client import StreamEvent
from corral.supervisor.scheduler import (
    Lease,
    PlainFactory,
    RunnerSpec,
    Scheduler,
    default_runner_factory,
)
from corral.supervisor.store import ModelStore

from tests.conftest import TINY, TINY_B

CTX = 512


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Recorder:
    """The default runner factory, noting which runner pids were alive when each one started."""

    def __init__(self) -> None:
        self.processes: list[RunnerProcess] = []
        self.starts: list[tuple[str, list[int]]] = []

    def __call__(self, spec: RunnerSpec) -> RunnerProcess:
        self.starts.append((spec.name, [p.pid for p in self.processes if p.pid and not gone(p.pid)]))
        p = default_runner_factory(spec)
        self.processes.append(p)
        return p


@pytest.fixture
async def world(hf_cache: Path, tmp_path: Path) -> AsyncIterator[tuple[Scheduler, Recorder, ModelStore]]:
    store = ModelStore(tmp_path / "home", hf_cache)
    needs = [estimate_need(store.manifest(store.resolve(n)), CTX, 1).total for n in (TINY, TINY_B)]
    # room for the bigger of the two, not for both
    settings = Settings(home=tmp_path / "home", context_length=CTX, num_parallel=1, load_timeout=180.0,
                        memory_limit=max(needs) + min(needs) // 2, reserve=0, keep_alive=-1)
    rec = Recorder()
    sched = Scheduler(settings, store, runner_factory=PlainFactory(rec))
    await sched.start()
    yield sched, rec, store
    await sched.shutdown()
    assert all(gone(p.pid) for p in rec.processes if p.pid)


async def generate(lease: Lease, n: int = 8) -> list[StreamEvent]:
    request = RunnerRequest({"num_predict": n, "temperature": 0}, prompt="hello")
    return [event async for event in lease.completion(request)]


async def test_memory_limit_fits_one_of_two(world: tuple[Scheduler, Recorder, ModelStore]) -> None:
    sched, rec, _ = world
    async with await sched.acquire(await sched.resolve(TINY)) as lease:
        lines = await generate(lease)
        assert isinstance(lines[-1], Done) and lines[-1].eval_count == 8
        a_pid = lease.pid
    row = sched.loaded()[0]
    assert row.name == TINY and row.pid == a_pid and row.size > 0 and row.context_length == CTX
    async with await sched.acquire(await sched.resolve(TINY_B)) as lease:
        assert isinstance((await generate(lease))[-1], Done)
    assert rec.starts == [(TINY, []), (TINY_B, [])]  # TINY was reaped before TINY_B started
    assert gone(a_pid) and [m.name for m in sched.loaded()] == [TINY_B]


async def test_racing_acquires_one_real_runner(world: tuple[Scheduler, Recorder, ModelStore]) -> None:
    sched, rec, _ = world
    ref = await sched.resolve(TINY)
    leases = await asyncio.gather(*(sched.acquire(ref) for _ in range(8)))
    assert len(rec.processes) == 1 and {lease.pid for lease in leases} == {rec.processes[0].pid}
    results = await asyncio.gather(*(generate(lease, 4) for lease in leases))
    assert all(isinstance(r[-1], Done) for r in results)
    for lease in leases:
        await lease.release()


async def test_sigkill_mid_stream_then_new_pid(world: tuple[Scheduler, Recorder, ModelStore]) -> None:
    sched, _, _ = world
    lease = await sched.acquire(await sched.resolve(TINY))
    pid = lease.pid
    got = 0
    with pytest.raises(RunnerFailed) as ei:
        async for _line in lease.completion(RunnerRequest({"num_predict": 400, "temperature": 0}, prompt="hello")):
            got += 1
            if got == 1:
                os.kill(pid, signal.SIGKILL)
    # the error says which runner failed; it quotes no unrelated INFO line (SIGKILL leaves no error line)
    assert f"runner for '{TINY}' failed" in ei.value.message and "INFO" not in ei.value.message
    await lease.release()
    for _ in range(200):
        if not sched.loaded():
            break
        await asyncio.sleep(0.05)
    assert sched.loaded() == []
    async with await sched.acquire(await sched.resolve(TINY)) as again:
        assert again.pid != pid
        assert isinstance((await generate(again, 4))[-1], Done)

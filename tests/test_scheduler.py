"""Scheduler with fake runners (tests/fake_runner.py): real processes, fake store and memory."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psutil
import pytest
from corral.runner.protocol import Done, RunnerRequest
from corral.supervisor.config import Settings
from corral.supervisor.errors import (
    Busy,
    InsufficientMemory,
    LoadTimeout,
    ModelNotFound,
    RunnerFailed,
)
from corral.supervisor.manifest import Manifest
from corral.supervisor.memory import NeedEstimate
from corral.supervisor.process import RunnerProcess
from corral.supervisor.runner_client import StreamEvent
from corral.supervisor.scheduler import Lease, PlainFactory, RunnerSpec, Scheduler
from corral.supervisor.store import ModelRef

FAKE = str(Path(__file__).with_name("fake_runner.py"))
GB = 1000**3


def manifest(size: int) -> Manifest:
    return Manifest(model_type="llama", family="llama", weight_bytes=size, parameter_count=1, quant_bits=None,
                    quant_group_size=None, dtype="float32", max_context=2048, num_layers=2, kv_heads=1,
                    head_dim=8, kv_bytes_per_token=64)


class FakeStore:
    def __init__(self, root: Path, sizes: dict[str, int]) -> None:
        self.root = root
        self.sizes = sizes

    def resolve(self, name: str) -> ModelRef:
        key = name.removesuffix(":latest")
        if key not in self.sizes:
            raise ModelNotFound(name)
        return ModelRef(key, self.root / key, "local", "d", 0.0, 1)

    def resolve_recent(self, name: str) -> ModelRef | None:
        return None  # never checked recently: resolve() on a worker thread, as on a cold store

    def manifest_recent(self, ref: ModelRef) -> Manifest | None:
        return None

    def manifest(self, ref: ModelRef) -> Manifest:
        return manifest(self.sizes[ref.name])


def estimate(m: Manifest, num_ctx: int, num_parallel: int) -> NeedEstimate:
    return NeedEstimate(m.weight_bytes, 0, 0, m.weight_bytes)


class FakeProbe:
    def __init__(self, total: int) -> None:
        self._total = total

    def total(self) -> int:
        return self._total

    def available(self) -> int:
        return self._total  # the fake runners use almost nothing: the limit decides


class World:
    """A scheduler plus a log of runner starts (pid of every live runner at each start)."""

    def __init__(self, tmp: Path, sizes: dict[str, int], flags: dict[str, list[str]] | None = None,
                 **settings: object) -> None:
        self.settings = Settings(home=tmp, reserve=0, memory_limit=int(10 * GB), load_timeout=60.0,
                                 keep_alive=-1, **settings)  # type: ignore[arg-type]
        self.flags = flags or {}
        self.starts: list[tuple[str, list[int]]] = []  # (model, pids alive at its start)
        self.processes: list[RunnerProcess] = []
        self.sched = Scheduler(self.settings, FakeStore(tmp, sizes), estimate=estimate,
                               probe=FakeProbe(int(100 * GB)), runner_factory=PlainFactory(self.factory))

    def factory(self, spec: RunnerSpec) -> RunnerProcess:
        alive = [p.pid for p in self.processes if p.pid and psutil.pid_exists(p.pid) and not _zombie(p.pid)]
        self.starts.append((spec.name, alive))
        p = RunnerProcess(spec.name, spec.model_dir, home=spec.home, num_ctx=spec.num_ctx,
                          num_parallel=spec.num_parallel, command=(sys.executable, FAKE),
                          extra_args=["--memory", "1000", *self.flags.get(spec.name, [])], stop_grace=2.0)
        self.processes.append(p)
        return p

    async def acquire(self, name: str, **kw: object) -> Lease:
        return await self.sched.acquire(await self.sched.resolve(name), **kw)  # type: ignore[arg-type]

    def names(self) -> list[str]:
        return sorted(m.name for m in self.sched.loaded())


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or _zombie(pid)


async def until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[World]]]:
    worlds: list[World] = []

    async def _make(sizes: dict[str, int], flags: dict[str, list[str]] | None = None, **settings: object) -> World:
        w = World(tmp_path, sizes, flags, **settings)
        await w.sched.start()
        worlds.append(w)
        return w

    yield _make
    for w in worlds:
        await w.sched.shutdown()
        assert all(gone(p.pid) for p in w.processes if p.pid)


async def read_all(lease: Lease, **opts: object) -> list[StreamEvent]:
    return [event async for event in lease.completion(RunnerRequest(dict(opts), prompt="x"))]


async def test_racing_acquires_start_one_runner(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB})
    leases = await asyncio.gather(*(w.acquire("a") for _ in range(8)))
    assert w.sched.loads == 1 and len(w.processes) == 1
    assert {lease.pid for lease in leases} == {w.processes[0].pid}
    assert w.sched.loaded()[0].active == 8
    for lease in leases:
        await lease.release()
    assert w.sched.loaded()[0].active == 0


async def test_loaded_model_is_a_noop(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB})
    first = await w.acquire("a")
    await first.release()
    second = await w.acquire("a:latest")
    assert second.load_duration == 0.0 and second.pid == first.pid and w.sched.loads == 1
    assert isinstance((await read_all(second))[-1], Done)
    await second.release()


async def test_eviction_finishes_before_the_next_start(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB})
    async with await w.acquire("a") as lease:
        a_pid = lease.pid
    async with await w.acquire("b") as lease:
        assert isinstance((await read_all(lease))[-1], Done)
    assert w.starts[1] == ("b", [])  # a's process no longer existed when b's started
    assert gone(a_pid) and w.names() == ["b"]


async def test_too_big_is_507_and_nothing_evicted(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": 4 * GB, "huge": 11 * GB})
    async with await w.acquire("a") as lease:
        a_pid = lease.pid
    with pytest.raises(InsufficientMemory) as ei:
        await w.acquire("huge")
    assert "huge" in ei.value.message and ei.value.status == 507
    assert w.names() == ["a"] and not gone(a_pid) and len(w.starts) == 1


async def test_busy_model_drains_before_eviction(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB}, {"a": ["--token-delay", "0.05"]})
    lease_a = await w.acquire("a")
    events: list[str] = []

    async def stream_a() -> int:
        n = 0
        async for line in lease_a.completion(RunnerRequest({"num_predict": 20}, prompt="x")):
            n += 1
            if isinstance(line, Done):
                events.append("a done")
        await lease_a.release()
        return n

    async def get_b() -> None:
        lease = await w.acquire("b")
        events.append("b leased")
        assert isinstance((await read_all(lease))[-1], Done)
        await lease.release()

    task_a = asyncio.create_task(stream_a())
    await asyncio.sleep(0.1)
    await get_b()
    assert await task_a == 21  # the full stream: 20 tokens and the done line
    assert events == ["a done", "b leased"]
    assert w.starts[1] == ("b", [])
    assert w.names() == ["b"]


async def test_fifo_no_starvation(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB})
    held_a = await w.acquire("a")
    order: list[str] = []

    async def want(name: str) -> Lease:
        lease = await w.acquire(name)
        order.append(name)
        return lease

    want_b = asyncio.create_task(want("b"))
    await until(lambda: any(m.name == "a" for m in w.sched.loaded()) and w.sched._table["a"].draining)
    want_a = asyncio.create_task(want("a"))  # a is draining: this queues behind b
    await asyncio.sleep(0.3)
    assert not want_a.done() and not want_b.done()
    await held_a.release()
    lease_b = await want_b
    assert order == ["b"]
    await asyncio.sleep(0.2)
    assert not want_a.done()  # b is busy now; a waits for it to drain
    await lease_b.release()
    lease_a = await want_a
    assert order == ["b", "a"]
    await lease_a.release()
    assert [s[0] for s in w.starts] == ["a", "b", "a"]


async def test_max_queue_busy(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB, "c": 6 * GB}, max_queue=1)
    held = await w.acquire("a")
    waiting = asyncio.create_task(w.acquire("b"))
    await until(lambda: len(w.sched._queue) == 1)
    with pytest.raises(Busy) as ei:
        await w.acquire("c")
    assert ei.value.status == 503 and "Retry-After" in ei.value.headers()
    await held.release()
    await (await waiting).release()


async def test_keep_alive(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB, "b": GB, "c": GB})
    lease = await w.acquire("a", keep_alive=0)
    pid = lease.pid
    await lease.release()
    await until(lambda: "a" not in w.names())
    assert gone(pid)

    lease = await w.acquire("b", keep_alive=0.5)
    await lease.release()
    row = w.sched.loaded()[0]
    assert row.expires_at is not None and row.active == 0
    await until(lambda: "b" not in w.names())

    lease = await w.acquire("c", keep_alive=-1)
    assert w.sched.loaded()[0].expires_at is None
    await lease.release()
    await asyncio.sleep(1.0)
    assert w.names() == ["c"] and w.sched.loaded()[0].expires_at is None


async def test_default_keep_alive_from_live_settings(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB})
    w.settings.keep_alive = 0.3  # as PATCH /api/settings would
    async with await w.acquire("a"):
        pass
    await until(lambda: not w.names())


async def test_single_model_mode(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB, "b": GB, "c": GB})
    for name in ("a", "b"):
        async with await w.acquire(name):
            pass
    assert w.names() == ["a", "b"]  # off: both fit, nothing evicted
    w.settings.single_model = True
    async with await w.acquire("c"):
        pass
    assert w.names() == ["c"]
    assert w.starts[2] == ("c", [])


async def test_pinned_survive(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"p": 4 * GB, "a": 4 * GB, "b": 4 * GB}, pinned=["p"])
    assert w.names() == ["p"]  # loaded at start()
    pid_p = w.processes[0].pid
    for name in ("a", "b", "a"):
        async with await w.acquire(name):
            pass
    assert w.names() == ["a", "p"] and w.processes[0].pid == pid_p and not gone(pid_p)
    async with await w.acquire("p", keep_alive=0):
        pass
    await asyncio.sleep(0.3)
    assert "p" in w.names()
    assert [m.expires_at for m in w.sched.loaded() if m.name == "p"] == [None]


async def test_max_loaded_models(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB, "b": GB}, max_loaded_models=1)
    for name in ("a", "b"):
        async with await w.acquire(name):
            pass
    assert w.names() == ["b"]


async def test_load_timeout(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"slow": GB}, {"slow": ["--load-delay", "60"]}, )
    w.settings.load_timeout = 1.0
    with pytest.raises(LoadTimeout):
        await w.acquire("slow")
    assert w.names() == [] and gone(w.processes[0].pid)


async def test_fail_at_load(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"bad": GB}, {"bad": ["--fail-load"]})
    with pytest.raises(RunnerFailed) as ei:
        await w.acquire("bad")
    assert "fake load failure" in ei.value.message
    assert w.names() == []


async def test_crash_mid_stream_then_new_runner(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB}, {"a": ["--crash-after", "2", "--token-delay", "0.05"]})
    lease = await w.acquire("a")
    first_pid = lease.pid
    got = []
    with pytest.raises(RunnerFailed) as ei:
        async for line in lease.completion(RunnerRequest(prompt="x")):
            got.append(line)
    assert len(got) == 2
    assert "crashed after 2 tokens" in ei.value.message
    await lease.release()
    await until(lambda: not w.names())
    async with await w.acquire("a") as again:
        assert again.pid != first_pid
    assert w.sched.loads == 2


async def test_unload_idle_and_busy(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB, "b": GB})
    async with await w.acquire("a"):
        pass
    assert await w.sched.unload("a") is True and w.names() == []
    assert await w.sched.unload("a") is False
    lease = await w.acquire("b")
    assert await w.sched.unload("b") is True
    assert w.names() == ["b"]  # busy: stays until idle
    await lease.release()
    await until(lambda: not w.names())


async def test_unknown_model(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB})
    with pytest.raises(ModelNotFound):
        await w.acquire("nope")
    assert w.sched.loads == 0


async def test_cancelled_waiter_gives_back_its_lease(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB}, {"a": ["--load-delay", "0.5"]})
    t = asyncio.create_task(w.acquire("a"))
    await asyncio.sleep(0.1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await until(lambda: bool(w.names()))
    assert w.sched.loaded()[0].active == 0


async def test_stuck_load_does_not_hold_up_another_model(make: Callable[..., Awaitable[World]]) -> None:
    w = await make({"a": GB, "b": GB}, {"a": ["--load-delay", "60"]})
    stuck = asyncio.create_task(w.acquire("a"))
    await until(lambda: len(w.starts) == 1)
    t0 = asyncio.get_running_loop().time()
    async with await w.acquire("b") as lease:
        assert isinstance((await read_all(lease))[-1], Done)
    assert asyncio.get_running_loop().time() - t0 < 10 and not stuck.done()
    await w.sched.shutdown()  # stops the runner still loading; its waiter is told
    with pytest.raises(Busy):
        await stuck

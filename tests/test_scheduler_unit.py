"""Scheduler unit tests: an in-memory fake runner (the Runner Protocol) and a fake clock.

No processes and no sleeping: keep_alive timers fire when the test advances the
clock, and loads finish when the test opens their gate. The whole file runs in
well under two seconds; tests/test_scheduler.py covers the same rules with real
runner subprocesses.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from corral.runner.protocol import Chunk, Done, RunnerRequest
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
from corral.supervisor.metrics import EVICTION_REASONS
from corral.supervisor.process import RunnerState
from corral.supervisor.runner_client import StreamEvent
from corral.supervisor.scheduler import Lease, RunnerSpec, Scheduler
from corral.supervisor.store import ModelRef

GB = 1000**3
_pids = itertools.count(1000)


def manifest(size: int) -> Manifest:
    return Manifest(model_type="llama", family="llama", weight_bytes=size, parameter_count=1, quant_bits=None,
                    quant_group_size=None, dtype="float32", max_context=2048, num_layers=2, kv_heads=1,
                    head_dim=8, kv_bytes_per_token=64)


class FakeStore:
    """Names resolve case-insensitively, ':latest' stripped; the ref keeps the stored spelling."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.broken: set[str] = set()  # manifest() raises for these

    def resolve(self, name: str) -> ModelRef:
        key = name.removesuffix(":latest").lower()
        for stored in self.sizes:
            if stored.lower() == key:
                return ModelRef(stored, Path("/models") / stored, "local", "d", 0.0, 1)
        raise ModelNotFound(name)

    def resolve_recent(self, name: str) -> ModelRef | None:
        return None  # never checked recently: resolve() on a worker thread, as on a cold store

    def manifest_recent(self, ref: ModelRef) -> Manifest | None:
        return None

    def manifest(self, ref: ModelRef) -> Manifest:
        if ref.name in self.broken:
            raise OSError("config.json is unreadable")
        return manifest(self.sizes[ref.name])


def estimate(m: Manifest, num_ctx: int, num_parallel: int) -> NeedEstimate:
    return NeedEstimate(m.weight_bytes, 0, 0, m.weight_bytes)


class FakeProbe:
    def total(self) -> int:
        return 100 * GB

    def available(self) -> int:
        return 100 * GB  # the memory limit decides


@dataclass
class FakeTimer:
    at: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Unix time that moves only when told; timers fire from `advance`."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.timers: list[FakeTimer] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.timers if not t.cancelled and t.at <= self.now), key=lambda t: t.at)
        for t in due:
            self.timers.remove(t)
            t.callback()

    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

REQUEST = RunnerRequest(options={}, prompt="x")


class FakeClient:
    def __init__(self, runner: FakeRunner) -> None:
        self.runner = runner

    async def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return {"device": "cpu", "memory": {"rss": 1000, "peak_rss": 1000}}

    async def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    async def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    async def events(self, request: RunnerRequest) -> AsyncGenerator[StreamEvent, None]:
        yield Chunk("hi")
        yield Done(prompt_eval_count=1, eval_count=1)


@dataclass
class Behaviour:
    """How a model's runners load: at once, behind a gate the test opens, never, or failing."""

    gate: asyncio.Event | None = None
    hang: bool = False
    fail: str = ""


class FakeRunner:
    """Implements the scheduler's Runner Protocol in memory."""

    def __init__(self, world: World, spec: RunnerSpec, behaviour: Behaviour) -> None:
        self.world = world
        self.spec = spec
        self.behaviour = behaviour
        self.state = RunnerState.STARTING
        self.on_exit: Callable[[Any], None] | None = None
        self.pid = next(_pids)
        self.client = FakeClient(self)
        self.start_timeout: float | None = None
        self._stop_asked = asyncio.Event()

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self, timeout: float) -> None:
        self.start_timeout = timeout
        others = [r.name for r in self.world.runners if r is not self and r.state is not RunnerState.STOPPED]
        self.world.log.append(f"start {self.name} alive={sorted(others)}")
        b = self.behaviour
        if b.fail:
            self.state = RunnerState.FAILED
            raise RunnerFailed(self.failure_message(f"runner for '{self.name}' exited: {b.fail}"))
        if b.gate is not None or b.hang:
            waits = [asyncio.ensure_future(self._stop_asked.wait())]
            if b.gate is not None:
                waits.append(asyncio.ensure_future(b.gate.wait()))
            done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
            if not done:
                await self.stop()
                raise LoadTimeout(f"model '{self.name}' did not load within {timeout:g}s")
            if self._stop_asked.is_set():
                raise RunnerFailed(f"runner for '{self.name}' was stopped while loading")
        self.state = RunnerState.READY

    async def stop(self) -> None:
        self._stop_asked.set()
        if self.state in (RunnerState.STARTING, RunnerState.READY):
            self.state = RunnerState.STOPPING
            await asyncio.sleep(0)  # a reap takes a moment
            self.state = RunnerState.STOPPED
            self.world.log.append(f"stopped {self.name}")

    async def wait_exited(self, timeout: float) -> bool:
        return self.state in (RunnerState.STOPPED, RunnerState.FAILED)

    def failure_message(self, what: str) -> str:
        return what

    def crash(self) -> None:
        """The process died by itself (what the watcher reports)."""
        self.state = RunnerState.FAILED
        if self.on_exit is not None:
            self.on_exit(self)


@dataclass
class World:
    sizes: dict[str, int]
    settings: Settings
    clock: FakeClock = field(default_factory=FakeClock)
    runners: list[FakeRunner] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    behaviour: dict[str, Behaviour] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = FakeStore(self.sizes)
        self.sched = Scheduler(self.settings, self.store, estimate=estimate, probe=FakeProbe(),
                               runner_factory=self, clock=self.clock, timers=self.clock)

    # the RunnerFactory Protocol
    def __call__(self, spec: RunnerSpec) -> FakeRunner:
        runner = FakeRunner(self, spec, self.behaviour.get(spec.name, Behaviour()))
        self.runners.append(runner)
        return runner

    def refill(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def acquire(self, name: str, **kw: Any) -> Lease:
        return await self.sched.acquire(await self.sched.resolve(name), **kw)

    def names(self) -> list[str]:
        return sorted(m.name for m in self.sched.loaded())

    def starts(self) -> list[str]:
        return [line for line in self.log if line.startswith("start")]

    def runner(self, name: str) -> FakeRunner:
        return [r for r in self.runners if r.name == name][-1]


async def until(cond: Callable[[], bool]) -> None:
    """Let the event loop run (no sleeping) until `cond` holds."""
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not met")


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    worlds: list[World] = []

    async def _make(sizes: dict[str, int], behaviour: dict[str, Behaviour] | None = None,
                    **settings: Any) -> World:
        values: dict[str, Any] = dict(home=tmp_path, reserve=0, memory_limit=10 * GB, load_timeout=60.0,
                                      keep_alive=-1)
        values.update(settings)
        w = World(sizes, Settings(**values), behaviour=behaviour or {})
        await w.sched.start()
        worlds.append(w)
        return w

    yield _make
    for w in worlds:
        await w.sched.shutdown()
        assert all(r.state in (RunnerState.STOPPED, RunnerState.FAILED) for r in w.runners)


async def test_racing_acquires_start_one_runner(make: Callable[..., Any]) -> None:
    gate = asyncio.Event()
    w = await make({"a": GB}, {"a": Behaviour(gate=gate)})
    waiting = [asyncio.create_task(w.acquire("a")) for _ in range(8)]
    await until(lambda: len(w.starts()) == 1)
    await settle()
    assert not any(t.done() for t in waiting)
    gate.set()
    leases = await asyncio.gather(*waiting)
    assert w.sched.loads == 1 and len(w.runners) == 1
    assert {lease.pid for lease in leases} == {w.runners[0].pid}
    assert all(lease.load_duration > 0 for lease in leases)
    assert w.sched.loaded()[0].active == 8
    for lease in leases:
        await lease.release()
    assert w.sched.loaded()[0].active == 0


async def test_loaded_model_is_leased_at_once(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    first = await w.acquire("a")
    await first.release()
    second = await w.acquire("A:latest")  # another spelling of the same model
    assert second.load_duration == 0.0 and second.pid == first.pid and w.sched.loads == 1
    assert isinstance([e async for e in second.completion(REQUEST)][-1], Done)
    assert await second.tokenize("ab") == [97, 98]
    await second.release()
    await second.release()  # idempotent
    assert w.sched.loaded()[0].active == 0


async def test_eviction_reaps_before_the_next_start(make: Callable[..., Any]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB})
    async with await w.acquire("a"):
        pass
    async with await w.acquire("b"):
        pass
    assert w.log == ["start a alive=[]", "stopped a", "start b alive=[]"]
    assert w.names() == ["b"]


async def test_too_big_is_507_and_nothing_evicted(make: Callable[..., Any]) -> None:
    w = await make({"a": 4 * GB, "huge": 11 * GB})
    async with await w.acquire("a"):
        pass
    with pytest.raises(InsufficientMemory) as ei:
        await w.acquire("huge")
    assert "huge" in ei.value.message and ei.value.status == 507
    assert w.names() == ["a"] and w.log == ["start a alive=[]"]


async def test_busy_victim_drains_never_cut_off(make: Callable[..., Any]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB})
    held = await w.acquire("a")
    want_b = asyncio.create_task(w.acquire("b"))
    await until(lambda: w.sched._table["a"].draining)
    await settle()
    assert not want_b.done() and w.runner("a").state is RunnerState.READY
    assert isinstance([e async for e in held.completion(REQUEST)][-1], Done)
    await held.release()
    lease_b = await want_b
    assert w.log == ["start a alive=[]", "stopped a", "start b alive=[]"]
    await lease_b.release()


async def test_draining_model_gets_no_new_leases(make: Callable[..., Any]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB})
    held = await w.acquire("a")
    want_b = asyncio.create_task(w.acquire("b"))
    await until(lambda: w.sched._table["a"].draining)
    want_a = asyncio.create_task(w.acquire("a"))
    await settle()
    assert not want_a.done() and w.sched.loaded()[0].active == 1
    await held.release()
    await (await want_b).release()
    await (await want_a).release()
    assert [s.split()[1] for s in w.starts()] == ["a", "b", "a"]


async def test_fifo_no_starvation(make: Callable[..., Any]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB})
    held_a = await w.acquire("a")
    order: list[str] = []

    async def want(name: str) -> Lease:
        lease = await w.acquire(name)
        order.append(name)
        return lease

    want_b = asyncio.create_task(want("b"))
    await until(lambda: w.sched._table["a"].draining)
    want_a = asyncio.create_task(want("a"))  # a is draining: this queues behind b
    await settle()
    assert not want_a.done() and not want_b.done()
    await held_a.release()
    lease_b = await want_b
    await settle()
    assert order == ["b"] and not want_a.done()  # b is busy now; a waits for it to drain
    await lease_b.release()
    await (await want_a).release()
    assert order == ["b", "a"]
    assert [s.split()[1] for s in w.starts()] == ["a", "b", "a"]


async def test_max_queue_is_503_with_retry_after(make: Callable[..., Any]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB, "c": 6 * GB}, max_queue=1)
    held = await w.acquire("a")
    waiting = asyncio.create_task(w.acquire("b"))
    await until(lambda: len(w.sched._queue) == 1)
    with pytest.raises(Busy) as ei:
        await w.acquire("c")
    assert ei.value.status == 503 and "Retry-After" in ei.value.headers()
    with pytest.raises(Busy):
        await w.acquire("a")  # a drains for b, so this one would have to queue too
    await held.release()
    await (await waiting).release()


async def test_load_timeout(make: Callable[..., Any]) -> None:
    w = await make({"slow": GB}, {"slow": Behaviour(hang=True)}, load_timeout=0.01)
    with pytest.raises(LoadTimeout):
        await w.acquire("slow")
    assert w.runner("slow").start_timeout == 0.01
    assert w.names() == [] and not w.sched._table
    assert w.runner("slow").state is RunnerState.STOPPED


async def test_fail_at_load_then_retry(make: Callable[..., Any]) -> None:
    w = await make({"bad": GB}, {"bad": Behaviour(fail="fake load failure")})
    with pytest.raises(RunnerFailed) as ei:
        await w.acquire("bad")
    assert "fake load failure" in ei.value.message and not w.sched._table
    w.behaviour["bad"] = Behaviour()
    async with await w.acquire("bad"):
        pass
    assert w.sched.loads == 2


async def test_unreadable_model_fails_its_requests_only(make: Callable[..., Any]) -> None:
    w = await make({"a": GB, "broken": GB})
    w.store.broken.add("broken")
    with pytest.raises(RunnerFailed, match="cannot read model 'broken'"):
        await w.acquire("broken")
    async with await w.acquire("a"):
        pass
    with pytest.raises(ModelNotFound):
        await w.acquire("nope")
    assert w.sched.loads == 1


async def test_keep_alive_zero_duration_forever(make: Callable[..., Any]) -> None:
    w = await make({"a": GB, "b": GB, "c": GB})
    lease = await w.acquire("a", keep_alive=0)
    await lease.release()
    await until(lambda: "a" not in w.names())
    assert w.runner("a").state is RunnerState.STOPPED

    lease = await w.acquire("b", keep_alive=30)
    await lease.release()
    row = w.sched.loaded()[0]
    assert row.expires_at == w.clock.now + 30 and row.active == 0
    w.clock.advance(29)
    await settle()
    assert "b" in w.names()
    w.clock.advance(1)
    await until(lambda: "b" not in w.names())

    lease = await w.acquire("c", keep_alive=-1)
    await lease.release()
    w.clock.advance(10**9)
    await settle()
    assert w.names() == ["c"] and w.sched.loaded()[0].expires_at is None and not w.clock.pending()


async def test_a_new_lease_cancels_the_keep_alive_timer(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    await (await w.acquire("a", keep_alive=10)).release()
    w.clock.advance(5)
    lease = await w.acquire("a", keep_alive=10)
    w.clock.advance(6)  # the first timer would have fired now
    await settle()
    assert w.names() == ["a"]
    await lease.release()
    w.clock.advance(9)
    await settle()
    assert w.names() == ["a"]
    w.clock.advance(1)
    await until(lambda: not w.names())


async def test_timer_posted_before_a_lease_is_stale(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    await (await w.acquire("a", keep_alive=10)).release()
    timer = w.clock.pending()[0]
    timer.callback()  # fired, its event queued ...
    lease = await w.acquire("a", keep_alive=10)  # ... and a lease comes first: the expiry is stale
    await settle()
    assert w.names() == ["a"] and w.sched.loaded()[0].active == 1
    await lease.release()


async def test_default_keep_alive_read_live_from_settings(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    w.settings.keep_alive = 3  # as PATCH /api/settings would
    async with await w.acquire("a"):
        pass
    w.clock.advance(3)
    await until(lambda: not w.names())


async def test_unload_idle_busy_and_unknown(make: Callable[..., Any]) -> None:
    w = await make({"a": GB, "b": GB})
    async with await w.acquire("a"):
        pass
    assert await w.sched.unload("A:latest") is True
    assert w.names() == [] and w.runner("a").state is RunnerState.STOPPED  # reaped before it answers
    assert await w.sched.unload("a") is False
    assert await w.sched.unload("../bad") is False
    lease = await w.acquire("b")
    assert await w.sched.unload("b") is True
    assert w.names() == ["b"]  # busy: stays until idle
    await lease.release()
    await until(lambda: not w.names())


async def test_single_model_mode_read_live(make: Callable[..., Any]) -> None:
    w = await make({"a": GB, "b": GB, "c": GB})
    for name in ("a", "b"):
        async with await w.acquire(name):
            pass
    assert w.names() == ["a", "b"]
    w.settings.single_model = True
    async with await w.acquire("c"):
        pass
    assert w.names() == ["c"] and w.starts()[-1] == "start c alive=[]"


async def test_memory_limit_read_live(make: Callable[..., Any]) -> None:
    w = await make({"a": 4 * GB, "b": 4 * GB})
    async with await w.acquire("a"):
        pass
    w.settings.memory_limit = 6 * GB
    async with await w.acquire("b"):
        pass
    assert w.names() == ["b"]


async def test_max_loaded_models(make: Callable[..., Any]) -> None:
    w = await make({"a": GB, "b": GB}, max_loaded_models=1)
    for name in ("a", "b"):
        async with await w.acquire(name):
            pass
    assert w.names() == ["b"]


async def test_pinned_loaded_at_start_never_evicted(make: Callable[..., Any]) -> None:
    w = await make({"P": 4 * GB, "a": 4 * GB, "b": 4 * GB}, pinned=["p:latest"])
    assert w.names() == ["P"]  # loaded at start()
    pinned = w.runners[0]
    for name in ("a", "b", "a"):
        async with await w.acquire(name):
            pass
    assert w.names() == ["P", "a"] and pinned.state is RunnerState.READY
    async with await w.acquire("p", keep_alive=0):
        pass
    await settle()
    assert "P" in w.names() and not w.clock.pending()
    assert [(m.expires_at, m.pinned) for m in w.sched.loaded() if m.name == "P"] == [(None, True)]


async def test_dead_runner_is_dropped_and_reloaded(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    lease = await w.acquire("a")
    first = w.runner("a")
    first.crash()
    await until(lambda: not w.names())
    await lease.release()  # a lease on a dropped runner releases quietly
    async with await w.acquire("a") as again:
        assert again.pid != first.pid
    assert w.sched.loads == 2


async def test_cancelled_waiter_gives_back_its_lease(make: Callable[..., Any]) -> None:
    gate = asyncio.Event()
    w = await make({"a": GB}, {"a": Behaviour(gate=gate)}, keep_alive=5)
    t = asyncio.create_task(w.acquire("a"))
    await until(lambda: len(w.starts()) == 1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    gate.set()
    await until(lambda: bool(w.names()))
    assert w.sched.loaded()[0].active == 0 and len(w.clock.pending()) == 1  # its keep_alive runs


async def test_hung_load_does_not_block_another_model(make: Callable[..., Any]) -> None:
    w = await make({"a": 2 * GB, "b": 2 * GB}, {"a": Behaviour(hang=True)})
    stuck = asyncio.create_task(w.acquire("a"))
    await until(lambda: len(w.starts()) == 1)
    lease_b = await asyncio.wait_for(w.acquire("b"), 1.0)
    assert not stuck.done() and w.names() == ["b"]  # a is still loading, and not listed
    await lease_b.release()
    joined = asyncio.create_task(w.acquire("a"))  # joins the load in flight: no second runner
    await settle()
    assert w.sched.loads == 2 and not joined.done()
    await w.sched.shutdown()
    for t in (stuck, joined):
        with pytest.raises(Busy):
            await t


async def test_a_model_that_needs_the_loading_ones_room_waits(make: Callable[..., Any]) -> None:
    gate = asyncio.Event()
    w = await make({"a": 6 * GB, "b": 6 * GB}, {"a": Behaviour(gate=gate)})
    want_a = asyncio.create_task(w.acquire("a"))
    await until(lambda: len(w.starts()) == 1)
    want_b = asyncio.create_task(w.acquire("b"))
    await settle()
    assert not want_b.done() and w.runner("a").state is RunnerState.STARTING  # not evicted mid-load
    gate.set()
    lease_a = await want_a
    await settle()
    assert not want_b.done()
    await lease_a.release()
    await (await want_b).release()
    assert w.log == ["start a alive=[]", "stopped a", "start b alive=[]"]


async def test_shutdown_stops_everything_and_refuses_new_work(make: Callable[..., Any]) -> None:
    w = await make({"a": GB, "b": GB})
    lease = await w.acquire("a")
    await w.sched.shutdown()
    assert all(r.state is RunnerState.STOPPED for r in w.runners) and not w.sched._table
    with pytest.raises(Busy):
        await w.acquire("b")
    await lease.release()  # after shutdown: quiet
    assert await w.sched.unload("a") is False


def _evictions(w: World) -> dict[str, float]:
    return {reason: w.sched.metrics.evictions.labels(reason)._value.get() for reason in EVICTION_REASONS}


async def test_metrics_count_loads_and_evictions_by_reason(make: Callable[..., Any]) -> None:
    w = await make({"a": 6 * GB, "b": 6 * GB, "c": GB, "d": GB, "e": GB})
    async with await w.acquire("a"):
        pass
    async with await w.acquire("b"):  # a goes to make room
        pass
    assert _evictions(w)["memory"] == 1
    await (await w.acquire("c", keep_alive=5)).release()
    w.clock.advance(5)
    await until(lambda: "c" not in w.names())
    await (await w.acquire("c", keep_alive=0)).release()
    await until(lambda: "c" not in w.names())
    assert _evictions(w)["keep_alive"] == 2
    assert await w.sched.unload("b") is True
    assert _evictions(w)["manual"] == 1
    lease = await w.acquire("d")
    w.runner("d").crash()
    await until(lambda: "d" not in w.names())
    await lease.release()
    w.settings.single_model = True
    async with await w.acquire("c"):
        pass
    async with await w.acquire("e"):
        pass
    counts = _evictions(w)
    assert counts == {"memory": 1, "keep_alive": 2, "single-model": 1, "manual": 1, "crash": 1,
                      "reload": 0, "shutdown": 0}
    assert w.sched.metrics.restarts._value.get() == 1
    loads = w.sched.metrics.loads.labels("ok")._value.get()
    assert loads == w.sched.loads == 7


async def test_other_num_ctx_reloads_once_idle(make: Callable[..., Any]) -> None:
    """Ollama's needsReload: a request naming another num_ctx waits for the model to go
    idle, then gets it reloaded with that context; one naming none takes what is loaded."""
    w = await make({"a": GB})
    held = await w.acquire("a", num_ctx=1024)
    assert held.context_length == 1024
    same = await w.acquire("a")  # no num_ctx: whatever is loaded
    assert same.pid == held.pid and same.context_length == 1024
    await same.release()
    bigger = asyncio.create_task(w.acquire("a", num_ctx=2048))
    await until(lambda: w.sched._table["a"].draining)
    await settle()
    assert not bigger.done() and w.runner("a").state is RunnerState.READY  # in use: never cut off
    assert isinstance([e async for e in held.completion(REQUEST)][-1], Done)
    await held.release()
    lease = await bigger
    assert lease.context_length == 2048 and lease.pid != held.pid
    assert w.log == ["start a alive=[]", "stopped a", "start a alive=[]"]
    assert [r.spec.num_ctx for r in w.runners] == [1024, 2048]
    await lease.release()
    again = await w.acquire("a", num_ctx=2048)  # the same context: no reload
    assert again.pid == lease.pid and w.sched.loads == 2
    await again.release()
    assert _evictions(w)["reload"] == 1


async def test_num_ctx_over_the_models_maximum_is_capped_not_reloaded(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    first = await w.acquire("a", num_ctx=100_000)  # the model's maximum is 2048
    await first.release()
    second = await w.acquire("a", num_ctx=4096)  # capped to the same 2048: no reload
    assert first.context_length == second.context_length == 2048 and w.sched.loads == 1
    await second.release()


async def test_default_context_follows_memory_tiers(make: Callable[..., Any]) -> None:
    """With no context_length configured, Ollama's tiers by memory, capped by the model."""
    from corral.supervisor.config import GIB, default_context_length

    assert [default_context_length(g * GIB) for g in (8, 23, 24, 47, 48, 512)] == [
        4096, 4096, 32768, 32768, 262144, 262144]
    small = await make({"a": GB}, memory_limit=16 * GIB, context_length=0)
    lease = await small.acquire("a")
    assert lease.context_length == 2048  # 4096 by the tier, capped by the model's 2048
    await lease.release()
    assert small.sched._shape(manifest(GB), None)[0] == 2048
    big = await make({"a": GB}, memory_limit=64 * GIB, context_length=0)
    m = replace(manifest(GB), max_context=0)  # unknown maximum: the tier itself
    assert big.sched._shape(m, None)[0] == 262144
    configured = await make({"a": GB}, memory_limit=64 * GIB, context_length=1000)
    assert configured.sched._shape(m, None)[0] == 1000


async def test_queued_requests_for_two_contexts_each_get_their_own(make: Callable[..., Any]) -> None:
    """FIFO holds: a request with no num_ctx queued behind a reload waits for it and shares it;
    a loading runner is never handed to a request that asked for another context."""
    gate = asyncio.Event()
    w = await make({"a": GB}, {"a": Behaviour(gate=gate)})
    small = asyncio.create_task(w.acquire("a", num_ctx=512))
    await until(lambda: len(w.starts()) == 1)
    big = asyncio.create_task(w.acquire("a", num_ctx=1024))
    plain = asyncio.create_task(w.acquire("a"))
    await settle()
    gate.set()
    first = await small
    await settle()
    assert first.context_length == 512 and not big.done() and not plain.done()
    await first.release()
    second, third = await big, await plain
    assert second.context_length == third.context_length == 1024 and second.pid == third.pid
    assert [r.spec.num_ctx for r in w.runners] == [512, 1024]
    await second.release()
    await third.release()


async def test_a_load_takes_only_the_requests_for_its_context(make: Callable[..., Any]) -> None:
    w = await make({"a": GB})
    first = await w.acquire("a", num_ctx=512)
    big = asyncio.create_task(w.acquire("a", num_ctx=1024))
    small = asyncio.create_task(w.acquire("a", num_ctx=512))
    await settle()
    await first.release()
    second = await big
    await settle()
    assert second.context_length == 1024 and not small.done()  # not handed the 1024 runner
    await second.release()
    third = await small
    assert third.context_length == 512 and [r.spec.num_ctx for r in w.runners] == [512, 1024, 512]
    await third.release()

"""Scheduling: the one path that makes a model ready.

The API layers only ever call `Scheduler.acquire`, use the returned Lease, and
release it; they never start runners.

One writer. The model table (`_table`, keyed by normalized model name) and the
FIFO of waiting tickets (`_queue`) are written only by one dispatcher task. The
public methods, the lease, keep_alive timers, runner watchers and background
tasks never touch them: they post events to one asyncio.Queue and the
dispatcher applies them one at a time, so no state change races another.

Events (what the dispatcher consumes):

    Acquire      a request wants a model (its ticket carries a future)
    Abandoned    a waiting request went away (its ticket is dropped)
    Released     a lease ended (keep_alive of that request)
    TimerExpired a keep_alive timer fired (ignored unless it is the entry's current timer)
    RunnerExited a runner died by itself: dropped, the next request loads it again
    Unload       unload now if idle, else when it goes idle
    Planned      the manifest of the head ticket's model was read (off the loop)
    StatusDone   fresh /status footprints of loaded runners
    LoadDone     a load task finished (ok, or the error for its waiters)
    Stopped      a stop task reaped its runner: the entry leaves the table
    Shutdown     fail every waiter, stop every runner

Entry phases (the scheduler's view; the runner's own lifecycle stays in
RunnerState, owned by the runner):

    LOADING   a load task is starting the runner; tickets for it wait on the entry
    LOADED    its runner is READY; leasable unless draining
    STOPPING  a stop task is reaping its runner (eviction, unload, keep_alive, shutdown)
    GONE      out of the table; late events about it are ignored

Decisions. After every event the dispatcher serves the ticket at the head of
the FIFO, asking the pure policy (supervisor.policy) what to do:

    READY  grant every queued ticket for that model (or, while it loads, attach them to the load)
    NEVER  fail that model's tickets with InsufficientMemory (nothing evicted)
    WAIT   mark the busy victims draining and wait until something changes
    LOAD   start stop tasks for the idle victims and wait for their Stopped;
           with no victims left, start a load task and serve the next ticket

A loading model counts in the policy as a busy resident (its estimate), so a
second model that fits beside it loads at once instead of waiting behind a slow
or hung load, and one that does not fit waits for it rather than evicting it.
Because only the dispatcher creates entries, exactly one load per model
happens however many requests race; victims are reaped before the new runner
starts; a request for a draining model queues behind the model that waits for
it, so nobody starves. Slow work (manifest reads, /status, loads, stops) runs
in tasks that post their result back, so the dispatcher never blocks. Settings
is read at each decision (PATCH /api/settings).

Several hosts (the hosts setting): the policy may place a model on k hosts; the
entry then holds one DistributedRunner (ranks under mlx.launch, one per host),
its footprint is what it holds on each of those hosts, and eviction or a rank's
death ends the whole runner, like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from corral.runner.protocol import RunnerRequest
from corral.supervisor import policy
from corral.supervisor.config import HostSpec, Settings, default_context_length
from corral.supervisor.errors import Busy, CorralError, InsufficientMemory, RunnerFailed
from corral.supervisor.manifest import KIND_EMBEDDING, Manifest
from corral.supervisor.memory import (
    DeviceMemoryProbe,
    MemoryProbe,
    NeedEstimate,
    SystemMemoryProbe,
    estimate_need,
    footprint,
)
from corral.supervisor.metrics import Metrics
from corral.supervisor.process import (
    DistributedRunner,
    RunnerProcess,
    RunnerState,
    StandbyFactory,
    cleanup_orphans,
    runner_env,
)
from corral.supervisor.runner_client import StreamEvent
from corral.supervisor.store import ModelRef, normalize_name

log = logging.getLogger(__name__)

STATUS_REFRESH = 5.0  # seconds between /status refreshes of a loaded model's footprint


DEVICE_FACTS_WAIT = 30.0
"""Seconds the first decisions wait at startup for the standby's device report
(its imports take a few seconds; a load would wait for them anyway)."""

STALL_HEALTH_TIMEOUT = 5.0
"""Seconds a silent runner's /health has to answer before it counts as hung."""

STALL_RECHECK = 5.0
"""Seconds between a stream's looks at stall_timeout while it is 0 (off): it may be turned on at run time."""


class Store(Protocol):
    def resolve(self, name: str) -> ModelRef: ...

    def resolve_recent(self, name: str) -> ModelRef | None:
        """resolve()'s answer if it is fresh enough to give without file access, else None."""

    def manifest(self, ref: ModelRef) -> Manifest: ...


class RunnerAPI(Protocol):
    """The runner's HTTP routes the scheduler and leases use (RunnerClient)."""

    async def status(self, timeout: float = 5.0) -> dict[str, Any]: ...

    async def health(self, timeout: float = 2.0) -> bool: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    def events(self, request: RunnerRequest) -> AsyncGenerator[StreamEvent, None]: ...

    async def embed(self, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]: ...


class Runner(Protocol):
    """One runner process as the scheduler drives it (RunnerProcess, or a fake in tests)."""

    on_exit: Callable[[Any], None] | None  # called on an unexpected exit after start

    @property
    def state(self) -> RunnerState: ...

    @property
    def pid(self) -> int: ...

    @property
    def client(self) -> RunnerAPI: ...

    async def start(self, timeout: float) -> None: ...

    async def stop(self) -> None: ...

    async def wait_exited(self, timeout: float) -> bool: ...

    def failure_message(self, what: str) -> str: ...

    def kill_now(self, why: str) -> None: ...


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner factory needs to build a runner process."""

    name: str
    model_dir: Path
    home: Path
    num_ctx: int
    num_parallel: int
    env: dict[str, str] = field(default_factory=dict)  # runner settings (runner_env)
    hosts: tuple[HostSpec, ...] = ()  # more than one: a distributed runner, a rank on each


class RunnerFactory(Protocol):
    """Builds runners; may keep processes ready ahead of need (StandbyFactory)."""

    def __call__(self, spec: RunnerSpec) -> Runner: ...

    def refill(self) -> None:
        """Prepare ahead of the next build (called once at start)."""

    async def aclose(self) -> None:
        """Release whatever was kept ready (called at shutdown)."""


class PlainFactory:
    """A RunnerFactory that builds each runner with `build` and keeps nothing ready."""

    def __init__(self, build: Callable[[RunnerSpec], Runner]) -> None:
        self.build = build

    def __call__(self, spec: RunnerSpec) -> Runner:
        return self.build(spec)

    def refill(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


EstimateFn = Callable[..., NeedEstimate]
"""estimate_need's shape: (manifest, num_ctx, num_parallel, *, device) -> NeedEstimate."""


def default_runner_factory(spec: RunnerSpec) -> RunnerProcess:
    if len(spec.hosts) > 1:
        return DistributedRunner(spec.name, spec.model_dir, hosts=spec.hosts, home=spec.home,
                                 num_ctx=spec.num_ctx, num_parallel=spec.num_parallel, env=spec.env)
    return RunnerProcess(spec.name, spec.model_dir, home=spec.home, num_ctx=spec.num_ctx,
                         num_parallel=spec.num_parallel, env=spec.env)


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """Where keep_alive timers come from: the event loop, or a fake clock in tests."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopTimers:
    """Timers on the running asyncio loop."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)


@dataclass(frozen=True)
class LoadedModel:
    """One row of /api/ps."""

    name: str
    ref: ModelRef
    manifest: Manifest
    pid: int
    state: str  # RunnerState value
    size: int  # footprint bytes: max(estimate, runner-reported)
    size_vram: int  # bytes in accelerator memory (== size on Apple silicon / CUDA; 0 on CPU)
    context_length: int
    num_parallel: int
    expires_at: float | None  # unix time; None = never (pinned or keep_alive < 0); while busy: now + keep_alive
    active: int  # requests in flight
    pinned: bool
    prompt_cache: dict[str, Any] = field(default_factory=dict)  # the runner's /status "prompt_cache"
    hosts: tuple[str, ...] = ()  # a distributed model: the hosts of its ranks (rank i on hosts[i])
    ranks: tuple[dict[str, Any], ...] = ()  # and each rank's /status report (rank, pid, host, memory)


@dataclass(frozen=True)
class ModelView:
    """One model in the table as the status page sees it (loading and stopping ones too)."""

    name: str
    phase: str  # loading, loaded, stopping
    state: str  # the runner's RunnerState value
    pid: int
    active: int
    queued: int  # requests waiting for this model (queued, or attached to its load)
    context_length: int
    num_parallel: int
    expires_at: float | None
    pinned: bool
    footprint: int
    parts: dict[str, int]  # weights, kv, prompt_cache, overhead: they sum to footprint
    prompt_cache_used: int  # bytes the runner's prompt cache holds now
    draining: bool


class _Phase(enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"
    STOPPING = "stopping"
    GONE = "gone"


@dataclass(eq=False)
class _Entry:
    """A model in the table (one runner process)."""

    key: str  # normalized name: the table key
    ref: ModelRef
    manifest: Manifest
    process: Runner
    estimate: int
    context_length: int
    num_parallel: int
    phase: _Phase = _Phase.LOADING
    waiters: list[_Ticket] = field(default_factory=list)  # tickets granted when the load is done
    status: dict[str, Any] = field(default_factory=dict)
    status_at: float = 0.0
    active: int = 0
    last_used: float = 0.0
    keep_alive: float | None = None  # of the last release; None: settings default
    expires_at: float | None = None  # when idle
    draining: bool = False
    unload_when_idle: bool = False
    timer: TimerHandle | None = None
    hosts: tuple[int, ...] = (0,)  # indexes into settings.hosts; estimate is per host
    timer_gen: int = 0  # which timer is current: a stale TimerExpired carries an older one
    on_stopped: list[asyncio.Future[bool]] = field(default_factory=list)  # unload() callers
    load_started: float = field(default_factory=time.monotonic)  # for the load-seconds metric
    need: NeedEstimate | None = None  # the estimate's parts (weights, kv, prompt cache, overhead)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def footprint(self) -> int:
        """On each of its hosts: the largest rank's, for a distributed model."""
        ranks = (self.status.get("distributed") or {}).get("ranks") or []
        return max([footprint(self.estimate, self.status),
                    *(footprint(self.estimate, r) for r in ranks if isinstance(r, dict))])

    @property
    def leasable(self) -> bool:
        return self.phase is _Phase.LOADED and self.process.state is RunnerState.READY and not self.draining


@dataclass(eq=False)
class _Ticket:
    ref: ModelRef
    key: str
    num_ctx: int | None
    future: asyncio.Future[tuple[_Entry, bool]]  # (entry, loaded for this ticket)
    enqueued_at: float
    manifest: Manifest | None = None  # read once the ticket reaches the head
    drain_timer: TimerHandle | None = None  # set when it first waits for busy victims to drain


# -- events ------------------------------------------------------------------


@dataclass(eq=False)
class _Acquire:
    ticket: _Ticket


@dataclass(eq=False)
class _Abandoned:
    ticket: _Ticket


@dataclass(eq=False)
class _Released:
    entry: _Entry
    keep_alive: float | None
    done: asyncio.Future[None] | None = None


@dataclass(eq=False)
class _TimerExpired:
    entry: _Entry
    gen: int


@dataclass(eq=False)
class _RunnerExited:
    entry: _Entry


@dataclass(eq=False)
class _Unload:
    key: str
    done: asyncio.Future[bool]


@dataclass(eq=False)
class _Planned:
    ticket: _Ticket
    manifest: Manifest | None
    error: CorralError | None


@dataclass(eq=False)
class _StatusDone:
    statuses: list[tuple[_Entry, dict[str, Any] | None]]


@dataclass(eq=False)
class _LoadDone:
    entry: _Entry
    error: CorralError | None
    status: dict[str, Any]  # the runner's first /status ({} when it did not answer)


@dataclass(eq=False)
class _Stopped:
    entry: _Entry


@dataclass(eq=False)
class _Shutdown:
    done: asyncio.Future[None]


@dataclass(eq=False)
class _DeviceFacts:
    """The standby's device report arrived (None: it could not tell)."""

    facts: dict[str, Any] | None


@dataclass(eq=False)
class _DrainExpired:
    """A ticket has waited drain_timeout for busy models to make room."""

    ticket: _Ticket


_Event = (_Acquire | _Abandoned | _Released | _TimerExpired | _RunnerExited | _Unload | _Planned
          | _StatusDone | _LoadDone | _Stopped | _Shutdown | _DrainExpired | _DeviceFacts)


class _StallWatch:
    """Notices a runner silent for stall_timeout while a stream waits on it. If its
    /health does not answer either it is hung (stopped, deadlocked) and is killed,
    which ends the stream; one that still answers is busy (a long prefill, a full
    batch) and is waited for. The kill goes through the watcher like any exit, so
    the scheduler drops the model and the next request loads it afresh.

    One timer per stream, moved on only when it fires, rather than a timeout
    around every line: that took a task and a wait per line, about 40 us of the
    supervisor's CPU each, on the path every token takes.
    """

    def __init__(self, scheduler: Scheduler, name: str, process: Runner) -> None:
        self._scheduler, self._name, self._process = scheduler, name, process
        self._loop = asyncio.get_running_loop()
        self._since = self._loop.time()  # when the current wait for a line began
        self._awaiting = False  # time the client takes between lines is not the runner's
        self._timer: asyncio.TimerHandle | None = None
        self._probe: asyncio.Task[None] | None = None
        self.killed: str | None = None  # why, once it was killed
        self._task: asyncio.Task[Any] | None = None  # the task waiting for a line: cancelled out of it on a kill
        self._arm(None)

    def waiting(self) -> None:
        # The reader's task, at every wait: a stream's first line may be read in
        # another task than the rest (the handler, then the response's task).
        self._since, self._awaiting, self._task = self._loop.time(), True, asyncio.current_task()

    def got(self) -> None:
        self._awaiting = False

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._probe is not None:
            self._probe.cancel()

    def _arm(self, delay: float | None) -> None:
        if delay is None:
            limit = self._scheduler.settings.stall_timeout
            delay = limit if limit > 0 else STALL_RECHECK  # 0 (never) may be changed at run time
        self._timer = self._loop.call_later(max(delay, 0.01), self._fire)

    def _fire(self) -> None:
        self._timer = None
        limit = self._scheduler.settings.stall_timeout
        silent = self._loop.time() - self._since
        if limit <= 0 or not self._awaiting or silent < limit:
            self._arm(limit - silent if limit > 0 and self._awaiting else None)
            return
        self._probe = self._loop.create_task(self._check(limit))

    async def _check(self, limit: float) -> None:
        since = self._since
        answered = await self._process.client.health(timeout=min(limit, STALL_HEALTH_TIMEOUT))
        self._probe = None
        if answered or self._since != since or not self._awaiting:  # busy, or a line came meanwhile
            if self._since == since:
                self._since = self._loop.time()  # busy: another whole limit before the next look
            self._arm(None)
            return
        why = f"no progress for {limit:g}s and /health did not answer (stalled)"
        self._scheduler.metrics.observe_problem(self._name, "stalled", why)
        self.killed = why
        self._process.kill_now(why)
        # The kill ends the stream (its connection closes) in any case; the cancel
        # makes the reader stop now rather than when the exit is noticed.
        if self._task is not None:
            self._task.cancel()

    def uncancel(self) -> None:
        if self._task is not None:
            self._task.uncancel()


class Lease:
    """A request's hold on a ready model: while held, the model is busy and never evicted."""

    ref: ModelRef
    manifest: Manifest
    context_length: int
    load_duration: float  # seconds this request waited for a load (0 when already loaded)

    def __init__(self, scheduler: Scheduler, entry: _Entry, keep_alive: float | None, load_duration: float) -> None:
        self._scheduler = scheduler
        self._entry = entry
        self._keep_alive = keep_alive
        self._released = False
        self.ref = entry.ref
        self.manifest = entry.manifest
        self.context_length = entry.context_length
        self.load_duration = load_duration

    @property
    def pid(self) -> int:
        return self._entry.process.pid

    def _failed(self, e: CorralError) -> RunnerFailed:
        proc = self._entry.process
        return RunnerFailed(proc.failure_message(f"runner for '{self.ref.name}' failed: {e.message}"))

    async def _runner_error(self, e: RunnerFailed) -> RunnerFailed:
        # A broken stream usually means the runner died: give the watcher a moment
        # to reap it and read its last stderr line, which says why.
        await self._entry.process.wait_exited(2.0)
        return self._failed(e)

    async def completion(self, request: RunnerRequest) -> AsyncIterator[StreamEvent]:
        """POST /completion on the runner: Chunk events, then one Done.

        Raises BadRequest (runner answered 4xx, its message kept) or RunnerFailed
        (runner answered 5xx, sent an error line or the connection broke; the
        message ends with the runner's last stderr line) before or during the
        stream; a runner that stalls is killed (_StallWatch) and fails it too.
        Closing the iterator early (client gone) cancels the runner's sequence.
        """
        if self._released:
            raise RuntimeError("lease already released")
        stream = self._entry.process.client.events(request)
        watch = _StallWatch(self._scheduler, self.ref.name, self._entry.process)
        try:
            while True:
                watch.waiting()
                try:
                    event = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if watch.killed is None:
                        raise
                    watch.uncancel()  # the watch's own cancel, to stop waiting on a killed runner
                    raise RunnerFailed("killed") from None
                finally:
                    watch.got()
                yield event
        except RunnerFailed as e:
            if watch.killed:
                raise RunnerFailed(f"runner for '{self.ref.name}' stalled: {watch.killed}; it was killed") from e
            raise await self._runner_error(e) from e
        finally:
            watch.stop()
            await stream.aclose()

    async def tokenize(self, text: str) -> list[int]:
        try:
            return await self._entry.process.client.tokenize(text)
        except RunnerFailed as e:
            raise await self._runner_error(e) from e

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /embed on an embedding runner (see ROUTE_EMBED in runner/protocol.py)."""
        try:
            return await self._entry.process.client.embed(body)
        except RunnerFailed as e:
            raise await self._runner_error(e) from e

    async def detokenize(self, tokens: list[int]) -> str:
        try:
            return await self._entry.process.client.detokenize(tokens)
        except RunnerFailed as e:
            raise await self._runner_error(e) from e

    async def release(self) -> None:
        """Idempotent. Starts the keep_alive timer when the last lease on the model goes."""
        if self._released:
            return
        self._released = True
        await self._scheduler._release(self._entry, self._keep_alive)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        estimate: EstimateFn = estimate_need,
        probe: MemoryProbe | None = None,
        runner_factory: RunnerFactory | None = None,
        clock: Callable[[], float] = time.time,
        timers: Timers | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.estimate = estimate
        # Host memory, or the GPU's once a runner reports a CUDA device (fed by the dispatcher).
        self.probe = DeviceMemoryProbe(probe if probe is not None else SystemMemoryProbe())
        self._facts_pending = False  # decisions wait for the standby's device report (start)
        self._facts_task: asyncio.Task[None] | None = None
        # Default: real runners, with a standby process kept ready (see StandbyFactory).
        self.runner_factory: RunnerFactory = runner_factory or StandbyFactory(settings.home,
                                                                                    ports=settings.runner_ports)
        self.clock = clock  # unix time, for last_used and expires_at
        self.timers: Timers = timers if timers is not None else LoopTimers()
        # Written only by the dispatcher (see the module doc; tests/test_scheduler_writers.py checks it).
        self._table: dict[str, _Entry] = {}
        self._queue: deque[_Ticket] = deque()
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # loads, stops, manifest reads, /status refreshes
        self._planning: _Ticket | None = None  # the ticket whose manifest is being read
        self._refreshing = False
        self._closing = False
        self._pinned_cache: tuple[tuple[str, ...], frozenset[str]] = ((), frozenset())
        self.loads = 0  # runners started (for tests and /api/ps debugging)
        self.metrics = Metrics()  # observed by the dispatcher (loads, evictions) and the pipeline

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Kill runners orphaned by a previous supervisor; load pinned models."""
        killed = await asyncio.to_thread(cleanup_orphans, self.settings.home)
        if killed:
            log.warning("killed %d orphaned runner(s): %s", len(killed), killed)
        self._ensure_dispatcher()
        self.runner_factory.refill()
        ask = getattr(self.runner_factory, "ask_device_facts", None)
        if ask is not None:  # before any event: the dispatcher has not run yet
            self._facts_pending = True
            self._facts_task = asyncio.create_task(self._ask_device_facts(ask))
        for name in list(self.settings.pinned):
            try:
                lease = await self.acquire(await self.resolve(name))
            except CorralError as e:
                log.error("could not load pinned model %s: %s", name, e.message)
                continue
            await lease.release()

    async def shutdown(self) -> None:
        """Stop every runner (SIGTERM, bounded wait, SIGKILL, reap)."""
        self._closing = True
        if self._facts_task is not None:  # a standby still importing must not hold up the exit
            self._facts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._facts_task
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None and not dispatcher.done():
            done = asyncio.get_running_loop().create_future()
            self._post(_Shutdown(done))
            await done
            while self._tasks:  # stops (and loads cut short by them) post back to the dispatcher
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await asyncio.sleep(0)  # let the dispatcher take the last Stopped events
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await dispatcher
        self._answer_leftover_events()
        await self.runner_factory.aclose()

    def _ensure_dispatcher(self) -> None:
        if not self._closing and (self._dispatcher is None or self._dispatcher.done()):
            self._dispatcher = asyncio.create_task(self._dispatch_loop())

    def _post(self, event: _Event) -> None:
        self._events.put_nowait(event)

    def _answer_leftover_events(self) -> None:
        """After the dispatcher is gone nobody else will: answer whoever still waits."""
        while not self._events.empty():
            event = self._events.get_nowait()
            if isinstance(event, _Acquire):
                _fail(event.ticket.future, Busy("server is shutting down"))
            elif isinstance(event, (_Released, _Unload, _Shutdown)) and event.done is not None:
                _answer(event.done, False if isinstance(event, _Unload) else None)

    # -- public -------------------------------------------------------------

    async def resolve(self, name: str) -> ModelRef:
        """The store's ModelRef for `name` (file access off the event loop, unless just checked)."""
        ref = self.store.resolve_recent(name)
        return ref if ref is not None else await asyncio.to_thread(self.store.resolve, name)

    async def acquire(
        self, ref: ModelRef, *, keep_alive: float | None = None, num_ctx: int | None = None
    ) -> Lease:
        """Make the model `ref` ready (loading once however many requests race) and lease it.

        keep_alive: seconds (already parsed; < 0 forever; None = settings default),
        applied when the lease is released. Raises InvalidModelName, ModelNotFound,
        InsufficientMemory (507, before evicting anything), Busy (queue full),
        LoadTimeout, RunnerFailed.
        """
        if self._closing:
            raise Busy("server is shutting down")
        self._ensure_dispatcher()
        ticket = _Ticket(ref, normalize_name(ref.name), num_ctx, asyncio.get_running_loop().create_future(),
                         time.monotonic())
        self._post(_Acquire(ticket))
        try:
            entry, waited = await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            # the caller went away: give back what it may have been granted
            fut = ticket.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._post(_Released(fut.result()[0], keep_alive))
            else:
                fut.cancel()
            self._post(_Abandoned(ticket))
            raise
        return Lease(self, entry, keep_alive, time.monotonic() - ticket.enqueued_at if waited else 0.0)

    async def unload(self, name: str) -> bool:
        """Unload now if idle, else as soon as it goes idle. False if it was not loaded."""
        try:
            key = normalize_name(name)
        except CorralError:
            return False
        if self._dispatcher is None or self._dispatcher.done():
            return False
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._post(_Unload(key, done))
        return await done

    def loaded(self) -> list[LoadedModel]:
        """Snapshot for /api/ps, most recently used first."""
        now = self.clock()
        rows = []
        entries = [e for e in self._table.values() if e.phase is not _Phase.LOADING]
        for e in sorted(entries, key=lambda e: e.last_used, reverse=True):
            pinned = self._is_pinned(e.key)
            if pinned:
                expires: float | None = None
            elif e.active > 0:
                ka = self._keep_alive_of(e.keep_alive)
                expires = None if ka < 0 else now + ka
            else:
                expires = e.expires_at
            device = str(e.status.get("device", "cpu"))
            size = e.footprint
            rows.append(LoadedModel(
                name=e.name, ref=e.ref, manifest=e.manifest, pid=e.process.pid, state=e.process.state.value,
                size=size, size_vram=0 if device == "cpu" else size, context_length=e.context_length,
                num_parallel=e.num_parallel, expires_at=expires, active=e.active, pinned=pinned,
                prompt_cache=dict(e.status.get("prompt_cache") or {}),
                **self._spread(e),
            ))
        return rows

    def _spread(self, e: _Entry) -> dict[str, Any]:
        """A distributed model's hosts and ranks for /api/ps (nothing for one on this machine)."""
        if len(e.hosts) < 2:
            return {}
        hosts = self.settings.hosts
        ranks = (e.status.get("distributed") or {}).get("ranks") or []
        return {"hosts": tuple(hosts[i].ip if i < len(hosts) else "?" for i in e.hosts),
                "ranks": tuple(dict(r) for r in ranks if isinstance(r, dict))}

    def queue_depth(self) -> int:
        """Requests waiting for a model now (for /metrics)."""
        return self._waiting()

    def overview(self) -> list[ModelView]:
        """Snapshot of the whole table for the status page (read-only), loading ones first."""
        expiry = {m.name: m.expires_at for m in self.loaded()}
        order = {_Phase.LOADING: 0, _Phase.LOADED: 1, _Phase.STOPPING: 2}
        views = []
        for e in sorted(self._table.values(), key=lambda e: (order.get(e.phase, 3), -e.last_used)):
            queued = len(e.waiters) + sum(1 for t in self._queue if t.key == e.key)
            views.append(ModelView(
                name=e.name, phase=e.phase.value, state=e.process.state.value, pid=e.process.pid,
                active=e.active, queued=queued, context_length=e.context_length, num_parallel=e.num_parallel,
                expires_at=expiry.get(e.name), pinned=self._is_pinned(e.key), footprint=e.footprint,
                parts=_parts(e), prompt_cache_used=int((e.status.get("prompt_cache") or {}).get("bytes", 0)),
                draining=e.draining,
            ))
        return views

    def waiting_for_unloaded(self) -> dict[str, int]:
        """Queued requests for models not in the table yet, by name (for the status page)."""
        counts: dict[str, int] = {}
        for t in self._queue:
            if t.key not in self._table and not t.future.done():
                counts[t.ref.name] = counts.get(t.ref.name, 0) + 1
        return counts

    def standby(self) -> tuple[int, int] | None:
        """(pid, resident bytes) of the standby runner kept ready, or None."""
        info = getattr(self.runner_factory, "standby_info", None)
        return info() if callable(info) else None

    async def _release(self, entry: _Entry, keep_alive: float | None) -> None:
        """Lease.release: the dispatcher applies it; returns once it has."""
        if self._dispatcher is None or self._dispatcher.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(_Released(entry, keep_alive, done))
        await done

    # -- helpers (read-only) --------------------------------------------------

    def _pinned_keys(self) -> frozenset[str]:
        """Settings.pinned as table keys; normalized again only when the setting changes."""
        names = tuple(self.settings.pinned)
        if names != self._pinned_cache[0]:
            keys = set()
            for p in names:
                with contextlib.suppress(CorralError):
                    keys.add(normalize_name(p))
            self._pinned_cache = (names, frozenset(keys))
        return self._pinned_cache[1]

    def _is_pinned(self, key: str) -> bool:
        return key in self._pinned_keys()

    def _keep_alive_of(self, keep_alive: float | None) -> float:
        return float(self.settings.keep_alive if keep_alive is None else keep_alive)

    def _queued_for(self, key: str) -> bool:
        return any(t.key == key for t in self._queue)

    def _waiting(self) -> int:
        """Requests waiting for a model: queued, or attached to a load in flight."""
        return len(self._queue) + sum(len(e.waiters) for e in self._table.values())

    def _needs_reload(self, entry: _Entry, ticket: _Ticket) -> bool:
        """Ollama's needsReload: the request names a num_ctx other than the loaded one's.
        A request that names none takes the model with whatever context it has."""
        if ticket.num_ctx is None:
            return False
        return self._shape(entry.manifest, ticket.num_ctx)[0] != entry.context_length

    def _shape(self, manifest: Manifest, num_ctx: int | None) -> tuple[int, int]:
        ctx = num_ctx if num_ctx and num_ctx > 0 else self.settings.context_length
        if ctx <= 0:  # not configured: Ollama's tiers by the memory there is
            ctx = default_context_length(self.memory_limit()[0])
        if manifest.max_context > 0:
            ctx = min(ctx, manifest.max_context)
        return max(1, int(ctx)), max(1, int(self.settings.num_parallel))

    def memory_limit(self) -> tuple[int, str]:
        """The limit loads are fitted under and where it came from: the setting, else what
        the device a runner (the standby at startup, then loaded ones) reported can hold
        (device_limit), else physical memory."""
        if self.settings.memory_limit:
            return int(self.settings.memory_limit), "memory_limit setting"
        return self.probe.limit()

    def _snapshot(self, head: _Ticket, need: int, shape: policy.Shape | None = None) -> policy.Snapshot:
        s = self.settings
        limit, _ = self.memory_limit()
        hosts = self._hosts(int(limit))
        return policy.Snapshot(
            loaded=tuple(self._resident(e) for e in self._table.values()), name=head.key, need=need,
            limit=hosts[0].limit if hosts else int(limit), available=int(self.probe.available()),
            reserve=int(s.reserve), max_loaded_models=int(s.max_loaded_models or 0),
            single_model=bool(s.single_model), label=head.ref.name, hosts=hosts, shape=shape,
            shards=stored_shards(head.ref),
        )

    def _hosts(self, limit: int) -> tuple[policy.Host, ...]:
        """The hosts setting with limits: host 0's is the lower of its own and memory_limit;
        a host without one gets host 0's."""
        hosts = self.settings.hosts
        if len(hosts) < 2:
            return ()
        first = min(limit, hosts[0].memory_limit or limit)
        return tuple(policy.Host(h.ip, first if i == 0 else (h.memory_limit or first)) for i, h in enumerate(hosts))

    def _resident(self, e: _Entry) -> policy.Resident:
        if e.phase is _Phase.LOADING:  # busy until loaded: never an idle victim
            return policy.Resident(name=e.key, footprint=e.footprint, active=max(1, e.active + len(e.waiters)),
                                   last_used=e.last_used, pinned=self._is_pinned(e.key), draining=e.draining, hosts=e.hosts)
        if e.phase is _Phase.STOPPING:  # on its way out: an idle victim already chosen
            return policy.Resident(name=e.key, footprint=e.footprint, active=0, last_used=e.last_used,
                                   pinned=False, draining=True, hosts=e.hosts)
        return policy.Resident(name=e.key, footprint=e.footprint, active=e.active, last_used=e.last_used,
                               pinned=self._is_pinned(e.key), draining=e.draining, hosts=e.hosts)

    def _stale(self) -> list[_Entry]:
        now = time.monotonic()
        return [e for e in self._table.values() if e.phase is _Phase.LOADED
                and e.process.state is RunnerState.READY and now - e.status_at > STATUS_REFRESH]

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())

    # -- background tasks: they never touch the table, they post what they found --

    async def _read_manifest(self, ticket: _Ticket) -> None:
        try:
            manifest = await asyncio.to_thread(self.store.manifest, ticket.ref)
        except CorralError as e:
            self._post(_Planned(ticket, None, e))
        except Exception as e:
            self._post(_Planned(ticket, None, RunnerFailed(f"cannot read model '{ticket.ref.name}': {e}")))
        else:
            self._post(_Planned(ticket, manifest, None))

    async def _ask_device_facts(self, ask: Callable[[float], Coroutine[Any, Any, Any]]) -> None:
        facts: dict[str, Any] | None = None
        try:
            found = await ask(DEVICE_FACTS_WAIT)
            facts = found if isinstance(found, dict) else None
        except Exception as e:
            log.warning("the standby runner could not report its device: %s", e)
        finally:
            self._post(_DeviceFacts(facts))

    async def _fetch_statuses(self, entries: list[_Entry]) -> None:
        found: list[tuple[_Entry, dict[str, Any] | None]] = []
        try:
            for e in entries:
                try:
                    found.append((e, await e.process.client.status(timeout=2.0)))
                except CorralError:
                    found.append((e, None))
        finally:
            self._post(_StatusDone(found))

    async def _load_runner(self, entry: _Entry, timeout: float) -> None:
        error: CorralError | None = None
        status: dict[str, Any] = {}
        try:
            await entry.process.start(timeout=timeout)
            with contextlib.suppress(CorralError):
                status = await entry.process.client.status(timeout=5.0)
        except CorralError as e:
            error = e
        except Exception as e:
            error = RunnerFailed(f"cannot start runner for '{entry.name}': {e}")
        except BaseException:
            error = RunnerFailed(f"loading '{entry.name}' was cancelled")
            raise
        finally:  # always answered: an entry must never stay LOADING
            self._post(_LoadDone(entry, error, status))

    async def _stop_runner(self, entry: _Entry) -> None:
        t0 = time.perf_counter()
        try:
            await entry.process.stop()
            log.info("evicted %s (pid %d): reaped in %.0f ms", entry.name, entry.process.pid,
                     (time.perf_counter() - t0) * 1000)
        finally:
            self._post(_Stopped(entry))

    # -- the dispatcher: the only writer of _table and _queue -----------------

    async def _dispatch_loop(self) -> None:
        while True:
            event = await self._events.get()
            try:
                self._handle(event)
                self._schedule()
            except Exception:  # never let one bad event kill the dispatcher
                log.exception("scheduler: handling %s failed", type(event).__name__)

    def _handle(self, event: _Event) -> None:
        if isinstance(event, _Acquire):
            self._on_acquire(event.ticket)
        elif isinstance(event, _Abandoned):
            self._on_abandoned(event.ticket)
        elif isinstance(event, _Released):
            self._on_released(event)
        elif isinstance(event, _TimerExpired):
            self._on_timer(event)
        elif isinstance(event, _RunnerExited):
            self._on_runner_exit(event.entry)
        elif isinstance(event, _Unload):
            self._on_unload(event)
        elif isinstance(event, _Planned):
            self._on_planned(event)
        elif isinstance(event, _StatusDone):
            self._on_status(event)
        elif isinstance(event, _LoadDone):
            self._on_load_done(event)
        elif isinstance(event, _Stopped):
            self._on_stopped(event.entry)
        elif isinstance(event, _DrainExpired):
            self._on_drain_expired(event.ticket)
        elif isinstance(event, _DeviceFacts):
            self._on_device_facts(event.facts)
        else:
            self._on_shutdown(event.done)

    def _on_acquire(self, ticket: _Ticket) -> None:
        if ticket.future.done():
            return
        if self._closing:
            _fail(ticket.future, Busy("server is shutting down"))
            return
        entry = self._table.get(ticket.key)
        # nobody is queued ahead for this model, it is not giving way to another, and its
        # context is the one asked for (else it reloads once idle: see _serve)
        free = (entry if entry is not None and not entry.draining and not self._queued_for(ticket.key)
                and not self._needs_reload(entry, ticket) else None)
        if free is not None and free.leasable:  # the fast path
            self._grant(free)
            ticket.future.set_result((free, False))
            return
        waiting = self._waiting()
        if waiting >= max(self.settings.max_queue, 0):
            _fail(ticket.future, Busy(f"too many requests waiting for a model ({waiting}); try again later",
                                      retry_after=2))
        elif free is not None and free.phase is _Phase.LOADING:
            free.waiters.append(ticket)  # its load is in flight: granted when it is done
        else:
            self._queue.append(ticket)

    def _on_abandoned(self, ticket: _Ticket) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(ticket)
        entry = self._table.get(ticket.key)
        if entry is not None and ticket in entry.waiters:
            entry.waiters.remove(ticket)

    def _on_released(self, event: _Released) -> None:
        entry = event.entry
        entry.active = max(0, entry.active - 1)
        entry.last_used = self.clock()
        entry.keep_alive = event.keep_alive
        if event.done is not None:
            _answer(event.done, None)
        if entry.active == 0 and entry.phase is _Phase.LOADED:
            self._went_idle(entry)

    def _went_idle(self, entry: _Entry) -> None:
        """Start the keep_alive of an idle entry: stop now, a timer, or never."""
        ka = self._keep_alive_of(entry.keep_alive)
        pinned = self._is_pinned(entry.key)
        if entry.unload_when_idle or (ka == 0 and not pinned):
            self._begin_stop(entry, "manual" if entry.unload_when_idle else "keep_alive")
        elif ka > 0 and not pinned:
            entry.expires_at = entry.last_used + ka
            self._set_timer(entry, ka)
        else:
            entry.expires_at = None

    def _set_timer(self, entry: _Entry, delay: float) -> None:
        self._cancel_timer(entry)
        gen = entry.timer_gen
        entry.timer = self.timers.call_later(delay, lambda: self._post(_TimerExpired(entry, gen)))

    @staticmethod
    def _cancel_timer(entry: _Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.timer_gen += 1  # an expiry already posted is now stale

    def _on_timer(self, event: _TimerExpired) -> None:
        entry = event.entry
        if event.gen != entry.timer_gen or entry.phase is not _Phase.LOADED:
            return
        entry.timer = None
        if entry.active == 0 and not self._is_pinned(entry.key):
            log.info("keep_alive expired for %s; unloading", entry.name)
            self._begin_stop(entry, "keep_alive")

    def _on_runner_exit(self, entry: _Entry) -> None:
        """The runner died by itself: drop it so the next request loads it again."""
        if entry.phase is _Phase.LOADED:
            self.metrics.observe_eviction("crash")
            self.metrics.observe_problem(entry.name, "crashed", entry.process.failure_message(
                f"runner for '{entry.name}' exited"))
            self._drop(entry)

    def _on_unload(self, event: _Unload) -> None:
        entry = self._table.get(event.key)
        if entry is None or entry.phase is _Phase.LOADING:
            _answer(event.done, False)
        elif entry.phase is _Phase.STOPPING or entry.active == 0:
            entry.on_stopped.append(event.done)  # answered once it is reaped
            self._begin_stop(entry, "manual")
        else:
            entry.unload_when_idle = True
            _answer(event.done, True)

    def _on_planned(self, event: _Planned) -> None:
        if self._planning is event.ticket:
            self._planning = None
        if event.error is not None:
            self._fail_all(event.ticket.key, event.error)
        else:
            event.ticket.manifest = event.manifest

    def _on_device_facts(self, facts: dict[str, Any] | None) -> None:
        self._facts_pending = False
        self.probe.report(facts)
        if facts is not None:
            limit, source = self.memory_limit()
            log.info("device %s: memory limit %d bytes (%s)", self.probe.device, limit, source)

    def _on_status(self, event: _StatusDone) -> None:
        self._refreshing = False
        now = time.monotonic()
        for entry, status in event.statuses:
            entry.status_at = now  # a failed refresh waits for the next interval too
            if status is not None:
                entry.status = status
                self.probe.report(status.get("device_facts"))

    def _on_load_done(self, event: _LoadDone) -> None:
        entry = event.entry
        if entry.phase is not _Phase.LOADING:
            return  # stopped meanwhile (shutdown): its waiters were answered then
        error = event.error
        if error is None and entry.process.state is not RunnerState.READY:  # died between ready and now
            error = RunnerFailed(entry.process.failure_message(f"runner for '{entry.name}' exited"))
        waiters = [t for t in entry.waiters if not t.future.done()]
        entry.waiters = []
        self.metrics.observe_load(time.monotonic() - entry.load_started, ok=error is None)
        if error is not None:
            self.metrics.observe_problem(entry.name, "failed", error.message)
            self._drop(entry)
            for t in waiters:
                t.future.set_exception(error)
            return
        entry.phase = _Phase.LOADED
        entry.process.on_exit = lambda _runner: self._post(_RunnerExited(entry))
        entry.status, entry.status_at = event.status, time.monotonic()
        self.probe.report(event.status.get("device_facts"))
        for t in waiters:
            self._grant(entry)
            t.future.set_result((entry, True))
        if not waiters:  # every waiter went away: start its keep_alive now
            entry.last_used = self.clock()
            self._went_idle(entry)

    def _on_stopped(self, entry: _Entry) -> None:
        self._drop(entry)
        for fut in entry.on_stopped:
            _answer(fut, True)
        entry.on_stopped = []

    def _on_drain_expired(self, ticket: _Ticket) -> None:
        """Still queued after drain_timeout: 503 + Retry-After rather than waiting on
        for streams that may never end (every ticket for the model, as they wait alike)."""
        if ticket.future.done() or ticket not in self._queue:
            return  # served, cancelled, or past the wait (loading)
        waited = self.settings.drain_timeout
        self._fail_all(ticket.key, Busy(
            f"model '{ticket.ref.name}' waited {waited:g}s for busy models to finish; try again later",
            retry_after=max(1, min(30, int(waited // 4) or 1))))
        self._clear_draining(())

    def _on_shutdown(self, done: asyncio.Future[None]) -> None:
        self._closing = True
        _answer(done, None)  # before anything can raise: shutdown() waits for it
        while self._queue:
            _fail(self._queue.popleft().future, Busy("server is shutting down"))
        for entry in list(self._table.values()):
            for t in entry.waiters:
                _fail(t.future, Busy("server is shutting down"))
            entry.waiters = []
            self._begin_stop(entry, "shutdown")

    def _grant(self, entry: _Entry) -> None:
        entry.active += 1
        entry.last_used = self.clock()
        entry.expires_at = None
        self._cancel_timer(entry)

    def _begin_stop(self, entry: _Entry, reason: str) -> None:
        """Evict (reason: one of metrics.EVICTION_REASONS): a task stops the runner; the
        entry leaves the table only once it is reaped."""
        if entry.phase in (_Phase.STOPPING, _Phase.GONE):
            return
        self.metrics.observe_eviction(reason)
        self._cancel_timer(entry)
        entry.phase = _Phase.STOPPING
        self._spawn(self._stop_runner(entry))

    def _drop(self, entry: _Entry) -> None:
        # An entry is in the table exactly while it is not GONE, and a key has at most one
        # entry (a new load waits for a STOPPING one to go), so its key is its own.
        if entry.phase is _Phase.GONE:
            return
        self._cancel_timer(entry)
        entry.phase = _Phase.GONE
        del self._table[entry.key]

    def _take_tickets(self, key: str, ctx: int | None = None, manifest: Manifest | None = None) -> list[_Ticket]:
        """The queued tickets for `key`; with `ctx`, only those that take that context."""
        taken = [t for t in self._queue if t.key == key and (
            ctx is None or manifest is None or t.num_ctx is None or self._shape(manifest, t.num_ctx)[0] == ctx)]
        for t in taken:
            self._queue.remove(t)
        return [t for t in taken if not t.future.done()]

    def _fail_all(self, key: str, exc: BaseException) -> None:
        for t in self._take_tickets(key):
            t.future.set_exception(exc)

    def _clear_draining(self, keep: tuple[str, ...]) -> None:
        for e in self._table.values():
            if e.draining and e.key not in keep and e.phase is not _Phase.STOPPING:
                e.draining = False

    def _schedule(self) -> None:
        """Serve tickets from the head of the FIFO until one has to wait for an event."""
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # cancelled callers
            if not self._queue:
                self._clear_draining(())
                return
            if self._closing or not self._serve(self._queue[0]):
                return

    def _serve(self, head: _Ticket) -> bool:
        """One step for the head ticket; True when it moved on (serve the next one)."""
        entry = self._table.get(head.key)
        if entry is not None:
            # Draining marks only hold while the model that waits for them is at the head.
            self._clear_draining(())
            if self._needs_reload(entry, head) and entry.phase is not _Phase.STOPPING:
                return self._reload(entry)
            if entry.phase is _Phase.LOADED and entry.process.state is RunnerState.READY:
                for t in self._take_tickets(head.key, entry.context_length, entry.manifest):
                    self._grant(entry)
                    t.future.set_result((entry, True))
                return True
            if entry.phase is _Phase.LOADING:
                entry.waiters.extend(self._take_tickets(head.key, entry.context_length, entry.manifest))
                return True
            return False  # stopping, or dead and not yet dropped: loaded again after its event
        if head.manifest is None:
            if self._planning is None:
                self._planning = head
                self._spawn(self._read_manifest(head))
            return False
        if self._refreshing or self._facts_pending:
            return False
        stale = self._stale()
        if stale:  # footprints older than STATUS_REFRESH: decide on fresh ones
            self._refreshing = True
            self._spawn(self._fetch_statuses(stale))
            return False
        return self._decide(head, head.manifest)

    def _reload(self, entry: _Entry) -> bool:
        """The head wants another context: no new leases; stop it once idle (its Stopped
        event serves the head again, which then loads it with the new context)."""
        if entry.phase is _Phase.LOADED:
            entry.draining = True
            if entry.active == 0:
                log.info("reloading %s for another context length", entry.name)
                self._begin_stop(entry, "reload")
        return False

    def _decide(self, head: _Ticket, manifest: Manifest) -> bool:
        try:
            num_ctx, num_parallel = self._shape(manifest, head.num_ctx)
            estimate = self.estimate(manifest, num_ctx, num_parallel, device=self.probe.device)
            need = int(estimate.total)
        except Exception as e:
            self._fail_all(head.key, e if isinstance(e, CorralError)
                           else RunnerFailed(f"cannot read model '{head.ref.name}': {e}"))
            return True
        shape = None if manifest.kind == KIND_EMBEDDING else policy.Shape(
            int(estimate.weights), int(estimate.kv), int(estimate.overhead))
        decision = policy.decide(self._snapshot(head, need, shape))
        if decision.verdict is policy.Verdict.NEVER:
            self._fail_all(head.key, InsufficientMemory(decision.message))
            return True
        if decision.verdict is policy.Verdict.WAIT:
            if head.drain_timer is None and self.settings.drain_timeout > 0:
                head.drain_timer = self.timers.call_later(self.settings.drain_timeout,
                                                          lambda: self._post(_DrainExpired(head)))
            self._clear_draining(decision.drain)
            for victim in decision.drain:
                self._table[victim].draining = True
            return False
        self._clear_draining(decision.evict)
        victims = [self._table[v] for v in decision.evict]
        if victims:  # stop them all; decide again once each one's Stopped has arrived
            for v in victims:
                v.draining = True  # no new leases while the victims stop
                self._begin_stop(v, "single-model" if self.settings.single_model else "memory")
            return False
        self._clear_draining(())
        if len(decision.hosts) > 1:
            self._start_load(head, manifest, num_ctx, num_parallel, estimate, decision.per_host, decision.hosts)
        else:
            self._start_load(head, manifest, num_ctx, num_parallel, estimate, need)
        return True

    def _start_load(self, head: _Ticket, manifest: Manifest, num_ctx: int, num_parallel: int,
                    estimate: NeedEstimate, need: int, hosts: tuple[int, ...] = (0,)) -> None:
        ref = head.ref
        spec = RunnerSpec(ref.name, ref.path, Path(self.settings.home), num_ctx, num_parallel,
                          env=runner_env(self.settings, ref.path),
                          hosts=tuple(self.settings.hosts[i] for i in hosts) if len(hosts) > 1 else ())
        try:
            process = self.runner_factory(spec)
        except Exception as e:
            self._fail_all(head.key, RunnerFailed(f"cannot start runner for '{ref.name}': {e}"))
            return
        entry = _Entry(key=head.key, ref=ref, manifest=manifest, process=process, estimate=need,
                       context_length=num_ctx, num_parallel=num_parallel, last_used=self.clock(),
                       need=estimate if isinstance(estimate, NeedEstimate) else None, hosts=hosts)
        entry.waiters = self._take_tickets(head.key, num_ctx, manifest)
        self._table[head.key] = entry
        self.loads += 1
        log.info("loading %s (ctx %d, parallel %d, need %d bytes)", ref.name, num_ctx, num_parallel, need)
        self._spawn(self._load_runner(entry, float(self.settings.load_timeout)))


def _parts(e: _Entry) -> dict[str, int]:
    """A footprint split as the estimate splits it; what the runner uses beyond the estimate
    counts as overhead, so the parts always sum to the footprint."""
    total = e.footprint
    need = e.need
    if need is None:
        return {"weights": 0, "kv": 0, "prompt_cache": 0, "overhead": total}
    known = {"weights": int(need.weights), "kv": int(need.kv), "prompt_cache": int(need.prompt_cache)}
    return {**known, "overhead": max(0, total - sum(known.values()))}


def stored_shards(ref: ModelRef) -> int:
    """The rank count pinned with the model (`corral create --shards`, PARAMETER num_shards); 0: none."""
    value = ref.defaults.parameters.get("num_shards")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _answer(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

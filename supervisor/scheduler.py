"""Scheduling: the one path that makes a model ready.

The API layers only ever call `Scheduler.acquire`, use the returned Lease, and
release it; they never start runners.

How it works. A request for a model that is loaded, READY and not being
drained is leased at once. Every other request becomes a ticket in one FIFO
queue, served by a single dispatcher task, which (for the ticket at the head)
asks the pure policy (supervisor.policy) what to do:

    READY  grant every queued ticket for that model
    NEVER  fail that model's tickets with InsufficientMemory (nothing evicted)
    WAIT   mark the busy victims draining and sleep until something changes
    LOAD   stop the victims (awaiting reap), start the runner, grant its tickets

Because one dispatcher runs every load, exactly one load per model happens
however many requests race, evictions finish before the new runner starts,
and a request for a draining model queues behind the model that waits for
it, so nobody starves. Settings is read at each decision (PATCH /api/settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from corral.supervisor import policy
from corral.supervisor.config import Settings
from corral.supervisor.errors import Busy, CorralError, InsufficientMemory, RunnerFailed
from corral.supervisor.manifest import Manifest
from corral.supervisor.memory import (
    MemoryProbe,
    NeedEstimate,
    SystemMemoryProbe,
    estimate_need,
    footprint,
)
from corral.supervisor.process import RunnerProcess, RunnerState, StandbyFactory, cleanup_orphans
from corral.supervisor.store import ModelRef, normalize_name

log = logging.getLogger(__name__)

STATUS_REFRESH = 5.0  # seconds between /status refreshes of a loaded model's footprint


class Store(Protocol):
    def resolve(self, name: str) -> ModelRef: ...

    def manifest(self, ref: ModelRef) -> Manifest: ...


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner factory needs to build a runner process."""

    name: str
    model_dir: Path
    home: Path
    num_ctx: int
    num_parallel: int


RunnerFactory = Callable[[RunnerSpec], RunnerProcess]
EstimateFn = Callable[[Manifest, int, int], NeedEstimate]


def default_runner_factory(spec: RunnerSpec) -> RunnerProcess:
    return RunnerProcess(spec.name, spec.model_dir, home=spec.home, num_ctx=spec.num_ctx,
                         num_parallel=spec.num_parallel)


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


@dataclass(eq=False)
class _Entry:
    """A model in the table (one runner process)."""

    ref: ModelRef
    manifest: Manifest
    process: RunnerProcess
    estimate: int
    context_length: int
    num_parallel: int
    status: dict[str, Any] = field(default_factory=dict)
    status_at: float = 0.0
    active: int = 0
    last_used: float = 0.0
    keep_alive: float | None = None  # of the last release; None: settings default
    expires_at: float | None = None  # when idle
    draining: bool = False
    unload_when_idle: bool = False
    timer: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def footprint(self) -> int:
        return footprint(self.estimate, self.status)


@dataclass(eq=False)
class _Ticket:
    ref: ModelRef
    num_ctx: int | None
    future: asyncio.Future[_Entry]
    enqueued_at: float


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

    async def completion(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST /completion on the runner; yields NDJSON lines as dicts.

        Raises BadRequest (runner answered 4xx, its message kept) or RunnerFailed
        (runner answered 5xx or the connection broke; the message ends with the
        runner's last stderr line) before or during the stream. Closing the
        iterator early (client gone) cancels the runner's sequence.
        """
        if self._released:
            raise RuntimeError("lease already released")
        stream = self._entry.process.client.completion(body)
        try:
            async for line in stream:
                yield line
        except RunnerFailed as e:
            raise await self._runner_error(e) from e
        finally:
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
        self._scheduler._release(self._entry, self._keep_alive)

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
    ) -> None:
        self.settings = settings
        self.store = store
        self.estimate = estimate
        self.probe: MemoryProbe = probe if probe is not None else SystemMemoryProbe()
        # Default: real runners, with a standby process kept ready (see StandbyFactory).
        self.runner_factory: RunnerFactory = runner_factory or StandbyFactory(settings.home)
        self.clock = clock
        self._table: dict[str, _Entry] = {}
        self._queue: deque[_Ticket] = deque()
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stops: set[asyncio.Task[None]] = set()
        self._closing = False
        self.loads = 0  # runners started (for tests and /api/ps debugging)

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Kill runners orphaned by a previous supervisor; load pinned models."""
        killed = await asyncio.to_thread(cleanup_orphans, self.settings.home)
        if killed:
            log.warning("killed %d orphaned runner(s): %s", len(killed), killed)
        self._ensure_dispatcher()
        refill = getattr(self.runner_factory, "refill", None)
        if refill is not None:
            refill()
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
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._dispatcher
            self._dispatcher = None
        while self._queue:
            t = self._queue.popleft()
            if not t.future.done():
                t.future.set_exception(Busy("server is shutting down"))
        entries = list(self._table.values())
        await asyncio.gather(*(self._stop_entry(e) for e in entries), return_exceptions=True)
        if self._stops:
            await asyncio.gather(*self._stops, return_exceptions=True)
        aclose = getattr(self.runner_factory, "aclose", None)
        if aclose is not None:
            await aclose()

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch_loop())

    # -- public -------------------------------------------------------------

    async def resolve(self, name: str) -> ModelRef:
        """The store's ModelRef for `name` (file access off the event loop)."""
        return await asyncio.to_thread(self.store.resolve, name)

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
        entry = self._table.get(ref.name)
        if entry is not None and self._leasable(entry) and not self._queued_for(ref.name):
            self._grant(entry)
            return Lease(self, entry, keep_alive, 0.0)
        if len(self._queue) >= max(self.settings.max_queue, 0):
            raise Busy(f"too many requests waiting for a model ({len(self._queue)}); try again later",
                       retry_after=2)
        self._ensure_dispatcher()
        ticket = _Ticket(ref, num_ctx, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.append(ticket)
        self._wake.set()
        try:
            entry = await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            # the caller went away: give back what it may have been granted
            with contextlib.suppress(ValueError):
                self._queue.remove(ticket)
            if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
                self._release(ticket.future.result(), keep_alive)
            elif not ticket.future.done():
                ticket.future.cancel()
            self._wake.set()
            raise
        return Lease(self, entry, keep_alive, time.monotonic() - ticket.enqueued_at)

    async def unload(self, name: str) -> bool:
        """Unload now if idle, else as soon as it goes idle. False if it was not loaded."""
        entry = self._lookup(name)
        if entry is None:
            return False
        if entry.active == 0:
            await self._stop_entry(entry)
        else:
            entry.unload_when_idle = True
        return True

    def loaded(self) -> list[LoadedModel]:
        """Snapshot for /api/ps, most recently used first."""
        now = self.clock()
        rows = []
        for e in sorted(self._table.values(), key=lambda e: e.last_used, reverse=True):
            pinned = self._is_pinned(e.name)
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
            ))
        return rows

    # -- helpers ------------------------------------------------------------

    def _lookup(self, name: str) -> _Entry | None:
        if name in self._table:
            return self._table[name]
        try:
            key = normalize_name(name)
        except CorralError:
            return None
        for e in self._table.values():
            if e.name.lower() == key:
                return e
        return None

    def _is_pinned(self, name: str) -> bool:
        key = name.lower()
        for p in self.settings.pinned:
            try:
                if normalize_name(p) == key:
                    return True
            except CorralError:
                continue
        return False

    def _keep_alive_of(self, keep_alive: float | None) -> float:
        return float(self.settings.keep_alive if keep_alive is None else keep_alive)

    @staticmethod
    def _leasable(entry: _Entry) -> bool:
        return entry.process.state is RunnerState.READY and not entry.draining

    def _queued_for(self, name: str) -> bool:
        return any(t.ref.name == name for t in self._queue)

    def _grant(self, entry: _Entry) -> None:
        entry.active += 1
        entry.last_used = self.clock()
        entry.expires_at = None
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _release(self, entry: _Entry, keep_alive: float | None) -> None:
        entry.active = max(0, entry.active - 1)
        entry.last_used = self.clock()
        entry.keep_alive = keep_alive
        self._wake.set()
        if entry.active > 0 or self._table.get(entry.name) is not entry:
            return
        ka = self._keep_alive_of(keep_alive)
        if entry.unload_when_idle or (ka == 0 and not self._is_pinned(entry.name)):
            self._stop_later(entry)
        elif ka > 0 and not self._is_pinned(entry.name):
            entry.expires_at = entry.last_used + ka
            entry.timer = asyncio.get_running_loop().call_later(ka, self._expire, entry)
        else:
            entry.expires_at = None

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.active == 0 and self._table.get(entry.name) is entry and not self._is_pinned(entry.name):
            log.info("keep_alive expired for %s; unloading", entry.name)
            self._stop_later(entry)

    def _stop_later(self, entry: _Entry) -> None:
        task = asyncio.create_task(self._stop_entry(entry))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _stop_entry(self, entry: _Entry) -> None:
        """Evict: stop the runner, and only after it is reaped drop it from the table."""
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        t0 = time.perf_counter()
        await entry.process.stop()
        log.info("evicted %s (pid %d): reaped in %.0f ms", entry.name, entry.process.pid,
                 (time.perf_counter() - t0) * 1000)
        if self._table.get(entry.name) is entry:
            del self._table[entry.name]
        self._wake.set()

    def _on_runner_exit(self, entry: _Entry) -> None:
        """The runner died by itself: drop it so the next request loads it again."""
        if self._table.get(entry.name) is entry:
            del self._table[entry.name]
            if entry.timer is not None:
                entry.timer.cancel()
        self._wake.set()

    # -- the dispatcher -----------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                progressed = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad load kill the dispatcher
                log.exception("scheduler step failed")
                progressed = False
            if not progressed:
                await self._wake.wait()

    def _take_tickets(self, name: str) -> list[_Ticket]:
        taken = [t for t in self._queue if t.ref.name == name]
        for t in taken:
            self._queue.remove(t)
        return [t for t in taken if not t.future.done()]

    def _grant_all(self, entry: _Entry) -> None:
        for t in self._take_tickets(entry.name):
            self._grant(entry)
            t.future.set_result(entry)

    def _fail_all(self, name: str, exc: BaseException) -> None:
        for t in self._take_tickets(name):
            t.future.set_exception(exc)

    async def _step(self) -> bool:
        """Serve the ticket at the head of the queue; True when something changed."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # cancelled callers
        if not self._queue:
            self._clear_draining(())
            return False
        head = self._queue[0]
        name = head.ref.name
        entry = self._table.get(name)
        if entry is not None:
            # Draining marks only hold while the model that waits for them is at the head.
            self._clear_draining(())
            if entry.process.state is RunnerState.READY:
                self._grant_all(entry)
                return True
            return False  # stopping: once reaped (wake), it is loaded again
        try:
            manifest = await asyncio.to_thread(self.store.manifest, head.ref)
            num_ctx, num_parallel = self._shape(manifest, head.num_ctx)
            need = int(self.estimate(manifest, num_ctx, num_parallel).total)
        except Exception as e:
            self._fail_all(name, e if isinstance(e, CorralError) else RunnerFailed(f"cannot read model '{name}': {e}"))
            return True
        await self._refresh_status()
        decision = policy.decide(self._snapshot(name, need))
        if decision.verdict is policy.Verdict.NEVER:
            self._fail_all(name, InsufficientMemory(decision.message))
            return True
        if decision.verdict is policy.Verdict.WAIT:
            self._clear_draining(decision.drain)
            for victim in decision.drain:
                if victim in self._table:
                    self._table[victim].draining = True
            return False
        self._clear_draining(decision.evict)
        victims = [self._table[v] for v in decision.evict if v in self._table]
        for v in victims:
            v.draining = True  # no new leases while the victims stop one by one
        for v in victims:
            if v.active > 0:
                return True  # leased meanwhile: decide again
            await self._stop_entry(v)
        self._clear_draining(())
        await self._load(head.ref, manifest, num_ctx, num_parallel, need)
        return True

    def _clear_draining(self, keep: tuple[str, ...]) -> None:
        for e in self._table.values():
            if e.draining and e.name not in keep:
                e.draining = False
                self._wake.set()

    def _shape(self, manifest: Manifest, num_ctx: int | None) -> tuple[int, int]:
        ctx = num_ctx if num_ctx and num_ctx > 0 else self.settings.context_length
        if manifest.max_context > 0:
            ctx = min(ctx, manifest.max_context)
        return max(1, int(ctx)), max(1, int(self.settings.num_parallel))

    def _snapshot(self, name: str, need: int) -> policy.Snapshot:
        s = self.settings
        limit = s.memory_limit if s.memory_limit else self.probe.total()
        residents = tuple(
            policy.Resident(name=e.name, footprint=e.footprint, active=e.active, last_used=e.last_used,
                            pinned=self._is_pinned(e.name), draining=e.draining)
            for e in self._table.values()
        )
        return policy.Snapshot(
            loaded=residents, name=name, need=need, limit=int(limit), available=int(self.probe.available()),
            reserve=int(s.reserve), max_loaded_models=int(s.max_loaded_models or 0), single_model=bool(s.single_model),
        )

    async def _refresh_status(self) -> None:
        now = time.monotonic()
        stale = [e for e in self._table.values()
                 if e.process.state is RunnerState.READY and now - e.status_at > STATUS_REFRESH]
        for e in stale:
            with contextlib.suppress(CorralError):
                e.status = await e.process.client.status(timeout=2.0)
                e.status_at = now

    async def _load(self, ref: ModelRef, manifest: Manifest, num_ctx: int, num_parallel: int, need: int) -> None:
        spec = RunnerSpec(ref.name, ref.path, Path(self.settings.home), num_ctx, num_parallel)
        process = self.runner_factory(spec)
        entry = _Entry(ref=ref, manifest=manifest, process=process, estimate=need,
                       context_length=num_ctx, num_parallel=num_parallel, last_used=self.clock())
        self.loads += 1
        log.info("loading %s (ctx %d, parallel %d, need %d bytes)", ref.name, num_ctx, num_parallel, need)
        try:
            await process.start(timeout=float(self.settings.load_timeout))
        except CorralError as e:
            self._fail_all(ref.name, e)
            return
        except Exception as e:
            self._fail_all(ref.name, RunnerFailed(f"cannot start runner for '{ref.name}': {e}"))
            return
        process.on_exit = lambda _p: self._on_runner_exit(entry)
        if process.state is not RunnerState.READY:  # died between ready and now
            self._fail_all(ref.name, RunnerFailed(process.failure_message(f"runner for '{ref.name}' exited")))
            return
        self._table[ref.name] = entry
        with contextlib.suppress(CorralError):
            entry.status = await process.client.status(timeout=5.0)
            entry.status_at = time.monotonic()
        if self._table.get(ref.name) is not entry:
            self._fail_all(ref.name, RunnerFailed(process.failure_message(f"runner for '{ref.name}' exited")))
            return
        self._grant_all(entry)
        if entry.active == 0:  # every waiter went away: start its keep_alive now
            entry.active = 1
            self._release(entry, None)

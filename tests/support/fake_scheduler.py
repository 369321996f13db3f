"""In-process fakes of the model store and the scheduler, for API tests.

The API layers only talk to `ctx.store` and `ctx.scheduler`; these fakes keep
the same method names and exceptions so a handler can be exercised through
httpx.ASGITransport without runner subprocesses. Scripted runner lines stand
in for the runner's NDJSON stream (shapes from runner.protocol); the fake lease
turns them into typed events with the real client's parser, so it yields
Chunk/Done and raises RunnerFailed on an error line exactly as a Lease does.

    store = FakeStore.with_models("corral-test/tiny", "corral-test/tiny-b")
    sched = FakeScheduler(store, script=lambda body: text_script("Hello world"))
    ctx = AppContext(settings=Settings(home=tmp), store=store, scheduler=sched)
    app = create_app(ctx)
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from corral.runner.protocol import RunnerRequest, chunk_line, done_line, error_line
from corral.supervisor.api.context import AppContext
from corral.supervisor.config import Settings
from corral.supervisor.errors import CorralError, ModelNotFound
from corral.supervisor.manifest import Manifest
from corral.supervisor.metrics import Metrics
from corral.supervisor.names import display_name, normalize_name, tagged_name
from corral.supervisor.runner_client import StreamEvent, event_from_line
from corral.supervisor.scheduler import LoadedModel
from corral.supervisor.store import ModelDefaults, ModelRef


def fake_context(store: FakeStore, scheduler: FakeScheduler, settings: Settings) -> AppContext:
    """An AppContext holding the fakes (typed as the real classes for the handlers)."""
    return AppContext(settings=settings, store=cast(Any, store), scheduler=cast(Any, scheduler))


class FakeManifest(Manifest):
    """A Manifest whose display properties do not depend on the real implementation."""

    @property
    def parameter_size(self) -> str:
        n = self.parameter_count
        for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if n >= div:
                return f"{n / div:.1f}{suffix}"
        return str(n)

    @property
    def quantization_level(self) -> str:
        return f"Q{self.quant_bits}" if self.quant_bits else self.dtype.upper().replace("FLOAT", "F")


def fake_manifest(**overrides: Any) -> Manifest:
    values: dict[str, Any] = dict(
        model_type="llama", family="llama", weight_bytes=1_000_000, parameter_count=250_000,
        quant_bits=None, quant_group_size=None, dtype="float32", max_context=2048,
        num_layers=2, kv_heads=4, head_dim=16, kv_bytes_per_token=2 * 2 * 4 * 16 * 4,
    )
    values.update(overrides)
    return FakeManifest(**values)


def _validate(name: object) -> str:
    """The real store's name rules (pure: no file access)."""
    return normalize_name(name)


class FakeStore:
    """Lists given refs/manifests; resolve/copy/delete behave like the real store."""

    def __init__(self, refs: Iterable[ModelRef], manifests: dict[str, Manifest] | None = None) -> None:
        self.refs: dict[str, ModelRef] = {r.name.lower(): r for r in refs}
        self.manifests: dict[str, Manifest] = {k.lower(): v for k, v in (manifests or {}).items()}
        self.deleted: list[str] = []

    @classmethod
    def with_models(cls, *names: str, root: Path | None = None) -> FakeStore:
        root = root or Path("/nonexistent/models")
        refs = [
            ModelRef(name=n, path=root / n.replace("/", "--"), source="hf",
                     digest=hashlib.sha1(n.encode()).hexdigest(), modified_at=1_700_000_000.0,
                     size=1_000_000 + i)
            for i, n in enumerate(names)
        ]
        return cls(refs)

    def list(self) -> list[ModelRef]:
        return sorted(self.refs.values(), key=lambda r: r.name)

    def resolve(self, name: str) -> ModelRef:
        key = _validate(name)
        if key not in self.refs:
            raise ModelNotFound(name)
        return self.refs[key]

    def resolve_recent(self, name: str) -> ModelRef | None:
        return None  # never checked recently: resolve() on a worker thread, as on a cold store

    def manifest_recent(self, ref: ModelRef) -> Manifest | None:
        return None

    def manifest(self, ref: ModelRef) -> Manifest:
        return self.manifests.get(ref.name.lower()) or fake_manifest()

    def register(self, name: str, path: Path, defaults: ModelDefaults | None = None) -> ModelRef:
        ref = ModelRef(name=display_name(name), path=path, source="local", digest="0" * 40,
                       modified_at=time.time(), size=0, defaults=defaults or ModelDefaults())
        self.refs[_validate(name)] = ref
        return ref

    def create(self, name: str, source: str, defaults: ModelDefaults) -> ModelRef:
        base = self.resolve(source)
        ref = replace(base, name=display_name(name), source="local", defaults=defaults.over(base.defaults),
                      parent=tagged_name(base.name))
        self.refs[_validate(name)] = ref
        return ref

    def copy(self, src: str, dst: str) -> ModelRef:
        ref = replace(self.resolve(src), name=display_name(dst), source="local")
        self.refs[_validate(dst)] = ref
        return ref

    def delete(self, name: str) -> None:
        ref = self.resolve(name)
        del self.refs[ref.name.lower()]
        self.deleted.append(ref.name)


Script = list[dict[str, Any]]


def text_script(*pieces: str, reason: str = "stop", prompt_tokens: int = 5,
                stop_sequence: str | None = None) -> Script:
    """Runner lines producing `pieces`, then the done line (naming the stop string that
    ended the text, as the runner does, when `stop_sequence` is given)."""
    lines = [chunk_line(p) for p in pieces]
    lines.append(done_line(reason, prompt_eval_count=prompt_tokens, prompt_eval_duration=1_000,
                           eval_count=len(pieces), eval_duration=2_000, stop_sequence=stop_sequence))
    return lines


def broken_script(*pieces: str, message: str = "runner exited (signal 9)") -> Script:
    """Some text, then the runner's error line (a failure after the stream started)."""
    return [*(chunk_line(p) for p in pieces), error_line(message)]


class FakeLease:
    def __init__(self, sched: FakeScheduler, ref: ModelRef, manifest: Manifest, script: Script,
                 fail: BaseException | None, context_length: int) -> None:
        self.sched = sched
        self.ref = ref
        self.manifest = manifest
        self.context_length = context_length
        self.load_duration = 0.0
        self._script = script
        self._fail = fail
        self._script_for: Callable[[dict[str, Any]], Script] | None = None  # a script per body
        self.released = False
        self.closed_early = False

    async def completion(self, request: RunnerRequest) -> AsyncIterator[StreamEvent]:
        body = request.to_wire()  # what the runner would be sent
        self.sched.bodies.append(body)
        if self._fail is not None:
            raise self._fail
        if self._script_for is not None:
            self._script = self._script_for(body)
        finished = False
        try:
            for line in self._script:
                await asyncio.sleep(self.sched.line_delay)
                yield event_from_line(line)
            finished = True
        finally:
            if not finished:
                self.closed_early = True

    async def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    async def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    async def release(self) -> None:
        if not self.released:
            self.released = True
            self.sched.active[self.ref.name] -= 1

    async def __aenter__(self) -> FakeLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


@dataclass
class AcquireCall:
    name: str
    keep_alive: float | None
    num_ctx: int | None


class FakeProbe:
    """A machine with 64 GiB, half of it free."""

    def total(self) -> int:
        return 64 << 30

    def available(self) -> int:
        return 32 << 30


@dataclass
class FakeScheduler:
    """Resolves names through the store, hands out FakeLeases, keeps a fake /api/ps table.

    script: the runner lines every completion yields (or a callable of the request body).
    errors: name -> exception raised by acquire (e.g. InsufficientMemory).
    fail_completion: name -> exception raised by completion before any line.
    line_delay: seconds between lines, for streams a client can walk away from.
    """

    store: FakeStore
    script: Script | Callable[[dict[str, Any]], Script] = field(default_factory=lambda: text_script("Hi", " there"))
    errors: dict[str, CorralError] = field(default_factory=dict)
    fail_completion: dict[str, BaseException] = field(default_factory=dict)
    calls: list[AcquireCall] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)  # names given to resolve(), in order
    bodies: list[dict[str, Any]] = field(default_factory=list)
    leases: list[FakeLease] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)
    table: dict[str, LoadedModel] = field(default_factory=dict)
    unloaded: list[str] = field(default_factory=list)
    started: bool = False
    stopped: bool = False
    line_delay: float = 0.0  # seconds between scripted lines (a slow runner)
    metrics: Metrics = field(default_factory=Metrics)
    probe: FakeProbe = field(default_factory=lambda: FakeProbe())
    waiting: int = 0  # what queue_depth() reports

    def queue_depth(self) -> int:
        return self.waiting

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True

    async def resolve(self, name: str) -> ModelRef:
        self.resolved.append(name)
        return self.store.resolve(name)

    async def acquire(self, ref: ModelRef, *, keep_alive: float | None = None,
                      num_ctx: int | None = None) -> FakeLease:
        self.calls.append(AcquireCall(self.resolved[-1] if self.resolved else ref.name, keep_alive, num_ctx))
        if ref.name.lower() in self.errors:
            raise self.errors[ref.name.lower()]
        manifest = self.store.manifest(ref)
        script = [] if callable(self.script) else self.script
        ctx_len = min(num_ctx or 4096, manifest.max_context)
        lease = FakeLease(self, ref, manifest, script,
                          self.fail_completion.get(ref.name.lower()), ctx_len)
        lease.sched = self
        if callable(self.script):
            lease._script_for = self.script  # the script may depend on the body
        self.leases.append(lease)
        self.active[ref.name] = self.active.get(ref.name, 0) + 1
        forever = keep_alive is not None and keep_alive < 0
        self.table[ref.name] = LoadedModel(
            name=ref.name, ref=ref, manifest=manifest, pid=40_000 + len(self.table), state="ready",
            size=manifest.weight_bytes * 2, size_vram=0, context_length=ctx_len, num_parallel=4,
            expires_at=None if forever else time.time() + (keep_alive or 300.0),
            active=self.active[ref.name], pinned=False,
        )
        return lease

    def memory_limit(self) -> tuple[int, str]:
        return 64 * 2**30, "physical memory"  # a fixed machine: no device report, no setting

    async def unload(self, name: str) -> bool:
        ref = self.store.resolve(name)
        self.unloaded.append(ref.name)
        return self.table.pop(ref.name, None) is not None

    def loaded(self) -> list[LoadedModel]:
        return list(reversed(self.table.values()))

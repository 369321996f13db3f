"""Scheduling: the one path that makes a model ready (STUB: interface fixed).

The API layers only ever call `Scheduler.acquire`, use the returned Lease, and
release it; they never start runners.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from supervisor.manifest import Manifest
from supervisor.store import ModelRef


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


class Lease:
    """A request's hold on a ready model: while held, the model is busy and never evicted."""

    ref: ModelRef
    manifest: Manifest
    context_length: int
    load_duration: float  # seconds this request waited for a load (0 when already loaded)

    async def completion(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST /completion on the runner; yields NDJSON lines as dicts.

        Raises BadRequest (runner answered 4xx, its message kept) or RunnerFailed
        (runner answered 5xx or the connection broke; the message ends with the
        runner's last stderr line) before or during the stream. Closing the
        iterator early (client gone) cancels the runner's sequence.
        """
        raise NotImplementedError
        yield {}

    async def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    async def detokenize(self, tokens: list[int]) -> str:
        raise NotImplementedError

    async def release(self) -> None:
        """Idempotent. Starts the keep_alive timer when the last lease on the model goes."""
        raise NotImplementedError

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class Scheduler:
    async def start(self) -> None:
        """Kill runners orphaned by a previous supervisor; load pinned models."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Stop every runner (SIGTERM, bounded wait, SIGKILL, reap)."""
        raise NotImplementedError

    async def acquire(
        self, name: str, *, keep_alive: float | None = None, num_ctx: int | None = None
    ) -> Lease:
        """Make `name` ready (loading once however many requests race) and lease it.

        keep_alive: seconds (already parsed; < 0 forever; None = settings default),
        applied when the lease is released. Raises InvalidModelName, ModelNotFound,
        InsufficientMemory (507, before evicting anything), Busy (queue full),
        LoadTimeout, RunnerFailed.
        """
        raise NotImplementedError

    async def unload(self, name: str) -> bool:
        """Unload now if idle, else as soon as it goes idle. False if it was not loaded."""
        raise NotImplementedError

    def loaded(self) -> list[LoadedModel]:
        """Snapshot for /api/ps, most recently used first."""
        raise NotImplementedError

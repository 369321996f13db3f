"""One runner subprocess: spawn, wait for ready, watch, stop, reap.

RunnerProcess is the one owner of a runner's state; every change goes through
`_set_state`, checked against `_TRANSITIONS`, so eviction is a state
(STOPPING -> STOPPED), not a side effect. The runner lives in its own process
group (start_new_session) so SIGTERM/SIGKILL reach anything it spawned.

Each runner is recorded in CORRAL_HOME/runners/<pid>.json with its process
create_time and the supervisor's pid and create_time; `cleanup_orphans` uses
these to kill runners left by a supervisor that died, never a recycled pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from runner.protocol import PARENT_PID_ENV, TOKEN_ENV
from supervisor.errors import LoadTimeout, RunnerFailed
from supervisor.runner_client import RunnerClient

log = logging.getLogger(__name__)

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "runner")


class RunnerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_TRANSITIONS: dict[RunnerState, frozenset[RunnerState]] = {
    RunnerState.STARTING: frozenset({RunnerState.READY, RunnerState.STOPPING, RunnerState.FAILED}),
    RunnerState.READY: frozenset({RunnerState.STOPPING, RunnerState.FAILED}),
    RunnerState.STOPPING: frozenset({RunnerState.STOPPED}),
    RunnerState.STOPPED: frozenset(),
    RunnerState.FAILED: frozenset(),
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class RunnerProcess:
    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        home: Path,
        num_ctx: int,
        num_parallel: int,
        command: Sequence[str] = DEFAULT_COMMAND,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self.name = name
        self.model_dir = Path(model_dir)
        self.home = Path(home)
        self.num_ctx = num_ctx
        self.num_parallel = num_parallel
        self.command = tuple(command)
        self.extra_args = tuple(extra_args)
        self.host = host
        self.stop_grace = stop_grace
        self.state = RunnerState.STARTING
        self.port = 0
        self.token = secrets.token_urlsafe(24)
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self.returncode: int | None = None
        self.on_exit: Callable[[RunnerProcess], None] | None = None  # unexpected exits only
        self._proc: asyncio.subprocess.Process | None = None
        self._client: RunnerClient | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None

    # -- state --------------------------------------------------------------

    def _set_state(self, new: RunnerState) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"runner {self.name}: illegal transition {self.state.value} -> {new.value}")
        log.debug("runner %s (pid %s): %s -> %s", self.name, self.pid, self.state.value, new.value)
        self.state = new

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    @property
    def client(self) -> RunnerClient:
        if self._client is None:
            raise RunnerFailed(f"runner for {self.name} is not started")
        return self._client

    @property
    def last_line(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else ""

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / f"runner-{_slug(self.name)}.log"

    @property
    def record_path(self) -> Path:
        return self.home / "runners" / f"{self.pid}.json"

    def failure_message(self, what: str) -> str:
        line = self.last_line
        return f"{what}: {line}" if line else what

    # -- start --------------------------------------------------------------

    def argv(self) -> list[str]:
        return [*self.command, "--model", str(self.model_dir), "--host", self.host, "--port", str(self.port),
                "--num-ctx", str(self.num_ctx), "--num-parallel", str(self.num_parallel), *self.extra_args]

    async def start(self, timeout: float) -> None:
        """Spawn and wait until /health answers 200. Raises RunnerFailed or LoadTimeout
        (after stopping the process)."""
        self.port = free_port(self.host)
        env = dict(os.environ)
        env[TOKEN_ENV] = self.token
        env[PARENT_PID_ENV] = str(os.getpid())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv(), env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        self._write_record()
        self._client = RunnerClient(f"http://{self.host}:{self.port}", self.token)
        self._stderr_task = asyncio.create_task(self._pump_stderr())
        self._watch_task = asyncio.create_task(self._watch())
        try:
            await self._wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise
        self._set_state(RunnerState.READY)

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # A short constant poll: a loopback /health costs well under a millisecond,
        # and every interval of slack is added to the request's cold start.
        delay = 0.02
        while True:
            if self._exited.is_set() or self.state is RunnerState.FAILED:
                await self._drain_stderr()
                raise RunnerFailed(self.failure_message(
                    f"runner for '{self.name}' exited with code {self.returncode} while loading"))
            if await self.client.health(timeout=2.0):
                return
            if time.monotonic() >= deadline:
                raise LoadTimeout(f"model '{self.name}' did not load within {timeout:g}s", retry_after=5)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), delay)

    def _write_record(self) -> None:
        assert self._proc is not None
        try:
            rec = {
                "pid": self._proc.pid,
                "create_time": psutil.Process(self._proc.pid).create_time(),
                "supervisor_pid": os.getpid(),
                "supervisor_create_time": psutil.Process().create_time(),
                "model": self.name,
            }
        except psutil.Error:
            return  # already gone: the watcher will notice
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        self.record_path.write_text(json.dumps(rec))

    async def _pump_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        with open(self.log_path, "ab") as logf:
            async for raw in self._proc.stderr:
                logf.write(raw)
                logf.flush()
                text = raw.decode("utf-8", "replace").rstrip()
                if text.strip():
                    self.stderr_tail.append(text.strip())

    async def _drain_stderr(self) -> None:
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 2.0)

    async def _watch(self) -> None:
        assert self._proc is not None
        self.returncode = await self._proc.wait()
        await self._drain_stderr()
        self._remove_record()
        self._exited.set()
        if self.state in (RunnerState.STARTING, RunnerState.READY):
            log.warning("runner %s (pid %s) exited unexpectedly with code %s: %s",
                        self.name, self.pid, self.returncode, self.last_line)
            self._set_state(RunnerState.FAILED)
            if self._client is not None:
                await self._client.aclose()
            if self.on_exit is not None:
                self.on_exit(self)

    async def wait_exited(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _remove_record(self) -> None:
        with contextlib.suppress(OSError):
            self.record_path.unlink()

    # -- stop ---------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM the process group, wait up to stop_grace, SIGKILL, reap. Idempotent;
        concurrent callers share one stop."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop())
        await asyncio.shield(self._stop_task)

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def _stop(self) -> None:
        if self.state in (RunnerState.STARTING, RunnerState.READY):
            self._set_state(RunnerState.STOPPING)
        if self._proc is not None and not self._exited.is_set():
            self._signal(signal.SIGTERM)
            if not await self.wait_exited(self.stop_grace):
                log.warning("runner %s (pid %s) ignored SIGTERM; killing", self.name, self.pid)
                self._signal(signal.SIGKILL)
                await self._exited.wait()
            # anything left in the group (children of the runner) goes too
            self._signal(signal.SIGKILL)
        if self.state is RunnerState.STOPPING:
            self._set_state(RunnerState.STOPPED)
        if self._client is not None:
            await self._client.aclose()


def _alive_as(pid: int, create_time: float) -> bool:
    """True when `pid` runs and is the same process that was recorded (not a recycled pid)."""
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except (psutil.Error, ValueError):
        return False


def cleanup_orphans(home: Path) -> list[int]:
    """Kill runners recorded under home/runners whose supervisor is gone. Returns killed pids."""
    killed: list[int] = []
    for path in sorted((Path(home) / "runners").glob("*.json")):
        try:
            rec: dict[str, Any] = json.loads(path.read_text())
            pid, ctime = int(rec["pid"]), float(rec["create_time"])
            sup_pid, sup_ctime = int(rec["supervisor_pid"]), float(rec["supervisor_create_time"])
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if _alive_as(sup_pid, sup_ctime):
            continue  # another live supervisor owns it
        if _alive_as(pid, ctime):
            log.warning("killing orphaned runner pid %s (%s)", pid, rec.get("model"))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).wait(timeout=5)
            killed.append(pid)
        with contextlib.suppress(OSError):
            path.unlink()
    return killed

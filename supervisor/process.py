"""One runner subprocess: spawn, wait for ready, watch, stop, reap.

RunnerProcess is the one owner of a runner's state; every change goes through
`_set_state`, checked against `_TRANSITIONS`, so eviction is a state
(STOPPING -> STOPPED), not a side effect. The runner lives in its own process
group (start_new_session) so SIGTERM/SIGKILL reach anything it spawned.

A runner may start as a standby (`python -m corral.runner --model -`): spawned ahead
of need so its imports are done, then adopted for a model, which it reads on
stdin (`adopt` + `start`). StandbyFactory keeps one such process ready, so a
cold load skips interpreter start and the mlx_lm/transformers imports.

DistributedRunner is one logical runner made of several ranks on several hosts:
`mlx.launch` (ring backend) in its own process group starts one
`python -m corral.runner --distributed MODE` per host (over ssh for a remote
host, as mlx.launch does), rank 0 on this machine serving the runner protocol.
The supervisor treats the launcher like any runner process: its exit is the
model's exit, and stopping its group stops every local rank; mlx.launch ends
the remaining ranks when one fails, and a remote rank goes with its ssh session.

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
import re
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from corral.runner.device import parse_facts_line
from corral.runner.protocol import (
    KV_DIR_ENV,
    KV_DISK_ENV,
    PARENT_PID_ENV,
    PROMPT_CACHE_ENV,
    TOKEN_ENV,
    kv_dir_name,
)
from corral.supervisor.errors import LoadTimeout, RunnerFailed
from corral.supervisor.runner_client import RunnerClient

log = logging.getLogger(__name__)

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL (the runner's drain + disk-tier write fit in it)
RANK_EXIT_GRACE = 3.0  # seconds a distributed runner has to end by itself after one of its ranks exits
REAP_WAIT = 5.0  # seconds to wait for the kernel to reap a SIGKILLed group before giving up on it
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL|Traceback)\b|^\w*(Error|Exception)\b|\berror:", re.IGNORECASE)
_SECRET_ENV = ("CORRAL_API_KEY",)  # the supervisor's secrets; a runner gets only its own token
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "corral.runner")
LAUNCH_COMMAND: tuple[str, ...] = (
    sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; "
    "sys.exit(main())")
"""`mlx.launch` with the supervisor's interpreter (the supervisor itself never imports mlx)."""


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


def free_port(host: str = "127.0.0.1", ports: tuple[int, int] | None = None) -> int:
    """A port free on `host` now: any, or one in the inclusive range `ports` (CORRAL_RUNNER_PORTS).
    Free now, not later: until its user binds it, any socket may take it (see reserve_port)."""
    with reserve_port(host, ports) as s:
        return int(s.getsockname()[1])


def reserve_port(host: str = "127.0.0.1", ports: tuple[int, int] | None = None) -> socket.socket:
    """A TCP socket bound to a free port on `host` (any, or one in `ports`), not listening.

    A runner gets it as an inherited fd and listens on it. Picking a port, closing
    it and passing the number on would leave it unclaimed for as long as a standby
    waits for its model (minutes): any outgoing connection on the machine may be
    given it as its local port meanwhile (the supervisor's own /health polls
    included), and the runner then fails to bind, a load error for the user.
    Bound but not listening, it refuses connections as a closed port does, so
    polls before the runner is ready fail at once, as before.
    """
    if ports is None:
        candidates: Sequence[int] = (0,)
    else:  # from a random point, so runners started together rarely race for one port
        span = range(ports[0], ports[1] + 1)
        start = secrets.randbelow(len(span))
        candidates = [*span[start:], *span[:start]]
    for port in candidates:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            continue
        return s
    raise RunnerFailed(f"no free port for a runner in CORRAL_RUNNER_PORTS {ports[0]}-{ports[1]}"
                       if ports else "no free port for a runner")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def runner_log_path(home: Path, name: str) -> Path:
    """Where the runner of model `name` writes its log (kept after it exits)."""
    return Path(home) / "logs" / f"runner-{_slug(name)}.log"


class RunnerProcess:
    keeps_stdin = False  # give the process a pipe on stdin that stays open (never at EOF)
    inherits_socket = True  # listens on the socket spawn() reserved (--fd), so its port cannot be taken

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
        standby: bool = False,
        env: Mapping[str, str] | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        self.env = dict(env or {})  # runner settings (runner_env); a standby gets them on stdin
        self.standby = standby  # spawned with --model -, model assigned on stdin
        self.ports = ports  # the range its port comes from (CORRAL_RUNNER_PORTS); None: any
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
        self.device_facts: dict[str, Any] | None = None  # a standby's stderr report (runner/device.py)
        self._facts_reported = asyncio.Event()

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
        return runner_log_path(self.home, self.name)

    @property
    def record_path(self) -> Path:
        return self.home / "runners" / f"{self.pid}.json"

    @property
    def last_error_line(self) -> str:
        """The last line of the tail that reports an error (none: ""); an INFO line says nothing."""
        for line in reversed(self.stderr_tail):
            if _ERROR_LINE.search(line):
                return line
        return ""

    def failure_message(self, what: str) -> str:
        line = self.last_error_line
        return f"{what}: {line}" if line else what

    # -- start --------------------------------------------------------------

    def argv(self, fd: int | None = None) -> list[str]:
        """The command line; fd: the inherited socket it listens on (reserve_port)."""
        where = ["--host", self.host, "--port", str(self.port), *(["--fd", str(fd)] if fd is not None else [])]
        if self.standby:
            return [*self.command, "--model", "-", *where, *self.extra_args]
        return [*self.command, "--model", str(self.model_dir), *where,
                "--num-ctx", str(self.num_ctx), "--num-parallel", str(self.num_parallel), *self.extra_args]

    @property
    def spawned(self) -> bool:
        return self._proc is not None

    async def spawn(self) -> None:
        """Start the process (a standby waits for `adopt` + `start`); returns at once."""
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env[TOKEN_ENV] = self.token
        env[PARENT_PID_ENV] = str(os.getpid())
        env.update(self.env)
        with contextlib.suppress(OSError):  # a full disk must not stop a runner; its log just drops
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The port stays bound from here until the runner exits: it inherits the
        # socket and listens on it (reserve_port). Ours closes once it has a copy.
        with reserve_port(self.host, self.ports) as sock:
            self.port = int(sock.getsockname()[1])
            fd = sock.fileno() if self.inherits_socket else None
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv(fd), env=env, pass_fds=() if fd is None else (fd,),
                stdin=asyncio.subprocess.PIPE if self.standby or self.keeps_stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )
        # From here the process exists: whatever fails below, it is watched and reaped.
        self._client = RunnerClient(f"http://{self.host}:{self.port}", self.token, num_parallel=self.num_parallel)
        self._stderr_task = asyncio.create_task(self._pump_stderr())
        self._watch_task = asyncio.create_task(self._watch())
        try:
            self._write_record()
        except OSError as e:
            log.warning("runner %s (pid %s): cannot record it (%s); stopping it", self.name, self.pid, e)
            await self.stop()
            raise

    def adopt(self, name: str, model_dir: Path, num_ctx: int, num_parallel: int,
              env: Mapping[str, str] | None = None) -> None:
        """Give a spawned standby its model; `start` then sends it and waits for ready."""
        if not self.standby or self.state is not RunnerState.STARTING:
            raise RuntimeError(f"runner {self.name}: only a waiting standby can be adopted")
        self.name, self.model_dir, self.num_ctx, self.num_parallel = name, Path(model_dir), num_ctx, num_parallel
        self.env = dict(env or {})
        if self._client is not None:
            self._client.limit_streams(num_parallel)
        self._write_record()  # the record names the model it now serves

    async def _assign(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        line = json.dumps({"model": str(self.model_dir), "num_ctx": self.num_ctx,
                           "num_parallel": self.num_parallel, "name": self.name, "env": self.env})
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            self._proc.stdin.write(line.encode() + b"\n")
            await self._proc.stdin.drain()
            self._proc.stdin.close()  # an exit before reading shows up in _wait_ready

    async def start(self, timeout: float) -> None:
        """Spawn (or hand an adopted standby its model) and wait until /health answers 200.
        Raises RunnerFailed or LoadTimeout (after stopping the process)."""
        if self.state is not RunnerState.STARTING:  # stopped before it could start
            raise RunnerFailed(f"runner for '{self.name}' was stopped before it started")
        if self._proc is None:
            await self.spawn()
        if self.standby:
            await self._assign()
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
            if self.state in (RunnerState.STOPPING, RunnerState.STOPPED):
                raise RunnerFailed(f"runner for '{self.name}' was stopped while loading")
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
                "model_dir": str(self.model_dir),
            }
        except psutil.Error:
            return  # already gone: the watcher will notice
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        self.record_path.write_text(json.dumps(rec))

    async def _pump_stderr(self) -> None:
        """Read the runner's stderr to its end, whatever happens to the log file: a pipe
        left unread fills, and the runner then blocks on its next log line."""
        assert self._proc is not None and self._proc.stderr is not None
        log_failed = False
        while True:
            try:
                raw = await self._proc.stderr.readline()
            except ValueError:  # a line over the stream limit: its first part arrives alone
                raw = await self._proc.stderr.read(64 * 1024)
            if not raw:
                return
            text = raw.decode("utf-8", "replace").strip()
            facts = parse_facts_line(text)
            if facts is not None:
                self.device_facts = facts
                self._facts_reported.set()
            elif text:
                self.stderr_tail.append(text[:2000])
            written = self._write_log(raw)
            if not written and not log_failed:  # once per spell of failures, not per line
                log.warning("runner %s (pid %s): cannot write %s; dropping its log lines",
                            self.name, self.pid, self.log_path)
            log_failed = not written

    async def wait_device_facts(self, timeout: float) -> dict[str, Any] | None:
        """The device facts a standby reports once its imports are done; None if it
        exits or stays silent for `timeout` seconds."""
        reported = asyncio.ensure_future(self._facts_reported.wait())
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait({reported, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reported.cancel()
            exited.cancel()
        return self.device_facts

    def _write_log(self, raw: bytes) -> bool:
        """Append to the runner's log; False when the disk refuses (the line is dropped).

        Opened per line: a standby's log path changes when it is adopted. A local file
        append does not block the loop for long; a full disk fails at once (ENOSPC)."""
        try:
            with open(self.log_path, "ab") as logf:
                logf.write(raw)
        except OSError:
            return False
        return True

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
        if self._stop_task is None or (self._stop_task.done() and self.spawned and not self._exited.is_set()):
            # (again when a stop came while the process was being spawned)
            self._stop_task = asyncio.create_task(self._stop())
        await asyncio.shield(self._stop_task)

    def kill_now(self, why: str) -> None:
        """SIGKILL the group at once (a hung runner answers no SIGTERM); the watcher reaps it."""
        log.error("runner %s (pid %s): %s; killing it", self.name, self.pid, why)
        self.stderr_tail.append(f"error: {why}")
        if self._proc is not None and not self._exited.is_set():
            self._signal(signal.SIGKILL)

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
                if not await self.wait_exited(REAP_WAIT):  # bounded: shutdown never hangs here
                    log.error("runner %s (pid %s) not reaped %gs after SIGKILL", self.name, self.pid,
                              REAP_WAIT)
            # anything left in the group (children of the runner) goes too
            self._signal(signal.SIGKILL)
        if self.state is RunnerState.STOPPING:
            self._set_state(RunnerState.STOPPED)
        if self._client is not None:
            await self._client.aclose()


def runner_env(settings: Any, model_dir: Path) -> dict[str, str]:
    """The environment a completion runner reads its prompt-cache settings from:
    the budget, and the disk tier (CORRAL_HOME/kv/<model key>, see kv_dir_name)."""
    env = {PROMPT_CACHE_ENV: str(settings.prompt_cache), KV_DISK_ENV: str(settings.kv_disk)}
    if int(settings.kv_disk) > 0:
        env[KV_DIR_ENV] = str(kv_root(Path(settings.home)) / kv_dir_name(str(model_dir)))
    return env


def kv_root(home: Path) -> Path:
    """Where every model's disk-tier prompt caches live."""
    return Path(home) / "kv"


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


class StandbyFactory:
    """Builds runners, keeping one standby process ready to adopt the next model.

    `python -m corral.runner` spends most of a small model's cold start importing
    mlx_lm and transformers. A standby does that ahead of need, so a load only
    pays for reading weights. One spare costs one idle interpreter (~85 MB
    RSS on the CPU backend); it is refilled in the background after each use.
    """

    def __init__(self, home: Path, *, command: Sequence[str] = DEFAULT_COMMAND,
                 ports: tuple[int, int] | None = None) -> None:
        self.home = Path(home)
        self.command = tuple(command)
        self.ports = ports
        self._spare: RunnerProcess | None = None
        self._filling: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Future[None]] = set()
        self._closed = False
        self.device_facts: dict[str, Any] | None = None  # the last standby's report

    def __call__(self, spec: Any) -> RunnerProcess:
        if len(getattr(spec, "hosts", ())) > 1:  # ranks start under mlx.launch: no standby for them
            return DistributedRunner(spec.name, spec.model_dir, hosts=spec.hosts, home=self.home,
                                     num_ctx=spec.num_ctx, num_parallel=spec.num_parallel, ports=self.ports,
                                     env=getattr(spec, "env", None))
        spare, self._spare = self._spare, None
        self.refill()
        if spare is not None and spare.spawned and spare.state is RunnerState.STARTING \
                and not spare._exited.is_set():
            spare.adopt(spec.name, spec.model_dir, spec.num_ctx, spec.num_parallel, getattr(spec, "env", None))
            return spare
        if spare is not None:  # a dead or odd spare: make sure it is reaped
            task = asyncio.ensure_future(spare.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        return RunnerProcess(spec.name, spec.model_dir, home=self.home, num_ctx=spec.num_ctx,
                             num_parallel=spec.num_parallel, command=self.command,
                             env=getattr(spec, "env", None), ports=self.ports)

    def standby_info(self) -> tuple[int, int] | None:
        """(pid, resident bytes) of the spare, or None when there is none (read-only)."""
        spare = self._spare
        if spare is None or not spare.spawned:
            return None
        try:
            return spare.pid, int(psutil.Process(spare.pid).memory_info().rss)
        except (psutil.Error, ValueError):
            return None

    def refill(self) -> None:
        """Spawn a spare in the background if there is none."""
        if self._closed or self._spare is not None or (self._filling and not self._filling.done()):
            return
        self._filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        spare = RunnerProcess("standby", Path("-"), home=self.home, num_ctx=0, num_parallel=1,
                              command=self.command, standby=True, ports=self.ports)
        try:
            await spare.spawn()
        except (OSError, RunnerFailed) as e:  # spawn has stopped anything it started
            log.warning("could not start a standby runner: %s", e)
            await spare.stop()
            return
        if self._closed:
            await spare.stop()
            return
        self._spare = spare

    async def ask_device_facts(self, timeout: float) -> dict[str, Any] | None:
        """What the device can hold, as a standby reports it (runner/device.py): the
        spare is started if there is none, and its report awaited up to `timeout`
        seconds. None when no standby could start or report."""
        self.refill()
        if self._filling is not None:
            with contextlib.suppress(Exception):  # shielded: giving up on the facts keeps the spare
                await asyncio.shield(self._filling)
        spare = self._spare
        if spare is not None:
            facts = await spare.wait_device_facts(timeout)
            if facts is not None:
                self.device_facts = facts
        return self.device_facts

    async def aclose(self) -> None:
        self._closed = True
        if self._filling is not None:
            with contextlib.suppress(Exception):
                await self._filling
        spare, self._spare = self._spare, None
        if spare is not None:
            await spare.stop()


def free_port_run(count: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """The first of `count` consecutive ports free on `host` now (the ring backend takes
    one port per rank from a starting port)."""
    for _ in range(tries):
        first = free_port(host)
        if first + count - 1 > 65535:
            continue
        if all(_port_free(host, first + i) for i in range(1, count)):
            return first
    raise RunnerFailed(f"no {count} consecutive free ports for a distributed runner")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class DistributedRunner(RunnerProcess):
    """One model as ranks on several hosts, started by `mlx.launch` as one process group.

    `hosts` are where the ranks go, one each, this machine first (rank 0 serves
    the runner protocol on loopback). `mode` is "tensor" or "pipeline" (the
    runner falls back to the other when the model supports only that one).
    """

    # mlx.launch forwards its stdin to the ranks in a loop that polls it: at EOF
    # (/dev/null) that loop spins a core; an open pipe with nothing in it does not.
    keeps_stdin = True
    # mlx.launch starts the ranks itself and passes no fds on: rank 0 binds the port.
    inherits_socket = False

    def __init__(self, name: str, model_dir: Path, *, hosts: Sequence[Any], mode: str = "tensor",
                 launch: Sequence[str] = LAUNCH_COMMAND, **kw: Any) -> None:
        super().__init__(name, model_dir, **kw)
        if len(hosts) < 2:
            raise ValueError("a distributed runner needs at least 2 hosts")
        self.hosts = tuple(hosts)
        self.mode = mode
        self.launch = tuple(launch)
        self.ring_port = 0
        self._hostfile_id = secrets.token_hex(4)

    @property
    def hostfile_path(self) -> Path:
        return self.home / "hostfiles" / f"{_slug(self.name)}-{self._hostfile_id}.json"

    def argv(self, fd: int | None = None) -> list[str]:
        return [*self.launch, "--backend", "ring", "--hostfile", str(self.hostfile_path),
                "--starting-port", str(self.ring_port), "--", *super().argv(fd), "--distributed", self.mode]

    async def spawn(self) -> None:
        self.ring_port = free_port_run(len(self.hosts))
        self.hostfile_path.parent.mkdir(parents=True, exist_ok=True)
        self.hostfile_path.write_text(json.dumps([{"ssh": h.ssh, "ips": [h.ip]} for h in self.hosts]))
        await super().spawn()

    async def _watch_ranks(self) -> None:
        """Any local rank's (or a remote rank's ssh session's) exit ends the whole runner.

        mlx.launch ends the other ranks when one fails, but it waits on each rank it
        signals, so a stopped or hung one would hold it forever: give rank 0 a moment to
        fail its streams in-band and the launcher to finish, then kill the group."""
        ranks: list[psutil.Process] = []
        while not self._exited.is_set() and len(ranks) < len(self.hosts):
            with contextlib.suppress(psutil.Error):
                ranks = psutil.Process(self.pid).children()
            await asyncio.sleep(0.2)
        while not self._exited.is_set():
            if any(not _running(p) for p in ranks):
                if not await self.wait_exited(RANK_EXIT_GRACE) and self.state in (RunnerState.STARTING,
                                                                                   RunnerState.READY):
                    self.kill_now("a rank of the distributed runner exited")
                return
            await asyncio.sleep(0.25)

    async def _watch(self) -> None:
        ranks = asyncio.create_task(self._watch_ranks())
        try:
            await super()._watch()
        finally:
            ranks.cancel()
        # mlx.launch has gone: nothing of its group may outlive it (a rank stuck in a collective)
        self._signal(signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.hostfile_path.unlink()

    async def _stop(self) -> None:
        # the local ranks are the launcher's children: stopped means they are gone too
        members = await asyncio.to_thread(_group_members, self.pid) if self.spawned else []
        await super()._stop()
        if members:
            await asyncio.to_thread(_wait_gone, members, REAP_WAIT)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_members(pgid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != pgid and os.getpgid(p.pid) == pgid:
                found.append(p)
    return found


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Until each one has exited (a zombie counts: its parent, gone, no longer reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive:
            return
        procs = alive
        time.sleep(0.02)

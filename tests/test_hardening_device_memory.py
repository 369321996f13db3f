"""Issue 9, item 10: the fit follows the device the runners report, from the first load on.

Fake device reports for Metal, CUDA and CPU drive the real Scheduler (in-memory fake
runners, see test_scheduler_unit) and the DeviceMemoryProbe; a real standby process
(a stand-in command, and the real runner) shows the report travels over its stderr.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from corral.runner.device import FACTS_PREFIX, facts_line, parse_facts_line
from corral.supervisor import scheduler as scheduler_module
from corral.supervisor.config import Settings
from corral.supervisor.errors import InsufficientMemory
from corral.supervisor.manifest import Manifest, read_manifest
from corral.supervisor.memory import (
    PREFILL_STEP,
    DeviceMemoryProbe,
    NeedEstimate,
    device_limit,
    estimate_need,
)
from corral.supervisor.process import StandbyFactory
from corral.supervisor.scheduler import Scheduler

from tests.test_scheduler_unit import GB, FakeProbe, FakeStore, World

METAL = {"device": "metal", "total": 64 * GB, "recommended": 8 * GB, "free": None}
CUDA = {"device": "cuda", "total": 24 * GB, "recommended": None, "free": 5 * GB}
CPU = {"device": "cpu", "total": 100 * GB, "recommended": None, "free": 100 * GB}


class HostProbe:
    """The machine's RAM as the fake scheduler world sees it: 100 GB, 90 GB free."""

    def total(self) -> int:
        return 100 * GB

    def available(self) -> int:
        return 90 * GB


# --- the probe ------------------------------------------------------------------------------


def test_probe_before_any_report_is_the_host() -> None:
    probe = DeviceMemoryProbe(HostProbe())
    assert (probe.device, probe.total(), probe.available()) == ("cpu", 100 * GB, 90 * GB)
    assert probe.limit() == (100 * GB, "physical memory")


def test_probe_cuda_uses_the_gpus_total_and_free_memory() -> None:
    probe = DeviceMemoryProbe(HostProbe())
    probe.report(CUDA)
    assert (probe.device, probe.total(), probe.available()) == ("cuda", 24 * GB, 5 * GB)
    assert probe.limit() == (24 * GB, "cuda device memory")
    probe.report({**CUDA, "free": 7 * GB})  # a later report replaces it
    assert probe.available() == 7 * GB
    probe.report({**CUDA, "free": None})  # the backend could not tell: the host's view
    assert probe.available() == 90 * GB


def test_probe_metal_limit_is_the_working_set_and_available_is_unified_ram() -> None:
    probe = DeviceMemoryProbe(HostProbe())
    probe.report(METAL)
    assert probe.device == "metal"
    assert probe.limit() == (8 * GB, "metal recommended working set")
    assert (probe.total(), probe.available()) == (100 * GB, 90 * GB)


def test_probe_cpu_keeps_ram() -> None:
    probe = DeviceMemoryProbe(HostProbe())
    probe.report(CPU)
    assert (probe.total(), probe.available()) == (100 * GB, 90 * GB)
    assert probe.limit() == (100 * GB, "physical memory")


@pytest.mark.parametrize("junk", [None, {}, "cuda", {"device": "tpu", "total": 1}, [CUDA]])
def test_probe_ignores_what_is_not_a_report(junk: Any) -> None:
    probe = DeviceMemoryProbe(HostProbe())
    probe.report(CUDA)
    probe.report(junk)
    assert probe.device == "cuda"


def test_device_limit_for_each_device() -> None:
    assert device_limit(METAL, 100 * GB) == (8 * GB, "metal recommended working set")
    assert device_limit(CUDA, 100 * GB) == (24 * GB, "cuda device memory")
    assert device_limit(CPU, 100 * GB) == (100 * GB, "physical memory")


def test_facts_line_round_trips_and_rejects_other_lines() -> None:
    assert parse_facts_line(facts_line(CUDA)) == CUDA
    assert parse_facts_line("2026-01-01 runner[1] INFO standby: imports done") is None
    assert parse_facts_line(FACTS_PREFIX + "{not json") is None
    assert parse_facts_line(FACTS_PREFIX + '{"device": "tpu"}') is None


# --- the scheduler, with fake device reports ------------------------------------------------


@dataclass
class DeviceWorld(World):
    """A fake world whose standby reports `facts` once `reported` is set."""

    facts: dict[str, Any] | None = None
    reported: asyncio.Event = field(default_factory=asyncio.Event)
    estimated_for: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sched.estimate = self.estimate
        self.sched.probe.host = HostProbe()

    def estimate(self, m: Manifest, num_ctx: int, num_parallel: int, *, device: str = "cpu") -> NeedEstimate:
        self.estimated_for.append(device)
        return NeedEstimate(m.weight_bytes, 0, 0, m.weight_bytes)

    async def ask_device_facts(self, timeout: float) -> dict[str, Any] | None:
        await self.reported.wait()
        return self.facts


@pytest.fixture
async def device_world(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    worlds: list[DeviceWorld] = []

    async def _make(facts: dict[str, Any] | None, sizes: dict[str, int], report_now: bool = True) -> DeviceWorld:
        settings = Settings(home=tmp_path, reserve=0, memory_limit=None, load_timeout=60.0, keep_alive=-1)
        w = DeviceWorld(sizes, settings, facts=facts)
        if report_now:
            w.reported.set()
        await w.sched.start()
        worlds.append(w)
        return w

    yield _make
    for w in worlds:
        w.reported.set()
        await w.sched.shutdown()


async def test_first_load_on_metal_fits_against_the_working_set(device_world: Callable[..., Any]) -> None:
    w = await device_world(METAL, {"big": 9 * GB, "small": 7 * GB})
    with pytest.raises(InsufficientMemory, match="cannot fit"):
        await w.acquire("big")  # fits in 100 GB of RAM, not in Metal's 8 GB working set
    assert w.starts() == []
    lease = await w.acquire("small")
    await lease.release()
    assert w.sched.memory_limit() == (8 * GB, "metal recommended working set")
    assert set(w.estimated_for) == {"metal"}


async def test_first_load_on_cuda_fits_against_free_gpu_memory(device_world: Callable[..., Any]) -> None:
    w = await device_world(CUDA, {"big": 6 * GB, "small": 4 * GB})
    with pytest.raises(InsufficientMemory, match="cannot fit"):
        await w.acquire("big")  # under the 24 GB card, over its 5 GB free
    lease = await w.acquire("small")
    await lease.release()
    assert w.sched.memory_limit() == (24 * GB, "cuda device memory")
    assert set(w.estimated_for) == {"cuda"}


async def test_cpu_keeps_ram(device_world: Callable[..., Any]) -> None:
    w = await device_world(CPU, {"a": 80 * GB})
    lease = await w.acquire("a")
    await lease.release()
    assert w.sched.memory_limit() == (100 * GB, "physical memory")
    assert set(w.estimated_for) == {"cpu"}


async def test_decisions_wait_for_the_standbys_report(device_world: Callable[..., Any]) -> None:
    w = await device_world(METAL, {"big": 9 * GB}, report_now=False)
    task = asyncio.create_task(w.acquire("big"))
    for _ in range(200):
        await asyncio.sleep(0)
    assert not task.done() and w.starts() == []  # not decided against RAM meanwhile
    w.reported.set()
    with pytest.raises(InsufficientMemory):
        await task
    assert w.starts() == []


async def test_no_report_falls_back_to_physical_memory(device_world: Callable[..., Any]) -> None:
    w = await device_world(None, {"a": 50 * GB})
    lease = await w.acquire("a")
    await lease.release()
    assert w.sched.memory_limit() == (100 * GB, "physical memory")


async def test_loaded_runners_status_reports_update_the_probe(device_world: Callable[..., Any]) -> None:
    w = await device_world(CUDA, {"a": 1 * GB})
    lease = await w.acquire("a")
    await lease.release()
    assert w.sched.probe.available() == 5 * GB
    w.sched.probe.report({**CUDA, "free": 3 * GB})  # what the next /status refresh would post
    assert w.sched.probe.available() == 3 * GB


def test_scheduler_keeps_a_plain_probe_as_the_host(tmp_path: Path) -> None:
    w = World({"a": GB}, Settings(home=tmp_path, reserve=0, memory_limit=None))
    assert isinstance(w.sched.probe.host, FakeProbe)
    assert w.sched.memory_limit() == (100 * GB, "physical memory")


# --- a real standby process -----------------------------------------------------------------


def _fake_standby(tmp_path: Path, facts: dict[str, Any]) -> list[str]:
    """A standby stand-in: writes its facts line as the runner does, then waits for stdin."""
    script = tmp_path / "standby.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.stderr.write("some INFO line first\\n")
        sys.stderr.write({facts_line(facts)!r} + "\\n")
        sys.stderr.flush()
        sys.stdin.readline()
    """))
    return [sys.executable, str(script)]


async def test_a_standby_process_reports_over_stderr(tmp_path: Path) -> None:
    factory = StandbyFactory(tmp_path, command=_fake_standby(tmp_path, METAL))
    try:
        assert await factory.ask_device_facts(30) == METAL
        spare = factory._spare
        assert spare is not None and all(FACTS_PREFIX not in line for line in spare.stderr_tail)
    finally:
        await factory.aclose()


async def test_the_real_standby_runner_reports_this_machine(tmp_path: Path) -> None:
    factory = StandbyFactory(tmp_path)
    try:
        facts = await factory.ask_device_facts(120)
    finally:
        await factory.aclose()
    assert facts is not None and facts["device"] in ("metal", "cuda", "cpu")
    if facts["device"] == "cpu":
        assert facts["total"] == psutil.virtual_memory().total


async def test_a_standby_that_cannot_start_reports_nothing(tmp_path: Path) -> None:
    factory = StandbyFactory(tmp_path, command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        assert await factory.ask_device_facts(30) is None
    finally:
        await factory.aclose()


# --- the estimate follows the device --------------------------------------------------------


def test_estimate_leaves_out_attention_scores_where_attention_is_fused(tiny_model: Path) -> None:
    m = read_manifest(tiny_model)
    cpu = estimate_need(m, 20000, 2)
    metal = estimate_need(m, 20000, 2, device="metal")
    assert metal == estimate_need(m, 20000, 2, device="cuda")
    scores = 2 * m.num_heads * PREFILL_STEP * 20000 * 4 * 5 // 4  # the CPU's scores buffer
    assert cpu.total - metal.total == scores
    assert (cpu.weights, cpu.kv) == (metal.weights, metal.kv)
    assert estimate_need(m, 20000, 2, device="cpu") == cpu  # the default is the CPU


def test_fused_estimate_still_grows_with_context(tiny_model: Path) -> None:
    m = read_manifest(tiny_model)
    assert estimate_need(m, 20000, 1, device="metal").total > estimate_need(m, 4096, 1, device="metal").total


# --- a standby that never reports -----------------------------------------------------------


def _silent_standby(tmp_path: Path) -> list[str]:
    script = tmp_path / "silent.py"
    script.write_text("import sys\nsys.stdin.readline()\n")
    return [sys.executable, str(script)]


async def test_a_silent_standby_neither_blocks_decisions_for_long_nor_the_exit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "DEVICE_FACTS_WAIT", 0.5)
    settings = Settings(home=tmp_path, reserve=0, memory_limit=None)
    sched = Scheduler(settings, FakeStore({"a": GB}), probe=HostProbe(),
                      runner_factory=StandbyFactory(tmp_path, command=_silent_standby(tmp_path)))
    await sched.start()
    try:
        for _ in range(400):  # the bounded wait ends; decisions go on with physical memory
            if not sched._facts_pending:
                break
            await asyncio.sleep(0.05)
        assert not sched._facts_pending
        assert sched.memory_limit() == (100 * GB, "physical memory")
    finally:
        await asyncio.wait_for(sched.shutdown(), 20)


async def test_shutdown_does_not_wait_for_the_standbys_report(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, reserve=0, memory_limit=None)
    sched = Scheduler(settings, FakeStore({"a": GB}), probe=HostProbe(),
                      runner_factory=StandbyFactory(tmp_path, command=_silent_standby(tmp_path)))
    await sched.start()
    assert sched._facts_pending
    await asyncio.wait_for(sched.shutdown(), 20)  # well under DEVICE_FACTS_WAIT (30 s)

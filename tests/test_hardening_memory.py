"""Issue 9, item 10: the default memory limit follows the device a runner reports."""

from __future__ import annotations

from pathlib import Path

import httpx2
from corral.runner.device import device_facts
from corral.supervisor.app import create_app
from corral.supervisor.memory import device_limit

from tests.support.fake_scheduler import FakeScheduler, FakeStore, fake_context

GiB = 2**30
RAM = 64 * GiB


def test_metal_uses_the_recommended_working_set() -> None:
    facts = {"device": "metal", "total": RAM, "recommended": 48 * GiB, "free": None}
    assert device_limit(facts, RAM) == (48 * GiB, "metal recommended working set")


def test_cuda_uses_the_gpu_memory_not_host_ram() -> None:
    facts = {"device": "cuda", "total": 24 * GiB, "recommended": None, "free": 20 * GiB}
    assert device_limit(facts, RAM) == (24 * GiB, "cuda device memory")


def test_cpu_and_no_report_keep_physical_memory() -> None:
    assert device_limit({"device": "cpu", "total": RAM, "recommended": None, "free": 1}, RAM) == (
        RAM, "physical memory")
    assert device_limit(None, RAM) == (RAM, "physical memory")
    # a malformed report never shrinks the limit to nothing
    for bad in ({"device": "metal", "recommended": 0}, {"device": "cuda", "total": "lots"},
                {"device": "metal", "recommended": True}):
        assert device_limit(bad, RAM) == (RAM, "physical memory")


def test_this_machine_reports_its_device() -> None:
    facts = device_facts()
    assert facts["device"] in ("metal", "cuda", "cpu") and facts["total"] > 0


async def test_settings_show_the_effective_limit_and_its_source(tmp_path: Path) -> None:
    from corral.supervisor.config import Settings

    sched = FakeScheduler(FakeStore.with_models("corral-test/tiny"))
    app = create_app(fake_context(sched.store, sched, Settings(home=tmp_path)))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        shown = (await c.get("/api/settings")).json()
    assert shown["memory_limit_effective"] == 64 * GiB and shown["memory_limit_source"] == "physical memory"

"""/metrics and the request log: the completion pipeline's one hook, through every family.

In process (httpx.ASGITransport, a fake scheduler); the exposition is read back
with prometheus_client's own parser. Scheduler-side counters (loads, evictions
by reason) are checked with real runners in test_metrics_e2e.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from corral.supervisor.api.context import AppContext
from corral.supervisor.app import create_app
from corral.supervisor.config import Settings, parse_host
from corral.supervisor.errors import InsufficientMemory
from corral.supervisor.metrics import EVICTION_REASONS, Metrics, RequestRecord, request_log_line
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_scheduler import FakeScheduler, FakeStore, fake_context

TINY = "corral-test/tiny"


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeScheduler, AppContext]:
    store = FakeStore.with_models(TINY, "corral-test/big")
    sched = FakeScheduler(store)
    sched.errors["corral-test/big"] = InsufficientMemory("needs 99 GiB")
    return sched, fake_context(store, sched, Settings(home=tmp_path / "home"))


async def _client(ctx: AppContext, **headers: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers) as c:
        yield c


@pytest.fixture
async def client(parts: tuple[FakeScheduler, AppContext]) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(parts[1]):
        yield c


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def req(family: str, route: str, status: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("corral_requests_total", (("family", family), ("route", route), ("status", status)))


async def test_counters_move_as_requests_run(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    assert before.get(req("ollama", "/api/chat", "200"), 0) == 0
    for reason in EVICTION_REASONS:  # every reason is there from the start
        assert before[("corral_evictions_total", (("reason", reason),))] == 0

    chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/api/chat", json=chat)).status_code == 200
    assert (await client.post("/api/chat", json={**chat, "stream": False})).status_code == 200
    r = await client.post("/v1/chat/completions", json={**chat, "stream": True})
    assert r.status_code == 200
    r = await client.post("/v1/messages", json={**chat, "max_tokens": 5})
    assert r.status_code == 200

    after = await scrape(client)
    assert after[req("ollama", "/api/chat", "200")] == 2
    assert after[req("openai", "/v1/chat/completions", "200")] == 1
    assert after[req("anthropic", "/v1/messages", "200")] == 1
    # the fake runner's script: 5 prompt tokens, one token per piece ("Hi", " there")
    assert after[("corral_tokens_in_total", (("model", TINY),))] == 4 * 5
    assert after[("corral_tokens_out_total", (("model", TINY),))] == 4 * 2
    assert after[("corral_time_to_first_token_seconds_count", (("family", "ollama"),))] == 2
    assert after[("corral_request_duration_seconds_count", (("family", "openai"),))] == 1


async def test_failed_request_counts_with_its_status(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"model": "corral-test/big", "prompt": "x"})
    assert r.status_code == 507
    r = await client.post("/api/generate", json={"model": "corral-test/missing", "prompt": "x"})
    assert r.status_code == 404
    after = await scrape(client)
    assert after[req("ollama", "/api/generate", "507")] == 1
    assert after[req("ollama", "/api/generate", "404")] == 1
    # no first token: a duration, but no time-to-first-token sample
    assert after[("corral_request_duration_seconds_count", (("family", "ollama"),))] == 2
    assert after.get(("corral_time_to_first_token_seconds_count", (("family", "ollama"),)), 0) == 0


async def test_gauges_from_the_present_state(parts: tuple[FakeScheduler, AppContext],
                                             client: httpx.AsyncClient) -> None:
    sched, _ = parts
    sched.waiting = 3
    s = await scrape(client)
    assert s[("corral_queue_depth", ())] == 3
    assert s[("corral_memory_limit_bytes", ())] == 64 << 30  # the probe's total: no limit set


async def test_metrics_need_the_key(tmp_path: Path) -> None:
    store = FakeStore.with_models(TINY)
    sched = FakeScheduler(store)
    ctx = fake_context(store, sched, Settings(home=tmp_path / "home", api_key="sekrit"))
    async for c in _client(ctx):
        assert (await c.get("/metrics")).status_code == 401
    async for c in _client(ctx, Authorization="Bearer sekrit"):
        r = await c.get("/metrics")
        assert r.status_code == 200 and "corral_requests" in r.text


async def test_one_log_line_per_request(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="corral"):
        await client.post("/api/generate", json={"model": TINY, "prompt": "hi"})
    lines = [r.getMessage() for r in caplog.records if "model=" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("ollama /api/generate model=corral-test/tiny status=200 ttft=")
    assert "tokens=5/2" in line and "duration=" in line


def test_log_line_shape() -> None:
    rec = RequestRecord(family="openai", route="/v1/completions", model="m", status=507, ttft=None,
                        duration=0.25, tokens_in=0, tokens_out=0, error="needs 9 GiB")
    assert request_log_line(rec) == ("openai /v1/completions model=m status=507 ttft=- tokens=0/0 "
                                     "duration=250ms error='needs 9 GiB'")


def test_crash_counts_as_a_restart() -> None:
    m = Metrics()
    m.observe_eviction("crash")
    m.observe_eviction("memory")
    s = samples(m.render(queue_depth=0, memory_limit=1, models=[]).decode())
    assert s[("corral_runner_restarts_total", ())] == 1
    assert s[("corral_evictions_total", (("reason", "memory"),))] == 1


@pytest.mark.parametrize("value", ["nonsense:abc", "host:99999", "[::1:80", "h:"])
def test_bad_host_names_the_value(value: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_host(value)
    assert repr(value) in str(e.value) and "invalid literal" not in str(e.value)


def test_good_hosts_still_parse() -> None:
    assert parse_host("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_host("[::1]:11434") == ("::1", 11434)

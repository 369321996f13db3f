"""Issue 9, items 2 and 3: DNS rebinding (Host) and CSRF (Origin, content type), in process.

The fake scheduler records what it was asked to do, so each refusal is shown to
change nothing and start nothing, not merely to answer 403.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from corral.supervisor.api.access import host_allowed, host_name, refusal
from corral.supervisor.app import create_app
from corral.supervisor.config import Settings
from starlette.datastructures import Headers

from tests.support.fake_scheduler import FakeScheduler, FakeStore, fake_context

TINY = "corral-test/tiny"
OTHER = "corral-test/other"
EVIL = "http://evil.example"
GENERATE = {"model": TINY, "prompt": "hi", "stream": False, "keep_alive": -1}


@pytest.fixture
def sched() -> FakeScheduler:
    return FakeScheduler(FakeStore.with_models(TINY, OTHER))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, port=11434)


@pytest.fixture
async def http(sched: FakeScheduler, settings: Settings) -> AsyncIterator[httpx2.AsyncClient]:
    app = create_app(fake_context(sched.store, sched, settings))
    # uvicorn puts the bound address in scope["server"]; ASGITransport puts the URL's host there.
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app),
                                  base_url="http://127.0.0.1:11434") as c:
        yield c


# ---- Host: DNS rebinding ----------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example:11434", "evil.example", "127.0.0.1.nip.io:11434",
                                  "localhost.evil.example", "10.0.0.5:11434"])
async def test_foreign_host_is_refused_before_anything_runs(
        http: httpx2.AsyncClient, sched: FakeScheduler, host: str) -> None:
    r = await http.request("DELETE", "/api/delete", json={"model": TINY}, headers={"Host": host})
    assert r.status_code == 403 and "not allowed" in r.json()["error"]
    r = await http.patch("/api/settings", json={"keep_alive": "1h"}, headers={"Host": host})
    assert r.status_code == 403
    r = await http.get("/api/tags", headers={"Host": host})
    assert r.status_code == 403
    assert sched.store.deleted == [] and len((await http.get("/api/tags")).json()["models"]) == 2
    assert (await http.get("/api/settings")).json()["keep_alive"] == 300
    assert sched.calls == []


@pytest.mark.parametrize("host", ["localhost:11434", "LOCALHOST", "127.0.0.1:11434", "127.0.0.2",
                                  "[::1]:11434", "app.localhost:11434"])
async def test_local_hosts_are_served(http: httpx2.AsyncClient, host: str) -> None:
    assert (await http.get("/api/tags", headers={"Host": host})).status_code == 200


async def test_configured_hosts_are_served(http: httpx2.AsyncClient, settings: Settings) -> None:
    settings.allowed_hosts = ["*.corp.example"]
    settings.origins = ["https://ui.example.org"]
    for host in ("gpu.corp.example:11434", "ui.example.org"):
        assert (await http.get("/api/tags", headers={"Host": host})).status_code == 200
    assert (await http.get("/api/tags", headers={"Host": "evil.example"})).status_code == 403
    settings.allowed_hosts = ["*"]
    assert (await http.get("/api/tags", headers={"Host": "evil.example"})).status_code == 200


def test_host_policy_when_bound_to_every_interface() -> None:
    s = Settings(host="0.0.0.0")
    # an IP literal cannot be rebound; a name must be configured
    assert host_allowed("192.168.1.20", ["0.0.0.0"], s)
    assert not host_allowed("evil.example", ["0.0.0.0"], s)
    s.allowed_hosts = ["gpu-box"]
    assert host_allowed("gpu-box", ["0.0.0.0"], s)
    # bound to loopback, another interface's address is refused
    assert not host_allowed("192.168.1.20", ["127.0.0.1"], Settings())
    assert host_allowed("192.168.1.20", ["127.0.0.1", "192.168.1.20"], Settings())


def test_host_name_parsing() -> None:
    assert host_name("Example.COM:80") == "example.com"
    assert host_name("[::1]:11434") == "::1"
    assert host_name("::1") == "::1"
    assert host_name("") == ""


# ---- Origin and content type: CSRF -----------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json"])
async def test_foreign_origin_never_changes_state(
        http: httpx2.AsyncClient, sched: FakeScheduler, content_type: str) -> None:
    headers = {"Origin": EVIL, "Content-Type": content_type}
    copy = b'{"source": "corral-test/tiny", "destination": "corral-test/other"}'
    r = await http.post("/api/copy", content=copy, headers=headers)
    assert r.status_code == 403 and "origin" in r.json()["error"]
    r = await http.post("/api/generate", content=b'{"model": "corral-test/tiny", "prompt": "x"}',
                        headers=headers)
    assert r.status_code == 403
    r = await http.patch("/api/settings", content=b'{"keep_alive": -1}', headers=headers)
    assert r.status_code == 403
    r = await http.post("/v1/chat/completions", content=b"{}", headers=headers)
    assert r.status_code == 403 and r.json()["error"]["message"]
    assert sched.calls == []
    assert [r.name for r in sched.store.list()] == [OTHER, TINY]
    assert sched.store.refs[OTHER.lower()].source == "hf"  # not overwritten by a copy
    assert (await http.get("/api/settings")).json()["keep_alive"] == 300


async def test_foreign_origin_may_still_read(http: httpx2.AsyncClient) -> None:
    r = await http.get("/api/tags", headers={"Origin": EVIL})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers  # the browser keeps the page from reading it


async def test_local_and_configured_origins_work(http: httpx2.AsyncClient, settings: Settings,
                                                 sched: FakeScheduler) -> None:
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "app://obsidian.md"):
        r = await http.post("/api/generate", json=GENERATE, headers={"Origin": origin})
        assert r.status_code == 200, (origin, r.text)
        assert r.headers["access-control-allow-origin"] == origin
    settings.origins = ["https://ui.example.org"]
    r = await http.post("/api/generate", json=GENERATE, headers={"Origin": "https://ui.example.org"})
    assert r.status_code == 200
    assert len(sched.calls) == 4


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x",
                                          "application/xml", "text/plain; charset=utf-8"])
async def test_non_json_bodies_get_415(http: httpx2.AsyncClient, sched: FakeScheduler,
                                       content_type: str) -> None:
    body = b'{"model": "corral-test/tiny", "prompt": "x", "stream": false}'
    r = await http.post("/api/generate", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = await http.post("/v1/messages", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 415 and r.json()["type"] == "error"
    assert sched.calls == []


async def test_what_real_clients_send_is_accepted(http: httpx2.AsyncClient, sched: FakeScheduler) -> None:
    body = b'{"model": "corral-test/tiny", "prompt": "x", "stream": false}'
    # curl -d sends the form type with no Origin: Ollama accepts it, so do we
    curl = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "curl/8.5.0"}
    assert (await http.post("/api/generate", content=body, headers=curl)).status_code == 200
    # no content type at all, and JSON with a charset or a +json suffix
    for headers in ({}, {"Content-Type": "application/json; charset=utf-8"},
                    {"Content-Type": "application/vnd.api+json"}):
        r = await http.post("/api/generate", content=body, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    # the same form post from a web page is refused
    r = await http.post("/api/generate", content=body, headers={**curl, "Origin": "http://localhost:3000"})
    assert r.status_code == 415
    assert len(sched.calls) == 4


def test_refusal_policy_table() -> None:
    s = Settings()

    def why(method: str, **headers: str) -> int | None:
        error = refusal(method, Headers({k.replace("_", "-"): v for k, v in headers.items()}),
                        ["127.0.0.1"], s)
        return None if error is None else error.status

    assert why("GET", host="evil.example") == 403
    assert why("GET", host="localhost", origin=EVIL) is None
    assert why("POST", host="localhost", origin=EVIL, content_type="application/json") == 403
    assert why("POST", host="localhost", origin="null", content_type="application/json") == 403
    assert why("POST", host="localhost", content_type="text/plain") == 415
    assert why("POST", host="localhost", content_type="application/x-www-form-urlencoded") is None
    assert why("DELETE", host="localhost") is None
    s.origins = ["*"]
    assert why("POST", host="localhost", origin=EVIL, content_type="application/json") is None

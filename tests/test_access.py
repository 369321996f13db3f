"""API key and CORS, in process: each family's 401 shape, open routes, preflights, origins."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from corral.supervisor.api.access import key_matches, origin_regex
from corral.supervisor.app import create_app
from corral.supervisor.config import Settings

from tests.support.fake_scheduler import FakeScheduler, FakeStore, fake_context

TINY = "corral-test/tiny"
KEY = "s3cret-key"


def _app(tmp_path: Path, **settings: Any) -> Any:
    sched = FakeScheduler(FakeStore.with_models(TINY))
    return create_app(fake_context(sched.store, sched, Settings(home=tmp_path, **settings)))


@pytest.fixture
def app(tmp_path: Path) -> Any:
    return _app(tmp_path, api_key=KEY, origins=["https://example.com", "chrome-extension://*"])


@pytest.fixture
async def http(app: Any) -> AsyncIterator[httpx2.AsyncClient]:
    # the openai and anthropic SDKs use httpx2 (an httpx fork with the same API)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def _bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_open_routes_need_no_key(http: httpx2.AsyncClient) -> None:
    assert (await http.get("/")).status_code == 200
    assert (await http.head("/")).status_code == 200
    assert (await http.get("/api/version")).status_code == 200


async def test_ollama_routes(http: httpx2.AsyncClient) -> None:
    r = await http.get("/api/tags")
    assert r.status_code == 401 and set(r.json()) == {"error"}
    assert r.headers["www-authenticate"] == "Bearer"
    assert (await http.get("/api/tags", headers=_bearer("wrong"))).status_code == 401
    assert (await http.get("/api/tags", headers=_bearer())).status_code == 200
    # x-api-key is Anthropic's header; it does not open the other families
    assert (await http.get("/api/tags", headers={"x-api-key": KEY})).status_code == 401
    r = await http.post("/api/chat", json={"model": TINY, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401


async def test_openai_routes(http: httpx2.AsyncClient) -> None:
    r = await http.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.AsyncOpenAI(base_url="http://test/v1", api_key="wrong", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}])
    good = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEY, http_client=http, max_retries=0)
    assert [m.id for m in (await good.models.list()).data] == [TINY]
    r2 = await good.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}])
    assert r2.choices[0].message.content


async def test_anthropic_route(app: Any) -> None:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as c:
        bad = anthropic.AsyncAnthropic(base_url="http://test", api_key="wrong", http_client=c, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            await bad.messages.create(model=TINY, max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        good = anthropic.AsyncAnthropic(base_url="http://test", api_key=KEY, http_client=c, max_retries=0)
        m = await good.messages.create(model=TINY, max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert m.content
        bearer = anthropic.AsyncAnthropic(base_url="http://test", auth_token=KEY, http_client=c, max_retries=0)
        assert (await bearer.messages.create(model=TINY, max_tokens=5,
                                             messages=[{"role": "user", "content": "x"}])).content


async def test_no_key_configured_means_open(tmp_path: Path) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(tmp_path)), base_url="http://t") as c:
        assert (await c.get("/api/tags")).status_code == 200
        assert (await c.get("/v1/models")).status_code == 200


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.mark.parametrize("origin", [
    "http://localhost:3000", "http://127.0.0.1", "https://localhost", "http://[::1]:8080",
    "app://obsidian.md", "file://", "tauri://localhost", "vscode-webview://abc",
    "https://example.com", "chrome-extension://abcdef",
])
async def test_preflight_allowed_without_key(http: httpx2.AsyncClient, origin: str) -> None:
    r = await http.options("/v1/chat/completions", headers={"Origin": origin, **PREFLIGHT})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.com", "https://example.com.evil"])
async def test_preflight_refused_for_other_origins(http: httpx2.AsyncClient, origin: str) -> None:
    r = await http.options("/api/chat", headers={"Origin": origin, **PREFLIGHT})
    assert "access-control-allow-origin" not in r.headers


async def test_cors_headers_on_answers_and_401s(http: httpx2.AsyncClient) -> None:
    r = await http.get("/v1/models", headers={"Origin": "http://localhost:5173", **_bearer()})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = await http.get("/v1/models", headers={"Origin": "http://localhost:5173"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = await http.get("/v1/models", headers={"Origin": "https://evil.example", **_bearer()})
    assert "access-control-allow-origin" not in r.headers


async def test_star_allows_any_origin(tmp_path: Path) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(tmp_path, origins=["*"])),
                                 base_url="http://t") as c:
        r = await c.options("/api/chat", headers={"Origin": "https://anything.example", **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "https://anything.example")


def test_helpers() -> None:
    assert key_matches("abc", "abc") and not key_matches("abd", "abc") and not key_matches(None, "abc")
    assert not key_matches("ab", "abc")
    import re
    rx = re.compile(origin_regex(["https://*.corp.example"]))
    assert rx.fullmatch("https://app.corp.example") and not rx.fullmatch("https://corp.example.evil")

"""End to end: a real `corral serve` with real runners, through the official openai and anthropic clients.

One server for the module, started with an API key and a default model, so
every call also proves the key works for its family. Tests run in file order:
the first one races requests at a model nobody has loaded yet.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psutil
import pytest

from tests.conftest import TINY, TINY_B
from tests.support.live_server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

KEY = "e2e-key-123"
USER: Any = [{"role": "user", "content": "Say something about corrals."}]


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"CORRAL_API_KEY": KEY, "CORRAL_DEFAULT_MODEL": TINY_B, "CORRAL_ORIGINS": "https://app.example"}
    with ServerProcess(tmp_path_factory.mktemp("home"), hf_cache, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, timeout=120, max_retries=0)


def _ps(server: ServerProcess) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/api/ps", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    r.raise_for_status()
    return list(r.json()["models"])


def _runner_pids(server: ServerProcess, repo: str) -> list[int]:
    """Pids of the server's live runner children serving `repo`.

    A runner may have started as a standby (`--model -`) and been handed its
    model later, so the model comes from the supervisor's runner records
    (CORRAL_HOME/runners/<pid>.json), checked against the live children.
    """
    assert server.proc is not None
    marker = f"models--{repo.replace('/', '--')}/"
    children = {c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)}
    pids = []
    for record in (server.home / "runners").glob("*.json"):
        rec = json.loads(record.read_text())
        if rec["pid"] in children and marker in rec.get("model_dir", ""):
            pids.append(int(rec["pid"]))
    return pids


def test_concurrent_requests_load_once(server: ServerProcess) -> None:
    """8 requests from the three families race at an unloaded model: one runner serves them all."""
    assert _ps(server) == []

    async def race() -> list[str]:
        oc = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=120, max_retries=0)
        ac = anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, timeout=120, max_retries=0)

        async def chat() -> str:
            r = await oc.chat.completions.create(model=TINY, messages=USER, max_tokens=3, temperature=0)
            return r.choices[0].message.content or ""

        async def complete() -> str:
            r = await oc.completions.create(model=TINY, prompt="Once upon", max_tokens=3, temperature=0)
            return r.choices[0].text

        async def message() -> str:
            m = await ac.messages.create(model=TINY, max_tokens=3, messages=USER)
            return m.content[0].text  # type: ignore[union-attr]

        calls = [chat, complete, message, chat, complete, message, chat, message]
        async with oc, ac:
            return await asyncio.gather(*(c() for c in calls))

    results = asyncio.run(race())
    assert len(results) == 8
    rows = [m for m in _ps(server) if m["name"].startswith(TINY + ":")]
    assert len(rows) == 1 and rows[0]["pid"] > 0
    assert _runner_pids(server, TINY) == [rows[0]["pid"]]


def test_models_list_shows_every_local_model(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list().data]
    assert TINY in ids and TINY_B in ids  # tiny-b is not necessarily loaded
    assert oai.models.retrieve(TINY_B).id == TINY_B


def test_chat_greedy_stream_equals_non_stream(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=TINY, messages=USER, max_tokens=10, temperature=0)
    text = r.choices[0].message.content
    assert text and r.usage is not None
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(oai.chat.completions.create(model=TINY, messages=USER, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model=TINY, prompt="The corral", max_tokens=6, temperature=0)
    assert r.choices[0].text and r.usage is not None and r.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=TINY, prompt="The corral", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_max_tokens_gives_length(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=TINY, messages=USER, max_tokens=2, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens <= 2
    if r.usage.completion_tokens == 2:
        assert r.choices[0].finish_reason == "length"


def test_openai_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=USER)  # no default mapping on OpenAI routes
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=TINY, messages=USER, n=2)
    assert e.value.param == "n"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as e:  # the runner names the keyword it cannot enforce
        oai.chat.completions.create(model=TINY, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}})
    assert "if" in str(e.value)


def test_anthropic_create_and_stream(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model=TINY, max_tokens=8, messages=USER, system="You are terse.",
                               extra_body={"temperature": 0})
    assert m.type == "message" and m.content[0].type == "text"
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 8
    with claude.messages.stream(model=TINY, max_tokens=8, messages=USER, system="You are terse.",
                                extra_body={"temperature": 0}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text
    assert final.stop_reason == m.stop_reason
    assert (final.usage.input_tokens, final.usage.output_tokens) == (m.usage.input_tokens, m.usage.output_tokens)


def test_anthropic_default_model_and_errors(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    m = claude.messages.create(model="claude-opus-9-test", max_tokens=3, messages=USER)
    assert m.content and m.model == "claude-opus-9-test"
    assert any(row["name"].startswith(TINY_B + ":") for row in _ps(server))
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=TINY, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=TINY, max_tokens=3, messages=USER, extra_body={"keep_alive": "soon"})
    assert "keep_alive" in e.value.message


def test_anthropic_404_without_default_model(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without CORRAL_DEFAULT_MODEL an unknown name is a 404 the SDK parses (no runner is started)."""
    with ServerProcess(tmp_path_factory.mktemp("home"), hf_cache) as bare:
        client = anthropic.Anthropic(base_url=bare.url, api_key="any", timeout=60, max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as e:
            client.messages.create(model="claude-opus-9-test", max_tokens=3, messages=USER)
        assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        assert "CORRAL_DEFAULT_MODEL" in e.value.message


def test_api_key_for_all_families(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as h:
        assert h.get("/").status_code == 200
        assert h.head("/").status_code == 200
        assert h.get("/api/version").status_code == 200
        r = h.get("/api/tags")
        assert r.status_code == 401 and "error" in r.json()
        assert h.get("/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0).messages.create(
            model=TINY, max_tokens=3, messages=USER)


def test_cors_preflight(server: ServerProcess) -> None:
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    for origin in ("http://localhost:3000", "https://app.example"):
        r = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": origin, **pre}, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    r = httpx.options(server.url + "/v1/messages", headers={"Origin": "https://evil.example", **pre}, timeout=30)
    assert "access-control-allow-origin" not in r.headers

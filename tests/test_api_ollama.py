"""The Ollama API in process: httpx.ASGITransport against create_app with a fake scheduler.

Covers every route's shape (stream and not), error statuses and hostile input;
the end-to-end behaviour with real runners is in test_server_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from corral.runner.protocol import RunnerRequest, chunk_line, done_line
from corral.supervisor.api import completion
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.toolcalls import ToolCallFilter
from corral.supervisor.app import MAX_BODY_BYTES, create_app
from corral.supervisor.config import Settings
from corral.supervisor.errors import Busy, InsufficientMemory, RunnerFailed
from corral.supervisor.store import ModelRef
from starlette.types import Message

from tests.support.fake_scheduler import (
    FakeScheduler,
    FakeStore,
    broken_script,
    fake_context,
    fake_manifest,
    text_script,
)

TINY = "corral-test/tiny"
OTHER = "corral-test/tiny-b"


def _model_dir(root: Path) -> Path:
    d = root / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                               "num_attention_heads": 4, "vocab_size": 512}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>",
        "chat_template": "{% if tools %}tools{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}",
    }))
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    (d / "LICENSE").write_text("MIT License\n")
    return d


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeStore, FakeScheduler, AppContext]:
    store = FakeStore.with_models(OTHER)
    d = _model_dir(tmp_path)
    store.refs[TINY] = ModelRef(name=TINY, path=d, source="hf", digest="a" * 40,
                                modified_at=1_700_000_000.0, size=4_000_000)
    store.manifests[TINY] = fake_manifest(parameter_count=135_300, max_context=2048)
    sched = FakeScheduler(store)
    ctx = fake_context(store, sched, Settings(home=tmp_path / "home"))
    return store, sched, ctx


@pytest.fixture
async def client(parts: tuple[FakeStore, FakeScheduler, AppContext]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(parts[2])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as c:
        yield c


@pytest.fixture
def sched(parts: tuple[FakeStore, FakeScheduler, AppContext]) -> FakeScheduler:
    return parts[1]


def ndjson(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def is_rfc3339(text: str) -> bool:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None


# ---- generate / chat -----------------------------------------------------


async def test_generate_streams_ndjson(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    r = await client.post("/api/generate", json={"model": TINY, "prompt": "Hello"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(r)
    assert [x["response"] for x in lines] == ["Hi", " there", ""]
    assert all(x["model"] == TINY and is_rfc3339(x["created_at"]) for x in lines)
    assert [x["done"] for x in lines] == [False, False, True]
    final = lines[-1]
    assert final["done_reason"] == "stop"
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(final[key], int), key
    assert final["eval_count"] == 2 and final["prompt_eval_count"] == 5
    # the template is applied by the runner: generate sends messages unless raw
    assert sched.bodies[-1]["messages"] == [{"role": "user", "content": "Hello"}]
    assert sched.leases[-1].released


async def test_generate_not_streamed(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    r = await client.post("/api/generate", json={"model": TINY + ":latest", "prompt": "Hello",
                                                 "stream": False, "system": "Be brief."})
    assert r.status_code == 200
    body = r.json()
    assert body["response"] == "Hi there" and body["done"] is True and body["done_reason"] == "stop"
    assert body["model"] == TINY + ":latest"
    assert sched.bodies[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello"}]


async def test_generate_raw_sends_prompt_as_is(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    r = await client.post("/api/generate", json={"model": TINY, "prompt": "<s>x", "raw": True,
                                                 "stream": False, "options": {"temperature": 0,
                                                                              "num_predict": 3,
                                                                              "num_ctx": 512}})
    assert r.status_code == 200
    body = sched.bodies[-1]
    assert body["prompt"] == "<s>x" and "messages" not in body
    assert body["options"]["temperature"] == 0 and body["options"]["num_predict"] == 3
    assert sched.calls[-1].num_ctx == 512


async def test_keep_alive_forms_reach_the_scheduler(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    for raw, seconds in (("10m", 600.0), (30, 30.0), ("0", 0.0), (-1, -1.0), ("1h30m", 5400.0)):
        r = await client.post("/api/generate", json={"model": TINY, "prompt": "x", "stream": False,
                                                     "keep_alive": raw})
        assert r.status_code == 200, r.text
        assert sched.calls[-1].keep_alive == seconds
    await client.post("/api/generate", json={"model": TINY, "prompt": "x", "stream": False})
    assert sched.calls[-1].keep_alive is None  # the server default applies


async def test_chat_stream_and_not(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Hello"}]
    r = await client.post("/api/chat", json={"model": TINY, "messages": msgs})
    lines = ndjson(r)
    assert [x["message"] for x in lines[:-1]] == [{"role": "assistant", "content": "Hi"},
                                                  {"role": "assistant", "content": " there"}]
    assert lines[-1]["done"] is True and lines[-1]["message"]["content"] == ""
    assert sched.bodies[-1]["messages"] == msgs
    r = await client.post("/api/chat", json={"model": TINY, "messages": msgs, "stream": False})
    body = r.json()
    assert body["message"] == {"role": "assistant", "content": "Hi there"}
    assert body["done_reason"] == "stop" and body["eval_count"] == 2


async def test_chat_tool_calls(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    sched.script = text_script("Let me check. ", call[:9], call[9:30], call[30:])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    req = {"model": TINY, "messages": [{"role": "user", "content": "weather?"}], "tools": tools}
    body = (await client.post("/api/chat", json={**req, "stream": False})).json()
    assert body["message"]["content"] == "Let me check. "
    assert body["message"]["tool_calls"] == [{"function": {"name": "get_weather",
                                                           "arguments": {"city": "Paris"}}}]
    assert sched.bodies[-1]["tools"] == tools
    lines = ndjson(await client.post("/api/chat", json=req))
    calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
    assert calls == body["message"]["tool_calls"]
    assert "".join(x["message"]["content"] for x in lines) == "Let me check. "


async def test_chat_tool_calls_parsed_by_the_runner(client: httpx.AsyncClient,
                                                     sched: FakeScheduler) -> None:
    done = done_line("stop", prompt_eval_count=3, prompt_eval_duration=1, eval_count=4,
                     eval_duration=1)
    done["tool_calls"] = [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    sched.script = [chunk_line("Adding."), done]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    req = {"model": TINY, "messages": [{"role": "user", "content": "1+2"}], "tools": tools}
    body = (await client.post("/api/chat", json={**req, "stream": False})).json()
    expected = [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    assert body["message"] == {"role": "assistant", "content": "Adding.", "tool_calls": expected}
    lines = ndjson(await client.post("/api/chat", json=req))
    assert [c for x in lines for c in x["message"].get("tool_calls", [])] == expected
    assert lines[-1]["done"] is True


def test_tool_call_filter_passes_plain_text_and_bad_json() -> None:
    f = ToolCallFilter()
    assert f.feed("a <") == ("a ", [])
    assert f.feed("b> <tool_call>not json</tool_call> end") == ("<b> <tool_call>not json</tool_call> end", [])
    assert f.flush() == ""


async def test_empty_prompt_loads_and_keep_alive_zero_unloads(client: httpx.AsyncClient,
                                                              sched: FakeScheduler) -> None:
    r = await client.post("/api/generate", json={"model": TINY})
    assert r.status_code == 200
    assert r.json()["done"] is True and r.json()["done_reason"] == "load"
    assert sched.leases[-1].released and not sched.bodies
    assert [m["name"] for m in (await client.get("/api/ps")).json()["models"]] == [TINY + ":latest"]
    r = await client.post("/api/generate", json={"model": TINY, "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    assert sched.unloaded == [TINY]
    assert (await client.get("/api/ps")).json()["models"] == []
    r = await client.post("/api/chat", json={"model": TINY, "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["message"]["content"] == ""
    r = await client.post("/api/chat", json={"model": TINY, "messages": [], "keep_alive": "0s"})
    assert r.json()["done_reason"] == "unload"
    r = await client.post("/api/generate", json={"model": "nope/missing", "keep_alive": 0})
    assert r.status_code == 404


async def test_client_stream_error_line_after_start(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    sched.script = broken_script("Hi", message="runner for corral-test/tiny exited: killed")
    lines = ndjson(await client.post("/api/generate", json={"model": TINY, "prompt": "x"}))
    assert lines[0]["response"] == "Hi"
    assert lines[-1] == {"error": "runner for corral-test/tiny exited: killed"}
    assert sched.leases[-1].released
    r = await client.post("/api/generate", json={"model": TINY, "prompt": "x", "stream": False})
    assert r.status_code == 500 and "killed" in r.json()["error"]


async def test_stream_without_final_line_is_an_error(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    # A stream that stops before its done line is never shown as a complete answer.
    sched.script = [chunk_line("Hi"), chunk_line(" there")]
    lines = ndjson(await client.post("/api/generate", json={"model": TINY, "prompt": "x"}))
    assert [line.get("response") for line in lines[:2]] == ["Hi", " there"]
    assert lines[-1] == {"error": "the model's stream ended without a final line"}
    r = await client.post("/api/chat", json={"model": TINY, "stream": False,
                                            "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and "without a final line" in r.json()["error"]
    assert all(lease.released for lease in sched.leases)


async def test_failure_before_stream_keeps_its_status(client: httpx.AsyncClient, sched: FakeScheduler) -> None:
    sched.fail_completion[TINY] = RunnerFailed("runner exited: out of memory")
    r = await client.post("/api/generate", json={"model": TINY, "prompt": "x"})
    assert r.status_code == 500 and r.json() == {"error": "runner exited: out of memory"}
    assert sched.leases[-1].released
    del sched.fail_completion[TINY]
    sched.script = broken_script(message="runner failed: no memory")  # error as the first line
    r = await client.post("/api/chat", json={"model": TINY, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and r.json() == {"error": "runner failed: no memory"}
    sched.script = []  # a stream with no lines at all
    r = await client.post("/api/generate", json={"model": TINY, "prompt": "x"})
    assert r.status_code == 500 and "empty stream" in r.json()["error"]
    assert all(lease.released for lease in sched.leases)


@pytest.mark.parametrize("error,status", [
    (InsufficientMemory("model needs 9 GB, limit is 1 GB"), 507),
    (Busy("queue is full", retry_after=3), 503),
])
async def test_scheduler_errors(client: httpx.AsyncClient, sched: FakeScheduler,
                                error: Exception, status: int) -> None:
    sched.errors[TINY] = error  # type: ignore[assignment]
    r = await client.post("/api/chat", json={"model": TINY, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == status
    assert r.json() == {"error": str(error)}
    if status == 503:
        assert r.headers["retry-after"] == "3"


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    for path, body in (("/api/generate", {"model": "nope/x", "prompt": "hi"}),
                       ("/api/chat", {"model": "nope/x", "messages": [{"role": "user", "content": "x"}]}),
                       ("/api/show", {"model": "nope/x"}),
                       ("/api/copy", {"source": "nope/x", "destination": "y"})):
        r = await client.post(path, json=body)
        assert r.status_code == 404, path
        assert r.json()["error"].startswith("model 'nope/x' not found")
    r = await client.request("DELETE", "/api/delete", json={"model": "nope/x"})
    assert r.status_code == 404


# ---- hostile input -------------------------------------------------------


@pytest.mark.parametrize("body", [
    {"prompt": "x"},                                       # no model
    {"model": 5, "prompt": "x"},
    {"model": "", "prompt": "x"},
    {"model": TINY, "prompt": 5},
    {"model": TINY, "prompt": "x", "stream": "yes"},
    {"model": TINY, "prompt": "x", "raw": 1},
    {"model": TINY, "prompt": "x", "options": "hot"},
    {"model": TINY, "prompt": "x", "options": {"temperature": -1}},
    {"model": TINY, "prompt": "x", "options": {"temperature": 1e308}},
    {"model": TINY, "prompt": "x", "options": {"top_k": -5}},
    {"model": TINY, "prompt": "x", "options": {"num_predict": "ten"}},
    {"model": TINY, "prompt": "x", "options": {"num_ctx": -1}},
    {"model": TINY, "prompt": "x", "options": {"num_ctx": 10**12}},
    {"model": TINY, "prompt": "x", "options": {"stop": [1, 2]}},
    {"model": TINY, "prompt": "x", "keep_alive": "forever"},
    {"model": TINY, "prompt": "x", "keep_alive": True},
    {"model": TINY, "prompt": "x", "format": "yaml"},
    {"model": TINY, "prompt": "x", "format": ["json"]},
    {"model": TINY, "prompt": "x", "images": ["aGk="]},
    {"model": TINY, "prompt": "x", "suffix": "end"},
    {"model": "../../etc/passwd", "prompt": "x"},
    {"model": "/etc/passwd", "prompt": "x"},
    {"model": "a\x00b", "prompt": "x"},
    {"model": TINY + ":v2:x", "prompt": "x"},  # a tag cannot hold ":" (any single tag is valid)
    {"model": "x" * 5000, "prompt": "x"},
])
async def test_generate_rejects_bad_input(client: httpx.AsyncClient, sched: FakeScheduler,
                                          body: dict[str, Any]) -> None:
    r = await client.post("/api/generate", json=body)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert not sched.bodies  # nothing reached a runner
    assert all(lease.released for lease in sched.leases)


@pytest.mark.parametrize("messages", [
    "hello", [1], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": "x", "images": ["aGk="]}], [{"content": "x"}],
])
async def test_chat_rejects_bad_messages(client: httpx.AsyncClient, messages: Any) -> None:
    r = await client.post("/api/chat", json={"model": TINY, "messages": messages})
    assert r.status_code == 400 and "messages" in r.json()["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\"text\"", b"", b"\xff\xfe", b"[" * 100_000])
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, raw: bytes) -> None:
    for path in ("/api/generate", "/api/chat", "/api/show", "/api/copy"):
        r = await client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        assert "error" in r.json()
    assert (await client.get("/api/version")).status_code == 200


async def test_huge_body_is_413_and_server_keeps_serving(client: httpx.AsyncClient) -> None:
    big = b'{"model": "x", "prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    r = await client.post("/api/generate", content=big)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(17):
            yield b" " * (1024 * 1024)

    r = await client.post("/api/chat", content=chunks())
    assert r.status_code == 413
    r = await client.post("/v1/chat/completions", content=big)
    assert r.status_code == 413 and isinstance(r.json()["error"], dict)  # OpenAI's shape
    assert (await client.get("/")).status_code == 200


async def test_unknown_exception_is_500_and_server_keeps_serving(client: httpx.AsyncClient,
                                                                 sched: FakeScheduler) -> None:
    sched.fail_completion[TINY] = ZeroDivisionError("boom")
    r = await client.post("/api/generate", json={"model": TINY, "prompt": "x"})
    assert r.status_code == 500 and "boom" in r.json()["error"]
    del sched.fail_completion[TINY]
    r = await client.post("/api/generate", json={"model": TINY, "prompt": "x", "stream": False})
    assert r.status_code == 200


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = await client.get("/api/generate")
    assert r.status_code == 405 and "error" in r.json()


# ---- listing, details, management ----------------------------------------


async def test_tags(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/tags")
    models = r.json()["models"]
    assert [m["name"] for m in models] == [TINY + ":latest", OTHER + ":latest"]
    tiny = models[0]
    assert tiny["model"] == tiny["name"] and tiny["size"] == 4_000_000 and tiny["digest"] == "a" * 40
    assert is_rfc3339(tiny["modified_at"])
    assert tiny["details"] == {"parent_model": "", "format": "safetensors", "family": "llama",
                               "families": ["llama"], "parameter_size": "135.3K",
                               "quantization_level": "F32"}


async def test_ps(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/ps")).json() == {"models": []}
    await client.post("/api/generate", json={"model": TINY, "prompt": "x", "keep_alive": -1})
    await client.post("/api/generate", json={"model": OTHER, "prompt": "x", "keep_alive": "1m"})
    rows = (await client.get("/api/ps")).json()["models"]
    assert [m["name"] for m in rows] == [OTHER + ":latest", TINY + ":latest"]
    other, tiny = rows
    assert tiny["expires_at"] == "9999-12-31T23:59:59Z"
    assert is_rfc3339(other["expires_at"])
    for row in rows:
        assert {"size", "size_vram", "digest", "details", "context_length", "pid"} <= set(row)
        assert row["details"]["format"] == "safetensors"


async def test_show(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/show", json={"model": TINY + ":latest"})
    assert r.status_code == 200
    body = r.json()
    assert body["license"] == "MIT License\n"
    assert "{% for m in messages %}" in body["template"]
    assert 'stop           "<|im_end|>"' in body["parameters"]
    assert "temperature    0.6" in body["parameters"]
    assert body["capabilities"] == ["completion", "tools"]
    info = body["model_info"]
    assert info["general.architecture"] == "llama" and info["general.parameter_count"] == 135_300
    assert info["llama.context_length"] == 2048 and info["llama.embedding_length"] == 64
    assert body["modelfile"].startswith("# Modelfile generated by corral")
    assert "FROM " in body["modelfile"] and "PARAMETER stop" in body["modelfile"]
    assert body["details"]["family"] == "llama" and is_rfc3339(body["modified_at"])
    # a model without a LICENSE or template still shows
    r = await client.post("/api/show", json={"name": OTHER})
    assert r.status_code == 200 and "license" not in r.json() and r.json()["template"] == ""
    assert r.json()["capabilities"] == ["completion"]


async def test_copy_and_delete(client: httpx.AsyncClient, parts: Any) -> None:
    store, sched, _ = parts
    r = await client.post("/api/copy", json={"source": TINY, "destination": "my-alias"})
    assert r.status_code == 200
    assert "my-alias:latest" in [m["name"] for m in (await client.get("/api/tags")).json()["models"]]
    r = await client.post("/api/copy", json={"source": TINY, "destination": "../evil"})
    assert r.status_code == 400
    r = await client.post("/api/copy", json={"source": TINY})
    assert r.status_code == 400
    await client.post("/api/generate", json={"model": "my-alias", "prompt": "x"})
    r = await client.request("DELETE", "/api/delete", json={"model": "my-alias"})
    assert r.status_code == 200
    assert "my-alias" in sched.unloaded  # stopped before being deleted
    assert store.deleted == ["my-alias"]
    r = await client.request("DELETE", "/api/delete", json={"model": "my-alias"})
    assert r.status_code == 404


async def test_root_version_head(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200 and r.text == "corral is running"
    assert (await client.head("/")).status_code == 200
    assert (await client.get("/api/version")).json()["version"]


async def test_settings_get_and_patch(client: httpx.AsyncClient, parts: Any) -> None:
    ctx: AppContext = parts[2]
    s = (await client.get("/api/settings")).json()
    assert s["single_model"] is False and s["pinned"] == [] and "api_key" not in s
    r = await client.patch("/api/settings", json={"single_model": True, "pinned": [TINY],
                                                  "keep_alive": "10m", "memory_limit": "2GB"})
    assert r.status_code == 200 and r.json()["changed"] == ["keep_alive", "memory_limit", "pinned",
                                                            "single_model"]
    assert ctx.settings.single_model is True and ctx.settings.pinned == [TINY]
    assert ctx.settings.keep_alive == 600.0 and ctx.settings.memory_limit == 2_000_000_000
    for bad in ({"port": 1}, {"keep_alive": "soon"}, {"single_model": "maybe"}, {"memory_limit": "-5"}):
        r = await client.patch("/api/settings", json=bad)
        assert r.status_code == 400, bad
    assert ctx.settings.keep_alive == 600.0  # a bad patch changes nothing
    assert (await client.patch("/api/settings", content=b"[]")).status_code == 400


async def test_lifespan_starts_and_stops_the_scheduler(parts: Any) -> None:
    _, sched, ctx = parts
    app = create_app(ctx)
    async with app.router.lifespan_context(app):
        assert sched.started and not sched.stopped
    assert sched.stopped


async def test_unknown_model_is_pulled_once_when_allowed(client: httpx.AsyncClient, parts: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pull = pytest.importorskip("corral.supervisor.pull")
    store = parts[0]
    asked: list[str] = []

    async def fake_pull(ctx: AppContext, name: str) -> bool:
        asked.append(name)
        if name == "org/pullable":
            store.refs["org/pullable"] = store.refs[OTHER]
            return True
        return False

    monkeypatch.setattr(pull, "pull_if_allowed", fake_pull)
    r = await client.post("/api/generate", json={"model": "org/pullable", "prompt": "x", "stream": False})
    assert r.status_code == 200 and r.json()["response"] == "Hi there"
    r = await client.post("/api/chat", json={"model": "org/absent", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert asked == ["org/pullable", "org/absent"]


async def test_tags_and_show_with_the_real_store(hf_cache: Path, tmp_path: Path) -> None:
    from corral.supervisor.store import ModelStore

    store = ModelStore(tmp_path / "home", hf_cache=hf_cache)
    sched = FakeScheduler(store)  # type: ignore[arg-type]
    app = create_app(fake_context(store, sched, Settings(home=tmp_path / "home")))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as c:
        models = {m["name"]: m for m in (await c.get("/api/tags")).json()["models"]}
        tiny = models["corral-test/tiny:latest"]
        assert tiny["size"] > 0 and tiny["details"]["family"] == "llama"
        assert tiny["details"]["quantization_level"] == "F32" and tiny["details"]["parameter_size"]
        shown = (await c.post("/api/show", json={"model": "corral-test/tiny"})).json()
        assert "<|im_start|>" in shown["template"] and shown["capabilities"] == ["completion", "tools"]
        assert shown["model_info"]["llama.context_length"] == 2048
        assert shown["model_info"]["general.parameter_count"] > 0
        r = await c.post("/api/show", json={"model": "../../etc"})
        assert r.status_code == 400


async def test_client_disconnect_over_real_http_closes_the_stream(parts: Any) -> None:
    """ASGITransport cannot hang up mid-stream; a real uvicorn server on a thread can."""
    import threading

    import uvicorn

    _, sched, ctx = parts
    sched.line_delay = 0.01
    sched.script = text_script(*(["tok"] * 3000))
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            await anyio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            async with c.stream("POST", "/api/generate", json={"model": TINY, "prompt": "x"}) as r:
                async for _ in r.aiter_lines():
                    break
            lease = sched.leases[-1]
            with anyio.fail_after(30):
                while not lease.released:
                    await anyio.sleep(0.02)
            assert lease.closed_early  # the runner's stream was cancelled, not read to the end
            sched.script = text_script("ok")
            r = await c.post("/api/generate", json={"model": TINY, "prompt": "x", "stream": False,
                                                    "keep_alive": 0})
            assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


async def test_client_gone_before_the_first_byte_still_releases(parts: Any) -> None:
    """A disconnect that cancels the response before its body starts (so the body
    generator never runs) still closes the runner stream and releases the lease."""
    _, sched, ctx = parts
    request = completion.CompletionRequest(TINY, RunnerRequest({}, prompt="x"))

    async def render(events: completion.Started) -> AsyncIterator[bytes]:
        async for event in events:
            yield repr(event).encode()

    response = await completion.respond(ctx, request, stream=True, render_stream=render,
                                        render_body=lambda answer: {}, stream_error=lambda e: b"")
    lease = sched.leases[-1]
    assert not lease.released  # the first event is in: the runner stream is open

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await anyio.sleep(5)  # the client is gone before the response head is out

    scope = {"type": "http", "asgi": {"spec_version": "2.0"}, "method": "POST", "path": "/api/generate"}
    with anyio.fail_after(3):
        await response(scope, receive, send)
    assert lease.released and lease.closed_early

"""The Anthropic Messages route in process, through the official `anthropic` client and a fake scheduler."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from corral.runner.protocol import chunk_line, done_line
from corral.supervisor.app import create_app
from corral.supervisor.config import Settings
from corral.supervisor.errors import Busy

from tests.support.fake_scheduler import (
    FakeScheduler,
    FakeStore,
    broken_script,
    fake_context,
    text_script,
)

TINY, TINY_B = "corral-test/tiny", "corral-test/tiny-b"
USER: Any = [{"role": "user", "content": "hi"}]


def _script(body: dict[str, Any]) -> list[dict[str, Any]]:
    if body.get("tools"):
        return [chunk_line('<tool_call>{"name": "lookup", "arguments": {"q": "corral"}}</tool_call>'),
                done_line("stop", prompt_eval_count=11, prompt_eval_duration=1, eval_count=9,
                          eval_duration=1)]
    if body.get("options", {}).get("num_predict") == 2:
        return text_script("Hel", "lo", reason="length", prompt_tokens=6)
    return text_script("Hello", " wor", "ld. STOP", " more", prompt_tokens=6)


@pytest.fixture
def sched() -> FakeScheduler:
    return FakeScheduler(FakeStore.with_models(TINY, TINY_B), script=_script)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path)


@pytest.fixture
async def http(sched: FakeScheduler, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(fake_context(sched.store, sched, settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest.fixture
async def client(sched: FakeScheduler, settings: Settings) -> AsyncIterator[anthropic.AsyncAnthropic]:
    # This anthropic release ships its own httpx fork (httpx2); it has the same ASGITransport.
    app = create_app(fake_context(sched.store, sched, settings))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as c:
        yield anthropic.AsyncAnthropic(base_url="http://test", api_key="unused", http_client=c,
                                       max_retries=0)


async def test_create(client: anthropic.AsyncAnthropic, sched: FakeScheduler) -> None:
    m = await client.messages.create(
        model=TINY, max_tokens=50, system=[{"type": "text", "text": "be terse"}],
        # this SDK release no longer has sampling parameters; older clients still send them
        extra_body={"temperature": 0, "top_p": 0.9, "top_k": 5},
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}])
    assert m.type == "message" and m.role == "assistant" and m.model == TINY
    assert m.content[0].type == "text" and m.content[0].text == "Hello world. STOP more"
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert (m.usage.input_tokens, m.usage.output_tokens) == (6, 4)
    body = sched.bodies[-1]
    assert body["messages"] == [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    opts = body["options"]
    assert (opts["num_predict"], opts["temperature"], opts["top_p"], opts["top_k"]) == (50, 0.0, 0.9, 5)
    assert sched.leases[-1].released


async def test_max_tokens_stop_reason(client: anthropic.AsyncAnthropic) -> None:
    m = await client.messages.create(model=TINY, max_tokens=2, messages=USER)
    assert m.stop_reason == "max_tokens" and m.content[0].text == "Hello"  # type: ignore[union-attr]


async def test_stop_sequence(client: anthropic.AsyncAnthropic, sched: FakeScheduler) -> None:
    # The runner matches stop strings (it got them as options.stop) and names the one
    # that ended the text on its done line; the route reports it.
    sched.script = text_script("Hello", " world. ", prompt_tokens=6, stop_sequence="STOP")
    m = await client.messages.create(model=TINY, max_tokens=50, messages=USER, stop_sequences=["STOP", "zzz"])
    assert sched.bodies[-1]["options"]["stop"] == ["STOP", "zzz"]
    assert m.content[0].text == "Hello world. "  # type: ignore[union-attr]
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "STOP"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (6, 2)  # the runner's own counts
    async with client.messages.stream(model=TINY, max_tokens=50, messages=USER,
                                      stop_sequences=["STOP"]) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == "Hello world. " and final.stop_reason == "stop_sequence" and final.stop_sequence == "STOP"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 2)
    assert all(lease.released for lease in sched.leases)


async def test_too_many_stop_sequences_is_400(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/messages", json={"model": TINY, "max_tokens": 5, "messages": USER,
                                              "stop_sequences": [f"s{i}" for i in range(17)]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "'stop_sequences'" in r.json()["error"]["message"]


async def test_stream(client: anthropic.AsyncAnthropic, http: httpx.AsyncClient) -> None:
    async with client.messages.stream(model=TINY, max_tokens=50, messages=USER) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == "Hello world. STOP more"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 4)
    r = await http.post("/v1/messages", json={"model": TINY, "max_tokens": 5, "stream": True, "messages": USER})
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


async def test_tools(client: anthropic.AsyncAnthropic, sched: FakeScheduler) -> None:
    tools: Any = [{"name": "lookup", "description": "search", "input_schema": {
        "type": "object", "properties": {"q": {"type": "string"}}}}]
    m = await client.messages.create(model=TINY, max_tokens=50, messages=USER, tools=tools)
    assert sched.bodies[-1]["tools"][0]["function"]["name"] == "lookup"
    assert m.stop_reason == "tool_use"
    use = m.content[-1]
    assert use.type == "tool_use" and use.name == "lookup" and use.input == {"q": "corral"}
    async with client.messages.stream(model=TINY, max_tokens=50, messages=USER, tools=tools) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"q": "corral"}  # type: ignore[union-attr]
    # a tool_use / tool_result round trip reaches the template as structured messages
    await client.messages.create(model=TINY, max_tokens=50, tools=tools, messages=[
        *USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "found it"},
                                     {"type": "text", "text": "thanks"}]},
    ])
    sent = sched.bodies[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": {"q": "x"}}
    assert sent[2] == {"role": "tool", "tool_call_id": "t1", "content": "found it"}
    assert sent[3] == {"role": "user", "content": "thanks"}


async def test_default_model_mapping(client: anthropic.AsyncAnthropic, sched: FakeScheduler,
                                     settings: Settings) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        await client.messages.create(model="claude-opus-9-test", max_tokens=5, messages=USER)
    assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    settings.default_model = TINY_B
    m = await client.messages.create(model="claude-opus-9-test", max_tokens=5, messages=USER,
                                     extra_body={"keep_alive": 0})
    assert m.model == "claude-opus-9-test"
    assert sched.calls[-1].name == TINY_B and sched.calls[-1].keep_alive == 0
    await client.messages.create(model=TINY, max_tokens=5, messages=USER)  # local names still win
    assert sched.calls[-1].name == TINY


@pytest.mark.parametrize("body, needle", [
    ({"messages": USER}, "max_tokens"),
    ({"max_tokens": "x", "messages": USER}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "image"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"max_tokens": 5, "messages": USER, "temperature": "warm"}, "temperature"),
    ({"max_tokens": 5, "messages": USER, "stop_sequences": "STOP"}, "stop_sequences"),
    ({"max_tokens": 5, "messages": USER, "system": 3}, "system"),
])
async def test_bad_requests(http: httpx.AsyncClient, client: anthropic.AsyncAnthropic,
                            body: dict[str, Any], needle: str) -> None:
    r = await http.post("/v1/messages", json={"model": TINY, **body})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert needle in r.json()["error"]["message"]
    if not isinstance(body.get("max_tokens"), int):
        return  # the SDK refuses this itself, before sending
    known = {"messages", "max_tokens", "stop_sequences", "system"}
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model=TINY, **{k: v for k, v in body.items() if k in known},
                                     extra_body={k: v for k, v in body.items() if k not in known})


async def test_overloaded(client: anthropic.AsyncAnthropic, sched: FakeScheduler) -> None:
    sched.errors[TINY_B] = Busy("queue is full", retry_after=3)
    with pytest.raises(anthropic.APIStatusError) as e:
        await client.messages.create(model=TINY_B, max_tokens=5, messages=USER)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "3"
    assert e.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_error_after_stream_started(http: httpx.AsyncClient, sched: FakeScheduler,
                                          client: anthropic.AsyncAnthropic) -> None:
    sched.script = lambda body: broken_script("partial", message="runner exited (signal 9)")
    r = await http.post("/v1/messages", json={"model": TINY, "max_tokens": 5, "stream": True, "messages": USER})
    assert r.status_code == 200
    blocks = [b for b in r.text.split("\n\n") if b]
    assert blocks[-1].startswith("event: error\n")
    err = json.loads(blocks[-1].split("data: ", 1)[1])
    assert err["type"] == "error" and "signal 9" in err["error"]["message"]
    assert sched.leases[-1].released
    with pytest.raises(anthropic.APIStatusError):  # the SDK raises the error event
        async with client.messages.stream(model=TINY, max_tokens=5, messages=USER) as s:
            async for _ in s.text_stream:
                pass

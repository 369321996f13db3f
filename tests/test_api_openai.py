"""The OpenAI-compatible routes in process, through the official `openai` client and a fake scheduler."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from corral.runner.protocol import chunk_line, done_line
from corral.supervisor.app import create_app
from corral.supervisor.config import Settings
from corral.supervisor.errors import Busy, InsufficientMemory

from tests.support.fake_scheduler import (
    FakeScheduler,
    FakeStore,
    broken_script,
    fake_context,
    text_script,
)

TINY, TINY_B = "corral-test/tiny", "corral-test/tiny-b"


def _script(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Echo-ish runner: the reply depends on the request so tests can tell requests apart."""
    if body.get("tools"):
        return [chunk_line('<tool_call>{"name": "get_weather", '),
                chunk_line('"arguments": {"city": "Paris"}}</tool_call>'),
                done_line("stop", prompt_eval_count=9, prompt_eval_duration=1, eval_count=12,
                          eval_duration=1)]
    limit = body.get("options", {}).get("num_predict")
    if limit == 1:
        return text_script("Hi", reason="length", prompt_tokens=7)
    return text_script("Hello", ",", " world", prompt_tokens=7)


@pytest.fixture
def sched() -> FakeScheduler:
    store = FakeStore.with_models(TINY, TINY_B)
    return FakeScheduler(store, script=_script)


@pytest.fixture
def app(sched: FakeScheduler, tmp_path: Path) -> Any:
    return create_app(fake_context(sched.store, sched, Settings(home=tmp_path)))


@pytest.fixture
async def http(app: Any) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest.fixture
def client(http: httpx2.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http,
                              max_retries=0)


async def test_models_list_and_get(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == [TINY, TINY_B]
    assert all(m.object == "model" and m.owned_by == "corral" for m in page.data)
    one = await client.models.retrieve(TINY)  # an id with "/" in it
    assert one.id == TINY
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nobody/nothing")


async def test_chat_completion(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    r = await client.chat.completions.create(
        model=TINY, max_tokens=20, temperature=0, seed=3, stop=["END"], top_p=0.5,
        presence_penalty=0.5, frequency_penalty=0.25,
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == "Hello, world"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 3, 10)
    body = sched.bodies[-1]
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    opts = body["options"]
    assert (opts["num_predict"], opts["temperature"], opts["seed"], opts["stop"], opts["top_p"]) == (20, 0.0, 3, ["END"], 0.5)
    assert (opts["presence_penalty"], opts["frequency_penalty"], opts["repeat_penalty"]) == (0.5, 0.25, 1.0)
    assert sched.leases[-1].released


async def test_max_completion_tokens_and_length(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    r = await client.chat.completions.create(model=TINY, max_completion_tokens=1,
                                             messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].finish_reason == "length"
    assert sched.bodies[-1]["options"]["num_predict"] == 1


async def test_chat_stream_with_usage(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    stream = await client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 10
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert sched.leases[-1].released


async def test_stream_ends_with_done_marker(http: httpx2.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json={
        "model": TINY, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert "usage" not in json.loads(events[-2][6:]) or json.loads(events[-2][6:])["usage"] is None


async def test_completions(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    r = await client.completions.create(model=TINY, prompt="Once upon", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == "Hello, world" and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert sched.bodies[-1]["prompt"] == "Once upon" and "messages" not in sched.bodies[-1]
    stream = await client.completions.create(model=TINY, prompt=["Once upon"], max_tokens=5, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == "Hello, world"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_tool_calls(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    tools: Any = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs: Any = [{"role": "user", "content": "weather in Paris?"}]
    r = await client.chat.completions.create(model=TINY, messages=msgs, tools=tools)
    assert sched.bodies[-1]["tools"] == tools
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    stream = await client.chat.completions.create(model=TINY, messages=msgs, tools=tools, stream=True)
    chunks = [c async for c in stream]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back to the chat template as structured messages
    await client.chat.completions.create(model=TINY, messages=[
        *msgs,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])
    sent = sched.bodies[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


async def test_keep_alive_extension(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    await client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                         extra_body={"keep_alive": "10m"})
    assert sched.calls[-1].keep_alive == 600.0
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                             extra_body={"keep_alive": "soon"})
    assert e.value.param == "keep_alive"  # type: ignore[attr-defined]


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"top_p": 7}, "top_p"),
    ({"stop": [1, 2]}, "stop"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [{"type": "function", "function": {"name": "get", "parameters": {}}}]}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"model": 5}, "model"),
    ({"stream": "yes"}, "stream"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"stream": True, "stream_options": "usage"}, "stream_options"),
])
async def test_bad_requests(client: openai.AsyncOpenAI, kwargs: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"model": TINY, "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.param == param  # type: ignore[attr-defined]
    assert e.value.type == "invalid_request_error"  # type: ignore[attr-defined]


async def test_response_format_text_ok(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                             response_format={"type": "text"})
    assert r.choices[0].message.content


async def test_not_json_body(http: httpx2.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", content=b"{nope")
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_unknown_model_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-4o", prompt="x")


async def test_scheduler_errors_map_to_statuses(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    sched.errors[TINY_B] = Busy("queue is full", retry_after=7)
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model=TINY_B, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "7"
    sched.errors[TINY_B] = InsufficientMemory("needs 9 GB, 1 GB available")
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model=TINY_B, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 507 and "9 GB" in e.value.message


async def test_error_after_stream_started(http: httpx2.AsyncClient, sched: FakeScheduler) -> None:
    sched.script = lambda body: broken_script("partial", message="runner exited (signal 9)")
    r = await http.post("/v1/chat/completions", json={
        "model": TINY, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    last = [e for e in r.text.split("\n\n") if e][-1]
    err = json.loads(last.removeprefix("data: "))["error"]
    assert "signal 9" in err["message"] and err["type"] == "server_error"
    assert sched.leases[-1].released
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
    stream = await client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                                  stream=True)
    with pytest.raises(openai.APIError, match="signal 9"):  # the SDK raises the error event
        async for _ in stream:
            pass
    # and the server keeps serving
    sched.script = _script
    ok = await http.post("/v1/completions", json={"model": TINY, "prompt": "x"})
    assert ok.status_code == 200


async def test_error_before_first_line_gets_status(client: openai.AsyncOpenAI, sched: FakeScheduler) -> None:
    sched.script = lambda body: broken_script(message="runner failed to load: bad weights")
    with pytest.raises(openai.InternalServerError) as e:
        await client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                             stream=True)
    assert "bad weights" in e.value.message
    assert sched.leases[-1].released

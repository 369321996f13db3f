"""End to end: structured output and forced tool calls through a real `corral serve`.

The model is the random-weight tiny model, whose free output is gibberish: every
constrained answer parsing and validating against its schema, and ending with
"stop", is the grammar's doing. Requests run four at a time so constrained
sequences share the continuous batch with each other and with free ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import TINY
from tests.support.live_server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NUM_PREDICT = 256
SAMPLING = {"temperature": 1.0, "num_predict": NUM_PREDICT}


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("home"), hf_cache) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


# ---- random schemas ----------------------------------------------------------
# Strings and arrays are bounded so that a random model can finish a value
# within num_predict; the grammar must still close every value and end.


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["integer", "number", "string", "boolean", "enum", "null"])
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = rng.uniform(-10, 10)
        return {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(1, 100), 2)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None], rng.randint(1, 4))}
    return {"type": kind}


def _schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        return {"type": "array", "items": _schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    if depth < 2 and roll < 0.55:
        return _object(rng, depth + 1)
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(["id", "name", "kind", "size", "tags", "ok", "score", "meta", "x", "y"],
                       rng.randint(1, 4))
    props = {n: _schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [_object(random.Random(i), 0) for i in range(50)]


def _generate(client: ollama.Client, schema: dict[str, Any], seed: int, stream: bool) -> tuple[str, str]:
    options = {**SAMPLING, "seed": seed}
    if stream:
        parts, reason = [], ""
        for part in client.generate(TINY, "Describe a corral as JSON.", format=schema, stream=True,
                                    options=options):
            parts.append(part.response)
            reason = part.done_reason or reason
        return "".join(parts), reason
    r = client.generate(TINY, "Describe a corral as JSON.", format=schema, options=options)
    return r.response, r.done_reason or ""


@pytest.mark.parametrize("stream", [False, True])
def test_fifty_random_schemas_parse_validate_and_stop(client: ollama.Client, stream: bool) -> None:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: _generate(client, SCHEMAS[i], i, stream), range(len(SCHEMAS))))
    assert [r for _, r in answers] == ["stop"] * len(SCHEMAS), answers
    for schema, (text, _) in zip(SCHEMAS, answers, strict=True):
        jsonschema.validate(json.loads(text), schema)


def test_format_json_on_chat_and_length_is_honest(client: ollama.Client) -> None:
    r = client.chat(TINY, messages=[{"role": "user", "content": "JSON please"}], format="json",
                    options={**SAMPLING, "seed": 7})
    assert r.done_reason in ("stop", "length")
    if r.done_reason == "stop":
        json.loads(r.message.content or "")  # any JSON value
    long = {"type": "object", "properties": {"s": {"type": "string", "minLength": 40}}, "required": ["s"]}
    cut = client.generate(TINY, "x", format=long, options={**SAMPLING, "num_predict": 4, "seed": 1})
    assert cut.done_reason == "length" and cut.eval_count == 4


def test_constrained_and_free_share_a_batch(client: ollama.Client) -> None:
    """Greedy free answers are the same alone and next to constrained ones: masks stay in their row."""
    greedy = {"temperature": 0, "num_predict": 24}
    alone = client.generate(TINY, "The quick brown fox", options=greedy).response

    def free(_: int) -> str:
        return client.generate(TINY, "The quick brown fox", options=greedy).response

    def constrained(i: int) -> str:
        return _generate(client, SCHEMAS[i], i, False)[0]

    with ThreadPoolExecutor(4) as pool:
        frees = [pool.submit(free, i) for i in range(2)]
        shaped = [pool.submit(constrained, i) for i in range(2)]
        assert [f.result() for f in frees] == [alone, alone]
        for i, f in enumerate(shaped):
            jsonschema.validate(json.loads(f.result()), SCHEMAS[i])


# ---- OpenAI, langchain ---------------------------------------------------------


class Corral(BaseModel):
    name: str = Field(max_length=8)
    horses: int = Field(ge=0, le=40)
    open: bool


def test_openai_parse_returns_the_model(server: ServerProcess) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    done = oai.chat.completions.parse(model=TINY, messages=[{"role": "user", "content": "A corral?"}],
                                      response_format=Corral, max_tokens=NUM_PREDICT, seed=3)
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Corral)
    obj = oai.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                      response_format={"type": "json_object"}, max_tokens=NUM_PREDICT,
                                      seed=4)
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_langchain_ollama_structured_output(server: ServerProcess) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model=TINY, base_url=server.url, num_predict=NUM_PREDICT, seed=5)
    out = llm.with_structured_output(Corral, method="json_schema").invoke("Describe a corral.")
    assert isinstance(out, Corral)


# ---- forced tool calls -----------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a"], "additionalProperties": False}
OAI_TOOLS: Any = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
                  {"type": "function", "function": {"name": "add", "parameters": ADD}}]
PARAMS = {"weather": WEATHER, "add": ADD}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_openai_forced_tool_call(server: ServerProcess, choice: Any, stream: bool) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    args: Any = {"model": TINY, "messages": [{"role": "user", "content": "Weather?"}], "tools": OAI_TOOLS,
                 "tool_choice": choice, "max_tokens": NUM_PREDICT, "seed": 11}
    if stream:
        with oai.chat.completions.stream(**args) as s:
            done = s.get_final_completion()
    else:
        done = oai.chat.completions.create(**args)
    c = done.choices[0]
    assert c.finish_reason == "tool_calls", c
    calls = c.message.tool_calls or []
    assert len(calls) == 1
    fn = calls[0].function  # type: ignore[union-attr]
    if isinstance(choice, dict):
        assert fn.name == "add"
    jsonschema.validate(json.loads(fn.arguments), PARAMS[fn.name])


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "weather"}])
def test_anthropic_forced_tool_use(server: ServerProcess, choice: Any) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=120, max_retries=0)
    tools: Any = [{"name": "weather", "input_schema": WEATHER}, {"name": "add", "input_schema": ADD}]
    m = claude.messages.create(model=TINY, max_tokens=NUM_PREDICT, tools=tools, tool_choice=choice,
                               messages=[{"role": "user", "content": "Weather?"}])
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1
    if choice["type"] == "tool":
        assert uses[0].name == "weather"
    jsonschema.validate(uses[0].input, PARAMS[uses[0].name])
    with claude.messages.stream(model=TINY, max_tokens=NUM_PREDICT, tools=tools, tool_choice=choice,
                                messages=[{"role": "user", "content": "Weather?"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"

"""Constrained decoding without a runner: grammars, the compile cache, the mask, and
how each API family maps its structured-output and tool_choice fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from corral.runner.grammar import (
    GrammarCache,
    GrammarError,
    GrammarProcessor,
    allowed_from_bitmask,
    grammar_for,
    tool_call_schema,
    tool_markup,
)
from corral.runner.protocol import RunnerRequest
from corral.supervisor.api import anthropic as anthropic_api
from corral.supervisor.api import openai as openai_api
from corral.supervisor.api.fields import forced_tool, format_field
from corral.supervisor.cli import _format_value
from corral.supervisor.errors import BadRequest
from mlx_lm.tokenizer_utils import load as load_tokenizer

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                   "name": {"type": "string", "maxLength": 4}},
    "required": ["n", "tags"], "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def cache(tokenizer: Any) -> GrammarCache:
    return GrammarCache(tokenizer)


def test_grammar_for_free_text_is_none() -> None:
    assert grammar_for(None, None, TOOLS) is None


def test_grammar_refuses_format_with_a_forced_call() -> None:
    with pytest.raises(GrammarError, match="cannot be combined"):
        grammar_for("json", "required", TOOLS)


def test_tool_call_schema_forces_the_named_tool() -> None:
    schema = tool_call_schema(TOOLS, "add")
    assert schema["properties"]["name"] == {"const": "add"}
    assert schema["properties"]["arguments"]["required"] == ["a", "b"]
    assert len(tool_call_schema(TOOLS, None)["anyOf"]) == 2
    with pytest.raises(GrammarError, match="not among the tools"):
        tool_call_schema(TOOLS, "nope")


def test_tool_markup_of_a_tokenizer_without_tool_calling(tokenizer: Any) -> None:
    assert tool_markup(tokenizer) == ("<tool_call>", "</tool_call>")


def test_unsupported_keyword_is_named(cache: GrammarCache) -> None:
    grammar = grammar_for({"type": "object", "if": {"type": "object"}}, None, None)
    assert grammar is not None
    with pytest.raises(GrammarError, match='"if"'):
        cache.compile(grammar)


def test_compiled_grammars_are_cached(tokenizer: Any) -> None:
    cache = GrammarCache(tokenizer)
    grammar = grammar_for(SCHEMA, None, None)
    assert grammar is not None
    a, b = cache.compile(grammar), cache.compile(grammar)
    assert cache.compiles == 1 and a is not b  # one compile, a fresh matcher per sequence


def test_bitmask_unpacks_bit_by_bit() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(-(2**31), 2**31 - 1, size=(1, 3), dtype=np.int32)
    want = np.unpackbits(bits.view(np.uint8), bitorder="little").astype(bool)
    got = np.array(allowed_from_bitmask(bits, 96))[0]
    assert (got == want).all()
    assert np.array(allowed_from_bitmask(bits, 100))[0, 96:].tolist() == [False] * 4  # beyond the mask
    assert allowed_from_bitmask(bits, 40).shape == (1, 40)


def _decode(processor: GrammarProcessor, tokenizer: Any, seed: int, limit: int = 300) -> str:
    """Sample from random logits through the processor, as the batch does: each call
    consumes the token sampled the step before, then masks this step's logits."""
    rng = np.random.default_rng(seed)
    tokens = [0]  # the prompt's last token: the first call does not consume it
    for _ in range(limit):
        logits = mx.array(rng.normal(size=(1, 512)).astype(np.float32))
        masked = processor(mx.array(tokens), logits)
        if processor.done:
            break
        token = int(mx.argmax(masked, axis=-1).item())
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    return str(tokenizer.decode(tokens[1:]))


@pytest.mark.parametrize("seed", range(5))
def test_random_logits_through_the_mask_give_valid_json(tokenizer: Any, cache: GrammarCache,
                                                        seed: int) -> None:
    grammar = grammar_for(SCHEMA, None, None)
    assert grammar is not None
    processor = GrammarProcessor(cache.compile(grammar), cache.vocab_size)
    text = _decode(processor, tokenizer, seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_forced_call_grammar_writes_a_valid_call(tokenizer: Any, cache: GrammarCache) -> None:
    grammar = grammar_for(None, "get_weather", TOOLS)
    assert grammar is not None
    text = _decode(GrammarProcessor(cache.compile(grammar), cache.vocab_size), tokenizer, 3)
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    call = json.loads(text[len("<tool_call>"):-len("</tool_call>")])
    assert call["name"] == "get_weather"
    jsonschema.validate(call["arguments"], TOOLS[0]["function"]["parameters"])


def test_runner_request_wire_form_carries_the_constraint() -> None:
    wire = RunnerRequest({}, prompt="x", format="json", tool_choice="add").to_wire()
    assert wire["format"] == "json" and wire["tool_choice"] == "add"
    assert "format" not in RunnerRequest({}, prompt="x").to_wire()


def test_format_field() -> None:
    assert format_field(None) is None and format_field("") is None
    assert format_field("json") == "json"
    assert format_field(SCHEMA) == SCHEMA
    with pytest.raises(BadRequest):
        format_field("xml")


def test_forced_tool() -> None:
    assert forced_tool(TOOLS, None, "tool_choice") == "required"
    assert forced_tool(TOOLS, "add", "tool_choice") == "add"
    with pytest.raises(BadRequest, match="not among"):
        forced_tool(TOOLS, "nope", "tool_choice")
    with pytest.raises(BadRequest, match="no tools"):
        forced_tool(None, None, "tool_choice")


def test_openai_mapping() -> None:
    assert openai_api._response_format({"response_format": {"type": "json_object"}}) == {"type": "object"}
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}
    assert openai_api._response_format(body) == SCHEMA
    assert openai_api._response_format({"response_format": {"type": "text"}}) is None
    assert openai_api._tool_choice({"tool_choice": "auto"}, TOOLS) is None
    assert openai_api._tool_choice({"tool_choice": "required"}, TOOLS) == "required"
    named = {"tool_choice": {"type": "function", "function": {"name": "add"}}}
    assert openai_api._tool_choice(named, TOOLS) == "add"


def test_anthropic_mapping() -> None:
    assert anthropic_api._tool_choice({"tool_choice": {"type": "auto"}}, TOOLS) is None
    assert anthropic_api._tool_choice({"tool_choice": {"type": "any"}}, TOOLS) == "required"
    assert anthropic_api._tool_choice({"tool_choice": {"type": "tool", "name": "add"}}, TOOLS) == "add"
    with pytest.raises(BadRequest):
        anthropic_api._tool_choice({"tool_choice": {"type": "sometimes"}}, TOOLS)


def test_cli_format_value() -> None:
    assert _format_value("json") == "json"
    assert _format_value('{"type": "object"}') == {"type": "object"}
    with pytest.raises(SystemExit):
        _format_value("{nope")


async def test_compiles_run_on_the_grammar_thread(tokenizer: Any) -> None:
    """The generation thread never compiles: matcher() hands the work to the worker thread."""
    import threading

    seen: list[str] = []

    class Recording(GrammarCache):
        def compile(self, grammar: str) -> Any:
            seen.append(threading.current_thread().name)
            return super().compile(grammar)

    cache = Recording(tokenizer)
    grammar = grammar_for("json", None, None)
    assert grammar is not None
    processor = await cache.processor(grammar)
    assert seen and all(name.startswith("grammar") for name in seen)
    assert not processor.done
    cache.close()

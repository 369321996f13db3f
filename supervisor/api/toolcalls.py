"""Tool calls in generated text, shared by the Ollama, OpenAI and Anthropic routes.

The runner parses tool calls itself when the model's tokenizer supports them
(mlx_lm's tool parsers) and puts them on its done line (Done.tool_calls,
{"name", "arguments"}). For templates it cannot parse,
`<tool_call>{json}</tool_call>` blocks (the Hermes/Qwen convention) are split
out of the text here.
"""

from __future__ import annotations

import json
from typing import Any

from corral.runner.protocol import Done, parse_arguments
from corral.runner.stops import held_back

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _parse_call(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    parsed = tool_call_out(value)
    if parsed is None or not isinstance(parsed[1], dict):
        return None
    return {"function": {"name": parsed[0], "arguments": parsed[1]}}


def runner_calls(done: Done) -> list[dict[str, Any]]:
    """Tool calls the runner parsed itself ({"name", "arguments"}), in Ollama's shape."""
    return [{"function": {"name": c["name"], "arguments": c.get("arguments") or {}}}
            for c in done.tool_calls if isinstance(c.get("name"), str)]


class ToolCallFilter:
    """Splits streamed text into visible content and parsed tool calls.

    Text that might start a `<tool_call>` tag is held back until it is clear;
    a block that is not valid JSON is passed through as text.
    """

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        visible, calls = "", list[dict[str, Any]]()
        while True:
            start = self.buffer.find(_OPEN)
            if start < 0:
                cut = len(self.buffer) - held_back(self.buffer, (_OPEN,))
                visible += self.buffer[:cut]
                self.buffer = self.buffer[cut:]
                return visible, calls
            end = self.buffer.find(_CLOSE, start)
            if end < 0:
                visible += self.buffer[:start]
                self.buffer = self.buffer[start:]
                return visible, calls
            block = self.buffer[start + len(_OPEN):end]
            call = _parse_call(block.strip())
            if call is None:
                visible += self.buffer[:end + len(_CLOSE)]
            else:
                visible += self.buffer[:start]
                calls.append(call)
            self.buffer = self.buffer[end + len(_CLOSE):]

    def flush(self) -> str:
        rest, self.buffer = self.buffer, ""
        return rest


def tool_call_out(call: dict[str, Any]) -> tuple[str, Any] | None:
    """(name, arguments) from the runner's {"name","arguments"} or Ollama's {"function": {...}}.

    Arguments sent as a JSON string are decoded; a string that is not JSON is kept as is.
    """
    inner = call.get("function")
    fn: dict[str, Any] = inner if isinstance(inner, dict) else call
    name = fn.get("name")
    if not isinstance(name, str):
        return None
    args = fn.get("arguments", fn.get("parameters", {}))
    try:
        args = parse_arguments(args)
    except ValueError:
        pass
    return name, args


def text_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split `<tool_call>` blocks out of a whole generated text."""
    f = ToolCallFilter()
    visible, calls = f.feed(text)
    return visible + f.flush(), list(calls)


def calls_from(text: str, done: Done, *, tools_given: bool) -> tuple[str, list[dict[str, Any]]]:
    """(visible text, raw calls) for a whole answer: the runner's own parse from its
    done line when it made one, else `<tool_call>` blocks split out of the text
    (only when the request offered tools)."""
    calls: list[dict[str, Any]] = list(done.tool_calls)
    if tools_given and not calls:
        text, calls = text_tool_calls(text)
    return text, calls

"""Tool calls in generated text, shared by the Ollama, OpenAI and Anthropic routes.

The runner parses tool calls itself when the model's tokenizer supports them
(mlx_lm's tool parsers) and puts them on its done line; `runner_calls` adapts
those. For templates it cannot parse, `<tool_call>{json}</tool_call>` blocks
(the Hermes/Qwen convention) are split out of the text here.
"""

from __future__ import annotations

import json
from typing import Any

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _parse_call(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"function": {"name": value["name"], "arguments": args}}


def runner_calls(done: dict[str, Any]) -> list[dict[str, Any]]:
    """Tool calls the runner parsed itself ({"name", "arguments"}), in Ollama's shape."""
    raw = done.get("tool_calls")
    if not isinstance(raw, list):
        return []
    return [{"function": {"name": c["name"], "arguments": c.get("arguments") or {}}}
            for c in raw if isinstance(c, dict) and isinstance(c.get("name"), str)]


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
                # keep a suffix that could be the beginning of the open tag
                keep = next((k for k in range(len(_OPEN) - 1, 0, -1)
                             if self.buffer.endswith(_OPEN[:k])), 0)
                cut = len(self.buffer) - keep
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
    """(name, arguments) from the runner's {"name","arguments"} or Ollama's {"function": {...}}."""
    inner = call.get("function")
    fn: dict[str, Any] = inner if isinstance(inner, dict) else call
    name = fn.get("name")
    if not isinstance(name, str):
        return None
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return name, args


def text_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split `<tool_call>` blocks out of a whole generated text."""
    f = ToolCallFilter()
    visible, calls = f.feed(text)
    return visible + f.flush(), list(calls)


def calls_from(text: str, done: dict[str, Any], *, tools_given: bool) -> tuple[str, list[dict[str, Any]]]:
    """(visible text, raw calls) for a whole answer: the runner's own parse from its
    done line when it made one, else `<tool_call>` blocks split out of the text
    (only when the request offered tools)."""
    calls = [c for c in done.get("tool_calls") or [] if isinstance(c, dict)]
    if tools_given and not calls:
        text, calls = text_tool_calls(text)
    return text, calls

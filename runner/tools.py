"""Separate tool-call markup from content when the tokenizer knows tool calling.

mlx_lm's TokenizerWrapper names the model's tool-call delimiters
(tool_call_start / tool_call_end) and a parser for what is between them. Text
inside the delimiters is held back from the stream and parsed at the end into
{"name", "arguments"} objects; a call that does not parse is given back as
plain text, so a confused model never crashes a request.
"""

from __future__ import annotations

import logging
from typing import Any

from corral.runner.protocol import parse_arguments
from corral.runner.stops import held_back

log = logging.getLogger("runner")


class ToolCallSplitter:
    def __init__(self, tokenizer: Any, tools: list[Any] | None = None) -> None:
        self._start: str | None = getattr(tokenizer, "tool_call_start", None) if getattr(
            tokenizer, "has_tool_calling", False) else None
        self._end: str = getattr(tokenizer, "tool_call_end", None) or ""
        self._parser = getattr(tokenizer, "tool_parser", None)
        self._tools = tools
        self._buf = ""        # content not yet known to be outside a call
        self._calls: list[str] = []
        self._in_call = False

    def feed(self, text: str) -> str:
        """The part of `text` that is plain content."""
        if not self._start or self._parser is None:
            return text
        self._buf += text
        out = []
        while True:
            if not self._in_call:
                i = self._buf.find(self._start)
                if i < 0:
                    keep = held_back(self._buf, (self._start,))
                    out.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                out.append(self._buf[:i])
                self._buf = self._buf[i + len(self._start):]
                self._in_call = True
            else:
                j = self._buf.find(self._end) if self._end else -1
                if j < 0:
                    break
                self._calls.append(self._buf[:j])
                self._buf = self._buf[j + len(self._end):]
                self._in_call = False
        return "".join(out)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(leftover content, parsed tool calls) at the end of the stream."""
        rest = self._buf
        if self._in_call and rest:
            self._calls.append(rest)
            rest = ""
        calls: list[dict[str, Any]] = []
        for raw in self._calls:
            parsed = self._parse(raw)
            if parsed is None:
                rest += f"{self._start}{raw}{self._end}"
            else:
                calls.extend(parsed)
        return rest, calls

    def _parse(self, raw: str) -> list[dict[str, Any]] | None:
        try:
            result = self._parser(raw, self._tools) if self._parser else None
        except Exception as e:  # model output is untrusted text
            log.info("tool call did not parse: %s", e)
            return None
        items = result if isinstance(result, list) else [result]
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            try:
                args = parse_arguments(item.get("arguments", {}))
            except ValueError:
                return None
            calls.append({"name": item["name"], "arguments": args if isinstance(args, dict) else {}})
        return calls


"""Reasoning models: does a chat template think, and splitting `<think>` text off.

Templates with a thinking switch (Qwen3's `enable_thinking`) or ones that emit
`<think>` blocks produce `<think>reasoning</think>answer`; when a request asks
for thinking, the runner splits that once, here, so every API family gets the
reasoning as its own field while it streams.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def template_thinks(template: str) -> bool:
    """Whether a chat template can think: it has a thinking switch or writes `<think>` blocks."""
    return "enable_thinking" in template or OPEN in template or "reasoning_content" in template


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (held back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkingSplitter:
    """Feed generated text; get (thinking, content) pieces as soon as they are certain.

    `opened`: the prompt already ends inside a `<think>` block (templates that put
    the opening tag in the generation prompt). Otherwise reasoning is what follows
    an opening tag at the very start of the answer (leading whitespace allowed).
    """

    def __init__(self, *, opened: bool = False) -> None:
        self._state = "thinking" if opened else "start"
        self._held = ""
        self._trim = False  # the answer after a reasoning block starts at its first non-space


    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        thinking, content = "", ""
        while True:
            if self._state == "start":
                stripped = self._held.lstrip()
                if stripped.startswith(OPEN):
                    self._held = stripped[len(OPEN):]
                    self._state = "thinking"
                    continue
                if stripped and not OPEN.startswith(stripped):
                    self._state = "content"  # no reasoning block: all of it is the answer
                    continue
                return thinking, content
            if self._state == "thinking":
                end = self._held.find(CLOSE)
                if end >= 0:
                    thinking += self._held[:end]
                    self._held = self._held[end + len(CLOSE):]
                    self._state, self._trim = "content", True
                    continue
                keep = _partial_suffix(self._held, CLOSE)
                cut = len(self._held) - keep
                thinking += self._held[:cut]
                self._held = self._held[cut:]
                return thinking, content
            if self._trim:
                self._held = self._held.lstrip()
                self._trim = not self._held
            content += self._held
            self._held = ""
            return thinking, content

    def flush(self) -> tuple[str, str]:
        """What is still held at the end of the stream."""
        held, self._held = self._held, ""
        if self._state == "thinking":
            return held, ""
        return "", held

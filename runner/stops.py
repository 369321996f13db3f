"""Stop strings matched on decoded text, holding back a possible partial match.

Token-level stop sequences miss stops that tokenize differently in context, so
we match on text: everything that could still be the start of a stop string is
held back until the next piece of text decides it. `held_back` is that rule
alone; the supervisor's `<tool_call>` filter and the runner's tool-call
splitter use it too.
"""

from __future__ import annotations

from collections.abc import Iterable


def held_back(buf: str, needles: Iterable[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of some needle:
    the text to hold back because the next piece might complete a needle."""
    best = 0
    for s in needles:
        for n in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:n]):
                best = n
                break
    return best


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        """Text safe to emit now; sets `matched` when a stop string completes."""
        if self.matched is not None:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        hit = -1
        for s in self._stops:  # the earliest match wins; at one position, the first stop given
            i = buf.find(s)
            if i >= 0 and (hit < 0 or i < hit):
                hit, self.matched = i, s
        if hit >= 0:
            self._held = ""
            return buf[:hit]
        keep = held_back(buf, self._stops)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

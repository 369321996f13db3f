"""Pure-logic pieces of the runner: text stop matching and tool-call splitting.

(The end-to-end behaviour is covered with a real runner in tests/test_runner.py.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from corral.runner.protocol import (
    BodyError,
    done_from_line,
    done_line,
    json_object,
    parse_arguments,
)
from corral.runner.stops import StopMatcher, held_back
from corral.runner.tools import ToolCallSplitter


def feed_all(m: StopMatcher, pieces: list[str]) -> str:
    out = ""
    for p in pieces:
        out += m.feed(p)
        if m.stopped:
            break
    return out + m.flush()


@pytest.mark.parametrize(
    ("pieces", "stops", "want", "stopped"),
    [
        (["Hello", " wor", "ld", "!"], ("world",), "Hello ", True),
        (["ab", "c<", "|e", "nd|>", "tail"], ("<|end|>",), "abc", True),
        (["ab", "c<", "|x", "yz"], ("<|end|>",), "abc<|xyz", False),
        (["xx", "STOP"], ("nope", "STOP"), "xx", True),
        (["one two"], (), "one two", False),
        (["aaa", "ab"], ("aab",), "aa", True),
    ],
)
def test_stop_matcher(pieces: list[str], stops: tuple[str, ...], want: str, stopped: bool) -> None:
    m = StopMatcher(stops)
    assert feed_all(m, pieces) == want
    assert m.stopped is stopped
    assert (m.matched is not None) is stopped


def test_stop_matcher_names_the_earliest_match() -> None:
    m = StopMatcher(("two", "one"))
    assert m.feed("zero one two") == "zero " and m.matched == "one"
    m = StopMatcher(("abc", "ab"))  # both match at one position: the first given wins
    assert m.feed("xabc") == "x" and m.matched == "abc"
    assert StopMatcher(("END",)).matched is None


@pytest.mark.parametrize(("buf", "needles", "want"), [
    ("abc<tool", ("<tool_call>",), 5),
    ("abc<tool_call", ("<tool_call>",), 10),
    ("abc", ("<tool_call>",), 0),
    ("xE", ("END", "Ex"), 1),  # "E" starts both needles
    ("", ("END",), 0),
])
def test_held_back_is_the_longest_partial_match(buf: str, needles: tuple[str, ...], want: int) -> None:
    assert held_back(buf, needles) == want


def test_done_line_round_trips_with_stop_sequence() -> None:
    line = done_line("stop", prompt_eval_count=3, prompt_eval_duration=10, eval_count=4,
                     eval_duration=20, stop_sequence="END")
    assert json.loads(json.dumps(line))["stop_sequence"] == "END"
    done = done_from_line({**line, "tool_calls": [{"name": "f", "arguments": {}}, "junk"]})
    assert (done.done_reason, done.eval_count, done.stop_sequence) == ("stop", 4, "END")
    assert done.tool_calls == ({"name": "f", "arguments": {}},)
    assert done_line("length", prompt_eval_count=0, prompt_eval_duration=0, eval_count=0,
                     eval_duration=0)["stop_sequence"] is None


def test_parse_arguments() -> None:
    assert parse_arguments('{"a": 1}') == {"a": 1}
    assert parse_arguments({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError):
        parse_arguments("not json")


def test_stop_matcher_holds_back_only_a_possible_prefix() -> None:
    m = StopMatcher(("END",))
    assert m.feed("abcE") == "abc"
    assert m.feed("x") == "Ex"


class FakeToolTokenizer:
    has_tool_calling = True
    tool_call_start = "<tool_call>"
    tool_call_end = "</tool_call>"

    @staticmethod
    def tool_parser(text: str, tools: Any) -> Any:
        return json.loads(text.strip())


def test_tool_calls_are_split_from_content() -> None:
    s = ToolCallSplitter(FakeToolTokenizer(), tools=[])
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    pieces = ["Sure. <tool", "_call>", call[:10], call[10:], "</tool_", "call> done"]
    content = "".join(s.feed(p) for p in pieces)
    rest, calls = s.finish()
    assert content + rest == "Sure.  done"
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]


def test_unparsable_tool_call_comes_back_as_text() -> None:
    s = ToolCallSplitter(FakeToolTokenizer(), tools=[])
    content = s.feed("x<tool_call>not json</tool_call>")
    rest, calls = s.finish()
    assert calls == []
    assert content + rest == "x<tool_call>not json</tool_call>"


def test_tokenizer_without_tool_calling_passes_text_through() -> None:
    class Plain:
        has_tool_calling = False

    s = ToolCallSplitter(Plain(), tools=[{"type": "function"}])
    assert s.feed("<tool_call>{}</tool_call>") == "<tool_call>{}</tool_call>"
    assert s.finish() == ("", [])


@pytest.mark.parametrize(("raw", "want"), [
    (b"", "empty"), (b"  \n", "empty"), (b"{not json", "malformed JSON"), (b"\xff\xfe", "malformed JSON"),
    (b"[" * 100_000, "malformed JSON"), (b"[1, 2]", "got list"), (b'"text"', "got str"),
])
def test_json_object_refuses_what_is_not_one_object(raw: bytes, want: str) -> None:
    with pytest.raises(BodyError, match=want):
        json_object(raw)


def test_json_object_reads_an_object() -> None:
    assert json_object(b' {"a": [1]} ') == {"a": [1]}


def test_stream_interval_stretches_with_streams_within_bounds() -> None:
    from corral.runner.engine import MAX_STREAM_INTERVAL, STREAM_INTERVAL, stream_interval

    assert stream_interval(0) == stream_interval(1) == stream_interval(2) == STREAM_INTERVAL
    assert stream_interval(4) == pytest.approx(0.04)  # 4 streams together still ~100 lines/s
    assert stream_interval(8) == pytest.approx(0.08)
    assert stream_interval(1000) == MAX_STREAM_INTERVAL
    assert all(stream_interval(n) <= stream_interval(n + 1) for n in range(64))


@pytest.mark.parametrize(("waiting", "room", "waited", "step", "window", "due"), [
    (1, 3, 0.000, 0.0015, 0.005, False),  # just arrived, steps are short: wait for company
    (2, 3, 0.003, 0.0015, 0.005, False),  # one more step still ends inside the window
    (2, 3, 0.004, 0.0015, 0.005, True),  # one more step would end past it: in now
    (1, 3, 0.000, 0.0300, 0.005, True),  # a step longer than the window: never wait a step
    (3, 3, 0.000, 0.0015, 0.005, True),  # they fill the batch: nobody else could join
    (5, 3, 0.000, 0.0015, 0.005, True),  # more than fit: the first ones go in now
    (1, 3, 0.000, 0.0000, 0.000, True),  # no window: every arrival is admitted at once
])
def test_joiners_wait_for_company_only_within_the_window(waiting: int, room: int, waited: float, step: float,
                                                         window: float, due: bool) -> None:
    from corral.runner.engine import joiners_due

    assert joiners_due(waiting=waiting, room=room, waited=waited, step=step, window=window) is due

"""Log-probability helpers as pure logic: the engine's per-token entry and OpenAI's legacy shape."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import pytest
from corral.runner.engine import Engine
from corral.runner.protocol import RunnerRequest, check_top_logprobs, chunk_from_line, chunk_line
from corral.supervisor.api.openai import _completion_logprobs


class FakeTokenizer:
    eos_token_ids = [0]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def test_engine_entry_is_the_token_and_its_most_likely_alternatives() -> None:
    engine = Engine(None, FakeTokenizer(), num_ctx=16, num_parallel=1)
    logits = mx.array([0.0, 3.0, 1.0, 2.0, -1.0])
    logprobs = logits - mx.logsumexp(logits)
    entry = engine._logprob(3, logprobs, 2)
    assert entry["token"] == "<3>" and entry["bytes"] == list(b"<3>")
    assert entry["logprob"] == pytest.approx(2.0 - math.log(sum(math.exp(x) for x in (0, 3, 1, 2, -1))), abs=1e-5)
    assert [a["token"] for a in entry["top_logprobs"]] == ["<1>", "<3>"]
    assert entry["top_logprobs"][1]["logprob"] == pytest.approx(entry["logprob"])
    assert engine._logprob(1, logprobs, 0)["top_logprobs"] == []


def test_completions_shape_counts_offsets_across_calls() -> None:
    entries = [{"token": "ab", "logprob": -0.1, "top_logprobs": [{"token": "ab", "logprob": -0.1}]},
               {"token": "c", "logprob": -2.0, "top_logprobs": []}]
    out = _completion_logprobs(entries, offset=5)
    assert out == {"tokens": ["ab", "c"], "token_logprobs": [-0.1, -2.0],
                   "top_logprobs": [{"ab": -0.1}, {}], "text_offset": [5, 7]}


def test_wire_round_trip() -> None:
    entry: dict[str, Any] = {"token": "x", "logprob": -1.0, "bytes": [120], "top_logprobs": []}
    chunk = chunk_from_line(chunk_line("x", "why", [entry]))
    assert chunk.content == "x" and chunk.thinking == "why" and chunk.logprobs == (entry,)
    assert chunk_line("x") == {"content": "x", "done": False}
    wire = RunnerRequest({}, prompt="p", think="high", top_logprobs=3, logprobs=True, truncate=False).to_wire()
    assert wire == {"options": {}, "prompt": "p", "think": "high", "logprobs": True, "top_logprobs": 3,
                    "truncate": False}
    assert RunnerRequest({}, prompt="p").to_wire() == {"options": {}, "prompt": "p"}
    with pytest.raises(ValueError, match="top_logprobs"):
        check_top_logprobs(21)

"""Thinking: the runner splits `<think>` reasoning off once; every family renders it.

Unit tests for the splitter, the capability check and the CLI's printing; then a
real server with a tiny model whose chat template has a Qwen3-style thinking
switch (scripts/make_test_model.py --thinking), driven through the official
ollama, openai and anthropic clients. That template opens a `<think>` block in
the generation prompt, so a random-weight model's whole answer is reasoning:
the end-to-end tests check that it goes to the reasoning fields (equal to what
the model generates from the same prompt raw), streamed and not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from corral.runner.protocol import OptionError, parse_think
from corral.runner.thinking import ThinkingSplitter, template_thinks
from corral.supervisor.cli import ThinkPrinter, build_parser

from tests.conftest import TINY
from tests.support.live_server import ServerProcess
from tests.support.models import make_hf_model

THINKER = "corral-test/tiny-think"
GREEDY = {"temperature": 0, "num_predict": 12}


# ---- units -----------------------------------------------------------------


def _split(pieces: list[str], opened: bool = False) -> tuple[str, str]:
    s = ThinkingSplitter(opened=opened)
    thinking, content = "", ""
    for p in pieces:
        t, c = s.feed(p)
        thinking, content = thinking + t, content + c
    t, c = s.flush()
    return thinking + t, content + c


@pytest.mark.parametrize("pieces", [
    ["<think>why</think>answer"],
    ["<th", "ink>w", "hy</th", "ink>", "\n\nans", "wer"],
    ["\n<think>", "why", "<", "/think>", "answer"],
])
def test_splitter_finds_the_block_across_pieces(pieces: list[str]) -> None:
    assert _split(pieces) == ("why", "answer")


def test_splitter_without_a_block_is_all_content() -> None:
    assert _split(["hello ", "<thin", "gs>"]) == ("", "hello <things>")
    assert _split(["<thi"]) == ("", "<thi")  # a tag that never completes is text


def test_splitter_opened_by_the_prompt() -> None:
    assert _split(["reason", "ing</think>  done"], opened=True) == ("reasoning", "done")
    assert _split(["never closed <"], opened=True) == ("never closed <", "")


def test_splitter_streams_reasoning_before_the_block_ends() -> None:
    s = ThinkingSplitter(opened=True)
    assert s.feed("step one, ") == ("step one, ", "")
    assert s.feed("step two</") == ("step two", "")  # "</" may start the closing tag: held
    assert s.feed("think>ok") == ("", "ok")


def test_template_capability() -> None:
    assert template_thinks("{% if enable_thinking %}x{% endif %}")
    assert template_thinks("<think>{{ m }}</think>")
    assert not template_thinks("{% for m in messages %}{{ m.content }}{% endfor %}")


@pytest.mark.parametrize(("raw", "want"), [(None, None), (True, True), (False, False), ("high", "high"),
                                           ("Low", "low"), ("true", True)])
def test_parse_think(raw: Any, want: Any) -> None:
    assert parse_think(raw) == want


@pytest.mark.parametrize("raw", ["max", 1, [], {"a": 1}])
def test_parse_think_refuses(raw: Any) -> None:
    with pytest.raises(OptionError, match="'think' must be"):
        parse_think(raw)


def test_cli_think_flags_and_printing() -> None:
    args = build_parser().parse_args(["run", "m", "--think", "high", "--hidethinking"])
    assert args.think == "high" and args.hidethinking
    assert build_parser().parse_args(["run", "m", "--think"]).think is True
    assert build_parser().parse_args(["run", "m", "--think=false"]).think is False
    shown = ThinkPrinter(hide=False)
    out = shown.piece("hm", "") + shown.piece(" ok", "") + shown.piece("", "Answer")
    assert out == "Thinking...\nhm ok\n...done thinking.\n\nAnswer"
    hidden = ThinkPrinter(hide=True)
    assert hidden.piece("hm", "") + hidden.piece("", "Answer") == "Answer"


# ---- end to end --------------------------------------------------------------



@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("hf-think") / "hub"
    make_hf_model(cache, THINKER, "--thinking")
    make_hf_model(cache, TINY)
    with ServerProcess(tmp_path_factory.mktemp("home"), cache, env={"CORRAL_NUM_PARALLEL": "2"}) as s:
        yield s


@pytest.fixture(scope="module")
def raw_reasoning(server: ServerProcess) -> str:
    """What the model generates, unsplit, from the prompt a think request renders."""
    prompt = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    r = httpx.post(server.url + "/api/generate", json={
        "model": THINKER, "prompt": prompt, "raw": True, "stream": False, "options": GREEDY}, timeout=120)
    r.raise_for_status()
    text = str(r.json()["response"])
    assert text and "</think>" not in text  # a random model never closes the block
    return text


WHY = [{"role": "user", "content": "Why?"}]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_ollama_chat_thinking_split_streamed_and_not(server: ServerProcess, raw_reasoning: str) -> None:
    client = ollama.Client(host=server.url, timeout=120)
    whole = client.chat(model=THINKER, messages=WHY, think=True, options=GREEDY)
    assert whole.message.thinking == raw_reasoning and whole.message.content == ""
    parts = list(client.chat(model=THINKER, messages=WHY, think=True, options=GREEDY, stream=True))
    pieces = [p.message.thinking for p in parts if p.message.thinking]
    assert len(pieces) > 1  # streamed as produced, not at the end
    assert "".join(pieces) == raw_reasoning and not "".join(p.message.content or "" for p in parts)
    level = client.generate(model=THINKER, prompt="Why?", think="high", options=GREEDY)
    assert level.thinking == raw_reasoning and level.response == ""


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_think_false_renders_the_switch_off(server: ServerProcess, raw_reasoning: str) -> None:
    client = ollama.Client(host=server.url, timeout=120)
    off = client.chat(model=THINKER, messages=WHY, think=False, options=GREEDY)
    assert not off.message.thinking and off.message.content
    prompt = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    raw = client.generate(model=THINKER, prompt=prompt, raw=True, options=GREEDY)
    assert off.message.content == raw.response


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_think_on_a_model_that_cannot_think_is_400(server: ServerProcess) -> None:
    client = ollama.Client(host=server.url, timeout=120)
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model=TINY, messages=WHY, think=True)
    assert ei.value.status_code == 400 and "does not support thinking" in ei.value.error
    assert client.chat(model=TINY, messages=WHY, think=False, options=GREEDY).message.content
    r = httpx.post(server.url + "/api/chat", json={"model": THINKER, "messages": WHY, "think": "max"})
    assert r.status_code == 400 and "'think' must be" in r.json()["error"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_openai_reasoning_content(server: ServerProcess, raw_reasoning: str) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    res = oai.chat.completions.create(model=THINKER, messages=WHY, reasoning_effort="high",  # type: ignore[arg-type]
                                      temperature=0, max_tokens=12)
    msg: Any = res.choices[0].message
    assert msg.reasoning_content == raw_reasoning and not msg.content
    stream = oai.chat.completions.create(model=THINKER, messages=WHY, reasoning_effort="low",  # type: ignore[arg-type]
                                         temperature=0, max_tokens=12, stream=True)
    deltas = [getattr(c.choices[0].delta, "reasoning_content", None) for c in stream if c.choices]
    assert "".join(d for d in deltas if d) == raw_reasoning
    with pytest.raises(openai.BadRequestError, match="does not support thinking"):
        oai.chat.completions.create(model=TINY, messages=WHY, reasoning_effort="high")  # type: ignore[arg-type]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_anthropic_thinking_blocks(server: ServerProcess, raw_reasoning: str) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=120, max_retries=0)
    kw: Any = {"model": THINKER, "max_tokens": 12, "messages": WHY, "extra_body": {"temperature": 0},
               "thinking": {"type": "enabled", "budget_tokens": 1024}}
    msg = claude.messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == raw_reasoning  # type: ignore[union-attr]
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == raw_reasoning
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(**{**kw, "thinking": {"type": "enabled"}})


def test_template_of_the_test_model(tmp_path: Path) -> None:
    from tests.support.models import make_model

    config = json.loads((make_model(tmp_path / "m", "--thinking") / "tokenizer_config.json").read_text())
    assert template_thinks(config["chat_template"]) and "enable_thinking" in config["chat_template"]

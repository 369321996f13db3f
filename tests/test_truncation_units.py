"""The runner's prompt fitting as pure logic: a fake tokenizer, no model."""

from __future__ import annotations

from typing import Any

import pytest
from corral.runner.routes import BadInput, RunnerApp, _Wanted


class FakeTokenizer:
    """One token per character of each message's content, plus one per message; BOS is 1."""

    bos_token = "<s>"
    bos_token_id = 1
    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def __init__(self) -> None:
        self.rendered: list[list[dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        self.rendered.append(messages)
        ids: list[int] = []
        for m in messages:
            ids += [2] + [ord(c) for c in m["content"]]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i > 2)


class FakeEngine:
    def __init__(self, num_ctx: int) -> None:
        self.num_ctx = num_ctx
        self.tokenizer = FakeTokenizer()


def app(num_ctx: int = 100) -> RunnerApp:
    return RunnerApp(FakeEngine(num_ctx), model_name="m", token=None)  # type: ignore[arg-type]


def msg(role: str, n: int, ch: str = "a") -> dict[str, str]:
    return {"role": role, "content": ch * n}


def tokens(a: RunnerApp, body: dict[str, Any], num_predict: int = 10) -> list[int]:
    return a._prompt_tokens(body, _Wanted.of(body), num_predict)[0]


def test_a_prompt_that_fits_is_untouched() -> None:
    messages = [msg("system", 10), msg("user", 30), msg("assistant", 30)]
    assert len(tokens(app(), {"messages": messages})) == 73


def test_overflow_keeps_system_and_drops_the_oldest() -> None:
    a = app()
    messages = [msg("system", 10, "s"), msg("user", 30, "b"), msg("assistant", 30, "c"), msg("user", 30, "d"),
                msg("assistant", 5, "e")]
    ids = tokens(a, {"messages": messages}, num_predict=10)
    kept = a.engine.tokenizer.rendered[-1]  # type: ignore[attr-defined]
    assert [m["content"][0] for m in kept] == ["s", "c", "d", "e"]  # 110 tokens: the oldest, "b", went
    assert len(ids) == 11 + 31 + 31 + 6 <= 100 - 10
    ids = tokens(a, {"messages": messages}, num_predict=40)  # more room to answer: "c" goes too
    assert [m["content"][0] for m in a.engine.tokenizer.rendered[-1]] == ["s", "d", "e"]  # type: ignore[attr-defined]
    assert len(ids) == 11 + 31 + 6 <= 100 - 40


def test_the_last_message_alone_too_long_is_refused() -> None:
    with pytest.raises(BadInput, match="the last message does not fit"):
        tokens(app(), {"messages": [msg("system", 10), msg("user", 95)]})


def test_truncate_false_leaves_the_overflow_for_the_400() -> None:
    messages = [msg("user", 60), msg("assistant", 60)]
    assert len(tokens(app(), {"messages": messages, "truncate": False})) == 122


def test_raw_prompt_keeps_bos_and_the_newest_tokens() -> None:
    prompt = "".join(chr(ord("A") + i % 26) for i in range(150))
    ids = tokens(app(), {"prompt": prompt}, num_predict=-1)  # room kept: a quarter of the window
    assert ids[0] == 1 and len(ids) == 75 and ids[1:] == [ord(c) for c in prompt[-74:]]


def test_think_needs_a_template_that_thinks() -> None:
    with pytest.raises(BadInput, match='"m" does not support thinking'):
        tokens(app(), {"messages": [msg("user", 3)], "think": True})
    assert tokens(app(), {"messages": [msg("user", 3)], "think": False})  # turning it off is fine

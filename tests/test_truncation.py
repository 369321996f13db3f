"""A prompt longer than num_ctx: Ollama's truncation, on all three API families.

A real server with CORRAL_CONTEXT_LENGTH=256 and a tiny model. What the runner
really kept is checked by replaying it: the truncated request's answer and
prompt_eval_count (greedy) equal those of an explicit request made of the system
message and the newest messages that fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.conftest import TINY
from tests.support.live_server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CTX = 256
GREEDY = {"temperature": 0, "num_predict": 8}
SYSTEM = {"role": "system", "content": "You are a careful assistant who answers briefly."}
# about 45 tokens each with the test tokenizer: eight of them overflow 256
LONG = "The quick brown fox jumps over the lazy dog while the model server keeps models in memory. "


def turns(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: {LONG}"})
    return out


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("home"), hf_cache,
                       env={"CORRAL_CONTEXT_LENGTH": str(CTX), "CORRAL_NUM_PARALLEL": "2",
                            # prompt_eval_count must be the prompt's length here, which a
                            # prompt cache hit would shorten (tests/test_prompt_cache*.py cover that)
                            "CORRAL_PROMPT_CACHE": "0"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def _kept(client: ollama.Client, history: list[dict[str, str]], count: int) -> tuple[int, list[dict[str, str]]]:
    """Which explicit prompt (system + the newest k messages) has `count` tokens."""
    for k in range(1, len(history) + 1):
        messages = [SYSTEM, *history[-k:]]
        r = client.chat(model=TINY, messages=messages, options=GREEDY)
        if r.prompt_eval_count == count:
            return k, messages
    raise AssertionError(f"no suffix of the conversation has {count} prompt tokens")


def test_ollama_chat_keeps_the_system_message_and_drops_the_oldest(client: ollama.Client) -> None:
    history = turns(11)
    r = client.chat(model=TINY, messages=[SYSTEM, *history], options=GREEDY)
    assert r.prompt_eval_count is not None and r.prompt_eval_count < CTX
    k, messages = _kept(client, history, r.prompt_eval_count)
    assert 1 <= k < len(history)
    replay = client.chat(model=TINY, messages=messages, options=GREEDY)
    assert replay.message.content == r.message.content
    without_system = client.chat(model=TINY, messages=history[-k:], options=GREEDY)
    assert without_system.prompt_eval_count != r.prompt_eval_count  # the system message was kept
    streamed = list(client.chat(model=TINY, messages=[SYSTEM, *history], options=GREEDY, stream=True))
    assert streamed[-1].prompt_eval_count == r.prompt_eval_count
    assert "".join(p.message.content or "" for p in streamed) == r.message.content


def test_room_is_left_to_answer(client: ollama.Client) -> None:
    r = client.chat(model=TINY, messages=[SYSTEM, *turns(11)], options={"temperature": 0, "num_predict": 40})
    assert r.prompt_eval_count is not None and r.prompt_eval_count <= CTX - 40
    assert r.eval_count == 40


def test_raw_prompt_is_cut_from_the_front(client: ollama.Client) -> None:
    prompt = LONG * 12
    r = client.generate(model=TINY, prompt=prompt, raw=True, options=GREEDY)
    assert r.prompt_eval_count is not None and CTX // 2 <= r.prompt_eval_count < CTX


def test_truncate_false_and_a_lone_long_message_are_400(server: ServerProcess, client: ollama.Client) -> None:
    body: dict[str, Any] = {"model": TINY, "messages": [SYSTEM, *turns(11)], "stream": False,
                            "truncate": False, "options": GREEDY}
    r = httpx.post(server.url + "/api/chat", json=body, timeout=120)
    assert r.status_code == 400 and "truncate is false" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model=TINY, messages=[SYSTEM, {"role": "user", "content": LONG * 8}])
    assert ei.value.status_code == 400 and "the last message does not fit" in ei.value.error
    with pytest.raises(ollama.ResponseError) as ei:  # generate: one user message
        client.generate(model=TINY, prompt=LONG * 8)
    assert ei.value.status_code == 400 and f"num_ctx {CTX}" in ei.value.error


def test_openai_and_anthropic_truncate_too(server: ServerProcess, client: ollama.Client) -> None:
    history = turns(11)
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    res = oai.chat.completions.create(model=TINY, messages=[SYSTEM, *history],  # type: ignore[list-item]
                                      temperature=0, max_tokens=8)
    assert res.usage is not None and res.usage.prompt_tokens < CTX
    reference = client.chat(model=TINY, messages=[SYSTEM, *history], options=GREEDY)
    assert res.usage.prompt_tokens == reference.prompt_eval_count
    assert res.choices[0].message.content == reference.message.content
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=120, max_retries=0)
    msg = claude.messages.create(model=TINY, max_tokens=8, system=SYSTEM["content"],
                                 messages=history,  # type: ignore[arg-type]
                                 extra_body={"temperature": 0})
    assert msg.usage.input_tokens == reference.prompt_eval_count
    assert msg.content[0].text == reference.message.content  # type: ignore[union-attr]
    completion = oai.completions.create(model=TINY, prompt=LONG * 12, temperature=0, max_tokens=8)
    assert completion.usage is not None and completion.usage.prompt_tokens < CTX


def test_another_num_ctx_reloads_the_model(server: ServerProcess, client: ollama.Client) -> None:
    """Ollama's needsReload: options.num_ctx other than the loaded one's reloads it once idle."""
    client.generate(model=TINY, prompt="hi", options={**GREEDY, "num_ctx": 128})
    (row,) = [m for m in client.ps().models if m.model and TINY in m.model]
    assert row.context_length == 128
    long = client.generate(model=TINY, prompt=LONG * 4, options={**GREEDY, "num_ctx": 512})
    assert long.prompt_eval_count is not None and long.prompt_eval_count > 128  # not truncated to the old 128
    (row,) = [m for m in client.ps().models if m.model and TINY in m.model]
    assert row.context_length == 512
    client.generate(model=TINY, prompt="hi", options=GREEDY)  # no num_ctx: whatever is loaded
    (row,) = [m for m in client.ps().models if m.model and TINY in m.model]
    assert row.context_length == 512

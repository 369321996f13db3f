"""Log-probabilities from the runner's real distribution, in Ollama's and OpenAI's shapes.

A real server and a tiny model: under greedy decoding each generated token is
the most likely one, so its logprob is the maximum and equals the first of its
top_logprobs; the tokens spell the answer; streamed and whole answers agree, and
every family reports the same numbers for the same prompt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import TINY
from tests.support.live_server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GREEDY = {"temperature": 0, "num_predict": 10}
HI = [{"role": "user", "content": "Tell me about the weather."}]


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("home"), hf_cache, env={"CORRAL_NUM_PARALLEL": "2"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def _check_greedy(entries: list[Any], top: int) -> None:
    for e in entries:
        alternatives = e["top_logprobs"]
        assert len(alternatives) == top
        values = [a["logprob"] for a in alternatives]
        assert values == sorted(values, reverse=True)
        assert e["logprob"] == pytest.approx(values[0], abs=1e-5)  # the greedy token is the max
        assert alternatives[0]["token"] == e["token"]
        assert e["logprob"] <= 0 and sum(math.exp(v) for v in values) <= 1 + 1e-4


def _dump(entries: Any) -> list[dict[str, Any]]:
    return [e.model_dump() if hasattr(e, "model_dump") else dict(e) for e in entries or []]


def test_ollama_generate_and_chat_logprobs(client: ollama.Client) -> None:
    r = client.generate(model=TINY, prompt="The weather", logprobs=True, top_logprobs=3, options=GREEDY)
    entries = _dump(r.logprobs)
    assert len(entries) == r.eval_count and entries
    _check_greedy(entries, 3)
    parts = list(client.generate(model=TINY, prompt="The weather", logprobs=True, top_logprobs=3,
                                 options=GREEDY, stream=True))
    streamed = [e for p in parts for e in _dump(p.logprobs)]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in entries], abs=1e-5)
    chat = client.chat(model=TINY, messages=HI, logprobs=True, options=GREEDY)
    chat_entries = _dump(chat.logprobs)
    assert len(chat_entries) == chat.eval_count and all(e["top_logprobs"] == [] for e in chat_entries)


def test_token_bytes_spell_the_answer(server: ServerProcess) -> None:
    """A token may be part of a UTF-8 character: its bytes are exact, its text says "bytes:"."""
    for prompt in ("The weather", "Unicode text: 東京, 日本語"):
        body = {"model": TINY, "prompt": prompt, "raw": True, "stream": False, "logprobs": True,
                "top_logprobs": 2, "options": GREEDY}
        r = httpx.post(server.url + "/api/generate", json=body, timeout=120).json()
        raw = b"".join(bytes(e["bytes"]) for e in r["logprobs"])
        assert raw.decode("utf-8", "replace") == r["response"]
        for e in [*r["logprobs"], *(a for t in r["logprobs"] for a in t["top_logprobs"])]:
            text = e["token"]
            assert bytes(e["bytes"]) == (text.encode() if not text.startswith("bytes:")
                                         else bytes.fromhex(text[6:].replace("\\x", "")))


def test_no_logprobs_unless_asked(server: ServerProcess, client: ollama.Client) -> None:
    assert client.generate(model=TINY, prompt="The weather", options=GREEDY).logprobs is None
    r = httpx.post(server.url + "/api/generate", json={"model": TINY, "prompt": "x", "top_logprobs": 50})
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]


def test_sampled_tokens_have_real_logprobs(client: ollama.Client) -> None:
    r = client.generate(model=TINY, prompt="The weather", logprobs=True, top_logprobs=5,
                        options={"temperature": 1.5, "seed": 7, "num_predict": 10, "top_k": 0, "top_p": 1})
    for e in _dump(r.logprobs):
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6


def test_openai_chat_logprobs_match_ollama(server: ServerProcess, client: ollama.Client) -> None:
    reference = _dump(client.chat(model=TINY, messages=HI, logprobs=True, top_logprobs=2, options=GREEDY).logprobs)
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    res = oai.chat.completions.create(model=TINY, messages=HI, temperature=0, max_tokens=10,  # type: ignore[arg-type]
                                      logprobs=True, top_logprobs=2)
    lp = res.choices[0].logprobs
    assert lp is not None and lp.content is not None
    entries = [c.model_dump() for c in lp.content]
    _check_greedy(entries, 2)
    assert [e["token"] for e in entries] == [e["token"] for e in reference]
    assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in reference], abs=1e-5)
    stream = oai.chat.completions.create(model=TINY, messages=HI, temperature=0, max_tokens=10,  # type: ignore[arg-type]
                                         logprobs=True, top_logprobs=2, stream=True)
    streamed = [t.token for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]
    assert streamed == [e["token"] for e in entries]
    plain = oai.chat.completions.create(model=TINY, messages=HI, temperature=0, max_tokens=3)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None


def test_openai_completions_logprobs(server: ServerProcess, client: ollama.Client) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    res = oai.completions.create(model=TINY, prompt="The weather", temperature=0, max_tokens=10, logprobs=2)
    lp = res.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(value, abs=1e-5) and token in top
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False))
    reference = client.generate(model=TINY, prompt="The weather", raw=True, logprobs=True,
                                options=GREEDY)
    assert lp.tokens == [e["token"] for e in _dump(reference.logprobs)]
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=TINY, prompt="x", logprobs=9)

"""The prompt cache through the real server and real clients: usage fields per family,
/api/ps, and a conversation that stays warm across a supervisor restart (the runner
writes its disk tier on SIGTERM; the next runner of the model restores it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai

from tests.conftest import TINY
from tests.support.live_server import ServerProcess

SYSTEM = "You are a patient tutor who explains things slowly, with one example each time."


def _chat(server: ServerProcess, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": TINY, "messages": messages, "stream": False,
            "options": {"temperature": 0, "num_predict": 10}}
    r = httpx.post(server.url + "/api/chat", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_usage_and_restart(hf_cache: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a noun?"}]
    with ServerProcess(home, hf_cache) as server:
        first = _chat(server, turn1)
        turn2 = [*turn1, {"role": "assistant", "content": first["message"]["content"]},
                 {"role": "user", "content": "And a verb?"}]
        warm = _chat(server, turn2)
        # Ollama: prompt_eval_count is what was evaluated, less than the whole prompt now
        assert 0 < warm["prompt_eval_count"] < first["prompt_eval_count"]

        oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        r = oai.chat.completions.create(model=TINY, messages=turn2, max_tokens=4, temperature=0)  # type: ignore[arg-type]
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        assert 0 < cached < r.usage.prompt_tokens

        claude = anthropic.Anthropic(base_url=server.url, api_key="x")
        m = claude.messages.create(
            model=TINY, max_tokens=4,
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "What is a noun?"}])
        assert (m.usage.cache_read_input_tokens or 0) > 0 and m.usage.input_tokens >= 1

        ps = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
        assert ps and ps[0]["prompt_cache"]["budget"] > 0
    kv_files = list((home / "kv").glob("*/*.safetensors"))
    assert kv_files, "the runner wrote no disk tier on shutdown"

    with ServerProcess(home, hf_cache) as server:
        again = _chat(server, turn2)
        assert again["message"]["content"] == warm["message"]["content"]  # greedy parity from disk
        assert again["prompt_eval_count"] == 1, "turn 2's prompt was not restored from disk"

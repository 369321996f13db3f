"""End-to-end tests of the runner: a real `python -m corral.runner` subprocess on a
generated model, compared against mlx_lm in this process.

One runner serves the whole module (each start costs ~2 s). Helpers here
(RunnerProcess, stream) are reused by the other tests/test_runner_*.py files.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from corral.supervisor.process import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello, world", "The quick brown fox", "Once upon a time there", "café naïve 東京"]
NUM_CTX = 160


class RunnerProcess:
    """A real runner subprocess on a free loopback port; stderr goes to a file."""

    def __init__(self, model: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"runner-{self.port}.log"
        self.cmd = [sys.executable, "-m", "corral.runner", "--model", str(model), "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, headers: dict[str, str] | None = None) -> RunnerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stderr=log, stdout=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runner exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"runner did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stream(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """POST /completion; (all content, last line)."""
    text, last = "", {}
    with httpx.stream("POST", url + "/completion", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            last = json.loads(line)
            assert "error" not in last, last
            text += last["content"]
    assert last.get("done") is True
    return text, last


def greedy(prompt: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "options": {"temperature": 0, "num_predict": n, **extra}}


def wait_for(cond: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def runner(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    r = RunnerProcess(tiny_model, tmp_path_factory.mktemp("runner"), "--num-ctx", str(NUM_CTX))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def mlx_model(tiny_model: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tok = load(str(tiny_model))[:2]
    return model, tok


def reference(mlx_model: tuple[Any, Any], prompt: str | list[int], n: int) -> str:
    from mlx_lm import generate

    model, tok = mlx_model
    return str(generate(model, tok, prompt, max_tokens=n))


# -- greedy equivalence ------------------------------------------------------


def test_greedy_equals_mlx_lm_generate(runner: RunnerProcess, mlx_model: Any) -> None:
    for prompt in PROMPTS:
        text, done = stream(runner.url, greedy(prompt, 24))
        assert text == reference(mlx_model, prompt, 24)
        assert done["done_reason"] in ("length", "stop")
        assert done["prompt_eval_count"] == len(mlx_model[1].encode(prompt))
        assert done["eval_duration"] > 0 and done["prompt_eval_duration"] > 0


def test_four_concurrent_greedy_each_equal_single_run(runner: RunnerProcess, mlx_model: Any) -> None:
    singles = [stream(runner.url, greedy(p, 32))[0] for p in PROMPTS]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        together = list(ex.map(lambda p: stream(runner.url, greedy(p, 32))[0], PROMPTS))
    assert together == singles
    assert singles == [reference(mlx_model, p, 32) for p in PROMPTS]


def test_more_requests_than_slots_all_complete(runner: RunnerProcess) -> None:
    prompts = PROMPTS * 2 + ["Numbers: 0 1 2"]  # 9 requests, 4 slots: the rest wait FIFO
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        results = list(ex.map(lambda p: stream(runner.url, greedy(p, 8)), prompts))
    assert all(done["eval_count"] <= 8 for _, done in results)
    assert results[0][0] == results[4][0]
    assert wait_for(lambda: httpx.get(runner.url + "/status").json()["active"] == 0)


def test_num_parallel_caps_the_batch(runner: RunnerProcess) -> None:
    seen: list[dict[str, Any]] = []
    prompts = PROMPTS * 2
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        futures = [ex.submit(stream, runner.url, {"prompt": p, "options": {"temperature": 0}}) for p in prompts]
        while not all(f.done() for f in futures):
            seen.append(httpx.get(runner.url + "/status").json())
            time.sleep(0.01)
        results = [f.result() for f in futures]
    assert all(s["active"] <= 4 for s in seen)
    assert all(s["active"] + s["queued"] <= len(prompts) for s in seen)
    assert [t for t, _ in results[:4]] == [t for t, _ in results[4:]]  # batch mates do not change output


# -- chat ----------------------------------------------------------------------


def test_chat_renders_the_chat_template(runner: RunnerProcess, mlx_model: Any) -> None:
    _, tok = mlx_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    text, done = stream(runner.url, {"messages": messages, "options": {"temperature": 0, "num_predict": 16}})
    assert done["prompt_eval_count"] == len(ids)
    assert text == reference(mlx_model, ids, 16)


def test_chat_with_tools_renders_tools_and_does_not_crash(runner: RunnerProcess, mlx_model: Any) -> None:
    _, tok = mlx_model
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather?"}]
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    text, done = stream(runner.url, {"messages": messages, "tools": tools,
                                     "options": {"temperature": 0, "num_predict": 8}})
    assert done["prompt_eval_count"] == len(ids)
    assert text == reference(mlx_model, ids, 8)  # this tokenizer has no tool-call markup: plain text
    assert "tool_calls" not in done


# -- options -----------------------------------------------------------------


def test_num_predict_limits_tokens(runner: RunnerProcess) -> None:
    _, done = stream(runner.url, greedy(PROMPTS[0], 5))
    assert done["eval_count"] == 5 and done["done_reason"] == "length"


def test_stop_string_cuts_text_and_is_not_emitted(runner: RunnerProcess) -> None:
    full, _ = stream(runner.url, greedy(PROMPTS[1], 30))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    text, done = stream(runner.url, greedy(PROMPTS[1], 30, stop=[stop]))
    assert text == full[: full.index(stop)]
    assert stop not in text
    assert done["done_reason"] == "stop"
    assert done["stop_sequence"] == stop  # the done line names the stop string that matched
    _, done = stream(runner.url, greedy(PROMPTS[1], 5, stop=["\u2603 never generated"]))
    assert done["done_reason"] == "length" and done["stop_sequence"] is None


def test_generation_ends_at_the_context_window(runner: RunnerProcess, mlx_model: Any) -> None:
    prompt = PROMPTS[2]
    n_prompt = len(mlx_model[1].encode(prompt))
    _, done = stream(runner.url, {"prompt": prompt, "options": {"temperature": 0}})  # num_predict -1
    if done["done_reason"] == "length":
        assert done["eval_count"] == NUM_CTX - n_prompt
    assert done["prompt_eval_count"] + done["eval_count"] <= NUM_CTX
    _, capped = stream(runner.url, greedy(prompt, 10_000))
    assert capped["prompt_eval_count"] + capped["eval_count"] <= NUM_CTX


def test_prompt_longer_than_context_is_truncated_unless_refused(runner: RunnerProcess) -> None:
    _, done = stream(runner.url, greedy("hello " * 400, 4))  # Ollama's runner keeps the newest tokens
    assert NUM_CTX // 2 <= done["prompt_eval_count"] <= NUM_CTX - 4 and done["eval_count"] == 4
    r = httpx.post(runner.url + "/completion", json={**greedy("hello " * 400, 4), "truncate": False})
    assert r.status_code == 400
    msg = r.json()["error"]
    assert "tokens" in msg and str(NUM_CTX - 1) in msg and "truncate is false" in msg
    lone = {"messages": [{"role": "user", "content": "hello " * 400}], "options": {"num_predict": 4}}
    r = httpx.post(runner.url + "/completion", json=lone)
    assert r.status_code == 400 and "the last message does not fit" in r.json()["error"]


def test_seeded_sampling_is_reproducible(runner: RunnerProcess) -> None:
    opts: dict[str, Any] = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 42, "num_predict": 24}
    body = {"prompt": PROMPTS[0], "options": opts}
    a, _ = stream(runner.url, body)
    with cf.ThreadPoolExecutor(3) as ex:  # also while batched with other requests
        others = [ex.submit(stream, runner.url, greedy(p, 24)) for p in PROMPTS[1:3]]
        b, _ = stream(runner.url, body)
        [f.result() for f in others]
    assert a == b
    c, _ = stream(runner.url, {**body, "options": {**opts, "seed": 7}})
    assert c != a


def test_penalties_and_filters_are_accepted(runner: RunnerProcess) -> None:
    opts = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.3,
            "repeat_last_n": 16, "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 1,
            "num_predict": 12, "num_gpu": 99}
    _, done = stream(runner.url, {"prompt": PROMPTS[0], "options": opts})
    assert done["eval_count"] <= 12


# -- tokenize ------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(runner: RunnerProcess, mlx_model: Any) -> None:
    _, tok = mlx_model
    text = "Grüße aus 東京 🙂 — the quick brown fox"
    tokens = httpx.post(runner.url + "/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == tok.encode(text, add_special_tokens=False)
    back = httpx.post(runner.url + "/detokenize", json={"tokens": tokens}).json()["content"]
    assert back == tok.decode(tokens) == text


# -- cancellation, status, bad input ---------------------------------------


def test_disconnect_mid_stream_frees_the_slot(runner: RunnerProcess) -> None:
    with httpx.stream("POST", runner.url + "/completion",
                      json={"prompt": PROMPTS[0], "options": {"temperature": 0}}, timeout=30) as r:
        next(r.iter_lines())
    # the connection is closed now; the runner must notice and remove the sequence
    assert wait_for(lambda: httpx.get(runner.url + "/status").json()["active"] == 0)
    assert "cancelled by client disconnect" in runner.log() or \
        "request end" in runner.log().splitlines()[-1]
    stream(runner.url, greedy(PROMPTS[0], 4))  # still serving


def test_status_and_health(runner: RunnerProcess) -> None:
    s = httpx.get(runner.url + "/status").json()
    assert s["status"] == "ok" and s["context_length"] == NUM_CTX and s["num_parallel"] == 4
    assert s["pid"] == runner.proc.pid if runner.proc else False
    assert s["device"] in ("cpu", "gpu") and s["queued"] == 0
    mem = s["memory"]
    assert set(mem) >= {"active", "cache", "peak", "rss", "peak_rss"}
    assert mem["active"] > 0 and mem["rss"] > 0 and mem["peak_rss"] >= mem["rss"]
    assert httpx.get(runner.url + "/health").json() == {"status": "ok"}


def test_status_answers_during_generation(runner: RunnerProcess) -> None:
    with httpx.stream("POST", runner.url + "/completion",
                      json={"prompt": PROMPTS[3], "options": {"temperature": 0}}, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        t0 = time.monotonic()
        s = httpx.get(runner.url + "/status", timeout=10).json()
        assert time.monotonic() - t0 < 5
        assert isinstance(s["active"], int) and s["status"] == "ok"
        for _ in lines:
            pass


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"prompt": ""}).encode(), "empty"),
        (json.dumps({"options": {}}).encode(), "'prompt' or 'messages'"),
        (json.dumps({"prompt": 5}).encode(), "string"),
        (json.dumps({"messages": "hi"}).encode(), "messages"),
        (json.dumps({"prompt": "hi", "options": {"temperature": "hot"}}).encode(), "temperature"),
        (json.dumps({"prompt": "hi", "options": {"num_predict": 1.5}}).encode(), "num_predict"),
        (json.dumps({"prompt": "hi", "options": {"stop": 3}}).encode(), "stop"),
        (json.dumps({"prompt": "hi", "options": []}).encode(), "options"),
    ],
)
def test_bad_completion_input_is_400(runner: RunnerProcess, raw: bytes, want: str) -> None:
    r = httpx.post(runner.url + "/completion", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert want in r.json()["error"]
    assert httpx.get(runner.url + "/health").status_code == 200


def test_bad_tokenize_input_is_400(runner: RunnerProcess) -> None:
    assert httpx.post(runner.url + "/tokenize", json={"content": 3}).status_code == 400
    assert httpx.post(runner.url + "/detokenize", json={"tokens": ["a"]}).status_code == 400
    assert httpx.post(runner.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    r = httpx.get(runner.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    stream(runner.url, greedy(PROMPTS[0], 2))

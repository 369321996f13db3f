"""End-to-end tests of the runner's prompt cache: real runner subprocesses on the tiny
generated model, outputs compared token for token (as text) with mlx_lm's own greedy
generate, which has no cache at all.

One runner serves most tests; the disk-tier tests stop it and start another on the
same kv directory.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_runner import RunnerProcess, stream

NUM_CTX = 256
SYSTEM = "You are a careful assistant. Answer in one short sentence, and never use lists."


def _env(kv_dir: Path, budget: str = "64MiB") -> dict[str, str]:
    return {"CORRAL_PROMPT_CACHE": budget, "CORRAL_KV_DIR": str(kv_dir), "CORRAL_KV_DISK": "64MiB"}


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv") / "tiny"


@pytest.fixture(scope="module")
def runner(tiny_model: Path, kv_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    r = RunnerProcess(tiny_model, tmp_path_factory.mktemp("runner"), "--num-ctx", str(NUM_CTX), env=_env(kv_dir))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def mlx_model(tiny_model: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tok = load(str(tiny_model))[:2]
    return model, tok


def reference(mlx_model: tuple[Any, Any], ids: list[int], n: int) -> str:
    from mlx_lm import generate

    model, tok = mlx_model
    return str(generate(model, tok, ids, max_tokens=n))


def chat_ids(mlx_model: tuple[Any, Any], messages: list[dict[str, str]]) -> list[int]:
    return list(mlx_model[1].apply_chat_template(messages, add_generation_prompt=True))


def ask(url: str, messages: list[dict[str, str]], n: int = 12) -> tuple[str, dict[str, Any]]:
    return stream(url, {"messages": messages, "options": {"temperature": 0, "num_predict": n}})


def cache_status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=5).json()["prompt_cache"])


def check(mlx_model: Any, messages: list[dict[str, str]], text: str, done: dict[str, Any], n: int = 12) -> None:
    """Greedy parity with no cache at all, and honest counts."""
    ids = chat_ids(mlx_model, messages)
    assert text == reference(mlx_model, ids, n)
    assert done["prompt_eval_count"] + done["cached_tokens"] == len(ids)
    assert done["prompt_eval_count"] >= 1


def test_multi_turn_chat_hits_the_cache(runner: RunnerProcess, mlx_model: Any) -> None:
    convo = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where do rivers start?"}]
    text, done = ask(runner.url, convo)
    check(mlx_model, convo, text, done)
    first_len = len(chat_ids(mlx_model, convo))
    for question in ("And where do they end?", "Why are they salty then?"):
        convo = [*convo, {"role": "assistant", "content": text}, {"role": "user", "content": question}]
        text, done = ask(runner.url, convo)
        check(mlx_model, convo, text, done)
        # at least the previous turn's prompt came from the cache
        assert done["cached_tokens"] >= first_len - 1, done
        first_len = len(chat_ids(mlx_model, convo))
    status = cache_status(runner.url)
    assert status["hits"] >= 2 and 0 < status["bytes"] <= status["budget"]


def test_partial_prefix_hit(runner: RunnerProcess, mlx_model: Any) -> None:
    base = [{"role": "system", "content": SYSTEM + " Partial."}]
    a = [*base, {"role": "user", "content": "Tell me about owls at night."}]
    b = [*base, {"role": "user", "content": "Tell me about cats by day."}]
    text, done = ask(runner.url, a)
    check(mlx_model, a, text, done)
    text, done = ask(runner.url, b)
    check(mlx_model, b, text, done)
    ia, ib = chat_ids(mlx_model, a), chat_ids(mlx_model, b)
    common = next(i for i, (x, y) in enumerate(zip(ia, ib, strict=False)) if x != y)
    assert done["cached_tokens"] == common  # the shared part, trimmed from a's longer entry


def test_shared_system_prompt_across_concurrent_users(runner: RunnerProcess, mlx_model: Any) -> None:
    system = {"role": "system", "content": SYSTEM + " Shared by everyone in this test, word for word."}
    long_one = [system, {"role": "user", "content": "Write a long story."}]
    n_long = NUM_CTX - len(chat_ids(mlx_model, long_one)) - 1
    body = {"messages": long_one, "options": {"temperature": 0, "num_predict": n_long}}
    with httpx.stream("POST", runner.url + "/completion", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))  # the long one is decoding now
        assert "error" not in first
        users = [[system, {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(3)]
        with cf.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda m: ask(runner.url, m), users))
        long_text = first["content"] + "".join(json.loads(line)["content"] for line in lines)
    assert long_text == reference(mlx_model, chat_ids(mlx_model, long_one), n_long)
    for messages, (text, done) in zip(users, results, strict=True):
        check(mlx_model, messages, text, done)  # parity while sharing the batch
        assert done["cached_tokens"] > 0, done  # the system prompt came from a live sequence or the cache


def test_exact_repeat_leaves_one_token_to_evaluate(runner: RunnerProcess, mlx_model: Any) -> None:
    msgs = [{"role": "user", "content": "Repeat after me: the same prompt twice."}]
    ask(runner.url, msgs)
    text, done = ask(runner.url, msgs)
    check(mlx_model, msgs, text, done)
    assert done["prompt_eval_count"] == 1


def test_disk_tier_survives_a_restart(runner: RunnerProcess, tiny_model: Path, kv_dir: Path, mlx_model: Any,
                                      tmp_path: Path) -> None:
    convo = [{"role": "system", "content": SYSTEM + " Disk."}, {"role": "user", "content": "Name a color."}]
    text, _ = ask(runner.url, convo)
    runner.stop()  # SIGTERM: writes the most recently used caches
    files = list(kv_dir.glob("*.safetensors"))
    assert files, runner.log()
    assert "prompt cache: wrote" in runner.log()
    (kv_dir / "garbage.safetensors").write_bytes(b"not a safetensors file at all")

    again = RunnerProcess(tiny_model, tmp_path, "--num-ctx", str(NUM_CTX), env=_env(kv_dir)).start()
    try:
        convo = [*convo, {"role": "assistant", "content": text}, {"role": "user", "content": "Another one?"}]
        text2, done = ask(again.url, convo)
        check(mlx_model, convo, text2, done)
        assert done["cached_tokens"] > 0, again.log()
        status = cache_status(again.url)
        assert status["disk_loaded"] >= 1 and status["disk_rejected"] == 1
        assert not (kv_dir / "garbage.safetensors").exists()  # a bad file is deleted
    finally:
        again.stop()


def test_file_for_another_model_is_rejected(tiny_model: Path, kv_dir: Path, tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, save_prompt_cache

    kv_dir.mkdir(parents=True, exist_ok=True)
    wrong = KVCache()
    wrong.update_and_fetch(mx.zeros((1, 3, 4, 5)), mx.zeros((1, 3, 4, 5)))  # wrong heads and head dim
    save_prompt_cache(str(kv_dir / "wrong.safetensors"), [wrong, wrong],
                      {"format": "corral-kv-1", "key": "someone-else", "tokens": "[1, 2, 3, 4]"})
    r = RunnerProcess(tiny_model, tmp_path, "--num-ctx", str(NUM_CTX), env=_env(kv_dir)).start()
    try:
        assert cache_status(r.url)["disk_rejected"] >= 1
        assert not (kv_dir / "wrong.safetensors").exists()
    finally:
        r.stop()


def test_cache_off_evaluates_everything(tiny_model: Path, tmp_path: Path, mlx_model: Any) -> None:
    r = RunnerProcess(tiny_model, tmp_path, "--num-ctx", str(NUM_CTX), env={"CORRAL_PROMPT_CACHE": "0"}).start()
    try:
        msgs = [{"role": "user", "content": "No cache here."}]
        for _ in range(2):
            text, done = ask(r.url, msgs)
            check(mlx_model, msgs, text, done)
            assert done["cached_tokens"] == 0
        assert cache_status(r.url)["bytes"] == 0
    finally:
        r.stop()


def test_sigterm_write_is_bounded(runner: RunnerProcess) -> None:
    # The module runner was stopped above; its stop (drain + disk write) took well under
    # the supervisor's SIGTERM grace.
    from corral.runner.__main__ import KV_SAVE_S, SHUTDOWN_GRACE_S
    from corral.supervisor.process import STOP_GRACE

    assert SHUTDOWN_GRACE_S + KV_SAVE_S < STOP_GRACE
    t0 = time.monotonic()
    runner.stop()
    assert time.monotonic() - t0 < STOP_GRACE


def test_estimate_covers_peak_with_a_full_cache(tiny_model: Path, tmp_path: Path) -> None:
    from corral.supervisor.manifest import read_manifest
    from corral.supervisor.memory import estimate_need

    budget = "3MiB"
    r = RunnerProcess(tiny_model, tmp_path, "--num-ctx", str(NUM_CTX), "--num-parallel", "4",
                      env={"CORRAL_PROMPT_CACHE": budget}).start()
    try:
        prompts = [f"Story number {i}: " + "once upon a time, " * 6 for i in range(24)]
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: stream(r.url, {"prompt": p, "options": {"temperature": 0, "num_predict": 120}}),
                          prompts))
        status = httpx.get(r.url + "/status", timeout=5).json()
    finally:
        r.stop()
    cache = status["prompt_cache"]
    assert cache["budget"] == 3 << 20
    assert 0.6 * cache["budget"] < cache["bytes"] <= cache["budget"]  # full, and within its budget
    need = estimate_need(read_manifest(tiny_model), NUM_CTX, 4, prompt_cache=budget)
    assert status["memory"]["peak_rss"] <= need.total

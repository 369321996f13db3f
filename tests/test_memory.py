"""supervisor.memory: the estimate bounds real peaks; footprints; the probe.

The bound is checked for real: each test model is run at full context and
full batch (and the tiny one at a long context), in a subprocess with mlx_lm's BatchGenerator (the code the runner
batches with) and in the real runner subprocess, and the measured peak RSS
must lie in [estimate / 1.5, estimate].
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from corral.supervisor.manifest import read_manifest
from corral.supervisor.memory import (
    RUNTIME_BYTES,
    NeedEstimate,
    SystemMemoryProbe,
    estimate_need,
    footprint,
    reported_bytes,
)

from tests.support.models import make_model

ROOT = Path(__file__).resolve().parents[1]
CALIBRATE = ROOT / "scripts" / "calibrate_memory.py"
NUM_CTX, NUM_PARALLEL = 256, 4
HAVE_RUNNER = (ROOT / "runner" / "__main__.py").exists()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wider and deeper than tiny: hidden 256, 4 layers (11.5 MB of float32 weights)."""
    return make_model(tmp_path_factory.mktemp("models") / "big", "--hidden", "256", "--layers", "4")


@pytest.fixture(params=["tiny", "q4", "big"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    name = {"tiny": "tiny_model", "q4": "tiny_q4_model", "big": "big_model"}[request.param]
    path: Path = request.getfixturevalue(name)
    return path


def check_bound(model: Path, peak: int) -> None:
    est = estimate_need(read_manifest(model), NUM_CTX, NUM_PARALLEL)
    mib = 1024 * 1024
    detail = f"{model.name}: peak {peak / mib:.1f} MiB, estimate {est.total / mib:.1f} MiB ({est})"
    print(f"{detail[: detail.index('(')]}ratio {est.total / peak:.2f}")
    assert peak <= est.total, "peak above estimate: " + detail
    assert est.total <= 1.5 * peak, "estimate too loose: " + detail


# --- measured bounds ------------------------------------------------------------------


def test_estimate_bounds_batch_generator_peak(model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(CALIBRATE), str(model_dir), "--num-ctx", str(NUM_CTX), "--num-parallel", str(NUM_PARALLEL)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["generated"] == 16 * NUM_PARALLEL
    check_bound(model_dir, result["peak_rss"])


def test_estimate_bounds_a_long_context_peak(tiny_model: Path) -> None:
    """At long contexts the CPU's attention scores dominate: the estimate still bounds
    the peak, within 1.5x (scripts/calibrate_memory.py --table goes to 20000 tokens)."""
    out = subprocess.run(
        [sys.executable, str(CALIBRATE), str(tiny_model), "--num-ctx", "8192", "--num-parallel", "1"],
        check=True, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    est = estimate_need(read_manifest(tiny_model), 8192, 1, device="cpu").total
    assert result["peak_rss"] <= est <= 1.5 * result["peak_rss"], (result, est)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def runner(model_dir: Path) -> Iterator[tuple[Path, str]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_RUNNER_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.runner", "--model", str(model_dir), "--port", str(port),
         "--num-ctx", str(NUM_CTX), "--num-parallel", str(NUM_PARALLEL)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"runner exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "runner did not become healthy"
            time.sleep(0.2)
        yield model_dir, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _filling_prompt(url: str, seed: int, budget: int) -> str:
    """Text of at most `budget` tokens and close to it, different per seed."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "server", "memory", "batch"]
    text = " ".join(words[(seed + i * 7) % len(words)] for i in range(budget * 2))
    tokens = httpx.post(url + "/tokenize", json={"content": text}, timeout=30).json()["tokens"]
    cut = httpx.post(url + "/detokenize", json={"tokens": tokens[: budget - 4]}, timeout=30).json()["content"]
    assert len(httpx.post(url + "/tokenize", json={"content": cut}, timeout=30).json()["tokens"]) <= budget
    return str(cut)


def _complete(url: str, prompt: str) -> dict[str, Any]:
    body = {"prompt": prompt, "options": {"temperature": 0, "num_predict": 16}}
    last: dict[str, Any] = {}
    with httpx.stream("POST", url + "/completion", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                last = json.loads(line)
    return last


@pytest.mark.skipif(not HAVE_RUNNER, reason="runner/__main__.py not present yet")
def test_estimate_bounds_runner_peak(runner: tuple[Path, str]) -> None:
    model, url = runner
    prompts = [_filling_prompt(url, i, NUM_CTX - 16) for i in range(NUM_PARALLEL)]
    with ThreadPoolExecutor(NUM_PARALLEL) as pool:
        finals = list(pool.map(lambda p: _complete(url, p), prompts))
    assert all(f.get("done") for f in finals), finals
    assert all(f["prompt_eval_count"] + f["eval_count"] >= NUM_CTX - 24 for f in finals), finals
    status = httpx.get(url + "/status", timeout=10).json()
    check_bound(model, int(status["memory"]["peak_rss"]))


# --- the formula ----------------------------------------------------------------------------


def test_estimate_parts(tiny_model: Path) -> None:
    m = read_manifest(tiny_model)
    e = estimate_need(m, 1024, 2)
    assert isinstance(e, NeedEstimate)
    assert e.weights == m.weight_bytes
    assert e.kv == m.kv_bytes_per_token * 1024 * 2
    assert e.total == e.weights + e.kv + e.overhead + e.prompt_cache  # the cache budget is charged
    assert e.prompt_cache == (e.weights + e.kv) // 4  # the default, 25% of the model's memory
    assert e.overhead >= RUNTIME_BYTES


def test_estimate_grows_with_context_batch_and_size(tiny_model: Path) -> None:
    m = read_manifest(tiny_model)
    base = estimate_need(m, 512, 2).total
    assert estimate_need(m, 1024, 2).total > base
    assert estimate_need(m, 512, 4).total > base
    bigger = replace(m, weight_bytes=m.weight_bytes * 10, vocab_size=m.vocab_size * 100)
    assert estimate_need(bigger, 512, 2).total > base
    assert estimate_need(m, 0, 0) == estimate_need(m, 1, 1)  # nonsense shapes clamp, never crash


def test_realistic_8b_estimate_is_plausible(tiny_model: Path) -> None:
    # Llama-3-8B at 4 bits: ~4.5 GB of weights, 128 KiB of bf16 KV per token.
    m = replace(read_manifest(tiny_model), weight_bytes=4_500_000_000, dtype="bfloat16", num_layers=32,
                kv_heads=8, head_dim=128, kv_bytes_per_token=2 * 32 * 8 * 128 * 2, hidden_size=4096,
                num_heads=32, intermediate_size=14336, vocab_size=128256)
    e = estimate_need(m, 4096, 1)
    assert e.kv == 512 * 1024 * 1024
    assert 5e9 < e.total < 9e9


# --- footprint and probe --------------------------------------------------------------------


def test_footprint_cpu_counts_rss_only() -> None:
    status = {"device": "cpu", "memory": {"active": 500, "cache": 300, "peak": 900, "rss": 1000, "peak_rss": 2000}}
    assert reported_bytes(status) == 1000
    assert footprint(800, status) == 1000
    assert footprint(5000, status) == 5000


def test_footprint_gpu_adds_device_buffers() -> None:
    status = {"device": "gpu", "memory": {"active": 500, "cache": 300, "peak": 900, "rss": 1000}}
    assert reported_bytes(status) == 1800
    assert footprint(1000, status) == 1800
    assert footprint(4000, status) == 4000


@pytest.mark.parametrize("status", [{}, {"memory": None}, {"memory": {"rss": "x"}}, {"memory": {"rss": -5}},
                                    {"memory": {"rss": True}}, {"device": "gpu", "memory": {}}])
def test_footprint_with_odd_status_falls_back_to_estimate(status: dict[str, Any]) -> None:
    assert footprint(1234, status) == 1234


def test_system_probe() -> None:
    probe = SystemMemoryProbe()
    total, avail = probe.total(), probe.available()
    assert 0 < avail <= total
    assert total == psutil.virtual_memory().total

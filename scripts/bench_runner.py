"""Benchmark the runner against mlx_lm in-process, on generated models.

Prints, from one run, for each model (by default the small 64x2 one, where
per-token costs cannot hide, and the 512x8 one):
  * decode tokens/s of one stream through the runner's HTTP vs
    mlx_lm.stream_generate in this process (target ratio >= 0.95), and the
    same ratio for `mlx_lm.server` (SSE) as the peer;
  * aggregate tokens/s at 1, 2, 4, 8 concurrent streams through HTTP vs the
    same counts through mlx_lm's BatchGenerator in this process (target ratio
    at 4 streams >= 0.85), with mlx_lm.server's ratio beside it.

Greedy decoding with the same prompts on every side. Each figure is the best
of --repeats runs, the sides alternating (the box may be shared).

Usage: python scripts/bench_runner.py [--models 64x2:256,512x8:64] [--no-peer]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_peer import CLIENT, mlx_lm_server, sse_aggregate, sse_completion
from corral.runner.protocol import SOLO_ENV
from corral.supervisor.process import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over",
    "Once upon a time there was a small model",
    "A model server keeps models in memory",
    "Continuous batching decodes several sequences",
    "Numbers: 0 1 2 3 4 5 6 7 8 9",
    "The supervisor evicts idle models when",
    "It is sunny and warm. What is the weather",
]
CONCURRENCY = (1, 2, 4, 8)


def make_model(out: Path, hidden: int, layers: int) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_model.py"), str(out),
                    "--hidden", str(hidden), "--layers", str(layers), "--heads", "8"],
                   check=True, capture_output=True)
    return out


def start_runner(model: Path, num_parallel: int, log: Path,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "corral.runner", "--model", str(model), "--port", str(port),
                             "--num-parallel", str(num_parallel)], cwd=ROOT, stderr=log.open("wb"),
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"runner exited: {log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("runner did not start")


def http_stream(url: str, prompt: str, n: int) -> dict[str, Any]:
    body = {"prompt": prompt, "options": {"temperature": 0, "num_predict": n}}
    last: dict[str, Any] = {}
    with CLIENT.stream("POST", url + "/completion", json=body) as r:
        for line in r.iter_lines():
            last = json.loads(line)
    return last


def http_single(url: str, n: int) -> tuple[float, float]:
    """Decode tokens/s of one stream as the client sees it: after the first line, and
    over the whole request (a held-back first line sent in a burst inflates the first)."""
    body = {"prompt": PROMPTS[0], "options": {"temperature": 0, "num_predict": n}}
    count, first, end = 0, 0.0, 0.0
    t0 = time.perf_counter()
    with CLIENT.stream("POST", url + "/completion", json=body) as r:
        for line in r.iter_lines():
            d = json.loads(line)
            if d.get("done"):
                end = time.perf_counter()
                count = d["eval_count"]
            elif not first:
                first = time.perf_counter()
    return (count - 1) / (end - first), count / (end - t0)


def http_aggregate(url: str, k: int, n: int) -> float:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(k) as ex:
        done = list(ex.map(lambda p: http_stream(url, p, n), PROMPTS[:k]))
    return sum(d["eval_count"] for d in done) / (time.perf_counter() - t0)


def local_single(model: Any, tok: Any, n: int) -> tuple[float, float]:
    from mlx_lm import stream_generate

    count, first, end = 0, 0.0, 0.0
    t0 = time.perf_counter()
    for _ in stream_generate(model, tok, PROMPTS[0], max_tokens=n):
        if not first:
            first = time.perf_counter()
        count += 1
        end = time.perf_counter()
    return (count - 1) / (end - first), count / (end - t0)


def local_aggregate(model: Any, tok: Any, k: int, n: int, *, text: bool = False) -> float:
    """Aggregate tokens/s of k sequences in one BatchGenerator in this process. With
    text, each sequence's tokens also go through a streaming detokenizer, as any
    server (this one, mlx_lm.server) must do to send text: the bare figure is the
    target's baseline, this one shows how much of a gap is making text."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[[t] for t in tok.eos_token_ids],
                         completion_batch_size=k, prefill_batch_size=k)
    prompts = [tok.encode(p) for p in PROMPTS[:k]]
    t0 = time.perf_counter()
    uids = gen.insert(prompts, max_tokens=[n] * k)
    detok = {uid: tok.detokenizer for uid in uids} if text else {}
    for d in detok.values():
        d.reset()
    total, left = 0, k
    while left:
        for r in gen.next_generated():
            if r.token not in tok.eos_token_ids:
                total += 1
                if text:
                    detok[r.uid].add_token(r.token)
                    _ = detok[r.uid].last_segment
            if r.finish_reason is not None:
                left -= 1
    elapsed = time.perf_counter() - t0
    gen.close()
    return total / elapsed


def _best(runs: list[Any]) -> Any:
    """The highest of each figure over the runs (runs are floats or tuples of floats)."""
    if isinstance(runs[0], tuple):
        return tuple(max(col) for col in zip(*runs, strict=True))
    return max(runs)


def best_pair(http: Any, local: Any, repeats: int) -> tuple[Any, Any]:
    # Alternate the two sides so load from other processes hits both alike.
    hs, ls = [], []
    for _ in range(repeats):
        hs.append(http())
        ls.append(local())
    return _best(hs), _best(ls)


def best(fn: Any, repeats: int) -> Any:
    return _best([fn() for _ in range(repeats)])


def parse_models(text: str, default_tokens: int) -> list[tuple[int, int, int]]:
    """"64x2:256,512x8" -> [(64, 2, 256), (512, 8, default_tokens)]."""
    out = []
    for item in text.split(","):
        shape, _, tokens = item.partition(":")
        hidden, layers = shape.lower().split("x")
        out.append((int(hidden), int(layers), int(tokens or default_tokens)))
    return out


def bench_model(tmp: Path, hidden: int, layers: int, n: int, reps: int, peer: bool) -> None:
    from mlx_lm import load

    model_dir = make_model(tmp / f"bench-{hidden}x{layers}", hidden, layers)
    model, tok = load(str(model_dir))[:2]
    proc, url = start_runner(model_dir, max(CONCURRENCY), tmp / f"runner-{hidden}x{layers}.log")
    # The same runner with a lone sequence decoded in the BatchGenerator too, to
    # show what the solo path (runner/solo.py) is worth
    batched, batched_url = start_runner(model_dir, max(CONCURRENCY), tmp / f"runner-{hidden}x{layers}-b.log",
                                        {SOLO_ENV: "0"})
    with contextlib.ExitStack() as stack:
        peer_url = stack.enter_context(mlx_lm_server(model_dir, tmp / "peer.log")) if peer else None
        try:
            print(f"\nmodel: llama hidden {hidden}, {layers} layers; {n} tokens per stream; "
                  f"best of {reps}, alternating; device {httpx.get(url + '/status').json()['device']}")
            http_stream(url, PROMPTS[0], 8)  # warm up every side
            local_single(model, tok, 8)
            (h1, hw), (l1, lw) = best_pair(lambda: http_single(url, n), lambda: local_single(model, tok, n), reps)
            print(f"single stream decode: runner HTTP {h1:8.1f} tok/s | mlx_lm.stream_generate "
                  f"{l1:8.1f} tok/s | ratio {h1 / l1:.3f} (target >= 0.95); whole request {hw / lw:.3f}")
            http_single(batched_url, n)
            (b1, bw), (l1, lw) = best_pair(lambda: http_single(batched_url, n),
                                           lambda: local_single(model, tok, n), reps)
            print(f"  {SOLO_ENV}=0 (batched) {b1:8.1f} tok/s | ratio {b1 / l1:.3f}; whole request {bw / lw:.3f}")
            if peer_url:
                sse_completion(peer_url, PROMPTS[0], 8)
                p1, pw = best(lambda: tuple(sse_completion(peer_url, PROMPTS[0], n)[k] for k in ("tps", "whole")),
                              reps)
                print(f"  peer mlx_lm.server  {p1:8.1f} tok/s | ratio {p1 / l1:.3f}; whole request {pw / lw:.3f}")
            for k in CONCURRENCY:
                hk, lk = best_pair(lambda k=k: http_aggregate(url, k, n),
                                   lambda k=k: local_aggregate(model, tok, k, n), reps)
                line = (f"{k} streams aggregate:  runner HTTP {hk:8.1f} tok/s | BatchGenerator "
                        f"{lk:8.1f} tok/s | ratio {hk / lk:.3f}")
                if peer_url:
                    pk = best(lambda k=k: sse_aggregate(peer_url, PROMPTS[:k], n), reps)
                    line += f" | mlx_lm.server {pk:8.1f} tok/s, ratio {pk / lk:.3f}"
                print(line + ("  (target >= 0.85)" if k == 4 else ""), flush=True)
        finally:
            for p in (proc, batched):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="64x2:256,512x8:64",
                   help="comma-separated HIDDENxLAYERS[:TOKENS], measured one after the other")
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream where --models gives none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="skip mlx_lm.server")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        for hidden, layers, n in parse_models(args.models, args.tokens):
            bench_model(Path(tmp), hidden, layers, n, args.repeats, not args.no_peer)
    os._exit(0)


if __name__ == "__main__":
    main()

"""Benchmark embeddings through corral's HTTP API against the same model in-process.

Prints inputs/s at batch 1 and batch 32 (inputs per request):
  * HTTP: POST /api/embed to a real `corral serve` (supervisor -> runner ->
    batching thread), one request at a time, the model already loaded;
  * in-process: the runner's own EmbeddingModel in this process (tokenize,
    one forward pass, vectors to Python lists), with no HTTP at all;
and their ratio (target >= 0.90 at batch 32). The two sides alternate and
each figure is the best of --repeats runs (the box may be shared).

Usage: python scripts/bench_embed.py [--family bert --hidden 384 --layers 6 --seconds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
REPO = "corral-bench/embed"
SENTENCE = ("A model server keeps models in memory and answers requests for them; "
            "the supervisor evicts idle models when memory is tight.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def texts(n: int, offset: int = 0) -> list[str]:
    """Distinct inputs of 20-40 words."""
    words = SENTENCE.split()
    return [" ".join(words[(i + offset) % 7:] + words[: 8 + (i + offset) % 13]) for i in range(n)]


def make_model(cache: Path, args: argparse.Namespace) -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_embed_model.py"), "--hf-cache", str(cache),
                          "--repo", REPO, "--family", args.family, "--hidden", str(args.hidden),
                          "--layers", str(args.layers), "--heads", str(max(1, args.hidden // 64))],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def start_server(home: Path, cache: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CORRAL_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "CORRAL_HOST": f"127.0.0.1:{port}", "CORRAL_KEEP_ALIVE": "-1"}
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "serve"], cwd=ROOT, env=env,
                            stdout=(home / "server.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not start")


def rate(run: Callable[[list[str]], object], batch: int, seconds: float) -> float:
    """Inputs per second of `run` over batches of `batch` distinct inputs, for about `seconds`."""
    run(texts(batch))  # warm-up: compiled kernels, allocator pools
    done, i = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(texts(batch, offset=i))
        done += batch
        i += 1
    return done / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["bert", "roberta", "nomic", "modernbert", "qwen3"], default="bert")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from corral.runner.embed_spec import embedding_spec
    from corral.runner.embedding import EmbeddingModel, TokenizerView

    with tempfile.TemporaryDirectory() as tmp:
        cache, home = Path(tmp) / "hub", Path(tmp) / "home"
        home.mkdir()
        snapshot = make_model(cache, args)
        spec = embedding_spec(snapshot)
        assert spec is not None
        model = EmbeddingModel(snapshot, spec)
        tok = TokenizerView(model.tokenizer, model.max_tokens)

        def in_process(inputs: list[str]) -> object:
            return model.embed_batch(tok.encode_inputs(inputs, truncate=True)).tolist()

        proc, url = start_server(home, cache)
        client = httpx.Client(base_url=url, timeout=600)

        def over_http(inputs: list[str]) -> object:
            r = client.post("/api/embed", json={"model": REPO, "input": inputs})
            r.raise_for_status()
            return r.json()["embeddings"]

        try:
            over_http(["load the model"])
            print(f"model: {args.family} hidden {args.hidden} x {args.layers} layers, float32; "
                  f"inputs {len(tok.encode_inputs(texts(1), truncate=True)[0])}+ tokens")
            for batch in (1, 32):
                http_best = local_best = 0.0
                for _ in range(args.repeats):
                    http_best = max(http_best, rate(over_http, batch, args.seconds))
                    local_best = max(local_best, rate(in_process, batch, args.seconds))
                print(f"batch {batch:>2}: HTTP {http_best:8.1f} inputs/s   in-process {local_best:8.1f} inputs/s"
                      f"   ratio {http_best / local_best:.3f}")
        finally:
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

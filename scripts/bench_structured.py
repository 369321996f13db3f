"""Benchmark constrained decoding against free decoding, on one generated model.

Prints, from one run, side by side:
  * decode tokens/s of one grammar-constrained stream vs one free stream
    through the runner's HTTP (target ratio >= 0.90);
  * aggregate tokens/s of 4 streams, 2 constrained + 2 free, vs 4 free
    (target ratio >= 0.85).

The constrained streams ask for a JSON string of at least 8 characters per
token (`format: {"type": "string", "minLength": ...}`), so that the grammar is
live for every one of the --tokens tokens and each stream ends by length,
exactly as long as the free ones. Greedy decoding on both sides; each figure
is the best of --repeats runs, alternated (the box may be shared).

Usage: python scripts/bench_structured.py [--hidden 512 --layers 8 --tokens 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import PROMPTS, make_model, start_runner


def _body(prompt: str, n: int, constrained: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "options": {"temperature": 0, "num_predict": n}}
    if constrained:
        body["format"] = {"type": "string", "minLength": 8 * n}
    return body


def stream(url: str, prompt: str, n: int, constrained: bool) -> tuple[int, float, float]:
    """(tokens, time of the first text line, time of the done line)."""
    first, count = 0.0, 0
    with httpx.stream("POST", url + "/completion", json=_body(prompt, n, constrained), timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            d = json.loads(line)
            if "error" in d:
                raise SystemExit(f"runner error: {d['error']}")
            if d.get("done"):
                count = d["eval_count"]
                if d["done_reason"] != "length":
                    raise SystemExit(f"a stream ended early ({d['done_reason']}); use fewer --tokens")
                return count, first, time.perf_counter()
            if not first:
                first = time.perf_counter()
    raise SystemExit("stream ended without a done line")


def single(url: str, n: int, constrained: bool) -> float:
    count, first, end = stream(url, PROMPTS[0], n, constrained)
    return (count - 1) / (end - first)


def aggregate(url: str, n: int, constrained: int) -> float:
    """Tokens/s of 4 concurrent streams, the first `constrained` of them constrained."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(4) as ex:
        done = list(ex.map(lambda i: stream(url, PROMPTS[i], n, i < constrained), range(4)))
    return sum(d[0] for d in done) / (time.perf_counter() - t0)


def best_pair(a: Any, b: Any, repeats: int) -> tuple[float, float]:
    xs, ys = [], []
    for _ in range(repeats):
        xs.append(a())
        ys.append(b())
    return max(xs), max(ys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    n, reps = args.tokens, args.repeats

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "bench", args.hidden, args.layers)
        proc, url = start_runner(model_dir, 4, Path(tmp) / "runner.log")
        try:
            print(f"model: llama hidden {args.hidden}, {args.layers} layers; {n} tokens per stream; "
                  f"best of {reps}, alternating; device {httpx.get(url + '/status').json()['device']}")
            stream(url, PROMPTS[0], 8, True)  # warm up: compiles and caches the grammar
            stream(url, PROMPTS[0], 8, False)
            c1, f1 = best_pair(lambda: single(url, n, True), lambda: single(url, n, False), reps)
            print(f"single stream decode: constrained {c1:8.1f} tok/s | free {f1:8.1f} tok/s | "
                  f"ratio {c1 / f1:.3f} (target >= 0.90)")
            mixed, free = best_pair(lambda: aggregate(url, n, 2), lambda: aggregate(url, n, 0), reps)
            print(f"4 streams aggregate:  2 constrained + 2 free {mixed:8.1f} tok/s | 4 free "
                  f"{free:8.1f} tok/s | ratio {mixed / free:.3f} (target >= 0.85)")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    os._exit(0)


if __name__ == "__main__":
    main()

"""The peer the benchmarks measure in the same run: `mlx_lm.server` (issue 16).

`python -m mlx_lm.server --model DIR --port P` serves /v1/completions with
server-sent events; one `data: {...}` event per piece of text, then
`data: [DONE]`. With stream_options.include_usage it reports how many tokens
it generated, so its decode rate is measured exactly as ours: tokens after the
first over the time from the first text to the last.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from corral.supervisor.process import free_port

CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
"""One HTTP client for every benchmark request, as real clients keep one: a new
httpx client per request builds a TLS context (tens of ms of CPU), which on a
2-core box takes time from the server being measured, not only from the client."""


@contextmanager
def mlx_lm_server(model: Path, log: Path) -> Iterator[str]:
    """A running `mlx_lm.server` on `model`; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model),
                                 "--port", str(port), "--log-level", "WARNING"],
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, url, log)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlx_lm.server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("mlx_lm.server did not start")


def sse_completion(url: str, prompt: str, n: int) -> dict[str, float]:
    """One streamed /v1/completions, greedy: ttft, tokens, decode tok/s after the first text."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with CLIENT.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event: dict[str, Any] = json.loads(line[6:])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                last = time.perf_counter()
                first = first or last
    return {"ttft": first - t0, "tokens": tokens,
            "tps": (tokens - 1) / (last - first) if last > first else float("nan"),
            "whole": tokens / (time.perf_counter() - t0)}


def sse_aggregate(url: str, prompts: list[str], n: int) -> float:
    """Aggregate generated tokens/s of len(prompts) concurrent streams."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        done = list(ex.map(lambda p: sse_completion(url, p, n), prompts))
    return sum(d["tokens"] for d in done) / (time.perf_counter() - t0)

"""Load benchmark: one-token requests from many concurrent clients (issue 16).

Starts `corral serve` on a generated model, loads it, then for each level of
concurrency runs that many clients at once, each an official `ollama`
AsyncClient (its own connection pool, as separate programs would have) sending
one-token /api/generate requests back to back. Prints per level: requests/s,
p50 and p99 latency, and errors (any exception or error reply; a connection
dropped without a response counts here too), and the CPU time the
supervisor and its runners spent per request (steadier than wall time on a
shared machine, and it says which process the time goes to).

Targets: 0 errors at every level; req/s at 256 clients >= req/s at 16.

Usage: python scripts/bench_load.py [--hidden 64 --layers 2 --clients 1,16,64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ollama
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_supervisor import make_model, server

PROMPT = "Once upon a time"
MODEL = "bench/load"


@dataclass
class Level:
    clients: int
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: tuple[float, float, float] = (0.0, 0.0, 0.0)  # seconds: supervisor, runners, the clients

    def row(self) -> str:
        ok = sorted(self.latencies)
        p50 = statistics.median(ok) * 1000 if ok else float("nan")
        p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1000 if ok else float("nan")
        kinds = ", ".join(f"{k} x{n}" for k, n in self.errors.items())
        per = 1000 / max(1, len(ok))
        return (f"{self.clients:7d} {len(ok) / self.elapsed:9.1f} {p50:9.1f} {p99:9.1f} "
                f"{sum(self.errors.values()):7d} {self.cpu[0] * per:10.2f} {self.cpu[1] * per:10.2f} "
                f"{self.cpu[2] * per:10.2f}"
                + (f"  ({kinds})" if kinds else ""))


def cpu_seconds() -> tuple[float, float, float]:
    """CPU time so far of the supervisor (this script's child), of its runners, and of
    this script (the clients: on a 2-core box their CPU is taken from the server's)."""
    sup = run = 0.0
    for child in psutil.Process().children():
        try:
            t = child.cpu_times()
            sup += t.user + t.system
            for runner in child.children(recursive=True):
                rt = runner.cpu_times()
                run += rt.user + rt.system
        except psutil.NoSuchProcess:
            continue
    me = psutil.Process().cpu_times()
    return sup, run, me.user + me.system


async def one_client(url: str, requests: int, level: Level, start: asyncio.Event) -> None:
    client = ollama.AsyncClient(host=url)
    await start.wait()
    for _ in range(requests):
        t0 = time.perf_counter()
        try:
            await client.generate(model=MODEL, prompt=PROMPT, raw=True,
                                  options={"num_predict": 1, "temperature": 0})
        except Exception as e:  # every failure is a result here, never a crash
            level.errors[type(e).__name__] += 1
        else:
            level.latencies.append(time.perf_counter() - t0)
    await client._client.aclose()


async def run_level(url: str, clients: int, total: int) -> Level:
    level = Level(clients)
    per_client = max(1, total // clients)
    start = asyncio.Event()
    tasks = [asyncio.create_task(one_client(url, per_client, level, start)) for _ in range(clients)]
    await asyncio.sleep(0.2)  # every client built before the clock starts
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    level.elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds()
    level.cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], cpu1[2] - cpu0[2])
    return level


async def run(url: str, levels: list[int], total: int) -> None:
    await ollama.AsyncClient(host=url).generate(model=MODEL, prompt=PROMPT, raw=True,
                                                options={"num_predict": 1})  # load + warm
    print(f"{'clients':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
          f"{'sup cpu ms':>10} {'run cpu ms':>10} {'cli cpu ms':>10}  (CPU per request)")
    for clients in levels:
        print((await run_level(url, clients, max(total, 2 * clients))).row(), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--clients", default="1,16,64,256", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=512, help="requests per level (at least 2 per client)")
    ap.add_argument("--num-parallel", type=int, default=4)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="corral-load-") as tmp:
        cache = Path(tmp) / "hub"
        make_model(cache, MODEL, "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", "8")
        print(f"model: {args.hidden}x{args.layers} float32; one-token /api/generate, "
              f"num_parallel {args.num_parallel}, official ollama AsyncClient per client")
        with server(Path(tmp) / "home", cache, CORRAL_NUM_PARALLEL=str(args.num_parallel)) as url:
            asyncio.run(run(url, levels, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())

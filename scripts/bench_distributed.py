"""Benchmark a model on 1 rank against the same model on 2 ranks (mlx.launch, ring backend).

Both runners are real subprocesses started the way the supervisor starts them
(supervisor.process.RunnerProcess and DistributedRunner, the 2 ranks on
127.0.0.1). For each, side by side in one run:
  * start: spawn to /health ready (interpreter start, imports, loading; no standby);
  * TTFT: time to the first streamed text of a greedy request (best of --repeats);
  * decode tok/s: the runner's own eval_count / eval_duration (best of --repeats);
  * evict: SIGTERM to every process reaped.
On one machine over loopback the 2-rank path is expected to be slower: each
step adds collectives (tensor: an all_sum per sharded layer; pipeline: a send
and an all_gather) and one all_sum to keep the ranks in step, and both ranks
share this machine's cores. The point of 2 ranks is memory (each holds half the
weights), for a model that does not fit one machine.

Usage: python scripts/bench_distributed.py [--hidden 512 --layers 4 --tokens 64 --mode tensor]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.runner.protocol import Chunk, Done, RunnerRequest
from corral.supervisor.config import HostSpec
from corral.supervisor.process import DistributedRunner, RunnerProcess

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "Once upon a time there was a small model that wanted to speak."


def make_model(out: Path, args: argparse.Namespace) -> Path:
    family = "qwen2" if args.mode == "pipeline" else "llama"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_model.py"), str(out), "--family", family,
                    "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads)],
                   check=True, capture_output=True)
    return out


async def one_request(runner: RunnerProcess, tokens: int) -> tuple[float, float]:
    """(seconds to the first text, decode tokens/s as the runner measured it)."""
    t0 = time.perf_counter()
    first = 0.0
    request = RunnerRequest({"num_predict": tokens, "temperature": 0}, prompt=PROMPT)
    async for event in runner.client.events(request):
        if isinstance(event, Chunk) and not first:
            first = time.perf_counter() - t0
        if isinstance(event, Done):
            rate = event.eval_count / (event.eval_duration / 1e9) if event.eval_duration else 0.0
            return first, rate
    raise RuntimeError("stream ended without done")


async def measure(runner: RunnerProcess, args: argparse.Namespace) -> dict[str, float]:
    t0 = time.perf_counter()
    await runner.start(timeout=300)
    start = time.perf_counter() - t0
    await one_request(runner, 4)  # warm-up
    ttft, rate = float("inf"), 0.0
    for _ in range(args.repeats):
        first, tps = await one_request(runner, args.tokens)
        ttft, rate = min(ttft, first), max(rate, tps)
    t0 = time.perf_counter()
    await runner.stop()
    return {"start": start, "ttft": ttft, "tps": rate, "evict": time.perf_counter() - t0}


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model = make_model(home / "model", args)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"model: {args.hidden} hidden, {args.layers} layers, {size / 2**20:.0f} MiB float32; "
              f"{args.tokens} greedy tokens, best of {args.repeats}; {args.mode} parallel on 2 ranks")
        single = RunnerProcess("bench", model, home=home, num_ctx=1024, num_parallel=1)
        hosts = (HostSpec("127.0.0.1", "127.0.0.1"), HostSpec("127.0.0.1", "127.0.0.1"))
        spread = DistributedRunner("bench", model, hosts=hosts, mode=args.mode, home=home, num_ctx=1024,
                                   num_parallel=1)
        one = await measure(single, args)
        two = await measure(spread, args)
    print(f"{'':>10} {'start s':>9} {'TTFT ms':>9} {'decode tok/s':>13} {'evict ms':>9}")
    for name, r in (("1 rank", one), ("2 ranks", two)):
        print(f"{name:>10} {r['start']:9.2f} {r['ttft'] * 1000:9.1f} {r['tps']:13.1f} {r['evict'] * 1000:9.0f}")
    print(f"2 ranks / 1 rank: decode {two['tps'] / one['tps']:.2f}x, TTFT {two['ttft'] / one['ttft']:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", choices=("tensor", "pipeline"), default="tensor")
    asyncio.run(main_async(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

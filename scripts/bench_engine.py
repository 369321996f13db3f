"""Where the runner's engine stands against a bare BatchGenerator, with no HTTP at all.

bench_supervisor.py measures k streams through `corral serve` against mlx_lm's
BatchGenerator in this process. This script splits that ratio: the same k
sequences, in this process, through

  * bare, this thread:  BatchGenerator.next_generated() in a loop here (the
    baseline bench_supervisor.py uses);
  * bare, own thread:   the same loop in a thread while this thread waits in an
    asyncio loop, as the runner's generation thread runs beside its event loop;
  * engine:             corral's Engine (runner/engine.py), the k sequences
    submitted at once, their events read from asyncio queues;
  * engine, no text:    the engine without its per-token text work
    (detokenizing, stop strings, the text events);
  * engine, no hand-offs: the engine handing its events to the event loop only
    when it goes idle, so the loop never wakes during the run;
  * engine, 2 ms apart: the k sequences arriving 2 ms apart, as they reach a
    runner through the supervisor (the first decodes alone, the others join);
  * 2 ms apart, no window: the same with the engine's join window off (each
    arrival admitted at once, with a prefill pass of its own).

The two "engine, no ..." variants are diagnostics, not servers: they show what
the work they skip costs. Each side runs --runs times, alternating; ratios are
to "bare, own thread" (median, and the geometric mean of back-to-back ratios
with its 95% confidence interval, as in bench_supervisor.py).

Usage: python scripts/bench_engine.py [--streams 4] [--runs 60] [--hidden 64 --layers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import PROMPTS, local_aggregate
from bench_supervisor import InProcess, make_model, paired_ratio
from corral.runner.engine import Engine, Sequence
from corral.runner.protocol import DONE_LENGTH, DONE_STOP, SamplingOptions


class NoText(Engine):
    """The engine without detokenizing, stop strings or text events (diagnostic)."""

    def _on_token(self, gen: Any, seq: Sequence, token: int, finish: str | None) -> None:
        if token in self._eos:
            self._finish(gen, seq, DONE_STOP)
            return
        seq.eval_count += 1
        if finish is not None:
            self._finish(gen, seq, DONE_LENGTH)


class NoHandOffs(Engine):
    """The engine handing events over only when it goes idle (diagnostic)."""

    def _flush(self, *, force: bool = False) -> None:
        if force:
            super()._flush(force=True)


def bare_in_thread(model: Any, tok: Any, k: int, tokens: int) -> float:
    """bench_runner's bare loop (local_aggregate) in its own thread, while this
    thread waits in an asyncio loop."""
    async def run() -> float:
        return await asyncio.to_thread(local_aggregate, model, tok, k, tokens)
    return asyncio.run(run())


def through_engine(engine: Engine, prompts: list[list[int]], tokens: int, apart: float = 0.0) -> float:
    """Aggregate tok/s of the prompts through the engine, submitted `apart` seconds apart."""
    options = SamplingOptions(temperature=0.0, num_predict=tokens)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        seqs = [Sequence(prompt=p, options=options, max_tokens=tokens, loop=loop) for p in prompts]
        t0 = time.perf_counter()

        async def one(i: int, seq: Sequence) -> int:
            if apart:
                await asyncio.sleep(t0 + i * apart - time.perf_counter())
            engine.submit(seq)
            while True:
                kind, value = await seq.out.get()
                if kind == "done":
                    return int(value["eval_count"])
                if kind == "error":
                    raise RuntimeError(value)

        total = sum(await asyncio.gather(*(one(i, s) for i, s in enumerate(seqs))))
        return total / (time.perf_counter() - t0)
    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    k, n = args.streams, args.tokens
    with tempfile.TemporaryDirectory(prefix="corral-bench-engine-") as tmp:
        path = make_model(Path(tmp) / "hub", "bench/engine", "--hidden", str(args.hidden),
                          "--layers", str(args.layers), "--heads", "8")
        local = InProcess(path)
        model, tok = local.model, local.tok
        prompts = [tok.encode(p) for p in PROMPTS[:k]]
        engines = {name: cls(model, tok, num_ctx=4096, num_parallel=k)
                   for name, cls in (("engine", Engine), ("no text", NoText), ("no hand-offs", NoHandOffs))}
        engines["no window"] = Engine(model, tok, num_ctx=4096, num_parallel=k, join_window=0.0)
        for engine in engines.values():
            engine.start()
        sides: dict[str, Callable[[], float]] = {
            "bare, own thread": lambda: bare_in_thread(model, tok, k, n),
            "bare, this thread": lambda: local_aggregate(model, tok, k, n),
            "engine": lambda: through_engine(engines["engine"], prompts, n),
            "engine, no text": lambda: through_engine(engines["no text"], prompts, n),
            "engine, no hand-offs": lambda: through_engine(engines["no hand-offs"], prompts, n),
            "engine, 2 ms apart": lambda: through_engine(engines["engine"], prompts, n, apart=0.002),
            "2 ms apart, no window": lambda: through_engine(engines["no window"], prompts, n, apart=0.002),
        }
        for side in sides.values():  # warm every path up
            side()
        runs: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.runs):
            order = list(sides.items())
            for name, side in order if i % 2 == 0 else order[::-1]:
                runs[name].append(side())
        for engine in engines.values():
            engine.stop()
    print(f"model {args.hidden}x{args.layers} float32, {k} sequences x {n} tokens, {args.runs} alternating runs each")
    print(f"{'':24}{'median tok/s':>13}   ratio to bare, own thread: median, geomean [95% CI]")
    base = runs["bare, own thread"]
    for name, vals in runs.items():
        mean, low, high = paired_ratio(vals, base)
        print(f"{name:24}{statistics.median(vals):13.0f}   {statistics.median(vals) / statistics.median(base):.3f}  "
              f"{mean:.3f} [{low:.3f}, {high:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

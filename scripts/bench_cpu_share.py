"""How much a little CPU used by other processes slows the generation.

Each streamed line costs a few hundred microseconds of CPU in the supervisor
and in the client (a wake-up, a read, a parse, a write). This script measures
what CPU spent that way costs the generation, with no HTTP at all: mlx_lm's
BatchGenerator makes k sequences in this process (the baseline of
bench_supervisor.py's stream aggregates), alone and beside helper processes
that each wake `rate` times a second and spin for --busy-us microseconds (as
the supervisor and a client do for each line, with --helpers 2).

It prints each side's tok/s, its ratio to running alone (geometric mean of
back-to-back ratios, 95% CI, as bench_supervisor.py does) and the share of
one core the helpers took. On a 2-core VM, with the generation's two busy
threads (the Python thread and MLX's worker hand work back and forth several
times a step), a share of one core costs the generation about that share of
its throughput, not half of it: each wake-up of a generation thread that
finds its core taken waits.

Usage: python scripts/bench_cpu_share.py [--streams 4] [--rates 200,100] [--busy-us 300] [--runs 24]
"""

from __future__ import annotations

import argparse
import glob
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import local_aggregate
from bench_supervisor import InProcess, make_model, paired_ratio

HELPER = r"""
import sys, time
period, busy = 1 / float(sys.argv[1]), float(sys.argv[2]) / 1e6
while True:
    time.sleep(period)
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
"""


def cpu_seconds(pid: int) -> float:
    """Exact on-CPU time of a process's threads (schedstat, not tick-sampled)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(Path(path).read_text().split()[0])
        except OSError:
            continue  # a thread that exited between the listing and the read
    return total / 1e9


def beside_helpers(run: Callable[[], float], helpers: int, rate: float, busy_us: float) -> tuple[float, float]:
    """tok/s of run() while `helpers` processes wake `rate` times a second, and
    the share of one core they took meanwhile."""
    procs = [subprocess.Popen([sys.executable, "-c", HELPER, str(rate), str(busy_us)])
             for _ in range(helpers if rate else 0)]
    try:
        time.sleep(0.2)  # past the helpers' start-up
        before = [cpu_seconds(p.pid) for p in procs]
        t0 = time.perf_counter()
        tps = run()
        elapsed = time.perf_counter() - t0
        used = sum(cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return tps, used / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--helpers", type=int, default=2, help="processes beside the generation (2: supervisor, client)")
    ap.add_argument("--rates", default="200,100", help="wake-ups a second of each helper, one side per rate")
    ap.add_argument("--busy-us", type=float, default=300.0, help="CPU each wake-up takes (about a line's cost)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    rates = [0.0] + [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="corral-bench-cpu-share-") as tmp:
        path = make_model(Path(tmp) / "hub", "bench/cpu-share", "--hidden", str(args.hidden),
                          "--layers", str(args.layers), "--heads", "8")
        local = InProcess(path)

        def run() -> float:
            return local_aggregate(local.model, local.tok, args.streams, args.tokens)

        for rate in rates:  # warm up, and start each kind of helper once
            beside_helpers(run, args.helpers, rate, args.busy_us)
        tps: dict[float, list[float]] = {r: [] for r in rates}
        share: dict[float, list[float]] = {r: [] for r in rates}
        for i in range(args.runs):
            for rate in rates if i % 2 == 0 else rates[::-1]:
                t, s = beside_helpers(run, args.helpers, rate, args.busy_us)
                tps[rate].append(t)
                share[rate].append(s)
    print(f"model {args.hidden}x{args.layers} float32, {args.streams} sequences x {args.tokens} tokens, "
          f"{args.runs} alternating runs each; {args.helpers} helpers, {args.busy_us:.0f} us per wake-up")
    print(f"{'':26}{'median tok/s':>13}  {'helpers, % of a core':>21}   vs alone: geomean [95% CI]")
    for rate in rates:
        label = "alone" if not rate else f"helpers at {rate:.0f}/s each"
        mean, low, high = paired_ratio(tps[rate], tps[0.0])
        print(f"{label:26}{statistics.median(tps[rate]):13.0f}  {100 * statistics.median(share[rate]):21.1f}   "
              + ("" if not rate else f"{mean:.3f} [{low:.3f}, {high:.3f}]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure a model's peak memory in a full-context, full-batch generation.

Runs in its own process (so its peak RSS is only this model's): loads the
model with mlx_lm, records the RSS baseline, then decodes `--num-parallel`
sequences together with mlx_lm's BatchGenerator, each prompt plus its
generated tokens filling exactly `--num-ctx` tokens, and prints one JSON line:

    {"baseline_rss", "peak_rss", "mlx_peak", "num_ctx", "num_parallel", "model"}

Used to calibrate supervisor/memory.py (the numbers are in its docstring) and
by tests/test_memory.py when no runner is available. Only the test process
and this script import mlx; the supervisor never does.

    python scripts/calibrate_memory.py MODEL_DIR --num-ctx 256 --num-parallel 4

`--table` measures the calibration table instead: it makes the test models
(tiny: hidden 64, 2 layers; q4: hidden 128, 4-bit; big: hidden 256, 4
layers; all 4 heads, float32) and runs each row in a process of its own, then
prints per row the measured peak RSS, the supervisor's estimate for this
machine's device and their ratio, and the largest and smallest ratio. Exit
status 1 if an estimate is below its peak (not an upper bound) or above 1.5 x
its peak. `--rows` picks rows by number (`--rows 0,5`).

    python scripts/calibrate_memory.py --table [--rows 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def current_rss() -> int:
    # /proc is Linux-only; fall back to the peak elsewhere (an overestimate).
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    # The runner's own measure, so calibration and the runner agree (VmHWM on Linux).
    from corral.runner.routes import peak_rss_bytes

    return peak_rss_bytes()


MODELS = {  # name: make_test_model.py arguments
    "tiny": [],
    "q4": ["--quantize", "--hidden", "128"],
    "big": ["--hidden", "256", "--layers", "4"],
}
TABLE = (  # (model, num_ctx, num_parallel): short and long contexts, one sequence and a full batch
    ("tiny", 256, 4),
    ("q4", 256, 4),
    ("big", 256, 4),
    ("big", 2048, 4),
    ("tiny", 4096, 2),
    ("tiny", 8192, 1),
    ("tiny", 20000, 1),
    ("q4", 20000, 1),
)
MAX_RATIO = 1.5
MiB = 1024 * 1024


def measure(model: Path, num_ctx: int, num_parallel: int) -> dict[str, Any]:
    """One row, in a fresh process (its peak RSS is this row's alone)."""
    out = subprocess.run([sys.executable, __file__, str(model), "--num-ctx", str(num_ctx),
                          "--num-parallel", str(num_parallel)], check=True, capture_output=True, text=True)
    row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return row


def run_table(rows: list[int]) -> int:
    from corral.runner.device import device_facts
    from corral.supervisor.manifest import read_manifest
    from corral.supervisor.memory import estimate_need

    device = str(device_facts()["device"])
    ratios: list[float] = []
    print(f"device {device}\n{'model':6} {'ctx':>6} {'par':>4} {'baseline':>10} {'peak RSS':>10} "
          f"{'estimate':>10} {'est/peak':>9}")
    with tempfile.TemporaryDirectory(prefix="corral-calibrate-") as tmp:
        made: dict[str, Path] = {}
        for i in rows:
            name, ctx, par = TABLE[i]
            if name not in made:
                made[name] = Path(tmp) / name
                subprocess.run([sys.executable, str(Path(__file__).parent / "make_test_model.py"), str(made[name]),
                                "--max-context", "32768", *MODELS[name]], check=True, capture_output=True)
            row = measure(made[name], ctx, par)
            est = estimate_need(read_manifest(made[name]), ctx, par, device=device).total
            ratio = est / row["peak_rss"]
            ratios.append(ratio)
            print(f"{name:6} {ctx:>6} {par:>4} {row['baseline_rss'] / MiB:>6.1f} MiB {row['peak_rss'] / MiB:>6.1f} MiB "
                  f"{est / MiB:>6.1f} MiB {ratio:>9.2f}", flush=True)
    print(f"est/peak: max {max(ratios):.2f}, min {min(ratios):.2f} (bound: 1.00 <= est/peak <= {MAX_RATIO})")
    return 0 if min(ratios) >= 1.0 and max(ratios) <= MAX_RATIO else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    p.add_argument("--num-ctx", type=int, default=256)
    p.add_argument("--num-parallel", type=int, default=4)
    p.add_argument("--gen", type=int, default=16, help="generated tokens per sequence")
    p.add_argument("--table", action="store_true", help="measure the calibration table (see above)")
    p.add_argument("--rows", default="", help="with --table: comma-separated row numbers (default: all)")
    args = p.parse_args(argv)
    if args.table:
        return run_table([int(r) for r in args.rows.split(",")] if args.rows else list(range(len(TABLE))))
    if not args.model:
        p.error("MODEL_DIR is required without --table")

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(args.model)[:2]
    mx.eval(model.parameters())
    baseline = current_rss()

    vocab = int(tokenizer.vocab_size)
    prompt_len = args.num_ctx - args.gen
    # Distinct prompts so the batch cannot share anything; ids avoid specials.
    prompts = [[(7 + 13 * i + 31 * j) % (vocab - 10) + 5 for j in range(prompt_len)] for i in range(args.num_parallel)]
    gen = BatchGenerator(model, max_tokens=args.gen, completion_batch_size=args.num_parallel,
                         prefill_batch_size=args.num_parallel)
    gen.insert(prompts, max_tokens=[args.gen] * args.num_parallel)
    produced = 0
    while produced < args.gen * args.num_parallel:
        responses = gen.next_generated()
        if not responses:
            break
        produced += len(responses)
    gen.close()
    print(json.dumps({
        "model": args.model,
        "num_ctx": args.num_ctx,
        "num_parallel": args.num_parallel,
        "generated": produced,
        "baseline_rss": baseline,
        "peak_rss": peak_rss(),
        "mlx_peak": int(mx.get_peak_memory()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

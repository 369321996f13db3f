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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--num-ctx", type=int, default=256)
    p.add_argument("--num-parallel", type=int, default=4)
    p.add_argument("--gen", type=int, default=16, help="generated tokens per sequence")
    args = p.parse_args(argv)

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

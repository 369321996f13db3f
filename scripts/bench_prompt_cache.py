"""Benchmark the runner's prompt cache, side by side with it off, from one run.

On a generated benchmark model (default 512x8, the larger bench_runner model):
  1. an N-turn chat (default 8) growing to ~--target tokens: per-turn time to
     first token with the cache vs without (target: last turn <= 0.15 of off);
  2. stop the cached runner (SIGTERM: it writes its disk tier), start it again,
     continue the conversation: prompt eval time vs a cold prefill of the same
     prompt (target <= 0.25);
  3. decode tokens/s with the cache on vs off (target >= 0.97);
  4. what that stop cost: total SIGTERM-to-exit ms, the disk write's own ms
     (from the runner's log) and MB written.

The conversation is raw token-level chat text (`prompt`), so each turn's prompt
is the previous prompt + the reply + a new user message, exactly as chat apps
resend it. Greedy decoding on both sides.

Usage: python scripts/bench_prompt_cache.py [--model-shape 512x8] [--turns 8] [--target 2500]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from corral.supervisor.process import free_port

ROOT = Path(__file__).resolve().parents[1]


def make_model(out: Path, hidden: int, layers: int, max_context: int) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_model.py"), str(out),
                    "--hidden", str(hidden), "--layers", str(layers), "--heads", "8",
                    "--max-context", str(max_context)], check=True, capture_output=True)
    return out


class Runner:
    def __init__(self, model: Path, num_ctx: int, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.runner", "--model", str(model), "--port", str(self.port),
                 "--num-ctx", str(num_ctx), "--num-parallel", "1"],
                cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=f)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"runner did not start:\n{log.read_text()[-3000:]}")

    def complete(self, prompt: str, n: int) -> tuple[str, float, dict[str, Any]]:
        """(text, seconds to the first token, done line)."""
        body = {"prompt": prompt, "options": {"temperature": 0, "num_predict": n}}
        text, ttft, last = "", 0.0, {}
        t0 = time.perf_counter()
        with httpx.stream("POST", self.url + "/completion", json=body, timeout=600) as r:
            for line in r.iter_lines():
                last = json.loads(line)
                if not ttft:
                    ttft = time.perf_counter() - t0
                text += last.get("content", "")
        return text, ttft, last

    def stop(self) -> float:
        """SIGTERM; ms until the process exited."""
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        return (time.perf_counter() - t0) * 1000


def filler(i: int, words: int) -> str:
    base = ["the", "model", "server", "keeps", "a", "conversation", "warm", "so", "that", "every", "new",
            "turn", "only", "prefills", "what", "is", "new", "and", "never", "the", "whole", "history"]
    return " ".join(base[(i + k) % len(base)] for k in range(words))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default="512x8")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--target", type=int, default=2500, help="tokens the chat grows to")
    p.add_argument("--reply", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--decode", type=int, default=128, help="tokens for the decode-speed check")
    args = p.parse_args()
    hidden, layers = (int(x) for x in args.model_shape.split("x"))
    num_ctx = args.target + 1024

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = make_model(tmp / "model", hidden, layers, num_ctx)
        kv = tmp / "kv" / "bench"
        on_env = {"CORRAL_PROMPT_CACHE": "2GiB", "CORRAL_KV_DIR": str(kv), "CORRAL_KV_DISK": "4GiB"}
        off = Runner(model, num_ctx, {"CORRAL_PROMPT_CACHE": "0"}, tmp / "off.log")
        on = Runner(model, num_ctx, on_env, tmp / "on.log")
        try:
            # the vocab is tiny (bytes-level), so words ~ tokens / 4; grow evenly per turn
            words = max(8, args.target // (args.turns * 3))
            history = ""
            print(f"{'turn':>4} {'tokens':>7} {'ttft off ms':>12} {'ttft on ms':>11} {'ratio':>6}")
            for turn in range(1, args.turns + 1):
                history += f"\nUser: {filler(turn, words)}\nAssistant:"
                text_off, t_off, _ = off.complete(history, args.reply)
                text_on, t_on, done_on = on.complete(history, args.reply)
                assert text_on == text_off, f"turn {turn}: cache changed the output"
                total = done_on["prompt_eval_count"] + done_on.get("cached_tokens", 0)
                print(f"{turn:>4} {total:>7} {t_off * 1000:>12.1f} {t_on * 1000:>11.1f} {t_on / t_off:>6.2f}")
                history += text_on
            # 3: decode speed with the cache on vs off (same prompt, long reply)
            _, _, d_off = off.complete(history + "\nUser: go on\nAssistant:", args.decode)
            _, _, d_on = on.complete(history + "\nUser: go on\nAssistant:", args.decode)
            tps_off = d_off["eval_count"] / (d_off["eval_duration"] / 1e9)
            tps_on = d_on["eval_count"] / (d_on["eval_duration"] / 1e9)
            # 4: the eviction's cost with the disk write
            stop_ms = on.stop()
            log = (tmp / "on.log").read_text()
            m = re.search(r"prompt cache: wrote (\d+) file\(s\), (\d+) bytes on disk, in (\d+) ms", log)
            wrote_ms = int(m.group(3)) if m else 0
            mb = int(m.group(2)) / 1e6 if m else 0.0
            # 2: reload and continue; compare prompt eval with a cold prefill of the same prompt
            on = Runner(model, num_ctx, on_env, tmp / "on2.log")
            follow = history + "\nUser: " + filler(99, words) + "\nAssistant:"
            _, _, warm = on.complete(follow, 4)
            _, _, cold = off.complete(follow, 4)
            restore = warm["prompt_eval_duration"] / cold["prompt_eval_duration"]
        finally:
            for r in (off, on):
                if r.proc.poll() is None:
                    r.stop()
    print(f"\nreload + continue: prompt eval {warm['prompt_eval_duration'] / 1e6:.1f} ms (cached "
          f"{warm.get('cached_tokens', 0)} of {warm['prompt_eval_count'] + warm.get('cached_tokens', 0)}) "
          f"vs cold {cold['prompt_eval_duration'] / 1e6:.1f} ms: ratio {restore:.3f} (target <= 0.25)")
    print(f"decode tok/s: on {tps_on:.1f} vs off {tps_off:.1f}: ratio {tps_on / tps_off:.3f} (target >= 0.97)")
    print(f"eviction with disk write: SIGTERM to exit {stop_ms:.0f} ms, of which the write {wrote_ms} ms, "
          f"{mb:.1f} MB written")


if __name__ == "__main__":
    main()

"""Supervisor benchmarks, measured side by side in one run (issue 3).

Prints ratios, never asserts timings:

1. decode, on the small model (64x2, where per-token costs cannot hide) and
   the 512x8 one: streaming tokens/s of one stream through `/api/generate`
   vs in-process `mlx_lm.stream_generate` (target >= 0.97), with
   `mlx_lm.server` (SSE) measured alike as the peer; aggregate tokens/s of 4
   and 8 concurrent streams vs in-process `BatchGenerator` (targets >= 0.90
   and >= 0.85); on the small model, time to first token through the
   official `ollama` client vs in-process (target: within 5 ms) and
   `GET /api/ps` through httpx (target <= 5 ms);
2. cold start: request -> first token for an unloaded model vs a fresh Python
   process that imports mlx_lm, loads the model and produces one token
   (target <= 1.0);
3. eviction: time from the unload decision to the runner being reaped, and the
   memory the OS reports available before load, after load and after eviction
   on a model of a few hundred MB (all of it should come back);
4. switch A -> B in single-model mode: B's first token vs B's own cold start
   (target: within 100 ms).

Usage: python scripts/bench_supervisor.py [--hidden 512 --layers 8 --tokens 128 --small-tokens 256] [--small-only]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import ollama
import psutil
from bench_peer import CLIENT, mlx_lm_server, sse_completion
from bench_runner import PROMPTS, local_aggregate
from corral.supervisor.process import free_port

ROOT = Path(__file__).resolve().parents[1]
SETTLE = 4.0  # seconds: the standby runner's imports finish well within this
WARM_RUNS = 2  # full-length requests each server gets before it is timed
PROMPT = "Once upon a time there was a small model that wanted to speak."


def make_model(cache: Path, repo: str, *args: str) -> Path:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_test_model.py"), "--hf-cache", str(cache),
         "--repo", repo, *args],
        check=True, capture_output=True, text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


SERVERS: dict[str, int] = {}  # base URL -> supervisor pid


def cpu_now(url: str) -> tuple[float, float, float]:
    """CPU seconds so far of this process (the client), the supervisor and its runners."""
    def used(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    sup = psutil.Process(SERVERS[url])
    runners = 0.0
    for child in sup.children(recursive=True):
        try:
            runners += used(child)
        except psutil.NoSuchProcess:
            continue
    return used(psutil.Process()), used(sup), runners


def cpu_line(before: tuple[float, float, float], after: tuple[float, float, float], tokens: int) -> str:
    client, sup, run = ((b - a) * 1e6 / max(1, tokens) for a, b in zip(before, after, strict=True))
    return (f"            CPU per token: client {client:.0f} us, supervisor {sup:.0f} us, "
            f"runner {run:.0f} us (generation included)")


@contextmanager
def server(home: Path, cache: Path, **env: str) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {**os.environ, "CORRAL_HOME": str(home), "HF_HUB_CACHE": str(cache),
                "HF_HUB_OFFLINE": "1", "CORRAL_HOST": f"127.0.0.1:{port}", **env}
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "bench-server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "serve"], cwd=ROOT,
                            env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start; see " + str(home / "bench-server.log"))
            time.sleep(0.05)
        SERVERS[url] = proc.pid
        try:
            yield url
        except Exception:
            # what the server said is the first thing to read when a request failed
            log.flush()
            tail = (home / "bench-server.log").read_text(errors="replace").splitlines()[-40:]
            print("server log, last lines:", *tail, sep="\n    ", file=sys.stderr)
            raise
    finally:
        SERVERS.pop(url, None)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def stream_generate_http(url: str, model: str, tokens: int, prompt: str = PROMPT,
                         **extra: Any) -> dict[str, float]:
    """Time one streamed /api/generate: request->first token, and decode rate after it."""
    # raw: the prompt exactly as the in-process side gets it (no chat template)
    body = {"model": model, "prompt": prompt, "stream": True, "raw": True,
            "options": {"temperature": 0, "num_predict": tokens}, **extra}
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    final: dict[str, Any] = {}
    with CLIENT.stream("POST", url + "/api/generate", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            obj = json.loads(line)
            if "error" in obj:
                raise RuntimeError(obj["error"])
            now = time.perf_counter()
            if obj.get("done"):
                final = obj
                break
            if obj.get("response"):
                chunks += 1
                if first is None:
                    first = now
                last = now
    assert first is not None and last is not None, "no tokens streamed"
    n = int(final.get("eval_count", chunks))
    # tps: after the first line, as before; a first line held back and then sent in a
    # burst with the rest would inflate it, so `whole` (request to done line) is kept too.
    return {"ttft": first - t0, "tokens": n,
            "tps": (n - 1) / (last - first) if last > first else float("nan"),
            "whole": n / (now - t0)}


CANDIDATE_PROMPTS = [PROMPT, "Hello, world!", "The quick brown fox", "def main():", "Numbers: 1 2 3",
                     "A model server keeps models", "Unicode text: café"]


class InProcess:
    """mlx_lm.stream_generate in this process: the baseline for the decode rate."""

    def __init__(self, path: Path) -> None:
        import mlx_lm
        from mlx_lm.sample_utils import make_sampler

        self.mlx_lm = mlx_lm
        self.model, self.tok = mlx_lm.load(str(path))
        self.sampler = make_sampler(temp=0.0)
        self.run(PROMPT, 8)  # warm up (compile, caches), as the server's runner is warm too
        # This process holds far more Python objects than a user's script would
        # (clients, models made, the peer's state): keep the collector from
        # rescanning them during the timed runs, so the baseline is not slowed by them.
        gc.collect()
        gc.freeze()

    def run(self, prompt: str, n_max: int) -> tuple[int, float, float]:
        """(tokens, tok/s after the first, tok/s of the whole call)."""
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for _resp in self.mlx_lm.stream_generate(self.model, self.tok, prompt, max_tokens=n_max,
                                                 sampler=self.sampler):
            now = time.perf_counter()
            n += 1
            if first is None:
                first = now
            last = now
        assert first is not None and last is not None
        return n, (n - 1) / (last - first) if last > first else float("nan"), n / (last - t0)

    def pick_prompt(self, tokens: int) -> str:
        """A prompt that decodes all `tokens` (a random model may say its end token
        early, which would make the run too short to time)."""
        return max(CANDIDATE_PROMPTS, key=lambda p: self.run(p, tokens)[0])


COLD_SCRIPT = """
import sys, time
t0 = float(sys.argv[2])
import mlx_lm
from mlx_lm.sample_utils import make_sampler
model, tok = mlx_lm.load(sys.argv[1])
for r in mlx_lm.stream_generate(model, tok, {prompt!r}, max_tokens=1, sampler=make_sampler(temp=0.0)):
    print(time.time() - t0, flush=True)
    break
"""


def fresh_process_first_token(path: Path) -> float:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", COLD_SCRIPT.format(prompt=PROMPT), str(path), repr(t0)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[0])


def unload(url: str, model: str) -> None:
    httpx.post(url + "/api/generate", json={"model": model, "keep_alive": 0}, timeout=120).raise_for_status()


def ps(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(url + "/api/ps", timeout=30).json()["models"])


def wait_gone(pid: int, timeout: float = 30) -> float:
    t0 = time.perf_counter()
    while psutil.pid_exists(pid):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                time.sleep(0.001)
                continue
        except psutil.NoSuchProcess:
            break
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"pid {pid} still alive after {timeout}s")
        time.sleep(0.001)
    return time.perf_counter() - t0


def paired_ratio(vals: list[float], base: list[float]) -> tuple[float, float, float]:
    """The geometric mean of the ratios of runs made back to back, and its 95%
    confidence interval. This machine's noise is multiplicative (a run is 15%
    slower, whichever side it is), so the mean is taken of the logs; t's critical
    value for df = n-1 degrees of freedom is approximated by 1.96 + 2.5/df + 3/df²
    (within 0.015 of the table from 5 runs up)."""
    logs = [math.log(v / b) for v, b in zip(vals, base, strict=True)]
    mean = statistics.fmean(logs)
    if len(logs) < 3:
        return math.exp(mean), math.nan, math.nan  # too few runs for an interval
    df = len(logs) - 1
    half = (1.96 + 2.5 / df + 3 / df**2) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def ratio_rows(label: str, n: int, runs: int, rows: list[tuple[str, list[float]]]) -> None:
    """Best and median per side, then each side's ratio to the first (the in-process
    baseline): best to best, median to median, the median of the ratios of runs
    made back to back (the machine's speed drifts less within a pair than over a
    run), and their geometric mean with its 95% confidence interval."""
    print(f"\n{label} ({n} tokens, {runs} alternating runs each)   best    median   paired  geomean [95% CI]")
    base = rows[0][1]
    for name, vals in rows:
        print(f"            {name:<31}{max(vals):7.1f} {statistics.median(vals):7.1f} tok/s")
    for name, vals in rows[1:]:
        paired = statistics.median(v / b for v, b in zip(vals, base, strict=True))
        mean, low, high = paired_ratio(vals, base)
        print(f"            ratio {name:<25}{max(vals) / max(base):7.3f} "
              f"{statistics.median(vals) / statistics.median(base):7.3f} {paired:7.3f}  "
              f"{mean:.3f} [{low:.3f}, {high:.3f}]")


def decode(url: str, model: str, path: Path, tokens: int, runs: int, peer_log: Path) -> InProcess:
    """One stream: in-process vs /api/generate vs mlx_lm.server, alternating."""
    local = InProcess(path)
    prompt = local.pick_prompt(tokens)  # also warms the in-process side: a dozen full-length runs
    stream_generate_http(url, model, 8)  # load
    time.sleep(SETTLE)  # the standby runner started by that load finishes its imports (CPU) first
    base, ours, peer = [], [], []
    cpu, made = [0.0, 0.0, 0.0], 0
    with mlx_lm_server(path, peer_log) as peer_url:
        # Every side warm alike, with full-length runs: the first long generations
        # of a process grow MLX's buffer cache and KV cache, which later ones reuse.
        for _ in range(WARM_RUNS):
            stream_generate_http(url, model, tokens, prompt)
            sse_completion(peer_url, prompt, tokens)
        # Alternate the sides so machine noise (large on a shared VM) hits all alike.
        for _ in range(runs):
            _, tps, whole = local.run(prompt, tokens)
            base.append((tps, whole))
            before = cpu_now(url)
            r = stream_generate_http(url, model, tokens, prompt)
            after = cpu_now(url)
            cpu = [c + b - a for c, a, b in zip(cpu, before, after, strict=True)]
            made += int(r["tokens"])
            ours.append((r["tps"], r["whole"]))
            r = sse_completion(peer_url, prompt, tokens)
            peer.append((r["tps"], r["whole"]))
    for i, label in ((0, "after the first token"), (1, "whole request")):
        ratio_rows(f"1. decode   {model}, {label}", tokens, runs,
                   [("in-process stream_generate", [b[i] for b in base]),
                    ("/api/generate stream", [o[i] for o in ours]),
                    ("mlx_lm.server SSE", [p[i] for p in peer])])
    print("            target: /api/generate >= 0.97, and above mlx_lm.server")
    print(cpu_line((0.0, 0.0, 0.0), (cpu[0], cpu[1], cpu[2]), made))
    return local


def http_aggregate(url: str, model: str, k: int, tokens: int) -> tuple[float, int]:
    """Aggregate tokens/s of k concurrent streams, and the tokens they made."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(k) as ex:
        done = list(ex.map(lambda p: stream_generate_http(url, model, tokens, p), PROMPTS[:k]))
    made = sum(int(d["tokens"]) for d in done)
    return made / (time.perf_counter() - t0), made


def concurrent_streams(url: str, model: str, local: InProcess, tokens: int, runs: int) -> None:
    for k, target in ((4, 0.90), (8, 0.85)):
        ours, base, with_text = [], [], []
        cpu = [0.0, 0.0, 0.0]
        made = 0
        http_aggregate(url, model, k, tokens)  # warm both sides at this batch size
        local_aggregate(local.model, local.tok, k, tokens)
        for _ in range(runs):
            before = cpu_now(url)
            rate, n = http_aggregate(url, model, k, tokens)
            after = cpu_now(url)
            cpu = [c + b - a for c, a, b in zip(cpu, before, after, strict=True)]
            ours.append(rate)
            made += n
            base.append(local_aggregate(local.model, local.tok, k, tokens))
            with_text.append(local_aggregate(local.model, local.tok, k, tokens, text=True))
        ratio_rows(f"   {k} streams aggregate", tokens, runs,
                   [("in-process BatchGenerator", base), ("/api/generate x" + str(k), ours),
                    ("in-process, detokenizing", with_text)])
        print(f"            target >= {target:.2f}")
        print(cpu_line((0.0, 0.0, 0.0), (cpu[0], cpu[1], cpu[2]), made))


def first_token_ms(local: InProcess, prompt: str) -> float:
    t0 = time.perf_counter()
    for _ in local.mlx_lm.stream_generate(local.model, local.tok, prompt, max_tokens=1,
                                          sampler=local.sampler):
        break
    return (time.perf_counter() - t0) * 1000


def ollama_first_token_ms(client: ollama.Client, model: str, prompt: str) -> float:
    t0 = time.perf_counter()
    for _ in client.generate(model=model, prompt=prompt, raw=True, stream=True,
                             options={"temperature": 0, "num_predict": 1}):
        break
    return (time.perf_counter() - t0) * 1000


def latency(url: str, model: str, local: InProcess, runs: int = 20) -> None:
    """Per-request costs on a loaded model: first token, and a trivial GET."""
    client = ollama.Client(host=url)
    ollama_first_token_ms(client, model, PROMPT)
    ours, base = [], []
    for _ in range(runs):
        base.append(first_token_ms(local, PROMPT))
        ours.append(ollama_first_token_ms(client, model, PROMPT))
    with httpx.Client(base_url=url) as http:
        http.get("/api/ps")
        ps_ms = []
        for _ in range(runs):
            t0 = time.perf_counter()
            http.get("/api/ps").raise_for_status()
            ps_ms.append((time.perf_counter() - t0) * 1000)
    b, o = statistics.median(base), statistics.median(ours)
    print(f"\n   latency  ({model}, median of {runs})")
    print(f"            first token, in-process stream_generate   {b:7.1f} ms")
    print(f"            first token, ollama client /api/generate  {o:7.1f} ms   "
          f"(+{o - b:.1f} ms; target <= +5 ms)")
    print(f"            GET /api/ps, httpx                        {statistics.median(ps_ms):7.1f} ms   "
          f"(target <= 5 ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--small-hidden", type=int, default=64)
    ap.add_argument("--small-layers", type=int, default=2)
    ap.add_argument("--small-tokens", type=int, default=256)
    ap.add_argument("--big-hidden", type=int, default=1024, help="eviction model size")
    ap.add_argument("--big-layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-repeats", type=int, default=40, help="single-stream runs, small model")
    ap.add_argument("--stream-repeats", type=int, default=24, help="runs per stream count, small model")
    ap.add_argument("--small-only", action="store_true",
                    help="only section 1 on the small model (decode, streams, latency): a few minutes")
    args = ap.parse_args()
    size = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", "8"]

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        tmpd = Path(tmp)
        cache = tmpd / "hub"
        a_path = make_model(cache, "bench/a", *size)
        small_path = make_model(cache, "bench/small", "--hidden", str(args.small_hidden),
                                "--layers", str(args.small_layers), "--heads", "8")
        make_model(cache, "bench/b", *size, "--seed", "1")
        big_path = make_model(cache, "bench/big", "--hidden", str(args.big_hidden),
                              "--layers", str(args.big_layers), "--heads", "8")
        print(f"models: {args.hidden}x{args.layers} float32 (a, b); small {args.small_hidden}x"
              f"{args.small_layers} float32; eviction model "
              f"{sum(p.stat().st_size for p in big_path.iterdir()) / 1e6:.0f} MB on disk")

        # 1. decode rate, concurrency, per-request latency; num_parallel 8 for 8 streams
        with server(tmpd / "home1", cache, CORRAL_NUM_PARALLEL="8") as url:
            models = [("bench/small", small_path, args.small_tokens), ("bench/a", a_path, args.tokens)]
            for model, path, n in models[:1] if args.small_only else models:
                small = model == "bench/small"
                # The small model's runs take well under a second each, so many of
                # them: the VM's noise is about +-15% per run. The 512x8 model's take
                # seconds (streams: ~30 s) and its figures hide per-token costs anyway.
                local = decode(url, model, path, n, args.decode_repeats if small else args.repeats * 2,
                               tmpd / "peer.log")
                concurrent_streams(url, model, local, n, args.stream_repeats if small else args.repeats)
                if small:
                    latency(url, model, local)
                    unload(url, model)
                del local
            if args.small_only:
                return 0

            # 2. cold start
            ours, theirs = [], []
            for _ in range(args.repeats):
                unload(url, "bench/a")
                time.sleep(SETTLE)
                ours.append(stream_generate_http(url, "bench/a", 1)["ttft"])
                theirs.append(fresh_process_first_token(a_path))
            o, t = statistics.median(ours), statistics.median(theirs)
            print(f"\n2. cold     request->first token, unloaded model   {o * 1000:8.0f} ms")
            print(f"            fresh python: import, load, one token  {t * 1000:8.0f} ms")
            print(f"            ratio corral/fresh-process             {o / t:8.3f}   (target <= 1.0)")
            unload(url, "bench/a")

            # 3. eviction and memory reclaim. One load and unload first: the first
            # read of the weights fills the page cache, which is not the runner's
            # memory and does not come back at its eviction. Each load also starts
            # a new standby runner, measured after it has settled for the same reason.
            stream_generate_http(url, "bench/big", 1)
            unload(url, "bench/big")
            time.sleep(SETTLE)
            before = psutil.virtual_memory().available
            stream_generate_http(url, "bench/big", 4)
            loaded = ps(url)
            pid = int(loaded[0]["pid"])
            time.sleep(SETTLE)  # the standby the load started grows while it imports: let it finish
            after_load = psutil.virtual_memory().available
            t0 = time.perf_counter()
            unload(url, "bench/big")
            wait_gone(pid)
            reaped = time.perf_counter() - t0
            time.sleep(0.3)
            after_evict = psutil.virtual_memory().available
            print(f"\n3. evict    unload request -> runner reaped         {reaped * 1000:8.0f} ms")
            print(f"            available before load   {before / 1e6:10.0f} MB")
            print(f"            available after load    {after_load / 1e6:10.0f} MB  (runner took {(before - after_load) / 1e6:.0f} MB, reported size {loaded[0]['size'] / 1e6:.0f} MB)")
            print(f"            available after evict   {after_evict / 1e6:10.0f} MB  (came back: {(after_evict - after_load) / max(1, before - after_load) * 100:.0f}%)")

        # 4. single-model switch
        with server(tmpd / "home2", cache, CORRAL_SINGLE_MODEL="1") as url:
            stream_generate_http(url, "bench/b", 1)
            unload(url, "bench/b")
            own = []
            switch = []
            # Steady state on both sides: a pause before each timed request lets the
            # server's standby runner finish its imports, as it has when a person
            # switches models (loads seconds apart, not back to back).
            for _ in range(args.repeats):
                time.sleep(SETTLE)
                own.append(stream_generate_http(url, "bench/b", 1)["ttft"])  # B alone, cold
                time.sleep(SETTLE)
                stream_generate_http(url, "bench/a", 1)  # A loaded (B evicted by the switch)
                time.sleep(SETTLE)
                switch.append(stream_generate_http(url, "bench/b", 1)["ttft"])  # switch A -> B
                unload(url, "bench/b")
            o, s = statistics.median(own), statistics.median(switch)
            print(f"\n4. switch   B cold start alone      {o * 1000:8.0f} ms")
            print(f"            A -> B first token      {s * 1000:8.0f} ms")
            print(f"            difference              {(s - o) * 1000:+8.0f} ms   (target: within 100 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak test: many clients, three models that evict each other, injected faults.

Starts `corral serve` on three tiny generated models with a memory limit that
fits one, runs --requests requests from --clients concurrent clients over the
Ollama, OpenAI and Anthropic APIs (streaming and not, some cancelled by the
client), SIGSTOPs one runner a third of the way in and SIGKILLs one two thirds
in, then stops the server and prints:

    requests, errors by status (only 503 with Retry-After is allowed, plus
    failures of requests the injected faults cut short), hung requests,
    runners started/reaped, orphans after shutdown, supervisor RSS at start and end.

Exit status 0 when nothing hung, nothing leaked and no unexplained error came back.

    python scripts/soak.py --requests 1000 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("soak/tiny-a", "soak/tiny-b", "soak/tiny-c")
CTX = 256
STALL_S = 2.0
FAULT_WINDOW_S = STALL_S + 5.0 + 5.0  # stall limit + /health wait + reload slack
REQUEST_TIMEOUT_S = 120.0  # a request still open after this is hung


@dataclass
class Outcome:
    model: str
    started: float
    ended: float
    status: int  # HTTP status; 0: no answer (hung or connection broken)
    retry_after: bool = False
    stream_error: str = ""  # an in-band error line/event of a stream


@dataclass
class Fault:
    kind: str
    model: str
    pid: int
    at: float


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    hung: int = 0
    runner_pids: set[int] = field(default_factory=set)
    last_model: str | None = None  # the model the last request sent asked for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_models(cache: Path) -> None:
    """The three models, made side by side (each maker is a process of its own)."""
    makers = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "make_test_model.py"), "--hf-cache",
                                str(cache), "--repo", repo, "--seed", str(i), "--hidden", str(64 + 32 * i)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for i, repo in enumerate(MODELS)]
    for maker in makers:
        _, err = maker.communicate()
        if maker.returncode != 0:
            raise RuntimeError(f"make_test_model.py failed: {err.decode(errors='replace')[-2000:]}")


def memory_limit_for_one(home: Path, cache: Path, num_parallel: int) -> int:
    from corral.supervisor.memory import estimate_need
    from corral.supervisor.store import ModelStore

    store = ModelStore(home, cache)
    needs = [estimate_need(store.manifest(store.resolve(m)), CTX, num_parallel).total for m in MODELS]
    return int(max(needs) + min(needs) // 2)


def request_for(family: str, model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    n = random.randint(2, 24)
    text = random.choice(["hello", "the corral", "once upon a time", "a b c"])
    if family == "ollama":
        return "/api/chat", {"model": model, "stream": stream, "options": {"num_predict": n},
                             "messages": [{"role": "user", "content": text}]}
    if family == "openai":
        return "/v1/chat/completions", {"model": model, "stream": stream, "max_tokens": n,
                                        "messages": [{"role": "user", "content": text}]}
    return "/v1/messages", {"model": model, "stream": stream, "max_tokens": n,
                            "messages": [{"role": "user", "content": text}]}


def stream_error(family: str, line: str) -> str:
    """The in-band error a stream line carries, or ""."""
    text = line[len("data:"):].strip() if line.startswith("data:") else line.strip()
    if not text or text == "[DONE]" or not text.startswith("{"):
        return ""
    try:
        obj = json.loads(text)
    except ValueError:
        return ""
    if isinstance(obj, dict) and ("error" in obj or obj.get("type") == "error"):
        return str(obj.get("error") or obj)[:200]
    return ""


async def one_request(http: httpx.AsyncClient, run: Run, sticky: float) -> None:
    family = random.choice(("ollama", "openai", "anthropic"))
    # sticky: the chance a request asks for the previous request's model (fewer model switches).
    # "Previous" is the one last sent, not the last to finish: with models queued behind each
    # other the last to finish rotates through all three, and following it switches on every batch.
    # Otherwise another model: every non-sticky pick is a switch, so a short run sees all three.
    last = run.last_model
    if last is not None and random.random() < sticky:
        model = last
    else:
        model = random.choice([m for m in MODELS if m != last])
    run.last_model = model
    stream = random.random() < 0.6
    cancel = stream and random.random() < 0.2
    path, body = request_for(family, model, stream)
    out = Outcome(model, time.monotonic(), 0.0, 0)

    async def send() -> None:
        if not stream:
            r = await http.post(path, json=body)
            out.status, out.retry_after = r.status_code, "retry-after" in r.headers
            return
        async with http.stream("POST", path, json=body) as r:
            out.status, out.retry_after = r.status_code, "retry-after" in r.headers
            async for line in r.aiter_lines():
                out.stream_error = out.stream_error or stream_error(family, line)
                if cancel:
                    break  # the client walks away mid-stream

    try:
        await asyncio.wait_for(send(), REQUEST_TIMEOUT_S)
    except asyncio.TimeoutError:
        run.hung += 1
        return
    except httpx.HTTPError as e:
        out.stream_error = out.stream_error or f"{type(e).__name__}: {e}"
    out.ended = time.monotonic()
    run.outcomes.append(out)


async def loaded_runner(http: httpx.AsyncClient, exclude: set[int]) -> tuple[str, int] | None:
    try:
        models = (await http.get("/api/ps")).json().get("models", [])
    except (httpx.HTTPError, ValueError):
        return None
    for m in models:
        pid = int(m.get("pid") or 0)  # corral's /api/ps reports each runner's pid
        if pid and pid not in exclude:
            return str(m["name"]), pid
    return None


async def inject(http: httpx.AsyncClient, run: Run, kind: str, sig: int) -> None:
    for _ in range(200):
        found = await loaded_runner(http, {f.pid for f in run.faults})
        if found is not None:
            name, pid = found
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            run.faults.append(Fault(kind, name.removesuffix(":latest"), pid, time.monotonic()))
            return
        await asyncio.sleep(0.05)


async def watch_children(server: psutil.Process, run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            run.runner_pids.update(c.pid for c in server.children(recursive=True))
        except psutil.Error:
            pass
        await asyncio.sleep(0.1)


async def drive(url: str, server: psutil.Process, requests: int, clients: int, sticky: float) -> Run:
    run = Run()
    todo = list(range(requests))
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as http:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_children(server, run, stop))

        async def client() -> None:
            while todo:
                i = todo.pop()
                if i == requests * 2 // 3:
                    await inject(http, run, "SIGSTOP", signal.SIGSTOP)
                elif i == requests // 3:
                    await inject(http, run, "SIGKILL", signal.SIGKILL)
                await one_request(http, run, sticky)

        await asyncio.gather(*(client() for _ in range(clients)))
        stop.set()
        await watcher
    return run


def explained(out: Outcome, faults: list[Fault]) -> bool:
    """A failure the injected faults account for: same model, in flight around the fault."""
    return any(f.model == out.model and out.started <= f.at + FAULT_WINDOW_S and out.ended >= f.at
               for f in faults)


def report(run: Run, rss: tuple[int, int], orphans: list[int], requests: int) -> dict[str, Any]:
    statuses = Counter(o.status for o in run.outcomes)
    bad = [o for o in run.outcomes if not (o.status == 200 or (o.status == 503 and o.retry_after))]
    stream_errors = [o for o in run.outcomes if o.status == 200 and o.stream_error]
    unexplained = [o for o in bad + stream_errors if not explained(o, run.faults)]
    reaped = [p for p in run.runner_pids if not psutil.pid_exists(p)]
    return {
        "requests": len(run.outcomes) + run.hung,
        "asked": requests,
        "statuses": dict(sorted(statuses.items())),
        "errors_by_status": dict(sorted(Counter(o.status for o in bad).items())),
        "stream_errors": len(stream_errors),
        "errors_explained_by_faults": len(bad) + len(stream_errors) - len(unexplained),
        "unexplained_errors": len(unexplained),
        "unexplained_examples": [f"{o.status} {o.model} {o.stream_error}" for o in unexplained[:5]],
        "hung": run.hung,
        "faults": [f"{f.kind} {f.model} pid {f.pid}" for f in run.faults],
        "runners_started": len(run.runner_pids),
        "runners_reaped": len(reaped),
        "orphans_after_shutdown": len(orphans),
        "supervisor_rss_start_mib": round(rss[0] / 2**20, 1),
        "supervisor_rss_end_mib": round(rss[1] / 2**20, 1),
    }


def soak(requests: int, clients: int, workdir: Path, num_parallel: int = 2, sticky: float = 0.0) -> dict[str, Any]:
    cache, home = workdir / "hub", workdir / "home"
    make_models(cache)
    port = free_port()
    env = {**os.environ, "CORRAL_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "CORRAL_HOST": f"127.0.0.1:{port}", "CORRAL_CONTEXT_LENGTH": str(CTX),
           "CORRAL_NUM_PARALLEL": str(num_parallel), "CORRAL_RESERVE": "1", "CORRAL_KEEP_ALIVE": "-1",
           "CORRAL_MEMORY_LIMIT": str(memory_limit_for_one(home, cache, num_parallel)),
           "CORRAL_STALL_TIMEOUT": f"{STALL_S}s", "CORRAL_DRAIN_TIMEOUT": "30s"}
    log = (workdir / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "corral.supervisor", "serve", "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    server = psutil.Process(proc.pid)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"corral serve exited with {proc.returncode}: see {workdir / 'server.log'}")
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        rss_start = server.memory_info().rss
        run = asyncio.run(drive(url, server, requests, clients, sticky))
        rss_end = server.memory_info().rss
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    for pid in run.runner_pids:  # a SIGSTOPped runner that somehow survived must not stay stopped
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    orphans = [p for p in run.runner_pids if psutil.pid_exists(p)
               and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    result = report(run, (rss_start, rss_end), orphans, requests)
    result["server_exit"] = proc.returncode
    return result


def passed(result: dict[str, Any]) -> bool:
    return (result["hung"] == 0 and result["unexplained_errors"] == 0 and result["orphans_after_shutdown"] == 0
            and result["requests"] == result["asked"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sticky", type=float, default=0.0,
                   help="chance a request asks for the model the previous one asked for; otherwise it "
                        "asks for another (0: every request switches)")
    args = p.parse_args(argv)
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="corral-soak-") as tmp:
        started = time.monotonic()
        result = soak(args.requests, args.clients, Path(tmp), sticky=args.sticky)
        result["seconds"] = round(time.monotonic() - started, 1)
    for key, value in result.items():
        print(f"{key:28} {value}")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())

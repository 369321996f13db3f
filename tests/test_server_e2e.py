"""End to end: a real `corral serve`, real runner subprocesses, real mlx, the official ollama client.

One server is shared by the module for everything that does not need its own
configuration; the servers with single-model mode, pinning, a memory limit or
signals start their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import ollama
import psutil
import pytest

from tests.conftest import TINY, TINY_B
from tests.support.live_server import ServerProcess
from tests.support.models import make_hf_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TINY_C = "corral-test/tiny-c"
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def cache(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A copy: the session's hf_cache is shared, and other modules expect exactly its two models.
    own = tmp_path_factory.mktemp("e2e-hub") / "hub"
    shutil.copytree(hf_cache, own, symlinks=True)
    make_hf_model(own, TINY_C, "--seed", "2")
    return own


@pytest.fixture(scope="module")
def server(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("home"), cache) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ps(url: str) -> dict[str, dict[str, Any]]:
    """name (without :latest) -> /api/ps row."""
    rows = httpx.get(url + "/api/ps", timeout=30).json()["models"]
    return {r["name"].removesuffix(":latest"): r for r in rows}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def load(url: str, model: str, keep_alive: Any = "5m") -> int:
    """Load `model` (empty prompt) and return its runner pid."""
    r = httpx.post(url + "/api/generate", json={"model": model, "keep_alive": keep_alive}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["done_reason"] == "load"
    return int(ps(url)[model]["pid"])


def unload_all(url: str) -> None:
    for name in ps(url):
        httpx.post(url + "/api/generate", json={"model": name, "keep_alive": 0}, timeout=60)
    wait_for(lambda: not ps(url), what="every model unloaded")


# ---- the shared server ----------------------------------------------------


def _loaded_extensions(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/PID/maps (Linux)")
def test_supervisor_and_runner_run_on_uvloop(server: ServerProcess) -> None:
    # Each streamed line costs both event loops a wake-up and a write: uvloop
    # and httptools take 20-30% less CPU per line than asyncio's loop and h11.
    # A change that quietly falls back to those (a dependency dropped,
    # asyncio.run put back, the supervisor's guarded protocol rebased on h11)
    # costs generation CPU without failing anything else.
    pid = load(server.url, TINY)
    assert server.proc is not None
    supervisor = _loaded_extensions(server.proc.pid)
    assert "uvloop" in supervisor and "httptools" in supervisor
    runner = _loaded_extensions(pid)
    assert "uvloop" in runner and "httptools" in runner


def test_list_and_show(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert {f"{TINY}:latest", f"{TINY_B}:latest", f"{TINY_C}:latest"} <= set(names)
    tiny = next(m for m in client.list().models if m.model == f"{TINY}:latest")
    assert tiny.size and tiny.size > 0 and tiny.digest and tiny.modified_at is not None
    assert tiny.details is not None and tiny.details.format == "safetensors"
    assert tiny.details.family == "llama" and tiny.details.parameter_size
    shown = client.show(TINY)
    assert shown.template and "im_start" in shown.template
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 2048
    assert shown.capabilities and "completion" in shown.capabilities
    assert shown.details is not None and shown.details.quantization_level == "F32"
    with pytest.raises(ollama.ResponseError) as e:
        client.show("corral-test/nothing-here")
    assert e.value.status_code == 404


def test_generate_stream_and_not(client: ollama.Client) -> None:
    whole = client.generate(TINY, "Hello, world!", options=GREEDY)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count and whole.eval_count <= 8 and whole.prompt_eval_count
    assert whole.total_duration and whole.total_duration > 0
    parts = list(client.generate(TINY, "Hello, world!", options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    # greedy decoding: streamed pieces add up to the same text
    assert "".join(p.response or "" for p in parts) == whole.response
    assert parts[-1].eval_count == whole.eval_count


def test_chat_stream_and_not(client: ollama.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = client.chat(TINY, messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.done
    parts = list(client.chat(TINY, messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    # /api/generate renders the chat template too: same messages, same greedy text
    via_generate = client.generate(TINY, "Hi!", system="Be brief.", options=GREEDY)
    assert via_generate.response == whole.message.content


def test_bad_requests_keep_the_server_serving(server: ServerProcess, client: ollama.Client) -> None:
    with server.client() as c:
        for body in ({"model": TINY, "prompt": "x", "options": {"temperature": -3}},
                     {"model": "../../etc/passwd", "prompt": "x"},
                     {"model": TINY, "prompt": "x", "format": {"type": "object", "if": {}}}):
            r = c.post("/api/generate", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]
        r = c.post("/api/chat", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = c.post("/api/generate", content=b"x" * (17 * 1024 * 1024))
        assert r.status_code == 413
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("corral-test/nothing-here", "hi")
    assert e.value.status_code == 404 and "not found" in e.value.error
    assert client.generate(TINY, "still here?", options=GREEDY).done


def test_ps_and_unload_with_keep_alive_zero(server: ServerProcess, client: ollama.Client) -> None:
    client.generate(TINY, "Hi", options=GREEDY, keep_alive="5m")
    rows = client.ps().models
    row = next(m for m in rows if m.model == f"{TINY}:latest")
    assert row.size and row.context_length and row.expires_at is not None
    pid = int(ps(server.url)[TINY]["pid"])
    assert alive(pid)
    gone = client.generate(TINY, "", keep_alive=0)
    assert gone.done_reason == "unload"
    wait_for(lambda: TINY not in ps(server.url), what="ps without the model")
    wait_for(lambda: not alive(pid), what="the runner to exit")


def test_keep_alive_forms(server: ServerProcess, client: ollama.Client) -> None:
    # "0" as a string: unloaded as soon as the request is done
    client.generate(TINY, "Hi", options=GREEDY, keep_alive="0")
    wait_for(lambda: TINY not in ps(server.url), what="keep_alive '0' unload")
    # -1: kept forever
    client.generate(TINY, "Hi", options=GREEDY, keep_alive=-1)
    row = ps(server.url)[TINY]
    assert row["expires_at"].startswith("9999")
    time.sleep(1.5)
    assert ps(server.url)[TINY]["pid"] == row["pid"]  # still there, same runner
    # "1s": expires by itself
    pid = int(row["pid"])
    client.generate(TINY, "Hi", options=GREEDY, keep_alive="1s")
    later = ps(server.url).get(TINY)
    if later is not None:  # (it may already have expired on a slow machine)
        assert int(later["pid"]) == pid
        expires = datetime.fromisoformat(later["expires_at"].replace("Z", "+00:00"))
        assert (expires - datetime.now(timezone.utc)).total_seconds() < 5
    wait_for(lambda: TINY not in ps(server.url), timeout=30, what="keep_alive 1s expiry")
    wait_for(lambda: not alive(pid), what="the expired runner to exit")


def _stream_then_kill(url: str, pid_of: Callable[[], int]) -> tuple[list[dict[str, Any]], int]:
    """Start a long stream, SIGKILL the runner after the first chunk, return every line."""
    import json

    body = {"model": TINY, "prompt": "Once upon a time", "raw": True,
            "options": {"temperature": 0, "num_predict": 100_000}}
    lines: list[dict[str, Any]] = []
    pid = 0
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        for raw in r.iter_lines():
            if not raw.strip():
                continue
            lines.append(json.loads(raw))
            if len(lines) == 1:
                pid = pid_of()
                os.kill(pid, signal.SIGKILL)
    return lines, pid


def test_runner_killed_mid_stream(server: ServerProcess, client: ollama.Client) -> None:
    load(server.url, TINY)
    lines, pid = _stream_then_kill(server.url, lambda: int(ps(server.url)[TINY]["pid"]))
    if lines[-1].get("done"):
        pytest.fail(f"the stream finished before the kill landed ({len(lines)} lines)")
    assert "error" in lines[-1], lines[-3:]
    wait_for(lambda: not alive(pid), what="the killed runner to be reaped")
    # the next request loads the model again, in a new process
    again = client.generate(TINY, "Hi", options=GREEDY)
    assert again.done
    assert int(ps(server.url)[TINY]["pid"]) != pid


def test_official_client_sees_the_error_line(server: ServerProcess, client: ollama.Client) -> None:
    pid = load(server.url, TINY)
    stream = client.generate(TINY, "Once upon a time", raw=True, stream=True,
                             options={"temperature": 0, "num_predict": 100_000})
    with pytest.raises(ollama.ResponseError):
        for i, _ in enumerate(stream):
            if i == 0:
                os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the killed runner to be reaped")
    assert client.chat(TINY, messages=[{"role": "user", "content": "Hi"}], options=GREEDY).done


def test_client_disconnect_frees_the_model(server: ServerProcess, client: ollama.Client) -> None:
    body = {"model": TINY, "prompt": "Once upon a time", "raw": True,
            "options": {"temperature": 0, "num_predict": 100_000}}
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=60) as r:
        next(r.iter_lines())
    # the server stops decoding for the gone client: the model goes idle again
    wait_for(lambda: ps(server.url)[TINY]["active"] == 0, what="the model to go idle")
    assert client.generate(TINY, "Hi", options=GREEDY).done


def test_single_model_and_pinning_via_settings(server: ServerProcess) -> None:
    url = server.url
    unload_all(url)
    with server.client() as c:
        r = c.patch("/api/settings", json={"single_model": True, "pinned": [TINY]})
        assert r.status_code == 200
        try:
            pinned_pid = load(url, TINY)
            load(url, TINY_B)
            assert set(ps(url)) == {TINY, TINY_B}  # the pinned one stays
            b_pid = int(ps(url)[TINY_B]["pid"])
            load(url, TINY_C)
            assert set(ps(url)) == {TINY, TINY_C}  # single-model: B went, not the pinned A
            assert not alive(b_pid) and int(ps(url)[TINY]["pid"]) == pinned_pid
        finally:
            c.patch("/api/settings", json={"single_model": False, "pinned": []})
    unload_all(url)


# ---- servers of their own ---------------------------------------------------


def _runner_pids(server: ServerProcess) -> set[int]:
    return {int(r["pid"]) for r in ps(server.url).values()}


def test_single_model_env_pinned_flag_then_sigterm(cache: Path, tmp_path: Path) -> None:
    s = ServerProcess(tmp_path / "home", cache, env={"CORRAL_SINGLE_MODEL": "1"},
                      args=["--pinned", TINY_B]).start()
    try:
        wait_for(lambda: TINY_B in ps(s.url), timeout=120, what="the pinned model to load at start")
        pinned_pid = int(ps(s.url)[TINY_B]["pid"])
        a_pid = load(s.url, TINY)
        assert set(ps(s.url)) == {TINY, TINY_B}
        load(s.url, TINY_C)
        assert set(ps(s.url)) == {TINY_B, TINY_C}
        assert not alive(a_pid) and alive(pinned_pid)
        runners = _runner_pids(s)
        assert len(runners) == 2
    finally:
        code = s.stop(signal.SIGTERM, timeout=30)
    assert code == 0, s.log()
    assert not any(alive(p) for p in runners)


def test_single_model_flag_pinned_env_then_sigkill(cache: Path, tmp_path: Path) -> None:
    s = ServerProcess(tmp_path / "home", cache, env={"CORRAL_PINNED": TINY_B},
                      args=["--single-model"]).start()
    try:
        wait_for(lambda: TINY_B in ps(s.url), timeout=120, what="the pinned model to load at start")
        a_pid = load(s.url, TINY)
        load(s.url, TINY_C)
        assert set(ps(s.url)) == {TINY_B, TINY_C} and not alive(a_pid)
        runners = _runner_pids(s)
        assert s.proc is not None
        s.proc.kill()
        s.proc.wait()
        time.sleep(3)
        assert [p for p in runners if alive(p)] == []
    finally:
        s.stop()


def _footprints(server: ServerProcess) -> dict[str, int]:
    unload_all(server.url)
    sizes = {}
    for name in (TINY, TINY_B):
        load(server.url, name)
        sizes[name] = int(ps(server.url)[name]["size"])
    unload_all(server.url)
    return sizes


def test_memory_limit_evicts_then_507(server: ServerProcess, cache: Path, tmp_path: Path) -> None:
    sizes = _footprints(server)
    limit = max(sizes.values()) + min(sizes.values()) // 4  # one fits, not both
    s = ServerProcess(tmp_path / "home", cache, env={"CORRAL_MEMORY_LIMIT": str(limit)}).start()
    try:
        a_pid = load(s.url, TINY)
        b = httpx.post(s.url + "/api/generate", json={"model": TINY_B, "prompt": "Hi", "stream": False,
                                                      "options": GREEDY}, timeout=120)
        assert b.status_code == 200, b.text
        assert not alive(a_pid)  # A was gone (reaped) before B answered
        assert set(ps(s.url)) == {TINY_B}
        b_pid = int(ps(s.url)[TINY_B]["pid"])
        # now a limit no model fits in: 507 and nothing evicted
        with s.client() as c:
            assert c.patch("/api/settings", json={"memory_limit": "1MB"}).status_code == 200
            r = c.post("/api/generate", json={"model": TINY, "prompt": "Hi"})
            assert r.status_code == 507, r.text
            assert r.json()["error"]
            assert alive(b_pid) and set(ps(s.url)) == {TINY_B}
    finally:
        assert s.stop() == 0

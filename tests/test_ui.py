"""The status page's routes against a real `corral serve` with real runners (no browser:
tests/test_ui_browser.py drives the page itself).

One server per module, with an API key: the page is open, its data is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY, TINY_B
from tests.support.live_server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

KEY = "ui-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"CORRAL_API_KEY": KEY, "CORRAL_MODELS_DIRS": str(tmp_path_factory.getbasetemp()),
           "CORRAL_STALL_TIMEOUT": "1.5s"}
    with ServerProcess(tmp_path_factory.mktemp("ui-home"), hf_cache, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client(headers=AUTH) as c:
        yield c


def generate(client: httpx.Client, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "Hello", "stream": False, "options": {"num_predict": 4}, **extra}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def state(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/ui/state")
    assert r.status_code == 200, r.text
    return dict(r.json())


def events(client: httpx.Client, seconds: float) -> Iterator[tuple[float, dict[str, Any]]]:
    """(seconds since the stream opened, snapshot) for each event, for at most `seconds`."""
    t0 = time.monotonic()
    with client.stream("GET", "/ui/events", timeout=seconds + 5) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                yield time.monotonic() - t0, json.loads(line[5:])
            if time.monotonic() - t0 > seconds:
                return


def test_page_is_open_and_its_data_needs_the_key(server: ServerProcess) -> None:
    with server.client() as anon:
        page = anon.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>corral status</title>" in page.text
        assert "https://" not in page.text and "http://" not in page.text  # nothing from a CDN
        for path in ("/ui/state", "/ui/events", f"/ui/log?model={TINY}"):
            r = anon.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        assert anon.get("/ui/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anon.get("/").text.strip() == "corral is running"  # / stays the liveness answer
    # The page's own origin passes the Host/Origin checks for its actions.
    with server.client(headers={**AUTH, "Origin": server.url}) as page_origin:
        assert page_origin.get("/ui/state").status_code == 200
        r = page_origin.post("/api/generate", json={"model": TINY, "keep_alive": 0})
        assert r.status_code == 200, r.text


def test_two_models_footprints_match_ps_and_split_into_parts(client: httpx.Client) -> None:
    generate(client, TINY)
    generate(client, TINY_B)
    snap = state(client)
    ps = {m["name"].removesuffix(":latest"): m["size"] for m in client.get("/api/ps").json()["models"]}
    shown = {m["name"]: m["footprint"] for m in snap["models"]}
    assert shown == ps and set(shown) == {TINY, TINY_B}
    assert snap["memory"]["used"] == sum(ps.values())
    for m in snap["models"]:
        assert sum(m["parts"].values()) == m["footprint"]
        assert m["parts"]["weights"] > 0 and m["parts"]["kv"] > 0 and m["parts"]["overhead"] > 0
        assert m["state"] == "ready" and m["pid"] > 0 and m["active"] == 0 and m["queued"] == 0
        assert m["context_length"] > 0 and m["num_parallel"] >= 1 and m["pinned"] is False
    mem = snap["memory"]
    assert mem["limit"] > 0 and mem["limit_source"] and 0 < mem["os_free"] <= mem["os_total"]


def test_recent_requests_are_listed_newest_first(client: httpx.Client) -> None:
    generate(client, TINY, prompt="first")
    r = client.post("/v1/chat/completions", json={"model": TINY, "max_tokens": 3,
                                                  "messages": [{"role": "user", "content": "second"}]})
    assert r.status_code == 200
    missing = client.post("/api/generate", json={"model": "nobody/nothing", "prompt": "x"})
    assert missing.status_code == 404
    rows = state(client)["requests"]
    assert [(x["family"], x["status"]) for x in rows[:3]] == [("ollama", 404), ("openai", 200), ("ollama", 200)]
    ok = rows[1]
    assert ok["model"] == TINY and ok["route"] == "/v1/chat/completions"
    assert ok["tokens_in"] > 0 and 0 < ok["tokens_out"] <= 3
    assert ok["ttft"] is not None and ok["duration"] >= ok["ttft"]
    assert ok["tok_s"] is None or ok["tok_s"] > 0
    assert "nobody/nothing" in rows[0]["error"]


def test_event_stream_sends_at_once_then_within_a_second_and_on_change(client: httpx.Client) -> None:
    generate(client, TINY)
    generate(client, TINY_B)
    stream = events(client, 8)
    t_first, first = next(stream)
    assert t_first < 2 and {m["name"] for m in first["models"]} >= {TINY, TINY_B}
    t_second, _ = next(stream)
    assert t_second - t_first < 2  # a heartbeat even when nothing changed
    unloaded = client.post("/api/generate", json={"model": TINY_B, "keep_alive": 0})
    assert unloaded.status_code == 200
    t_unload = time.monotonic()
    for _, snap in stream:
        if TINY_B not in {m["name"] for m in snap["models"]}:
            assert time.monotonic() - t_unload < 2
            break
    else:
        pytest.fail("the stream never showed the unload")


def test_runner_log_lines(client: httpx.Client) -> None:
    generate(client, TINY)
    r = client.get("/ui/log", params={"model": TINY, "lines": "5"})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == TINY and 0 < len(body["lines"]) <= 5
    assert client.get("/ui/log", params={"model": "never/loaded"}).json()["lines"] == []
    assert client.get("/ui/log", params={"model": TINY, "lines": "x"}).status_code == 400
    assert client.get("/ui/log").status_code == 400
    # The name is never a path: no way out of the logs folder.
    assert client.get("/ui/log", params={"model": "../../etc/passwd"}).json()["lines"] == []


def test_failed_load_shows_its_error(client: httpx.Client, tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    for weights in broken.glob("*.safetensors"):  # a valid file without the model's tensors
        weights.write_bytes(_empty_safetensors())
    created = client.post("/api/create", json={"model": "broken-ui", "from": str(broken), "stream": False})
    assert created.status_code == 200, created.text
    r = client.post("/api/generate", json={"model": "broken-ui", "prompt": "x", "stream": False})
    assert r.status_code >= 400
    problems = {p["name"]: p for p in state(client)["problems"]}
    assert problems["broken-ui"]["state"] == "failed"
    assert problems["broken-ui"]["error"] and problems["broken-ui"]["time"] > 0


def _empty_safetensors() -> bytes:
    header = json.dumps({"__metadata__": {"format": "mlx"}}).encode()
    return len(header).to_bytes(8, "little") + header


def test_stalled_runner_shows_as_stalled(client: httpx.Client) -> None:
    generate(client, TINY_B)
    pid = next(m["pid"] for m in state(client)["models"] if m["name"] == TINY_B)
    body = {"model": TINY_B, "prompt": "Hi", "options": {"num_predict": 500, "temperature": 0}}
    try:
        with client.stream("POST", "/api/generate", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(pid, signal.SIGSTOP)  # hung mid-stream: no more lines, no /health
            last = [line for line in lines if line.strip()][-1]
        assert "stalled" in json.loads(last)["error"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        snap = state(client)
        if TINY_B not in {m["name"] for m in snap["models"]}:
            break
        time.sleep(0.2)
    problems = {p["name"]: p for p in snap["problems"]}
    assert problems[TINY_B]["state"] == "stalled" and "no progress" in problems[TINY_B]["error"]


def test_open_event_stream_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "home", tmp_path / "hub").start()
    ended: list[str] = []

    def read() -> None:
        try:
            with httpx.stream("GET", server.url + "/ui/events", timeout=60) as r:
                for _ in r.iter_lines():
                    pass
            ended.append("clean")
        except httpx.HTTPError as e:
            ended.append(type(e).__name__)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1.0)
    assert server.stop() == 0
    reader.join(10)
    assert ended == ["clean"]  # the stream ended itself: no cut connection, no cancelled task
    # (uvicorn would cut a stream still open after its graceful-shutdown limit, with a traceback)
    assert "CancelledError" not in server.log() and "Traceback" not in server.log()

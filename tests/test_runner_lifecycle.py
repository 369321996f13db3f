"""Runner process lifecycle: auth, SIGTERM mid-stream, parent death, bad model dirs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from corral.runner.tools import ToolCallSplitter

from tests.test_runner import ROOT, RunnerProcess, free_port, stream, wait_for

TOKEN = "s3cret-token"


def test_token_required_when_set(tiny_model: Path, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = RunnerProcess(tiny_model, tmp_path, env={"CORRAL_RUNNER_TOKEN": TOKEN}).start(headers=auth)
    try:
        for method, route in [("GET", "/health"), ("GET", "/status"), ("POST", "/completion"),
                              ("POST", "/tokenize")]:
            for headers in [None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]:
                resp = httpx.request(method, r.url + route, headers=headers, json={"prompt": "hi"})
                assert resp.status_code == 401, (route, headers)
                assert "error" in resp.json()
        _, done = stream(r.url, {"prompt": "Hello", "options": {"temperature": 0, "num_predict": 3}},
                            headers=auth)
        assert done["eval_count"] <= 3

        # SIGTERM in the middle of streams: each ends with "cancelled", exit 0 within 5 s.
        results: list[dict[str, Any]] = []
        started = [threading.Event(), threading.Event()]

        def consume(prompt: str, i: int) -> None:
            with httpx.stream("POST", r.url + "/completion", headers=auth, timeout=30,
                              json={"prompt": prompt, "options": {"temperature": 0, "num_ctx": 4096}}) as resp:
                last: dict[str, Any] = {}
                for line in resp.iter_lines():
                    last = json.loads(line)
                    started[i].set()
                results.append(last)

        threads = [threading.Thread(target=consume, args=(p, i)) for i, p in enumerate(("Once upon", "The quick"))]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started)  # both streams are flowing
        assert r.proc is not None
        t0 = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        for t in threads:
            t.join(timeout=10)
        assert len(results) == 2
        # A stream may have legitimately finished (EOS / window) before the signal.
        assert any(x.get("done_reason") == "cancelled" for x in results), results
        assert all(x.get("done") is True for x in results), results
    finally:
        r.stop()


def test_exits_when_parent_is_sigkilled(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    # A throwaway parent that starts the runner, reports its pid, then waits.
    parent_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'corral.runner', '--model', {str(tiny_model)!r},"
        f" '--port', '{port}'], stderr=open({str(tmp_path / 'runner.log')!r}, 'wb'))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    try:
        assert wait_for(lambda: _healthy(port), timeout=60), (tmp_path / "runner.log").read_text()
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        assert wait_for(lambda: not _running(child_pid), timeout=10)
        assert time.monotonic() - t0 < 3
    finally:
        if _running(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- model directories that cannot load --------------------------------------


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


def _bad_json_config(d: Path) -> None:
    (d / "config.json").write_text("{ not json")


def _unknown_type(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (d / "config.json").write_text(json.dumps(cfg))


def _truncated_weights(d: Path) -> None:
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])


def _garbage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!rest")


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _no_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()


def _missing_tensor(d: Path) -> None:
    import mlx.core as mx

    w = d / "model.safetensors"
    weights = mx.load(str(w))
    assert isinstance(weights, dict)
    weights.pop(sorted(weights)[0])
    mx.save_safetensors(str(w), weights)


@pytest.mark.parametrize(
    ("corrupt", "want"),
    [
        (_no_config, "no config.json"),
        (_bad_json_config, "not valid JSON"),
        (_unknown_type, "no_such_arch"),
        (_truncated_weights, "truncated"),
        (_garbage_weights, "safetensors"),
        (_no_weights, "safetensors"),
        (_no_tokenizer, "tokenizer"),
        (_missing_tensor, "cannot load"),
    ],
)
def test_broken_model_dir_exits_with_one_line(tiny_model: Path, tmp_path: Path, corrupt: Any, want: str) -> None:
    d = tmp_path / "model"
    shutil.copytree(tiny_model, d)
    corrupt(d)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "corral.runner", "--model", str(d), "--port", str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 30
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("runner: error:"), p.stderr
    assert want in last, last
    assert "Traceback" not in p.stderr


def test_tool_capable_tokenizer_with_tools_streams_plainly(tiny_model: Path, tmp_path: Path) -> None:
    # A chat template that mentions <tool_call> makes mlx_lm pick its JSON
    # tool parser (tokenizer.has_tool_calling); random weights will not emit
    # a call, so this checks the tool path runs end to end and never crashes.
    d = tmp_path / "tool-model"
    shutil.copytree(tiny_model, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = cfg["chat_template"].replace(
        "You can call these tools:", "Call tools as <tool_call>(tool_call.name, arguments)</tool_call>:")
    cfg_path.write_text(json.dumps(cfg))
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(d)
    assert tok.has_tool_calling
    # The splitter with mlx_lm's own parser for this template:
    splitter = ToolCallSplitter(tok, [])
    shown = splitter.feed('ok <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    assert (shown, splitter.finish()) == ("ok ", ("", [{"name": "f", "arguments": {"x": 1}}]))
    r = RunnerProcess(d, tmp_path).start()
    try:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                "options": {"temperature": 0, "num_predict": 12}}
        text, done = stream(r.url, body)
        plain, _ = stream(r.url, {**body, "tools": None})
        assert done["done"] is True and isinstance(text, str)
        assert done.get("tool_calls", []) == [] or all("name" in c for c in done["tool_calls"])
        assert isinstance(plain, str)
    finally:
        r.stop()

"""A runner stand-in with no mlx that speaks the runner protocol (runner/protocol.py).

Fast to start (stdlib only), so process and scheduler tests run in seconds.
Behaviour flags let tests provoke every failure the supervisor must handle:

    --ignore-sigterm   SIGTERM is ignored (the supervisor must SIGKILL)
    --load-delay S     /health answers 503 for S seconds after start
    --fail-load        print an error to stderr and exit 1 while "loading"
    --crash-after N    exit 3 (stderr says why) after streaming N tokens in total
    --memory BYTES     the rss reported in /status
    --token-delay S    seconds between streamed tokens
    --tokens N         tokens per completion (default 5)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_ENV = "CORRAL_RUNNER_TOKEN"
PARENT_PID_ENV = "CORRAL_PARENT_PID"


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loaded = False
        self.active = 0
        self.streamed = 0
        self.lock = threading.Lock()
        self.token = os.environ.get(TOKEN_ENV)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # body ends when the connection closes

        def log_message(self, format: str, *args: Any) -> None:  # keep stderr for real messages
            pass

        def _json(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
                self._json(401, {"error": "unauthorized"})
                return False
            return True

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/health":
                if state.loaded:
                    self._json(200, {"status": "ok"})
                else:
                    self._json(503, {"status": "loading"})
            elif self.path == "/status":
                a = state.args
                self._json(200, {
                    "status": "ok" if state.loaded else "loading", "model": a.model, "pid": os.getpid(),
                    "context_length": a.num_ctx, "num_parallel": a.num_parallel, "active": state.active,
                    "device": "cpu",
                    "memory": {"active": 0, "cache": 0, "peak": a.memory, "rss": a.memory, "peak_rss": a.memory},
                })
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            try:
                body = self._body()
            except ValueError:
                self._json(400, {"error": "invalid JSON"})
                return
            if self.path == "/tokenize":
                self._json(200, {"tokens": [ord(c) for c in str(body.get("content", ""))]})
            elif self.path == "/detokenize":
                self._json(200, {"content": "".join(chr(t) for t in body.get("tokens", []))})
            elif self.path == "/completion":
                self._completion(body)
            else:
                self._json(404, {"error": "not found"})

        def _completion(self, body: dict[str, Any]) -> None:
            if "prompt" not in body and "messages" not in body:
                self._json(400, {"error": "either 'prompt' or 'messages' is required"})
                return
            n = int((body.get("options") or {}).get("num_predict") or state.args.tokens)
            if n < 0:
                n = state.args.tokens
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            with state.lock:
                state.active += 1
            try:
                for i in range(n):
                    time.sleep(state.args.token_delay)
                    with state.lock:
                        state.streamed += 1
                        crash = state.args.crash_after is not None and state.streamed > state.args.crash_after
                    if crash:
                        log(f"fatal: fake runner crashed after {state.args.crash_after} tokens")
                        os._exit(3)
                    self.wfile.write((json.dumps({"content": f"t{i} ", "done": False}) + "\n").encode())
                    self.wfile.flush()
                done = {"content": "", "done": True, "done_reason": "length", "prompt_eval_count": 1,
                        "prompt_eval_duration": 1, "eval_count": n, "eval_duration": 1}
                self.wfile.write((json.dumps(done) + "\n").encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away: the sequence is cancelled
            finally:
                with state.lock:
                    state.active -= 1

    return Handler


def watch_parent(pid: int) -> None:
    while True:
        time.sleep(0.2)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        if os.getppid() != pid:
            os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fd", type=int, default=None, help="an inherited bound socket to listen on")
    p.add_argument("--num-ctx", type=int, default=4096)
    p.add_argument("--num-parallel", type=int, default=4)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--load-delay", type=float, default=0.0)
    p.add_argument("--fail-load", action="store_true")
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--memory", type=int, default=50_000_000)
    p.add_argument("--token-delay", type=float, default=0.01)
    p.add_argument("--tokens", type=int, default=5)
    args = p.parse_args()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        threading.Thread(target=watch_parent, args=(int(parent),), daemon=True).start()

    state = State(args)
    if args.fd is None:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    else:  # as the real runner does: the supervisor bound it (process.reserve_port)
        server = ThreadingHTTPServer((args.host, args.port), make_handler(state), bind_and_activate=False)
        server.socket.close()
        server.socket = socket.socket(fileno=args.fd)
        server.server_activate()
    server.daemon_threads = True
    log(f"fake runner: loading {args.model} on port {args.port}")

    def load() -> None:
        time.sleep(args.load_delay)
        if args.fail_load:
            log(f"error: cannot load {args.model}: fake load failure")
            os._exit(1)
        state.loaded = True
        log("fake runner: ready")

    threading.Thread(target=load, daemon=True).start()
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()

"""`corral serve`: settings from flags/env/file, the app, uvicorn, clean signals.

Each flag mirrors one CORRAL_* environment variable (DESIGN.md,
"Configuration"); a flag not given leaves the setting to the environment,
then $CORRAL_HOME/config.toml, then the default.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from typing import Any

from corral.supervisor.config import SETTING_NAMES, Settings, load_settings
from corral.supervisor.errors import BadRequest

log = logging.getLogger("corral")

# flag -> (help, extra argparse kwargs); the setting name is the flag with "_" for "-".
_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--host": ("address to bind, HOST[:PORT] (CORRAL_HOST, default 127.0.0.1:11434)", {}),
    "--home": ("registry, logs and config.toml (CORRAL_HOME, default ~/.corral)", {}),
    "--keep-alive": ("idle time before unload: 5m, 30s, 0 at once, -1 forever (CORRAL_KEEP_ALIVE)", {}),
    "--max-loaded-models": ("cap on loaded models, 0 = memory decides (CORRAL_MAX_LOADED_MODELS)", {}),
    "--single-model": ("loading a model evicts every other non-pinned one (CORRAL_SINGLE_MODEL); "
                       "--single-model=false turns it off", {"nargs": "?", "const": "true"}),
    "--pinned": ("comma-separated models loaded at start, never evicted (CORRAL_PINNED)", {}),
    "--num-parallel": ("sequences decoded together per model (CORRAL_NUM_PARALLEL)", {}),
    "--max-queue": ("waiting requests before 503 (CORRAL_MAX_QUEUE)", {}),
    "--context-length": ("num_ctx per sequence (CORRAL_CONTEXT_LENGTH)", {}),
    "--memory-limit": ("bytes, 24GB or 80%% (CORRAL_MEMORY_LIMIT)", {}),
    "--load-timeout": ("seconds or duration a load may take (CORRAL_LOAD_TIMEOUT)", {}),
    "--api-key": ("require this bearer key on every request (CORRAL_API_KEY)", {}),
    "--origins": ("comma-separated CORS origins (CORRAL_ORIGINS)", {}),
    "--allow-pull": ("download unknown models on request: '*' or patterns (CORRAL_ALLOW_PULL)",
                     {"nargs": "?", "const": "*"}),
    "--default-model": ("model used for OpenAI/Anthropic names that are not local "
                        "(CORRAL_DEFAULT_MODEL)", {}),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (help_text, extra) in _FLAGS.items():
        parser.add_argument(flag, default=None, help=help_text, **extra)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity (stderr)")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Only the settings given on the command line (None = not given)."""
    return {name: getattr(args, name, None) for name in SETTING_NAMES}


KEEP_ALIVE_S = 75
"""Idle seconds before the server closes a client's connection: longer than
clients' own idle expiry (httpx, under the ollama/openai/anthropic clients:
5 s, uvicorn's default too). With equal timeouts a client can send a request
just as the server closes the connection, and that request is lost."""


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # proto must say TCP: asyncio turns on TCP_NODELAY only for accepted sockets
    # whose proto is IPPROTO_TCP (they inherit it from this one). With proto 0,
    # Nagle holds the second small write of each response (headers go out, then
    # the body) until the client's delayed ACK: ~40 ms on every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _address_in_use_message(settings: Settings) -> str:
    return (f"corral: {settings.host}:{settings.port} is already in use (is another corral or "
            f"ollama running?); set CORRAL_HOST=127.0.0.1:PORT or --host to serve elsewhere")


def build_context(settings: Settings) -> Any:
    from corral.supervisor.api.context import AppContext
    from corral.supervisor.scheduler import Scheduler
    from corral.supervisor.store import ModelStore

    store = ModelStore(settings.home)
    scheduler = Scheduler(settings, store)
    return AppContext(settings=settings, store=store, scheduler=scheduler)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per request comes from uvicorn's access log; the supervisor's own
    # calls to its runners would double every line, so httpx logs only problems.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from corral.supervisor.app import create_app

    _setup_logging(args.log_level)
    try:
        settings = load_settings(flags_from_args(args))
    except (BadRequest, ValueError) as e:
        print(f"corral: invalid configuration: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2
    try:
        sock = _bind(settings)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(_address_in_use_message(settings), file=sys.stderr)
        else:
            print(f"corral: cannot listen on {settings.host}:{settings.port}: {e.strerror}",
                  file=sys.stderr)
        return 1
    settings.home.mkdir(parents=True, exist_ok=True)
    app = create_app(build_context(settings))
    config = uvicorn.Config(app, log_level=args.log_level, access_log=True,
                            timeout_graceful_shutdown=5, lifespan="on", timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; with these
    # handlers that re-raise is a no-op, so SIGTERM/SIGINT end in exit status 0
    # after the lifespan shutdown has stopped every runner.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("corral listening on http://%s:%d (home %s)", settings.host, settings.port, settings.home)
    server.run(sockets=[sock])
    return 0 if server.started else 1

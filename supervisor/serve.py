"""`corral serve`: settings from flags/env/file, the app, uvicorn, clean signals.

Each flag mirrors one CORRAL_* environment variable; both come from the
settings table in supervisor.config. A flag not given leaves the setting to
the environment, then $CORRAL_HOME/config.toml, then the default.
"""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import signal
import socket
import sys
from typing import Any

from corral.supervisor.config import SETTING_NAMES, SETTINGS, Setting, Settings, load_settings
from corral.supervisor.errors import BadRequest

log = logging.getLogger("corral")


def _help(setting: Setting) -> str:
    """--help for one setting, from its declaration (argparse reads % as a format)."""
    text = f"{setting.doc} ({setting.env}, default {setting.default_text()})"
    return text.replace("`", "").replace("%", "%%")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for setting in SETTINGS:
        if not setting.flag:
            continue
        # A flag not given stays None, leaving the setting to env, file and default.
        extra: dict[str, Any] = {"nargs": "?", "const": setting.bare} if setting.bare else {}
        parser.add_argument(setting.flag_name, default=None, metavar=setting.metavar,
                            help=_help(setting), **extra)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity (stderr)")
    parser.add_argument("--access-log", action="store_true",
                        help="also log uvicorn's access line per HTTP request (off: the supervisor "
                             "logs one line per completion request)")


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
    from functools import partial

    from corral.supervisor.api.context import AppContext
    from corral.supervisor.memory import estimate_need
    from corral.supervisor.scheduler import Scheduler
    from corral.supervisor.store import ModelStore

    store = ModelStore(settings.home)
    scheduler = Scheduler(settings, store, estimate=partial(estimate_need, prompt_cache=settings.prompt_cache))
    return AppContext(settings=settings, store=store, scheduler=scheduler)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per completion request comes from the pipeline's request log; the
    # supervisor's own calls to its runners would double it, so httpx logs only problems.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from corral.supervisor.app import create_app
    from corral.supervisor.read_timeouts import guarded_protocol

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
    ctx = build_context(settings)
    app = create_app(ctx)
    # loop "auto": uvloop, a dependency (up to 20% less of this process's CPU
    # per streamed line, ~10% per request, than asyncio's selector loop). The
    # protocol is uvicorn's httptools one (about 20% less again per request
    # than h11), subclassed for the read timeouts.
    config = uvicorn.Config(app, log_level=args.log_level, access_log=bool(getattr(args, "access_log", False)),
                            timeout_graceful_shutdown=5, lifespan="on", timeout_keep_alive=KEEP_ALIVE_S,
                            loop="auto", http=guarded_protocol(settings.header_timeout, settings.body_timeout))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            ctx.stopping = True  # the status page's event streams end instead of holding up the exit
            super().handle_exit(sig, frame)

    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; with these
    # handlers that re-raise is a no-op, so SIGTERM/SIGINT end in exit status 0
    # after the lifespan shutdown has stopped every runner.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("corral listening on http://%s:%d (home %s)", settings.host, settings.port, settings.home)
    # What start-up made (starlette, httpx, the app) lives as long as the process:
    # out of the collector's sight, its rare full collections stop the event loop
    # (every stream) for much less.
    gc.collect()
    gc.freeze()
    server.run(sockets=[sock])
    return 0 if server.started else 1

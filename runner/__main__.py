"""`python -m corral.runner --model DIR --port N`: serve one model over loopback HTTP.

The model directory is checked cheaply before mlx is imported, so a broken
model fails within seconds with one readable line on stderr.

Standby mode (`--model -`): the process does its heavy imports first (mlx_lm
and transformers take 1.5-2 s, far longer than loading a small model), then
reads one JSON line on stdin, {"model": DIR, "num_ctx": N, "num_parallel": N,
"name": str}, and carries on as if those had been its arguments. The
supervisor keeps one such process ready so a cold load skips interpreter
start and imports. EOF on stdin before the line: exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.runner.embed_spec import EmbedSpec, EmbedSpecError, embedding_spec
from corral.runner.lifecycle import die_with_parent, hard_exit_after
from corral.runner.precheck import ModelDirError, check_model_dir, default_num_ctx
from corral.runner.protocol import DEFAULT_NUM_CTX, DEFAULT_NUM_PARALLEL, SOLO_ENV, TOKEN_ENV

if TYPE_CHECKING:  # heavy imports only after the model dir checks out
    import uvicorn
    from corral.runner.routes import RunnerApp

log = logging.getLogger("runner")

SHUTDOWN_GRACE_S = 2.0
"""How long SIGTERM waits for cancelled streams to flush their last line."""

KV_SAVE_S = 1.5
"""How long SIGTERM may spend writing the prompt cache's disk tier (most recent first).
SHUTDOWN_GRACE_S + KV_SAVE_S stays under the supervisor's SIGTERM-to-SIGKILL grace."""

KEEP_ALIVE_S = 3600
"""How long an idle connection from the supervisor stays open.

Well past any client's own idle expiry (httpx: 5 s, the same as uvicorn's
default): with equal timeouts the client may send a request on a connection
in the instant the server closes it, and that request is lost with no
response. The client's pool bounds how many idle connections there are.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m corral.runner", description="Serve one MLX model over HTTP.")
    p.add_argument("--model", required=True,
                   help="model directory (config.json, *.safetensors, tokenizer); '-': standby, read it on stdin")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fd", type=int, default=None,
                   help="an inherited TCP socket, bound to --host:--port, to listen on (the supervisor "
                        "reserves the port this way from spawn on)")
    p.add_argument("--num-ctx", type=int, default=0, help="tokens per sequence (default: min(4096, model max))")
    p.add_argument("--num-parallel", type=int, default=DEFAULT_NUM_PARALLEL)
    p.add_argument("--name", default=None, help="model name reported by /status (default: the directory)")
    p.add_argument("--distributed", choices=("tensor", "pipeline"), default=None,
                   help="one rank of a model sharded across processes started by mlx.launch; rank 0 serves")
    args = p.parse_args(argv)
    if args.num_ctx < 0 or args.num_parallel < 1:
        p.error("--num-ctx must be >= 0 and --num-parallel >= 1")
    return args


def fail(message: str) -> None:
    # One line, last on stderr: the supervisor quotes it as the load error.
    sys.stderr.write(f"runner: error: {message}\n")
    sys.stderr.flush()
    sys.exit(2)


def load(model_dir: Path) -> tuple[object, object]:
    from mlx_lm import load as mlx_load

    try:
        model, tokenizer = mlx_load(str(model_dir))[:2]
    except Exception as e:  # any load failure becomes one line
        detail = " ".join(str(e).split()) or "no details"
        if len(detail) > 300:
            detail = detail[:297] + "..."
        fail(f"cannot load {model_dir}: {type(e).__name__}: {detail}")
    return model, tokenizer


def embedding_spec_or_fail(model_dir: Path, config: dict[str, Any]) -> EmbedSpec | None:
    """The runner's mode, from the model's files: an EmbedSpec for embedding models."""
    try:
        return embedding_spec(model_dir, config)
    except EmbedSpecError as e:
        fail(str(e))
    return None


def load_embedder(model_dir: Path, spec: EmbedSpec, num_ctx: int, num_parallel: int) -> Any:
    from corral.runner import embedding

    try:
        return embedding.load(model_dir, spec, num_ctx=num_ctx, num_parallel=num_parallel)
    except Exception as e:  # any load failure becomes one line
        detail = " ".join(str(e).split())[:300] or "no details"
        fail(f"cannot load {model_dir}: {type(e).__name__}: {detail}")
    return None


STANDBY = "-"


def await_assignment(args: argparse.Namespace) -> None:
    """Standby: import what loading needs, then take the model from stdin into `args`."""
    import corral.runner.engine
    import corral.runner.routes  # noqa: F401
    import mlx_lm  # noqa: F401  (the slow import this mode exists to get done early)
    from corral.runner.device import device_facts, facts_line

    # The supervisor reads this line to fit its first load against the device's limit.
    sys.stderr.write(facts_line(device_facts()) + "\n")
    sys.stderr.flush()
    log.info("standby: imports done, waiting for a model on stdin")
    line = sys.stdin.readline()
    if not line.strip():
        log.info("standby: stdin closed without a model; exiting")
        logging.shutdown()
        os._exit(0)
    try:
        assignment = json.loads(line)
        args.model = str(assignment["model"])
        args.num_ctx = int(assignment.get("num_ctx") or 0)
        args.num_parallel = int(assignment.get("num_parallel") or DEFAULT_NUM_PARALLEL)
        args.name = assignment.get("name") or args.name
        env = assignment.get("env") or {}
        os.environ.update({str(k): str(v) for k, v in env.items()})  # settings that vary per model
    except (ValueError, KeyError, TypeError) as e:
        fail(f"standby: bad model assignment on stdin: {e}")
    if args.num_ctx < 0 or args.num_parallel < 1:
        fail("standby: num_ctx must be >= 0 and num_parallel >= 1")
    log.info("standby: assigned %s", args.model)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s runner[%(process)d] %(levelname)s %(message)s")
    args = parse_args(argv)
    die_with_parent()
    if args.model == STANDBY:
        await_assignment(args)
    model_dir = Path(args.model).expanduser()
    try:
        config = check_model_dir(model_dir)
    except ModelDirError as e:
        fail(str(e))
    num_ctx = args.num_ctx or default_num_ctx(config, DEFAULT_NUM_CTX)

    if args.distributed:
        from corral.runner import distributed

        distributed.run(args, model_dir, num_ctx, fail, run_server)
    t0 = time.perf_counter()
    spec = embedding_spec_or_fail(model_dir, config)
    app: RunnerApp
    if spec is not None:  # an embedding model: same process shape, /embed instead of /completion
        engine: Any = load_embedder(model_dir, spec, num_ctx, args.num_parallel)
        from corral.runner.embed_app import EmbedRunnerApp

        app = EmbedRunnerApp(engine, model_name=args.name or str(model_dir), token=os.environ.get(TOKEN_ENV) or None)
    else:
        model, tokenizer = load(model_dir)
        from corral.runner import prompt_cache
        from corral.runner.engine import Engine
        from corral.runner.routes import RunnerApp

        cache = prompt_cache.from_env(model, model_dir, num_ctx=num_ctx, num_parallel=args.num_parallel)
        engine = Engine(model, tokenizer, num_ctx=num_ctx, num_parallel=args.num_parallel, prompt_cache=cache,
                        solo=os.environ.get(SOLO_ENV, "1") != "0")
        app = RunnerApp(engine, model_name=args.name or str(model_dir), token=os.environ.get(TOKEN_ENV) or None)
    # Everything made so far (mlx, transformers, the tokenizer: a few hundred
    # thousand objects) lives as long as the process: out of the collector's
    # sight, a full collection while tokens stream scans only what requests made.
    gc.collect()
    gc.freeze()
    engine.start()
    log.info("loaded %s in %.2fs (num_ctx=%d num_parallel=%d)", model_dir, time.perf_counter() - t0,
             num_ctx, args.num_parallel)
    run_server(app, args.host, args.port, args.fd)
    engine.stop()
    log.info("exited cleanly")
    logging.shutdown()
    os._exit(0)  # skip interpreter teardown of MLX state: nothing left to flush


def run_server(app: RunnerApp, host: str, port: int, fd: int | None = None) -> None:
    """Serve until SIGTERM, on uvloop where it is installed (a dependency; it has no
    Windows build). Every streamed line costs this event loop a wake-up, a
    write and the protocol's bookkeeping; uvloop's C transports and uvicorn's
    httptools parser (picked with it) take 20-30% less of its CPU per line,
    and 10-25% less of the process's CPU per request, than asyncio's selector
    loop and h11: CPU the generation thread needs on a small machine."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(app, host, port, fd))
    else:
        uvloop.run(serve(app, host, port, fd))


async def serve(app: RunnerApp, host: str, port: int, fd: int | None = None) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: its graceful shutdown
        waits for open streams forever, so SIGTERM is ours."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app.app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=1, timeout_keep_alive=KEEP_ALIVE_S)
    server = Server(config)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def on_term() -> None:
        if app.draining:
            return
        log.info("SIGTERM: cancelling %d stream(s) and shutting down", app.streams)
        hard_exit_after(SHUTDOWN_GRACE_S + KV_SAVE_S + 2.0, 0)
        app.cancel_all()
        tasks.add(loop.create_task(_finish(server, app)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    # An inherited socket (--fd) is already bound to host:port; uvicorn listens on it.
    await server.serve(sockets=None if fd is None else [socket.socket(fileno=fd)])


def save_prompt_cache(app: RunnerApp) -> None:
    """Stop generation, writing the prompt cache's disk tier within KV_SAVE_S."""
    engine = app.engine
    if not hasattr(engine, "stop_and_save"):  # embedding runners keep no prompt cache
        return
    t0 = time.perf_counter()
    files, nbytes = engine.stop_and_save(KV_SAVE_S)
    if files or nbytes:
        log.info("prompt cache: wrote %d file(s), %d bytes on disk, in %.0f ms",
                 files, nbytes, (time.perf_counter() - t0) * 1000)


async def _finish(server: uvicorn.Server, app: RunnerApp) -> None:
    # Let every cancelled stream write its done line, then stop serving
    # without uvicorn's unbounded wait for connections.
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while app.streams > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    save_prompt_cache(app)
    # Exit now rather than through uvicorn's shutdown (a 0.1 s tick, then
    # connection draining) and interpreter teardown: every stream has written
    # its last line, and the OS reclaims sockets and memory at once. Eviction
    # time is on the path of every model switch.
    server.should_exit = True
    log.info("exited cleanly")
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()

"""One model across several processes (and hosts) with MLX's distributed layer.

`python -m corral.runner --distributed tensor|pipeline ...` is started once per
rank by `mlx.launch` (ring backend over TCP, or JACCL over Thunderbolt RDMA).
Every rank loads its shard with mlx_lm's `sharded_load`; rank 0, the leader,
serves the runner protocol; the others, followers, serve nothing.

Lockstep: every rank runs the same Engine (one mlx_lm BatchGenerator). Each
pass of the generation loop the leader shares the inbox items it took (new
sequences, cancels, stop) with one all_sum of a small byte array, so every rank
applies the same items before the same step and calls the model with the same
batch: the model's own collectives (tensor: all_sum of the sharded matmuls;
pipeline: send/recv between stages) then line up. Sampling is identical on
every rank because each sequence carries an explicit seed (the leader picks one
when the request has none) and the logits after the model's collectives are the
same everywhere. Followers' output goes nowhere. The prompt cache is off: its
eviction is not part of the shared state.

Peer watch: each follower keeps a TCP connection to the leader (the leader's
address from the launcher's hostfile, an ephemeral port shared with an
all_sum at start) and sends a status line (pid, host, memory) every
HEARTBEAT_S; the leader answers on the same connection. A collective with a
peer gone may block forever, so the leader does not wait for one: a closed
connection or HEARTBEAT_TIMEOUT_S of silence fails every stream with an
in-band error and exits the process, and a follower that loses the leader
exits too. `mlx.launch` ends the remaining ranks when one exits with an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import numpy as np
import psutil
from corral.runner.protocol import TOKEN_ENV, SamplingOptions

if TYPE_CHECKING:
    from corral.runner.engine import Engine, Sequence
    from corral.runner.routes import RunnerApp

log = logging.getLogger("runner")

MODES = ("tensor", "pipeline")
HEARTBEAT_S = 0.5
HEARTBEAT_TIMEOUT_S = 10.0
"""Silence from a peer this long means it hangs (or its host is gone)."""
CONNECT_TIMEOUT_S = 60.0
"""How long the leader waits for every follower's watch connection after loading."""
EXIT_GRACE_S = 2.0
"""How long the leader lets failed streams write their error line before it exits."""

Item = tuple[str, "Sequence | None"]


# -- sharing the leader's inbox items ----------------------------------------


class _NullLoop:
    """A follower's sequences report to nobody."""

    def call_soon_threadsafe(self, *args: Any) -> None:
        return None


class StepSync:
    """Shares the leader's inbox items with every rank, once per generation step."""

    def __init__(self, group: Any, tokenizer: Any) -> None:
        self.group = group
        self.leader = group.rank() == 0
        self._tokenizer = tokenizer
        self._next_key = 0
        self._by_seq: dict[int, tuple[int, Sequence]] = {}  # leader: id(seq) -> (key, seq)
        self._by_key: dict[int, Sequence] = {}  # follower: key -> its copy of the sequence
        self._grammars: Any = None
        self._closed = False

    def share(self, items: list[Item], stream: Any) -> list[Item]:
        """The leader passes what it took from its inbox; every rank gets the same items back.

        `stream` is the generator's: the step it has in flight (mlx_lm evaluates
        the next step asynchronously) runs the model's collectives, and this
        rank's share must not interleave with them in a different order than on
        the other ranks, so it waits for that step first."""
        mx.synchronize(stream)
        if self.leader:
            wire = [w for w in (self._encode(kind, seq) for kind, seq in items) if w is not None]
            self._broadcast(wire)
            return items
        return [self._decode(w) for w in self._receive()]

    def close(self, stream: Any) -> None:
        """The leader's loop ended: tell the followers to leave theirs."""
        if self.leader and not self._closed:
            self._closed = True
            try:
                mx.synchronize(stream)
                self._broadcast([["stop"]])
            except Exception:  # a peer already gone: the watch ends the process
                log.warning("could not tell the other ranks to stop")

    # -- leader

    def _encode(self, kind: str, seq: Sequence | None) -> list[Any] | None:
        self._prune()
        if kind == "add" and seq is not None:
            if seq.options.seed is None and not seq.options.greedy:
                # every rank must draw the same token: one seed for all of them
                seq.options = replace(seq.options, seed=secrets.randbits(63))
            key = self._next_key
            self._next_key += 1
            self._by_seq[id(seq)] = (key, seq)
            grammar = getattr(seq.grammar, "spec", None)
            return ["add", key, {"prompt": seq.prompt, "options": asdict(seq.options), "max_tokens": seq.max_tokens,
                                 "grammar": grammar, "top_logprobs": seq.top_logprobs}]
        if kind == "cancel" and seq is not None and id(seq) in self._by_seq:
            return ["cancel", self._by_seq[id(seq)][0]]
        if kind == "cancel_all":
            return ["cancel_all"]
        return None  # "wake": nothing to share

    def _prune(self) -> None:
        for ident in [i for i, (_, s) in self._by_seq.items() if s.finished]:
            del self._by_seq[ident]

    def _broadcast(self, wire: list[list[Any]]) -> None:
        data = json.dumps(wire).encode() if wire else b""
        size = mx.distributed.all_sum(mx.array(len(data), dtype=mx.int32), group=self.group, stream=mx.cpu)
        mx.eval(size)
        if data:
            payload = mx.array(np.frombuffer(data, dtype=np.uint8))
            mx.eval(mx.distributed.all_sum(payload, group=self.group, stream=mx.cpu))

    # -- follower

    def _receive(self) -> list[list[Any]]:
        size = mx.distributed.all_sum(mx.array(0, dtype=mx.int32), group=self.group, stream=mx.cpu)
        n = int(cast(int, size.item()))
        if n == 0:
            return []
        payload = mx.distributed.all_sum(mx.zeros((n,), dtype=mx.uint8), group=self.group, stream=mx.cpu)
        return cast(list[list[Any]], json.loads(bytes(np.array(payload, dtype=np.uint8))))

    def _decode(self, wire: list[Any]) -> Item:
        kind = wire[0]
        if kind == "add":
            seq = self._sequence(wire[2])
            for key in [k for k, s in self._by_key.items() if s.finished]:
                del self._by_key[key]
            self._by_key[int(wire[1])] = seq
            return "add", seq
        if kind == "cancel":
            return "cancel", self._by_key.get(int(wire[1]))
        return kind, None  # cancel_all, stop

    def _sequence(self, fields: dict[str, Any]) -> Sequence:
        from corral.runner.engine import Sequence

        opts = dict(fields["options"])
        opts["stop"] = tuple(opts.get("stop") or ())
        return Sequence(prompt=list(fields["prompt"]), options=SamplingOptions(**opts),
                        max_tokens=int(fields["max_tokens"]), loop=cast(asyncio.AbstractEventLoop, _NullLoop()),
                        grammar=self._grammar(fields.get("grammar")), top_logprobs=fields.get("top_logprobs"))

    def _grammar(self, spec: str | None) -> Any:
        if spec is None:
            return None
        from corral.runner.grammar import GrammarCache, GrammarProcessor

        if self._grammars is None:
            self._grammars = GrammarCache(self._tokenizer)
        return GrammarProcessor(self._grammars.compile(spec), self._grammars.vocab_size, spec)


# -- watching the peers -------------------------------------------------------


def leader_address() -> str:
    """Rank 0's IP as the launcher gave it to the backend (loopback when it cannot tell)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).is_file():
        try:
            hosts = json.loads(Path(hostfile).read_text())
            return str(hosts[0][0]).rsplit(":", 1)[0]
        except (ValueError, IndexError, TypeError):
            pass
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR")
    if coordinator:
        return coordinator.rsplit(":", 1)[0]
    return "127.0.0.1"


_rss_before_load = 0  # this rank's RSS once its process group was up, before its shard came in


def memory_facts() -> dict[str, int]:
    return {"active": int(mx.get_active_memory()), "peak": int(mx.get_peak_memory()),
            "cache": int(mx.get_cache_memory()), "rss": int(psutil.Process().memory_info().rss),
            "rss_before_load": _rss_before_load}


def rank_status(rank: int) -> dict[str, Any]:
    return {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "memory": memory_facts()}


class PeerWatch:
    """The leader's side: one connection per follower, its latest status, and loss detection."""

    def __init__(self, size: int, on_lost: Callable[[str], None], host: str) -> None:
        self.size = size
        self.on_lost = on_lost
        self.peers: dict[int, dict[str, Any]] = {}
        self._lost = threading.Event()
        self._server = socket.create_server((host, 0))
        self.port = int(self._server.getsockname()[1])
        self._connected = threading.Semaphore(0)
        threading.Thread(target=self._accept, name="peer-accept", daemon=True).start()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for _ in range(self.size - 1):
            if not self._connected.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
        return True

    def _accept(self) -> None:
        for _ in range(self.size - 1):
            conn, _ = self._server.accept()
            threading.Thread(target=self._watch, args=(conn,), name="peer-watch", daemon=True).start()
        self._server.close()

    def _watch(self, conn: socket.socket) -> None:
        conn.settimeout(HEARTBEAT_TIMEOUT_S)
        rank: int | None = None
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline()
                if not line:
                    raise ConnectionError("connection closed")
                status = json.loads(line)
                if rank is None:
                    rank = int(status["rank"])
                    self._connected.release()
                self.peers[rank] = status
                conn.sendall(b"ok\n")
        except (OSError, ValueError) as e:
            what = "hangs" if isinstance(e, TimeoutError) else f"is gone ({e})"
            self._lose(f"rank {rank if rank is not None else '?'} {what}")

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost.set()
            self.on_lost(reason)


def follow_leader(host: str, port: int, rank: int) -> None:
    """A follower's side: send a status line every HEARTBEAT_S; exit when the leader is gone."""
    try:
        conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        _exit(1, f"cannot reach the leader at {host}:{port}: {e}")
    conn.settimeout(HEARTBEAT_TIMEOUT_S)

    def beat() -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                conn.sendall(json.dumps(rank_status(rank)).encode() + b"\n")
                if not reader.readline():
                    raise ConnectionError("connection closed")
                time.sleep(HEARTBEAT_S)
        except (OSError, ValueError) as e:
            _exit(1, f"lost the leader: {e}")

    threading.Thread(target=beat, name="leader-watch", daemon=True).start()


def _exit(code: int, message: str) -> None:
    log.error("%s; exiting", message)
    logging.shutdown()
    os._exit(code)


# -- the process --------------------------------------------------------------


def init_group() -> Any:
    group = mx.distributed.init(strict=True)
    if group.size() < 2:
        raise RuntimeError("a distributed runner needs at least 2 ranks (start it with mlx.launch)")
    return group


def load_shard(model_dir: Path, mode: str, group: Any) -> tuple[Any, Any, str]:
    """This rank's shard; the other mode when the model's family supports only that one
    (every rank decides the same, from the same files). Returns the mode used too."""
    from mlx_lm.utils import sharded_load

    for attempt in (mode, *(m for m in MODES if m != mode)):
        pipeline, tensor = (group, None) if attempt == "pipeline" else (None, group)
        try:
            model, tokenizer = sharded_load(str(model_dir), pipeline_group=pipeline, tensor_group=tensor)[:2]
        except ValueError as e:
            if "does not support" not in str(e):
                raise
            log.info("%s parallel: %s", attempt, e)
            continue
        return model, tokenizer, attempt
    raise ValueError(f"the model supports neither {' nor '.join(MODES)} parallelism")


def share_int(group: Any, value: int) -> int:
    """The leader's value on every rank (the others pass 0)."""
    out = mx.distributed.all_sum(mx.array(value, dtype=mx.int64), group=group, stream=mx.cpu)
    return int(cast(int, out.item()))


def run(args: argparse.Namespace, model_dir: Path, num_ctx: int,
        fail: Callable[[str], None], run_server: Callable[[RunnerApp, str, int], None]) -> None:
    """Load this rank's shard and serve (leader) or follow (the others); never returns."""
    from corral.runner.engine import Engine

    global _rss_before_load
    try:
        group = init_group()
        _rss_before_load = int(psutil.Process().memory_info().rss)
        model, tokenizer, mode = load_shard(model_dir, args.distributed, group)
        mx.clear_cache()  # the whole tensors each shard was cut from
    except Exception as e:  # any load failure becomes one line
        detail = " ".join(str(e).split())[:300] or "no details"
        fail(f"cannot load {model_dir} ({args.distributed} parallel): {type(e).__name__}: {detail}")
        return
    rank, size = group.rank(), group.size()
    sync = StepSync(group, tokenizer)
    engine = Engine(model, tokenizer, num_ctx=num_ctx, num_parallel=args.num_parallel, sync=sync)
    log.info("rank %d/%d loaded its %s shard of %s", rank, size, mode, model_dir)
    if rank == 0:
        _lead(args, model_dir, engine, group, mode, run_server)
    else:
        _follow(engine, group, rank)


def _lead(args: argparse.Namespace, model_dir: Path, engine: Engine, group: Any, mode: str,
          run_server: Callable[[RunnerApp, str, int], None]) -> None:
    from corral.runner.routes import RunnerApp

    app = RunnerApp(engine, model_name=args.name or str(model_dir), token=os.environ.get(TOKEN_ENV) or None)

    def lost(reason: str) -> None:
        message = f"distributed runner failed: {reason}"
        log.error("%s", message)
        app.draining = True
        engine.fail_all(message)
        deadline = time.monotonic() + EXIT_GRACE_S
        while app.streams > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        _exit(1, message)

    watch = PeerWatch(group.size(), lost, leader_address())
    share_int(group, watch.port)
    if not watch.wait_connected(CONNECT_TIMEOUT_S):
        _exit(2, "runner: error: not every rank connected to the leader")
    size = group.size()

    def status() -> dict[str, Any]:
        ranks = [rank_status(0), *(watch.peers[r] for r in sorted(watch.peers))]
        return {"distributed": {"mode": mode, "size": size, "ranks": ranks}}

    app.extra_status = status
    engine.start()
    run_server(app, args.host, args.port)
    engine.stop()
    logging.shutdown()
    os._exit(0)


def _follow(engine: Engine, group: Any, rank: int) -> None:
    port = share_int(group, 0)
    follow_leader(leader_address(), port, rank)
    engine.start()
    engine.join()
    log.info("rank %d: the leader stopped; exiting", rank)
    logging.shutdown()
    os._exit(0)

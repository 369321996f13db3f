"""The generation thread: the only thread that touches MLX.

HTTP handlers submit Sequences through a thread-safe queue and read results
from a per-sequence asyncio queue that this thread feeds. Everything one pass
of the loop produces (a decode step's tokens for every sequence, done lines)
crosses to the event loop in one loop.call_soon_threadsafe: each call wakes
the event loop through its self-pipe and takes the GIL there, so one per step
rather than one per token per sequence. Up to num_parallel sequences decode
together in one mlx_lm BatchGenerator; new ones are admitted between steps,
the rest wait in FIFO order. A sequence that decodes alone does so outside
the BatchGenerator (runner/solo.py), which costs less per token, and joins
the batch when a second one arrives. Requests that arrive while others decode
may wait a few milliseconds for each other (JOIN_WINDOW), so that they share
one prefill pass instead of stalling the batch once each.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import mlx.core as mx
from corral.runner.grammar import GrammarProcessor
from corral.runner.logprobs import TokenText
from corral.runner.prompt_cache import PromptCache
from corral.runner.protocol import DONE_CANCELLED, DONE_LENGTH, DONE_STOP, SamplingOptions
from corral.runner.sampling import make_processors, make_sampler
from corral.runner.solo import Solo
from corral.runner.stops import StopMatcher
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

log = logging.getLogger("runner")

STREAM_INTERVAL = 0.02  # seconds: after a stream's first token, its text goes out at most this often
HANDOFFS_PER_SECOND = 100  # lines per second across all streams that the interval aims for
MAX_STREAM_INTERVAL = 0.1  # seconds: never hold a stream's text longer than this
# Seconds a request that arrives while others decode may wait for more to
# arrive, so that they are prefilled together (see joiners_due).
JOIN_WINDOW = 0.005
# Tokens a new sequence must share with a decoding one to borrow a copy of its
# cache: a few (a BOS, a chat template's header) cost less to prefill with the
# rest of the prompt than a copy of a cache and a pass of their own.
LIVE_PREFIX_MIN = 16

# What the generation thread sends to a sequence's output queue.
Event = tuple[str, Any]  # ("text", str) | ("logprob", dict) | ("done", dict) | ("error", str)


@dataclass
class Sequence:
    """One request's state, shared between its handler and the generation thread."""

    prompt: list[int]
    options: SamplingOptions
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    uid: int | None = None
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prompt cache
    eval_count: int = 0
    submitted: float = field(default_factory=time.perf_counter)  # made as the handler submits it
    admitted: float = 0.0
    first_token: float = 0.0
    finished: bool = False
    detok: Any = None
    stops: StopMatcher | None = None
    grammar: GrammarProcessor | None = None  # constrained decoding; applied last, after penalties
    top_logprobs: int | None = None  # report log-probabilities with this many alternatives; None: not asked
    streaming: bool = False  # its first text has been handed to the event loop

    def emit(self, kind: str, value: Any) -> None:
        """Hand one event to the event loop now (the batched path is Engine._emit)."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


class StepSync(Protocol):
    """A distributed runner's lockstep (runner/distributed.py): the leader's inbox items,
    shared with every rank once per pass of the generation loop."""

    leader: bool

    def share(self, items: list[tuple[str, Sequence | None]], stream: Any) -> list[tuple[str, Sequence | None]]: ...

    def close(self, stream: Any) -> None: ...


class Entry(NamedTuple):
    """One sequence's arguments to BatchGenerator.insert."""

    prompt: list[int]  # the tokens to prefill
    max_tokens: int
    cache: list[Any] | None  # KV state of in_cache; None: a fresh cache
    in_cache: list[int]  # the tokens that cache holds
    sampler: Any
    processors: list[Any]


def _deliver(events: list[tuple[Sequence, Event]]) -> None:
    # Runs on the event loop: one wake-up for a whole pass of the generation loop.
    for seq, event in events:
        seq.out.put_nowait(event)


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, num_ctx: int, num_parallel: int,
                 prompt_cache: PromptCache | None = None, sync: StepSync | None = None,
                 solo: bool = True, join_window: float = JOIN_WINDOW) -> None:
        self.model = model
        self.sync = sync  # distributed: every rank applies the same inbox items at the same step
        self.prompt_cache = prompt_cache
        self.tokenizer = tokenizer
        self.num_ctx = num_ctx
        self.num_parallel = num_parallel
        self._inbox: queue.Queue[tuple[str, Sequence | None]] = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._active: dict[int, Sequence] = {}  # in the BatchGenerator, by uid
        # A lone sequence decodes outside the BatchGenerator. Not on a
        # distributed runner: every rank must run the same batch ops in lockstep.
        self._solo_enabled = solo and sync is None
        # Distributed ranks must admit at the same step: a clock-based wait would
        # diverge between them, so they admit at once.
        self.join_window = join_window if sync is None else 0.0
        self._step_s = 0.0  # how long the last pass of the generation loop took
        self._alone: tuple[Sequence, Solo] | None = None  # the sequence decoding alone, and its state
        self._stop = threading.Event()
        self._eos = set(tokenizer.eos_token_ids)
        self._token_text = TokenText(tokenizer)
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._outbox: list[tuple[Sequence, Event]] = []
        self._flushed_at = 0.0
        self._urgent = False  # the outbox holds something that may not wait (see _emit)
        self.active_count = 0
        self.queued_count = 0
        self._save_budget_s = 0.0
        self.saved = (0, 0)  # what stop_and_save wrote: files, bytes on disk

    # -- called from the HTTP side ------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(("add", seq))

    def cancel(self, seq: Sequence) -> None:
        self._inbox.put(("cancel", seq))

    def cancel_all(self) -> None:
        self._inbox.put(("cancel_all", None))

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=5)

    def join(self) -> None:
        """Wait for the generation thread to end (a distributed follower has nothing else to do)."""
        self._thread.join()

    def fail_all(self, message: str) -> None:
        """End every stream with an in-band error, from any thread, and stop.

        For when the generation thread cannot go on and may never return (a
        distributed peer is gone while it waits in a collective)."""
        self._stop.set()
        pending: list[Sequence] = []
        while True:
            try:
                _, seq = self._inbox.get_nowait()
            except queue.Empty:
                break
            if seq is not None:
                pending.append(seq)
        for _ in range(3):  # the generation thread may still touch these; retry a torn read
            try:
                pending += self._all_sequences()
                break
            except RuntimeError:
                continue
        for seq in pending:
            if not seq.finished:
                seq.finished = True
                seq.emit("error", message)

    def stop_and_save(self, time_budget_s: float) -> tuple[int, int]:
        """Stop, writing the prompt cache's disk tier on the way out; (files, bytes on disk).

        The write happens on the generation thread: MLX arrays belong to the
        stream of the thread that made them.
        """
        self._save_budget_s = time_budget_s
        self.stop()
        return self.saved

    # -- the generation thread ----------------------------------------------

    def _run(self) -> None:
        gen = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self._eos],
            completion_batch_size=self.num_parallel,
            prefill_batch_size=self.num_parallel,
        )
        try:
            if self.prompt_cache is not None:
                self.prompt_cache.load()  # the disk tier of an earlier run of this model
            while not self._stop.is_set():
                self._drain_inbox(gen, block=not self._busy)
                started = time.perf_counter()
                if self._waiting and self._joiners_due(started):
                    if self._alone is not None and self.num_parallel > 1:
                        self._hand_over(gen)
                    self._admit(gen)
                if self._alone is not None:
                    self._solo_step(gen)
                elif self._active:
                    self._step(gen)
                self._step_s = time.perf_counter() - started
                self._flush(force=not self._busy)  # about to wait for work: nothing may stay behind
        except Exception as e:  # a dead generation thread must be visible: /health goes 503
            log.exception("generation thread failed")
            self._flush(force=True)
            for seq in self._all_sequences():
                seq.emit("error", f"generation failed: {e}")
            self._stop.set()
        finally:
            if self.sync is not None:
                self.sync.close(gen._stream)  # the other ranks leave their loops too
            self._save(gen)
            gen.close()

    def _save(self, gen: BatchGenerator) -> None:
        if self.prompt_cache is None or self._save_budget_s <= 0:
            return
        try:
            with mx.stream(gen._stream):
                self.saved = self.prompt_cache.save(self._save_budget_s)
        except Exception:  # a failed write must not block the exit
            log.exception("prompt cache: disk write failed")

    def _drain_inbox(self, gen: BatchGenerator, *, block: bool) -> None:
        if self.sync is None:
            items = self._take_inbox(block=block)
        else:  # the leader's items, shared so that every rank steps the same batch
            items = self.sync.share(self._take_inbox(block=block) if self.sync.leader else [], gen._stream)
        for item in items:
            self._handle(gen, *item)

    def _take_inbox(self, *, block: bool) -> list[tuple[str, Sequence | None]]:
        try:
            items = [self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _handle(self, gen: BatchGenerator, kind: str, seq: Sequence | None) -> None:
        if kind == "add" and seq is not None:
            self._waiting.append(seq)
        elif kind == "cancel" and seq is not None:
            self._finish(gen, seq, DONE_CANCELLED)
        elif kind == "stop":  # a distributed follower: the leader has stopped
            self._stop.set()
        elif kind == "cancel_all":
            for s in self._all_sequences():
                self._finish(gen, s, DONE_CANCELLED)
        self._update_counts()

    def _joiners_due(self, now: float) -> bool:
        """Whether the waiting sequences go in now, or wait one more step for others to join them."""
        if not self._busy:
            return True  # nothing decodes: a lone request starts at once
        room = self.num_parallel - len(self._active) - (self._alone is not None)
        return joiners_due(waiting=len(self._waiting), room=room, waited=now - self._waiting[0].submitted,
                           step=self._step_s, window=self.join_window)

    @property
    def _busy(self) -> bool:
        return bool(self._active) or self._alone is not None

    def _all_sequences(self) -> list[Sequence]:
        alone = [self._alone[0]] if self._alone is not None else []
        return [*alone, *self._active.values(), *self._waiting]

    def _admit(self, gen: BatchGenerator) -> None:
        if self._alone is not None:
            return  # alone until a second sequence arrives (then _hand_over) or it ends
        if self._solo_enabled and self._waiting and not self._active and (
                len(self._waiting) == 1 or self.num_parallel == 1):
            self._start_solo(gen, self._waiting.popleft())
            return
        batch: list[Sequence] = []
        while self._waiting and len(self._active) + len(batch) < self.num_parallel:
            batch.append(self._waiting.popleft())
        if not batch:
            return
        self._insert(gen, batch, [self._admission(gen, s) for s in batch])
        self._update_counts()

    def _admission(self, gen: BatchGenerator, seq: Sequence) -> Entry:
        """Start a new sequence; what BatchGenerator.insert needs for it, its cached prefix found."""
        self._started(seq)
        cache = self._cached_prefix(gen, seq)
        return Entry(seq.prompt[seq.cached_tokens:], seq.max_tokens, cache, seq.prompt[:seq.cached_tokens],
                     make_sampler(seq.options), make_processors(seq.options, self.num_ctx, seq.grammar))

    def _insert(self, gen: BatchGenerator, seqs: list[Sequence], entries: list[Entry]) -> None:
        """Put the sequences into the BatchGenerator in one insert: they are prefilled together."""
        uids = gen.insert(
            [e.prompt for e in entries],
            max_tokens=[e.max_tokens for e in entries],
            caches=[e.cache for e in entries],  # type: ignore[misc]  # None: a fresh cache
            all_tokens=[e.in_cache for e in entries],
            samplers=[e.sampler for e in entries],
            logits_processors=[e.processors for e in entries],
        )
        for uid, seq in zip(uids, seqs, strict=True):
            seq.uid = uid
            self._active[uid] = seq

    def _started(self, seq: Sequence) -> None:
        seq.admitted = time.perf_counter()
        seq.detok = self.tokenizer.detokenizer
        seq.stops = StopMatcher(seq.options.stop)

    # -- a sequence alone ---------------------------------------------------

    def _start_solo(self, gen: BatchGenerator, seq: Sequence) -> None:
        with mx.stream(gen.stream):
            cache = self._cached_prefix(gen, seq)
            solo = Solo(self.model, seq.prompt[seq.cached_tokens:], cache=cache,
                        cached=seq.prompt[:seq.cached_tokens], sampler=make_sampler(seq.options),
                        processors=make_processors(seq.options, self.num_ctx, seq.grammar),
                        max_tokens=seq.max_tokens)
        self._alone = (seq, solo)
        self._started(seq)
        self._update_counts()

    def _solo_step(self, gen: BatchGenerator) -> None:
        assert self._alone is not None
        with mx.stream(gen.stream):
            out = self._alone[1].advance()  # None: a chunk of the prompt
        if out is not None:
            self._solo_token(gen, *out)

    def _solo_token(self, gen: BatchGenerator, token: int, logprobs: mx.array) -> None:
        assert self._alone is not None
        seq, solo = self._alone
        if not seq.first_token:
            seq.first_token = time.perf_counter()
        if seq.top_logprobs is not None and token not in self._eos:
            self._emit(seq, "logprob", self._logprob(token, logprobs, seq.top_logprobs))
        self._on_token(gen, seq, token, "length" if solo.generated >= solo.max_tokens else None)

    def _hand_over(self, gen: BatchGenerator) -> None:
        """A second sequence arrived: the lone one joins the BatchGenerator where it
        stands (its cache, the tokens in it, its sampler and processors with their
        state), so the batch decodes the tokens it would have decoded alone."""
        assert self._alone is not None
        seq, solo = self._alone
        if solo.in_flight:  # the token being computed is this sequence's next one
            with mx.stream(gen.stream):
                self._solo_token(gen, *solo.take_in_flight())
            if self._alone is None:  # that token ended it
                return
        todo, cache, in_cache, left = solo.handover()
        self._alone = None
        # The sequences waiting go in with it, in one insert, so that the hand-over
        # and their prefill are one pass, not two: every decoding sequence waits
        # for each. Not one that would borrow a prefix of its cache (_live_prefix).
        joiners: list[Sequence] = []
        while (self._waiting and len(joiners) < self.num_parallel - 1
               and not _lendable(self._waiting[0].prompt, seq.prompt)):
            joiners.append(self._waiting.popleft())
        entries = [Entry(todo, left, cache, in_cache, solo.sampler, solo.processors),
                   *(self._admission(gen, s) for s in joiners)]
        self._insert(gen, [seq, *joiners], entries)
        if self._waiting:
            # One step now puts it in the generation batch, so that the sequences
            # admitted next never borrow (and trim) its cache while the generator
            # still holds the original (_live_prefix).
            self._step(gen)
        self._update_counts()

    def _cached_prefix(self, gen: BatchGenerator, seq: Sequence) -> list[Any] | None:
        """The KV state of the longest cached prefix of seq.prompt, or None; sets
        seq.cached_tokens. Candidates: the prompt cache, and the sequences still
        in the batch (a copy of their cache, trimmed to the shared prefix)."""
        if self.prompt_cache is None or not self.prompt_cache.enabled:
            return None
        cache, cached = self.prompt_cache.fetch(seq.prompt)
        live = self._live_prefix(gen, seq.prompt, cached)
        if live is not None:
            cache, cached = live
        seq.cached_tokens = cached
        return cache

    def _live_prefix(self, gen: BatchGenerator, prompt: list[int], best: int) -> tuple[list[Any], int] | None:
        # A concurrent sequence sharing a longer prefix (say, the same system
        # prompt) lends a copy of its cache: BatchGenerator.extract_cache.
        longest, uid = best, None
        for other in self._active.values():
            n = _lendable(prompt, other.prompt)
            if n > longest and other.uid is not None:
                longest, uid = n, other.uid
        if uid is None:
            return None
        found = gen.extract_cache([uid]).get(uid)
        if found is None:
            return None
        cache, tokens = found
        have = min(len(tokens), longest)
        if have <= best or not trim_prompt_cache_to(cache, len(tokens), have):
            return None
        return cache, have

    def _keep_cache(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        if self.prompt_cache is not None and tokens and cache:
            self.prompt_cache.store(list(tokens), cache)

    def _step(self, gen: BatchGenerator) -> None:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            seq = self._active.get(r.uid)
            if seq is None:
                continue
            if not seq.first_token:
                seq.first_token = now
            if r.finish_reason is not None:  # out of the batch: its cache comes with it
                self._keep_cache(r.all_tokens, r.prompt_cache)
            if seq.top_logprobs is not None and r.token not in self._eos:
                # before the token's text: the HTTP side attaches it to the next text it sends
                self._emit(seq, "logprob", self._logprob(r.token, r.logprobs, seq.top_logprobs))
            self._on_token(gen, seq, r.token, r.finish_reason)

    def _logprob(self, token: int, logprobs: Any, top: int) -> dict[str, Any]:
        """The token's log-probability (normalized over the vocabulary, before sampling
        filters) and its `top` most likely alternatives, in Ollama's and OpenAI's shape."""
        entry = self._token_text.entry(token, float(logprobs[token].item()))
        alternatives: list[dict[str, Any]] = []
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values: list[float] = logprobs[ids].tolist()  # type: ignore[assignment]
            tokens: list[int] = ids.tolist()  # type: ignore[assignment]
            pairs = sorted(zip(tokens, values, strict=True), key=lambda p: -p[1])
            alternatives = [self._token_text.entry(i, v) for i, v in pairs]
        entry["top_logprobs"] = alternatives
        return entry

    def _on_token(self, gen: BatchGenerator, seq: Sequence, token: int, finish: str | None) -> None:
        assert seq.stops is not None
        if token in self._eos:
            # EOS ends the sequence and, as in mlx_lm.stream_generate, is not text.
            self._finish(gen, seq, DONE_STOP)
            return
        seq.eval_count += 1
        seq.detok.add_token(token)
        text = seq.stops.feed(seq.detok.last_segment)
        if text:
            self._emit(seq, "text", text)
        if seq.grammar is not None and seq.grammar.failed:
            self._fail(gen, seq, f"constrained decoding failed: {seq.grammar.failed}")
        elif seq.stops.stopped or (seq.grammar is not None and seq.grammar.done):
            # a complete constrained value ends the sequence now, whatever the model would add
            self._finish(gen, seq, DONE_STOP)
        elif finish is not None:
            self._finish(gen, seq, DONE_LENGTH if finish == "length" else DONE_STOP)

    def _finish(self, gen: BatchGenerator, seq: Sequence, reason: str) -> None:
        if seq.finished:
            return
        seq.finished = True
        if self._alone is not None and seq is self._alone[0]:
            solo = self._alone[1]
            self._keep_cache(solo.in_cache, solo.cache)
            self._alone = None
        elif seq.uid is not None and seq.uid in self._active:
            del self._active[seq.uid]
            # frees its KV cache slot (a no-op if already done), keeping a copy
            kept = gen.remove([seq.uid], return_prompt_caches=self.prompt_cache is not None)
            if seq.uid in kept:
                cache, tokens = kept[seq.uid]
                self._keep_cache(tokens, cache)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if reason != DONE_CANCELLED and seq.detok is not None and seq.stops is not None:
            seq.detok.finalize()
            tail = seq.stops.feed(seq.detok.last_segment) + seq.stops.flush()
            if tail:
                self._emit(seq, "text", tail)
        self._emit(seq, "done", self._done_fields(seq, reason))
        self._update_counts()

    def _emit(self, seq: Sequence, kind: str, value: Any) -> None:
        self._outbox.append((seq, (kind, value)))
        if kind != "logprob" and (kind != "text" or not seq.streaming):
            self._urgent = True  # a stream's first text, or its end: hand it off this pass

    def _flush(self, *, force: bool = False) -> None:
        """Hand the events collected since the last hand-off to the event loop.

        A stream's first text, an end (done or error) and a forced flush go at
        once; after its first text a stream's tokens go at most every
        stream_interval(). Each hand-off costs a wake-up and a line per stream in
        this process, a read and a parse in the supervisor, and a write to the
        client: paid per token on a fast model, those take CPU the generation
        itself needs; paid per interval they do not, and 20 ms is still smooth
        to read.
        """
        if not self._outbox:
            return
        now = time.perf_counter()
        if not force and not self._urgent and now - self._flushed_at < stream_interval(self.active_count):
            return
        self._flushed_at, self._urgent = now, False
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Event]]] = {}
        for item in self._outbox:
            seq, (kind, _) = item
            if kind == "text":
                seq.streaming = True
            by_loop.setdefault(seq.loop, []).append(item)
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # that loop is closed: nobody is left to read these
                log.debug("dropped %d event(s) for a closed event loop", len(events))

    def _fail(self, gen: BatchGenerator, seq: Sequence, message: str) -> None:
        log.error("%s", message)
        seq.finished = True
        if self._alone is not None and seq is self._alone[0]:
            self._alone = None
        elif seq.uid is not None and self._active.pop(seq.uid, None) is not None:
            gen.remove([seq.uid])
        self._emit(seq, "error", message)
        self._update_counts()

    def _done_fields(self, seq: Sequence, reason: str) -> dict[str, Any]:
        end = time.perf_counter()
        first = seq.first_token or end
        start = seq.admitted or end
        return {
            "done_reason": reason,
            "prompt_eval_count": len(seq.prompt) - seq.cached_tokens,  # evaluated, as Ollama counts
            "cached_tokens": seq.cached_tokens,
            "prompt_eval_duration": int((first - start) * 1e9),
            "eval_count": seq.eval_count,
            "eval_duration": int((end - first) * 1e9),
            "stop_sequence": seq.stops.matched if seq.stops is not None else None,
        }

    def _update_counts(self) -> None:
        self.active_count = len(self._active) + (self._alone is not None)
        self.queued_count = len(self._waiting)


def stream_interval(streams: int) -> float:
    """How long a stream's text may wait for the next hand-off: STREAM_INTERVAL,
    stretched as streams grow so that all of them together make about
    HANDOFFS_PER_SECOND lines (1-2 streams every 20 ms, 4 every 40 ms, 8 every
    80 ms). The per-line cost (a wake-up here, a read, parse and write in the
    supervisor, a parse in the client) is paid per line in every process, and
    it takes more from the generation than its share of the CPU: the
    generation thread and MLX's worker hand work back and forth several times
    a step, and each hand-off that finds its core taken waits. Concurrent
    streams are mostly programs (agents, batch jobs), for which throughput
    counts more than a smoother stream; one or two are read by people, and
    keep 20 ms."""
    return min(MAX_STREAM_INTERVAL, max(STREAM_INTERVAL, streams / HANDOFFS_PER_SECOND))


def joiners_due(*, waiting: int, room: int, waited: float, step: float, window: float) -> bool:
    """Whether sequences that arrived while others decode are admitted this step.

    Each admission into a running batch costs a prefill pass of its own, which
    every decoding sequence waits for; requests sent together reach the runner
    a millisecond or two apart (the supervisor handles them one by one), so
    admitting each at once costs one pass per request. Waiting while one more
    step keeps the oldest within `window` lets them share a pass. Never waits
    when they fill the batch (no one else could join) or when a step is longer
    than the window (a large model: the wait would be a whole step); a lone
    request is not held at all (the caller admits it at once)."""
    return waiting >= room or waited + step >= window


def _lendable(prompt: list[int], other: list[int]) -> int:
    """How many of prompt's tokens a decoding sequence with prompt `other` may lend from
    its cache: their shared start, at least one token left to prefill, and 0 under
    LIVE_PREFIX_MIN (so few are cheaper to prefill than a cache is to copy)."""
    n = _common_prefix(prompt, other, len(prompt) - 1)
    return n if n >= LIVE_PREFIX_MIN else 0


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n


def trim_prompt_cache_to(cache: list[Any], length: int, keep: int) -> bool:
    """Trim a cache holding `length` tokens down to its first `keep`; False if it cannot be trimmed."""
    if not can_trim_prompt_cache(cache):
        return False
    trim_prompt_cache(cache, length - keep)
    return True

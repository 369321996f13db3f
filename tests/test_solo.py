"""A lone sequence decodes outside the BatchGenerator (runner/solo.py) and joins
it when a second one arrives. Real MLX on the tiny model: the solo step gives
mlx_lm's own tokens, the cache always holds exactly the tokens it says, and a
hand-over at any point (mid-decode, mid-prefill, with seeded sampling and
penalties) continues with the tokens the sequence would have decoded alone.
The engine tests run the real generation thread in this process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from corral.runner.engine import Engine, Sequence
from corral.runner.protocol import SamplingOptions
from corral.runner.sampling import make_processors, make_sampler
from corral.runner.solo import Solo
from mlx_lm.generate import BatchGenerator, generate_step

PROMPT = "Once upon a time there was a small model"
SEEDED = SamplingOptions(temperature=1.0, seed=7, top_k=0, top_p=1.0, repeat_penalty=1.3, repeat_last_n=16)
GREEDY = SamplingOptions(temperature=0.0)
LONG = "Once"  # greedy, the tiny model decodes about 900 tokens before its EOS


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tok = load(str(tiny_model))[:2]
    return model, tok


def solo(model: Any, prompt: list[int], opts: SamplingOptions, n: int, **kw: Any) -> Solo:
    return Solo(model, prompt, cache=None, cached=[], sampler=make_sampler(opts),
                processors=make_processors(opts, 256), max_tokens=n, **kw)


def run_alone(s: Solo) -> list[int]:
    out = []
    while s.generated < s.max_tokens:
        step = s.advance()
        if step is not None:
            out.append(step[0])
    return out


def finish_in_batch(model: Any, s: Solo, eos: list[int]) -> list[int]:
    """Hand `s` over to a fresh BatchGenerator and decode the rest there."""
    todo, cache, in_cache, left = s.handover()
    assert len(in_cache) == cache[0].offset
    gen = BatchGenerator(model, stop_tokens=[[t] for t in eos], completion_batch_size=4, prefill_batch_size=4)
    gen.insert([todo], max_tokens=[left], caches=[cache], all_tokens=[in_cache],
               samplers=[s.sampler], logits_processors=[s.processors])  # type: ignore[list-item]
    out: list[int] = []
    while len(out) < left:
        for r in gen.next_generated():
            out.append(r.token)
    gen.close()
    return out


def test_alone_it_decodes_mlx_lm_generate_steps_tokens(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    ids = tok.encode(PROMPT)
    want = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=40)]
    assert run_alone(solo(model, ids, GREEDY, 40)) == want


def test_the_cache_holds_exactly_the_tokens_it_names(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    ids = tok.encode(PROMPT * 3)
    s = solo(model, ids, SEEDED, 20, prefill_step=5)
    made: list[int] = []
    while s.generated < s.max_tokens:
        step = s.advance()
        if step is not None:
            made.append(step[0])
        assert len(s.in_cache) == s.cache[0].offset
        assert s.in_cache == (ids + made)[:len(s.in_cache)]
    assert s.in_cache == ids + made[:-1]  # the last token was never fed


def test_a_chunked_prefill_decodes_the_same_tokens(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    ids = tok.encode(PROMPT * 4)
    assert run_alone(solo(model, ids, SEEDED, 24, prefill_step=7)) == run_alone(solo(model, ids, SEEDED, 24))


@pytest.mark.parametrize("opts", [GREEDY, SEEDED], ids=["greedy", "seeded-with-penalty"])
@pytest.mark.parametrize("after", [1, 9])
def test_a_hand_over_mid_decode_keeps_the_tokens(loaded: tuple[Any, Any], opts: SamplingOptions,
                                                 after: int) -> None:
    model, tok = loaded
    ids = tok.encode(PROMPT)
    alone = run_alone(solo(model, ids, opts, 32))
    s = solo(model, ids, opts, 32)
    made: list[int] = []
    while len(made) < after:
        step = s.advance()
        if step is not None:
            made.append(step[0])
    made.append(s.take_in_flight()[0])  # the token being computed is not lost nor made twice
    made += finish_in_batch(model, s, [])
    assert made == alone


def test_a_hand_over_mid_prefill_keeps_the_tokens(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    ids = tok.encode(PROMPT * 3)
    alone = run_alone(solo(model, ids, SEEDED, 16))
    s = solo(model, ids, SEEDED, 16, prefill_step=6)
    assert s.advance() is None and s.advance() is None  # two chunks of the prompt
    assert not s.in_flight
    assert finish_in_batch(model, s, []) == alone


# -- the engine -----------------------------------------------------------------


async def collect(seq: Sequence) -> tuple[str, dict[str, Any]]:
    text = ""
    while True:
        kind, value = await seq.out.get()
        if kind == "text":
            text += value
        elif kind == "done":
            return text, value
        elif kind == "error":
            raise AssertionError(value)


def sequence(tok: Any, prompt: str, opts: SamplingOptions, n: int) -> Sequence:
    return Sequence(prompt=tok.encode(prompt), options=opts, max_tokens=n, loop=asyncio.get_running_loop())


def submit(e: Engine, seq: Sequence) -> Sequence:
    e.submit(seq)
    return seq


def engine(loaded: tuple[Any, Any], **kw: Any) -> Engine:
    model, tok = loaded
    e = Engine(model, tok, num_ctx=512, num_parallel=4, **kw)
    e.start()
    return e


def test_engine_decodes_a_lone_sequence_alone_and_batches_on_arrival(loaded: tuple[Any, Any]) -> None:
    _, tok = loaded

    async def main() -> None:
        ref = engine(loaded, solo=False)  # the batched path, for reference
        try:
            want_a = await collect(submit(ref, sequence(tok, PROMPT, SEEDED, 200)))
            want_b = await collect(submit(ref, sequence(tok, "The quick brown fox", SEEDED, 40)))
        finally:
            ref.stop()
        e = engine(loaded)
        try:
            a = submit(e, sequence(tok, PROMPT, SEEDED, 200))
            first = await a.out.get()  # a is decoding, alone
            assert first[0] == "text" and e._alone is not None and e._alone[0] is a and e.active_count == 1
            b = submit(e, sequence(tok, "The quick brown fox", SEEDED, 40))
            (text_b, done_b), (rest_a, done_a) = await asyncio.gather(collect(b), collect(a))
            assert a.uid is not None  # a joined the batch
            assert (first[1] + rest_a, done_b["eval_count"]) == (want_a[0], want_b[1]["eval_count"])
            assert text_b == want_b[0] and done_a["eval_count"] == want_a[1]["eval_count"]
            assert e.active_count == 0 and e._alone is None and not e._active
        finally:
            e.stop()

    asyncio.run(main())


def test_engine_cancels_a_lone_sequence_and_serves_the_next(loaded: tuple[Any, Any]) -> None:
    _, tok = loaded

    async def main() -> None:
        e = engine(loaded)
        try:
            a = sequence(tok, PROMPT, GREEDY, 100_000)
            e.submit(a)
            assert (await a.out.get())[0] == "text"
            e.cancel(a)
            _, done = await collect(a)
            assert done["done_reason"] == "cancelled" and e._alone is None
            b = sequence(tok, PROMPT, GREEDY, 8)
            e.submit(b)
            _, done = await collect(b)
            assert done["eval_count"] <= 8 and done["done_reason"] in ("length", "stop")
        finally:
            e.stop()

    asyncio.run(main())


def test_one_slot_runs_each_sequence_alone_in_turn(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded

    async def main() -> None:
        e = Engine(model, tok, num_ctx=512, num_parallel=1)
        e.start()
        try:
            seqs = [sequence(tok, p, GREEDY, 12) for p in (PROMPT, "Hello, world!", PROMPT)]
            for s in seqs:
                e.submit(s)
            out = await asyncio.gather(*(collect(s) for s in seqs))
            assert all(s.uid is None for s in seqs)  # never in the BatchGenerator
            assert out[0][0] == out[2][0] and out[0][1]["eval_count"] == 12
        finally:
            e.stop()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def decoding_alone(e: Engine, tok: Any) -> AsyncIterator[Sequence]:
    """The engine started, and a long sequence submitted and decoding alone (its first
    text is out); at the end that sequence is cancelled and read out, and the engine stopped."""
    e.start()
    try:
        a = submit(e, sequence(tok, LONG, GREEDY, 100_000))
        assert (await a.out.get())[0] == "text" and e._alone is not None and e._alone[0] is a
        yield a
        e.cancel(a)
        await collect(a)
    finally:
        e.stop()


class CountingEngine(Engine):
    """The engine, noting the sequences of each insert into the BatchGenerator."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.inserts: list[list[Sequence]] = []

    def _insert(self, gen: BatchGenerator, seqs: list[Sequence], entries: Any) -> None:
        self.inserts.append(list(seqs))
        super()._insert(gen, seqs, entries)


def test_joiners_wait_for_each_other_and_are_admitted_together(loaded: tuple[Any, Any]) -> None:
    """Requests that arrive while another decodes are prefilled in one pass: the
    first joiner waits (here, with a window far longer than the test) until a
    second fills the batch, then both go in at once with the lone sequence's
    hand-over, and all three decode as they would have."""
    model, tok = loaded

    async def main() -> None:
        e = CountingEngine(model, tok, num_ctx=4096, num_parallel=3, join_window=60.0)
        async with decoding_alone(e, tok) as a:
            b = submit(e, sequence(tok, "The quick brown fox", GREEDY, 12))
            await asyncio.sleep(0.1)
            assert b.admitted == 0 and e._alone is not None and e.queued_count == 1  # b waits, a goes on
            c = submit(e, sequence(tok, "Hello, world!", GREEDY, 12))
            out_b, out_c = await asyncio.gather(collect(b), collect(c))
            assert e.inserts[-1] == [a, b, c]  # one insert: a's hand-over, b and c
        ref = Engine(model, tok, num_ctx=512, num_parallel=3, solo=False)
        ref.start()
        try:
            want = [await collect(submit(ref, sequence(tok, p, GREEDY, 12))) for p in ("The quick brown fox",
                                                                                       "Hello, world!")]
        finally:
            ref.stop()
        assert [out_b[0], out_c[0]] == [w[0] for w in want]

    asyncio.run(main())


def test_a_lone_joiner_goes_in_when_its_window_ends(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded

    async def main() -> None:
        e = Engine(model, tok, num_ctx=4096, num_parallel=4, join_window=0.3)
        async with decoding_alone(e, tok):
            b = submit(e, sequence(tok, "The quick brown fox", GREEDY, 12))
            _, done = await asyncio.wait_for(collect(b), 30)  # room for two more, nobody came: it went in anyway
            assert done["eval_count"] == 12 and b.admitted - b.submitted >= 0.15  # the window, less at most a step

    asyncio.run(main())


def test_a_distributed_engine_admits_at_once(loaded: tuple[Any, Any]) -> None:
    """Every rank must admit at the same step, and a clock cannot promise that."""
    model, tok = loaded

    class Sync:
        leader = True

        def share(self, items: Any, stream: Any) -> Any:
            return items

        def close(self, stream: Any) -> None:
            pass

    assert Engine(model, tok, num_ctx=512, num_parallel=4, sync=Sync()).join_window == 0.0
    assert Engine(model, tok, num_ctx=512, num_parallel=4).join_window > 0

"""One sequence decoding on its own, outside mlx_lm's BatchGenerator.

A BatchGenerator of one still pays for batching on every token: a batched
KV cache with per-sequence offsets, an attention mask built each step, RoPE
with array offsets, the per-row split of the log-probabilities. On a small
model, where each step is a few hundred microseconds of work, that is about
15% more CPU per token than mlx_lm's single-sequence `generate_step` (measured
per thread: 1,445 vs 1,230 us per token on the 64x2 test model). A local server
mostly serves one request at a time, so the engine decodes a lone sequence
here, with a plain KV cache, and moves it into the BatchGenerator only when a
second request arrives (`handover`).

The step is mlx_lm's: the next token's graph is built from the current token
while it is still being computed (async_eval), so the device never waits for
Python. Logits processors see the same context as in the BatchGenerator (every
token in the cache plus the current input), and each sampler call draws one
token, so a seeded or constrained sequence decodes the same tokens whether it
ran alone, batched, or moved from one to the other mid-way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

PREFILL_STEP = 2048  # prompt tokens per pass, as BatchGenerator's prefill_step_size
CLEAR_EVERY = 256  # tokens between returns of MLX's buffer cache, as mlx_lm.generate_step

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

class Solo:
    """The decode state of one sequence: its KV cache, the tokens in it, and the
    next token, possibly still being computed."""

    def __init__(self, model: Any, prompt: list[int], *, cache: list[Any] | None, cached: list[int],
                 sampler: Sampler | None, processors: list[LogitsProcessor], max_tokens: int,
                 prefill_step: int = PREFILL_STEP) -> None:
        if not prompt or max_tokens <= 0:
            raise ValueError("a solo sequence needs a prompt token and room for one")
        self.model = model
        self.cache = cache if cache is not None else make_prompt_cache(model)
        self.in_cache = list(cached)  # the tokens whose KV state the cache holds
        self._todo = list(prompt)  # prompt tokens not fed yet
        self.sampler = sampler  # None: greedy; kept as given, for a hand-over
        self.processors = processors
        self._sample = sampler or greedy_sampler  # BatchGenerator's fallback too
        self._context = TokenBuffer(self.in_cache) if processors else None
        self.max_tokens = max_tokens
        self.prefill_step = prefill_step
        self.generated = 0  # tokens sampled so far
        self._pending: tuple[mx.array, mx.array] | None = None  # the next token and its log-probabilities

    def advance(self) -> tuple[int, mx.array] | None:
        """One pass of work: a prefill chunk (None), or the next token and its
        log-probabilities over the vocabulary."""
        if self._pending is None:
            if len(self._todo) > 1:
                self._prefill_chunk()
                return None
            self._pending = self._feed(mx.array(self._todo, dtype=mx.int32))
            self.in_cache += self._todo
            self._todo = []
        y, logprobs = self._pending
        self.generated += 1
        if self.generated < self.max_tokens:
            self._pending = self._feed(y)  # built now, computed while the caller handles y
        else:
            self._pending = None
        token: int = y.item()  # type: ignore[assignment]  # an integer array's item is an int
        if self._pending is not None:
            self.in_cache.append(token)
        if self.generated % CLEAR_EVERY == 0:
            mx.clear_cache()
        return token, logprobs

    @property
    def in_flight(self) -> bool:
        """A token is being computed (advance would return it)."""
        return self._pending is not None

    def take_in_flight(self) -> tuple[int, mx.array]:
        """The token being computed, without starting the step after it: for a
        hand-over, where the BatchGenerator feeds it instead."""
        assert self._pending is not None
        y, logprobs = self._pending
        self._pending = None
        self.generated += 1
        token: int = y.item()  # type: ignore[assignment]  # an integer array's item is an int
        self._todo = [token]
        return token, logprobs

    def handover(self) -> tuple[list[int], list[Any], list[int], int]:
        """Stop here for the BatchGenerator to go on: (tokens still to feed, the
        cache, the tokens in it, tokens left to sample). Take an in-flight token
        first (take_in_flight), so that none is computed twice or dropped."""
        if self._pending is not None or not self._todo:
            raise RuntimeError("nothing to hand over: take the in-flight token first")
        return list(self._todo), self.cache, list(self.in_cache), self.max_tokens - self.generated

    def _prefill_chunk(self) -> None:
        n = min(self.prefill_step, len(self._todo) - 1)
        chunk, self._todo = self._todo[:n], self._todo[n:]
        inputs = mx.array(chunk, dtype=mx.int32)
        self.model(inputs[None], cache=self.cache)
        mx.eval([c.state for c in self.cache])
        self.in_cache += chunk
        if self._context is not None:
            self._context.update_and_fetch(inputs)
        mx.clear_cache()

    def _feed(self, token: mx.array) -> tuple[mx.array, mx.array]:
        """Build the step that feeds `token` (shape (1,)) and samples the next one,
        and start computing it."""
        logits = self.model(token[None], cache=self.cache)[:, -1, :]
        if self._context is not None:
            context = self._context.update_and_fetch(token)
            for processor in self.processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = self._sample(logprobs)
        row = logprobs[0]
        mx.async_eval(sampled, row)
        return sampled, row

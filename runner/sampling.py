"""Per-request samplers and logits processors from Ollama-style options.

Each request gets its own PRNG key (from `seed`, or random), so seeded
sampling is reproducible no matter what else shares the batch. Greedy
(temperature 0) is plain argmax of the model's logits, exactly what
mlx_lm.generate does, so greedy output matches it token for token.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx
from corral.runner.protocol import SamplingOptions
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class SeededSampler:
    """Top-p / min-p / top-k filtering, then a categorical draw with our own key."""

    def __init__(self, opts: SamplingOptions) -> None:
        seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._key = mx.random.key(seed % (2**64))
        self._opts = opts

    def __call__(self, logprobs: mx.array) -> mx.array:
        o = self._opts
        if 0 < o.top_p < 1.0:
            logprobs = apply_top_p(logprobs, o.top_p)
        if o.min_p > 0.0:
            logprobs = apply_min_p(logprobs, o.min_p)
        if o.top_k > 0:
            logprobs = apply_top_k(logprobs, o.top_k)
        self._key, sub = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1.0 / o.temperature), key=sub)


def make_sampler(opts: SamplingOptions) -> Sampler | None:
    """None means the generator's shared greedy sampler (one batched argmax)."""
    return None if opts.greedy else SeededSampler(opts)


def make_processors(opts: SamplingOptions, num_ctx: int,
                    grammar: LogitsProcessor | None = None) -> list[LogitsProcessor]:
    """Penalty processors, then the grammar's mask (last, so nothing re-opens a masked token)."""
    penalties = _penalties(opts, num_ctx)
    return [*penalties, grammar] if grammar is not None else penalties


def _penalties(opts: SamplingOptions, num_ctx: int) -> list[LogitsProcessor]:
    # Penalties shape sampling only. Under temperature 0 we decode the raw
    # argmax (as Ollama's engine and mlx_lm.generate do), so that greedy
    # output is the reference output even though Ollama's default
    # repeat_penalty (1.1) is always on the wire.
    if opts.greedy:
        return []
    window = num_ctx if opts.repeat_last_n == -1 else opts.repeat_last_n
    if window <= 0:
        return []
    return make_logits_processors(
        repetition_penalty=opts.repeat_penalty if opts.repeat_penalty != 1.0 else None,
        repetition_context_size=window,
        presence_penalty=opts.presence_penalty or None,
        presence_context_size=window,
        frequency_penalty=opts.frequency_penalty or None,
        frequency_context_size=window,
    )

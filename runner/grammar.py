"""Grammar-constrained decoding: structured output (`format`) and forced tool calls.

A request's constraint becomes an llguidance grammar (grammar_for, pure); the
runner compiles it off the generation thread, on one worker thread, into a
matcher cached by grammar text (one cache per runner, so per tokenizer); each
constrained sequence gets its own copy wrapped in a GrammarProcessor, a logits
processor that the continuous batch calls for that sequence's row every step:
it feeds the matcher the token sampled last step, asks it for the allowed-token
bitmask and applies it with MLX ops (bit unpacking and a where over the
vocabulary, never a Python loop over tokens).

Termination: once the value is complete the matcher is stopped (only EOS is
allowed) and the engine ends the sequence with "stop" at once. Whitespace
between JSON tokens is bounded (WHITESPACE), so a model cannot loop on blanks.

llguidance was picked by measurement over xgrammar and outlines-core (see the
README's "Structured output" section).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import numpy as np

log = logging.getLogger("runner")

# Between two JSON tokens: nothing, one space, or one newline and an indent of
# at most 20 blanks (as Ollama's JSON grammar): room for pretty-printed JSON,
# none for a model to loop on blanks.
WHITESPACE = r"(\x20|\x0A[\x20\x09]{0,20})?"
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE}

ANY_JSON: dict[str, Any] = {}
"""The schema of `format: "json"`: any JSON value."""

# Text tool-call markup: the Hermes/Qwen convention the supervisor parses
# when the tokenizer has no tool parser of its own.
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
JSON_TOOL_PARSER = "mlx_lm.tool_parsers.json_tools"

CACHE_SIZE = 64


class GrammarError(ValueError):
    """A constraint that cannot be compiled: a 400 naming what is wrong."""


def json_schema_of(fmt: Any) -> dict[str, Any]:
    """The JSON schema a `format` value asks for: "json" is any value, an object is a schema."""
    if fmt == "json":
        return ANY_JSON
    if isinstance(fmt, dict):
        return fmt
    raise GrammarError("'format' must be \"json\" or a JSON schema object")


def tool_call_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The schema of one call {"name", "arguments"} to `name`, or to any tool when None."""
    options = []
    for tool in tools:
        inner = tool.get("function")
        fn: dict[str, Any] = inner if isinstance(inner, dict) else tool
        fname = fn.get("name")
        if not isinstance(fname, str) or (name is not None and fname != name):
            continue
        params = fn.get("parameters")
        if not isinstance(params, dict):
            params = {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": fname}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools" if name
                           else "tool_choice requires a call but no tools were given")
    return options[0] if len(options) == 1 else {"anyOf": options}


def grammar_for(fmt: Any, tool_choice: str | None, tools: list[dict[str, Any]] | None,
                markup: tuple[str, str] = (TOOL_OPEN, TOOL_CLOSE)) -> str | None:
    """The llguidance grammar for a request, or None when it is unconstrained.

    `fmt`: None, "json" or a JSON schema. `tool_choice`: None (free), "required"
    (some call) or a tool's name (that call); `markup` is the model's tool-call
    delimiters. A forced call and a format together are refused.
    """
    from llguidance import LLMatcher

    if tool_choice is not None:
        if fmt is not None:
            raise GrammarError("'format' cannot be combined with a required tool call")
        schema = tool_call_schema(tools or [], None if tool_choice == "required" else tool_choice)
        call = json.dumps({**schema, "x-guidance": JSON_OPTIONS})
        start, end = (json.dumps(text) for text in markup)  # as Lark string literals
        # the call on its own line between the delimiters, as the Hermes/Qwen templates write it
        return LLMatcher.grammar_from_lark(f'start: {start} "\\n" call "\\n" {end}\ncall: %json {call}\n')
    if fmt is None:
        return None
    return LLMatcher.grammar_from_json_schema(json_schema_of(fmt), overrides=JSON_OPTIONS)  # type: ignore[arg-type]


def tool_markup(tokenizer: Any) -> tuple[str, str]:
    """The delimiters a forced tool call is written in for this tokenizer.

    A tokenizer with mlx_lm's JSON tool parser uses its own delimiters; one
    without tool calling gets the `<tool_call>` text convention. Other markup
    (XML-ish or pythonic calls) is not supported for forced calls: GrammarError.
    """
    if not getattr(tokenizer, "has_tool_calling", False):
        return TOOL_OPEN, TOOL_CLOSE
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", "")
    if module != JSON_TOOL_PARSER:
        raise GrammarError(f"tool_choice that forces a call is not supported for this model's "
                           f"tool-call format ({module.rsplit('.', 1)[-1] or 'unknown'})")
    return str(tokenizer.tool_call_start), str(tokenizer.tool_call_end or "")


class GrammarCache:
    """Compiled grammars for one tokenizer, built on one worker thread (never the
    generation thread), so a large schema never stalls the batch."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self._hf = tokenizer
        self._vocab_size = vocab_size
        self._ll: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.compiles = 0  # how many grammars were really compiled (tests check the cache)

    def _tokenizer(self) -> Any:
        if self._ll is None:
            import llguidance.hf

            hf = getattr(self._hf, "_tokenizer", self._hf)
            eos = list(getattr(self._hf, "eos_token_ids", []) or []) or None
            self._ll = llguidance.hf.from_tokenizer(hf, n_vocab=self._vocab_size, eos_token=eos)
        return self._ll

    def compile(self, grammar: str) -> Any:
        """A fresh matcher for `grammar` (blocking); GrammarError when it does not compile."""
        from llguidance import LLMatcher

        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
                return template.deep_copy()
        tok = self._tokenizer()
        error = LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise GrammarError(f"unsupported or invalid schema: {error}")
        template = LLMatcher(tok, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"unsupported or invalid schema: {template.get_error()}")
        with self._lock:
            self.compiles += 1
            self._compiled[grammar] = template
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    async def matcher(self, grammar: str) -> Any:
        """compile() on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.compile, grammar)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer().vocab_size)

    async def processor(self, grammar: str) -> GrammarProcessor:
        """A processor for a new sequence constrained by `grammar`."""
        matcher = await self.matcher(grammar)
        return GrammarProcessor(matcher, self.vocab_size, grammar)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def allowed_from_bitmask(bits: np.ndarray, width: int) -> mx.array:
    """An llguidance bitmask (int32 words, bit i of word w = token 32w+i) as a [rows, width]
    boolean array; tokens beyond the mask are not allowed."""
    words = mx.array(bits.reshape(bits.shape[0] if bits.ndim == 2 else 1, -1))
    # built here, on the generation thread: MLX arrays belong to their thread's stream
    shifts = mx.arange(32, dtype=mx.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).reshape(words.shape[0], -1).astype(mx.bool_)
    have = allowed.shape[1]
    if have >= width:
        return allowed[:, :width]
    pad = mx.zeros((allowed.shape[0], width - have), dtype=mx.bool_)
    return mx.concatenate([allowed, pad], axis=1)


class GrammarProcessor:
    """The logits processor of one constrained sequence.

    The continuous batch calls it once per step with the sequence's tokens so
    far; the first call's last token is the prompt's, every later call's is
    the token sampled the step before, which the matcher consumes. `done`
    turns true once the grammar allows nothing but the end.
    """

    def __init__(self, matcher: Any, vocab_size: int, spec: str | None = None) -> None:
        self.matcher = matcher
        self.spec = spec  # the grammar text, so that a distributed runner's other ranks can build the same
        self._calls = 0
        self._bits = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped())

    @property
    def failed(self) -> str | None:
        return str(self.matcher.get_error()) if self.matcher.is_error() else None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._calls:
            self.matcher.consume_token(int(tokens[-1].item()))  # type: ignore[arg-type]
        self._calls += 1
        if self.matcher.is_error() or self.matcher.is_stopped():
            return logits  # the engine ends the sequence on this step's token
        bits = self._bits
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        allowed = allowed_from_bitmask(bits, logits.shape[-1])
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


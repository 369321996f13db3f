"""The wire format shared by the supervisor and the runner.

Pure Python with no third-party imports: the supervisor imports this module
(it must never import mlx), and the runner imports it so both sides agree on
option names, defaults, validation and stream line shapes.

POST /completion takes a RunnerRequest's wire form and answers NDJSON: one
`{"content": text, "done": false}` line per piece of text (with `thinking`
and `logprobs` when there are any), then one done line
(done_line: done_reason, token counts, durations in nanoseconds, the stop
string that matched or null, and tool_calls when the runner parsed any). A
failure after the stream started is an `{"error": message}` line instead.
The supervisor reads those lines as Chunk and Done events.

Constrained decoding (runner/grammar.py) takes two more body fields:
`format` is "json" (any JSON value) or a JSON schema object, and the output
is then exactly one such value; `tool_choice` is "required" (the output is
one call to one of `tools`) or a tool's name (one call to that tool), written
in the model's tool-call markup with arguments matching the tool's
`parameters` schema. Both are refused with 400 when the grammar cannot be
built (an unsupported schema keyword is named in the message). Absent, or
null, the output is free text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TOKEN_ENV = "CORRAL_RUNNER_TOKEN"
"""Environment variable holding the bearer token every runner request must carry."""

SOLO_ENV = "CORRAL_SOLO_DECODE"
"""Optional: `0` makes a lone sequence decode in the BatchGenerator too (runner/solo.py), for comparing the two."""

PARENT_PID_ENV = "CORRAL_PARENT_PID"
"""Optional: the pid the runner watches; it exits when that process is gone."""

ROUTE_HEALTH = "/health"
ROUTE_STATUS = "/status"
ROUTE_TOKENIZE = "/tokenize"
ROUTE_DETOKENIZE = "/detokenize"
ROUTE_COMPLETION = "/completion"
ROUTE_EMBED = "/embed"
"""Embedding runners only (a runner's GET /status says "kind": "embedding").

POST {"input": [text | [token ids]], "truncate": true, "dimensions": N | null,
      "encoding": "float" | "base64"}
-> 200 {"embeddings": [[float]] | [base64], "encoding": ..., "prompt_eval_count": tokens,
        "total_duration": ns}; base64: each vector's float32 little-endian bytes (the
supervisor asks for it: no float text to format and parse on the hop).
Texts get the model's special tokens (and its default prompt prefix); token
id lists are used as given. An input over the context length is cut when
truncate is true, else a 400. Vectors are L2-normalized; `dimensions` keeps
the first N components, normalized again. A completion runner answers 404;
an embedding runner answers /completion with 400.
"""

NDJSON = "application/x-ndjson"

DONE_STOP = "stop"
DONE_LENGTH = "length"
DONE_CANCELLED = "cancelled"

TOOL_CHOICE_REQUIRED = "required"
"""RunnerRequest.tool_choice value: some call to one of the tools (else a tool's name)."""

DEFAULT_NUM_PARALLEL = 4
DEFAULT_NUM_CTX = 4096


class OptionError(ValueError):
    """An option has the wrong type or an impossible value (HTTP 400)."""


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request options, with Ollama's names and defaults.

    num_predict -1 means "until the context window is full"; temperature 0
    means greedy decoding. repeat_penalty 1.0, presence/frequency 0 and
    top_k 0 / top_p 1 / min_p 0 disable those processors.
    """

    num_predict: int = -1
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# name -> (kind, minimum, maximum); bounds are inclusive and catch absurd values
# (a negative top_k, a temperature of 1e9) as 400s instead of NaNs mid-stream.
_INT = "int"
_FLOAT = "float"
_OPTION_SPECS: dict[str, tuple[str, float, float]] = {
    "num_predict": (_INT, -2, 10_000_000),
    "temperature": (_FLOAT, 0.0, 100.0),
    "top_p": (_FLOAT, 0.0, 1.0),
    "top_k": (_INT, 0, 1_000_000),
    "min_p": (_FLOAT, 0.0, 1.0),
    "seed": (_INT, -(2**63), 2**64 - 1),
    "repeat_penalty": (_FLOAT, 0.0, 100.0),
    "repeat_last_n": (_INT, -1, 1_000_000),
    "presence_penalty": (_FLOAT, -100.0, 100.0),
    "frequency_penalty": (_FLOAT, -100.0, 100.0),
}

OPTION_NAMES: frozenset[str] = frozenset([*_OPTION_SPECS, "stop"])
"""Every sampling option the runner understands (unknown keys are ignored)."""


def _check_number(name: str, value: Any, kind: str, lo: float, hi: float) -> int | float:
    # bool is an int subclass in Python; "true" is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"option {name!r} must be a number, got {type(value).__name__}")
    if kind == _INT:
        if isinstance(value, float):
            if not value.is_integer():
                raise OptionError(f"option {name!r} must be an integer, got {value}")
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise OptionError(f"option {name!r} must be finite")
    if not lo <= value <= hi:
        raise OptionError(f"option {name!r} must be between {lo:g} and {hi:g}, got {value}")
    return value


def _check_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise OptionError("option 'stop' must be a string or a list of strings")
    if len(value) > 16:
        raise OptionError("option 'stop' takes at most 16 strings")
    return tuple(s for s in value if s)


def parse_options(raw: Any) -> SamplingOptions:
    """Validate an `options` object into SamplingOptions.

    Unknown keys are ignored (clients send Ollama options we do not use, such
    as num_gpu); a known key with a wrong type or out-of-range value raises
    OptionError. `None` values mean "use the default".
    """
    if raw is None:
        return SamplingOptions()
    if not isinstance(raw, Mapping):
        raise OptionError("'options' must be an object")
    values: dict[str, Any] = {}
    for name, (kind, lo, hi) in _OPTION_SPECS.items():
        if raw.get(name) is not None:
            values[name] = _check_number(name, raw[name], kind, lo, hi)
    if "stop" in raw:
        values["stop"] = _check_stop(raw["stop"])
    return SamplingOptions(**values)


def options_to_wire(opts: SamplingOptions) -> dict[str, Any]:
    """The JSON object form of SamplingOptions (what the supervisor sends)."""
    out: dict[str, Any] = {
        "num_predict": opts.num_predict,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "top_k": opts.top_k,
        "min_p": opts.min_p,
        "repeat_penalty": opts.repeat_penalty,
        "repeat_last_n": opts.repeat_last_n,
        "presence_penalty": opts.presence_penalty,
        "frequency_penalty": opts.frequency_penalty,
        "stop": list(opts.stop),
    }
    if opts.seed is not None:
        out["seed"] = opts.seed
    return out


THINK_LEVELS = ("low", "medium", "high")
MAX_TOP_LOGPROBS = 20


def parse_think(value: Any) -> bool | str | None:
    """Ollama's `think`: true, false, "low", "medium" or "high" (None: not given)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in THINK_LEVELS:
        return value.lower()
    if value in ("true", "false"):
        return value == "true"
    raise OptionError(f"'think' must be true, false, or one of {', '.join(THINK_LEVELS)}")


def check_top_logprobs(value: Any) -> int:
    """How many alternatives per token to report (0 to MAX_TOP_LOGPROBS)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise OptionError(f"'top_logprobs' must be an integer between 0 and {MAX_TOP_LOGPROBS}")
    return value


@dataclass(frozen=True, slots=True)
class RunnerRequest:
    """The body of POST /completion: a raw `prompt` or chat `messages` (plus `tools`
    for the chat template, and `template`, a Jinja chat template replacing the
    tokenizer's), and wire `options` (options_to_wire's output).
    `format` ("json" or a JSON schema) and `tool_choice` ("required" or a tool
    name) constrain the output (see the module docstring).

    think: the chat template's thinking switch (None: the template's default, and
    no splitting); when truthy the runner splits the reasoning off into `thinking`.
    logprobs / top_logprobs: report each generated token's log-probability and its
    top alternatives. truncate: when the prompt overflows num_ctx, drop the oldest
    non-system messages (or a raw prompt's oldest tokens) instead of refusing.
    """

    options: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    template: str | None = None
    format: str | dict[str, Any] | None = None
    tool_choice: str | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    truncate: bool = True

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"options": self.options}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.messages is not None:
            out["messages"] = self.messages
        if self.tools:
            out["tools"] = self.tools
        if self.template:
            out["chat_template"] = self.template
        if self.format is not None:
            out["format"] = self.format
        if self.tool_choice is not None:
            out["tool_choice"] = self.tool_choice
        if self.think is not None:
            out["think"] = self.think
        if self.logprobs or self.top_logprobs:
            out["logprobs"] = True
            out["top_logprobs"] = self.top_logprobs
        if not self.truncate:
            out["truncate"] = False
        return out


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated text (one stream line): answer `content`, reasoning
    `thinking`, and the log-probabilities of the tokens it came from, each
    {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}."""

    content: str
    thinking: str = ""
    logprobs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Done:
    """The final stream line. Durations in nanoseconds, as the runner measures them;
    tool_calls are the runner's own parse ({"name", "arguments"}); stop_sequence is
    the stop string that ended generation, if one did."""

    done_reason: str = DONE_STOP
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    tool_calls: tuple[dict[str, Any], ...] = ()
    stop_sequence: str | None = None
    cached_tokens: int = 0
    """Prompt tokens served from the prompt cache; prompt_eval_count excludes them
    (it counts the tokens actually evaluated, as Ollama's does)."""

    @property
    def prompt_tokens(self) -> int:
        """The whole prompt's length: evaluated plus cached."""
        return self.prompt_eval_count + self.cached_tokens


def chunk_line(content: str, thinking: str = "",
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stream line carrying generated text (and reasoning, and log-probabilities)."""
    out: dict[str, Any] = {"content": content, "done": False}
    if thinking:
        out["thinking"] = thinking
    if logprobs:
        out["logprobs"] = logprobs
    return out


def chunk_from_line(line: Mapping[str, Any]) -> Chunk:
    """A text line as a Chunk."""
    lps = line.get("logprobs")
    return Chunk(str(line.get("content") or ""), str(line.get("thinking") or ""),
                 tuple(x for x in lps if isinstance(x, dict)) if isinstance(lps, list) else ())


def done_line(
    reason: str,
    *,
    prompt_eval_count: int,
    prompt_eval_duration: int,
    eval_count: int,
    eval_duration: int,
    stop_sequence: str | None = None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """The last stream line; durations in nanoseconds; `stop_sequence` the matched stop string;
    `cached_tokens` prompt tokens reused from the prompt cache (not in prompt_eval_count)."""
    return {
        "content": "",
        "done": True,
        "done_reason": reason,
        "prompt_eval_count": prompt_eval_count,
        "prompt_eval_duration": prompt_eval_duration,
        "eval_count": eval_count,
        "eval_duration": eval_duration,
        "stop_sequence": stop_sequence,
        "cached_tokens": cached_tokens,
    }


def done_from_line(line: Mapping[str, Any]) -> Done:
    """A done line as a Done (missing or malformed fields fall back to the defaults)."""
    calls = line.get("tool_calls")
    stop = line.get("stop_sequence")
    return Done(
        done_reason=str(line.get("done_reason") or DONE_STOP),
        prompt_eval_count=int(line.get("prompt_eval_count") or 0),
        prompt_eval_duration=int(line.get("prompt_eval_duration") or 0),
        eval_count=int(line.get("eval_count") or 0),
        eval_duration=int(line.get("eval_duration") or 0),
        tool_calls=tuple(c for c in calls if isinstance(c, dict)) if isinstance(calls, list) else (),
        stop_sequence=stop if isinstance(stop, str) else None,
        cached_tokens=int(line.get("cached_tokens") or 0),
    )


def error_line(message: str) -> dict[str, Any]:
    """A failure after the stream started."""
    return {"error": message}


def parse_arguments(raw: Any) -> Any:
    """Tool-call arguments as a value: a JSON string is decoded; anything else is
    returned as is. Raises ValueError for a string that is not JSON."""
    if isinstance(raw, str):
        return json.loads(raw)
    return raw


class BodyError(ValueError):
    """A request body that is not one JSON object (HTTP 400 on both sides)."""


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; BodyError saying what is wrong otherwise.

    The one body reader of the supervisor's APIs and the runner's routes.
    """
    if not raw.strip():
        raise BodyError("request body is empty; expected a JSON object")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also integers too long to convert
        raise BodyError(f"malformed JSON body: {e}") from None
    except RecursionError:
        raise BodyError("malformed JSON body: nested too deeply") from None
    if not isinstance(value, dict):
        raise BodyError(f"request body must be a JSON object, got {type(value).__name__}")
    # A \uXXXX escape may decode to a lone surrogate, which no later step can encode.
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise BodyError("malformed JSON body: a string holds a lone surrogate (\\ud800-\\udfff)")
    return value


# ---- prompt cache settings (read by the runner, charged by the supervisor) ----

PROMPT_CACHE_ENV = "CORRAL_PROMPT_CACHE"
KV_DISK_ENV = "CORRAL_KV_DISK"
KV_DIR_ENV = "CORRAL_KV_DIR"
"""The runner's disk-tier directory (CORRAL_HOME/kv/<model key>), set by the supervisor."""
DEFAULT_PROMPT_CACHE = "25%"
DEFAULT_KV_DISK = "4GiB"

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4,
               "tib": 1024**4}


def parse_size(value: str) -> int:
    """"512MiB", "2GB", "1048576", "0" as bytes; ValueError otherwise."""
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    if unit not in _SIZE_UNITS or not num:
        raise ValueError(f"not a size: {value!r}")
    n = float(num)
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"not a size: {value!r}")
    return int(n * _SIZE_UNITS[unit])


def prompt_cache_budget(spec: str, model_bytes: int) -> int:
    """CORRAL_PROMPT_CACHE in bytes: a size ("1GiB"), or a share ("50%") of the model's
    memory (weights plus the KV cache of its context slots); "0" or "off" disables it."""
    text = str(spec).strip().lower()
    if text in ("off", "false", "no", ""):
        return 0
    if text.endswith("%"):
        share = float(text[:-1])
        if not math.isfinite(share) or not 0 <= share <= 1000:
            raise ValueError(f"not a share: {spec!r}")
        return int(model_bytes * share / 100)
    return parse_size(text)


def kv_dir_name(model_dir: str) -> str:
    """The name of a model's disk-tier directory under CORRAL_HOME/kv: the snapshot
    commit for a Hugging Face snapshot, else a hash of the model's path."""
    import hashlib
    from pathlib import PurePath

    path = PurePath(model_dir)
    if path.parent.name == "snapshots" and path.name:
        return path.name
    return hashlib.sha256(str(path).encode()).hexdigest()


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False

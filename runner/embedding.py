"""Embedding models in the runner: loading, the forward pass, pooling, batching.

Two families:

- Encoder-only models run on small MLX modules written for this runner:
  BERT, RoBERTa / XLM-RoBERTa (bge, e5, all-MiniLM, ...) below; nomic-bert
  (nomic-embed-text) and ModernBERT in runner/encoders. mlx-embeddings covers
  some of them too, but not nomic-bert, and it imports mlx-vlm at load time,
  which pulls in datasets, opencv, mlx-audio and fastapi (hundreds of MB) for
  nothing a text embedding needs.
- Decoder models (Qwen3-Embedding and any other mlx_lm architecture shipped
  with sentence-transformers files) run on mlx_lm's own model code: the
  backbone's final hidden states (`model.model(ids)`), then the pooling the
  model's files name (last-token for Qwen3-Embedding).

Inputs are padded on the right. Encoders get a key mask, so padding never
changes a real token's state; decoders are causal, so tokens after the last
real one cannot reach it either. Every vector is L2-normalized (as Ollama
returns them); `dimensions` keeps the first N components and normalizes again.

The EmbedEngine thread is the only one touching MLX: handlers submit jobs,
the thread gathers every input waiting (from all requests), sorts them by
length and runs them in batches of up to EMBED_MAX_BATCH inputs and
EMBED_BATCH_TOKENS padded tokens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from corral.runner import encoders
from corral.runner.embed_spec import EMBED_BATCH_TOKENS, EMBED_MAX_BATCH, EmbedSpec
from corral.runner.encoders.common import load_weights
from tokenizers import Tokenizer

log = logging.getLogger("runner")


# ---- encoder-only models (BERT family) ------------------------------------


@dataclass(frozen=True)
class EncoderArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_offset: int = 0  # RoBERTa counts positions from padding_idx + 1

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EncoderArgs:
        roberta = config.get("model_type") in ("roberta", "xlm-roberta")
        pad = int(config.get("pad_token_id") or 1)
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
            type_vocab_size=int(config.get("type_vocab_size") or 1),
            layer_norm_eps=float(config.get("layer_norm_eps") or 1e-12),
            hidden_act=str(config.get("hidden_act") or "gelu"),
            position_offset=pad + 1 if roberta else 0,
        )

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - self.position_offset


_ACTIVATIONS = {"gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx,
                "relu": nn.relu, "silu": nn.silu}


class _Embeddings(nn.Module):
    def __init__(self, a: EncoderArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position_embeddings = nn.Embedding(a.max_position_embeddings, a.hidden_size)
        self.token_type_embeddings = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.offset = a.position_offset

    def __call__(self, ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1]) + self.offset
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(mx.zeros_like(ids))
        return self.LayerNorm(x)


class _Layer(nn.Module):
    """One post-norm transformer block, with Hugging Face BERT's weight names (flattened)."""

    def __init__(self, a: EncoderArgs) -> None:
        super().__init__()
        h = a.hidden_size
        self.heads = a.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=a.layer_norm_eps)
        self.intermediate = nn.Linear(h, a.intermediate_size)
        self.out_proj = nn.Linear(a.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=a.layer_norm_eps)
        self.act = _ACTIVATIONS.get(a.hidden_act, nn.gelu)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, h = x.shape
        d = h // self.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, d).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d), mask=mask)
        a = a.transpose(0, 2, 1, 3).reshape(b, n, h)
        x = self.attn_norm(x + self.attn_out(a))
        return self.out_norm(x + self.out_proj(self.act(self.intermediate(x))))


class Encoder(nn.Module):
    def __init__(self, args: EncoderArgs) -> None:
        super().__init__()
        self.args = args
        self.hidden_size = args.hidden_size
        self.max_tokens = args.max_tokens
        self.embeddings = _Embeddings(args)
        self.layers = [_Layer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, ids: mx.array, valid: mx.array) -> mx.array:
        """Last hidden states (batch, length, hidden); `valid` is (batch, length) bool."""
        # Additive key mask: padded keys get -inf-like scores, in the activations' dtype.
        x = self.embeddings(ids)
        mask = mx.where(valid[:, None, None, :], 0.0, -1e9).astype(x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# Hugging Face BERT layer names -> this module's (model prefixes such as "bert." are dropped first).
_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "out_proj",
    "output.LayerNorm": "out_norm",
}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
_DROP = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_LEAF = {"gamma": "weight", "beta": "bias"}  # old TensorFlow-converted LayerNorm names


def hf_to_encoder_names(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map a Hugging Face BERT/RoBERTa checkpoint's tensor names onto Encoder's."""
    out = {}
    for name, w in weights.items():
        for prefix in ("bert.", "roberta.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith(_DROP):
            continue
        m = _HF_LAYER.match(name)
        if m and m.group(2) in _LAYER_NAMES:
            leaf = _LEAF.get(m.group(3), m.group(3))
            name = f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{leaf}"
        else:
            stem, _, leaf = name.rpartition(".")
            name = f"{stem}.{_LEAF.get(leaf, leaf)}"
        out[name] = w
    return out


def encoder_to_hf_names(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The inverse of hf_to_encoder_names (the test-model generator writes HF names)."""
    back = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for name, w in weights.items():
        if name.startswith("layers."):
            _, index, module, leaf = name.split(".")
            name = f"encoder.layer.{index}.{back[module]}.{leaf}"
        out[name] = w
    return out


def load_encoder(model_dir: Path, config: dict[str, Any]) -> encoders.Encoder:
    """The encoder for config.json's model_type: BERT/RoBERTa here, rotary families in runner/encoders."""
    if config.get("model_type") in encoders.FAMILIES:
        return encoders.load(model_dir, config)
    model = Encoder(EncoderArgs.from_config(config))
    weights: dict[str, mx.array] = {}
    for path in sorted(model_dir.glob("model*.safetensors")):
        weights.update(mx.load(str(path)))  # type: ignore[arg-type]
    load_weights(model, hf_to_encoder_names(weights))
    return model


# ---- the model, whatever its family ----------------------------------------


def pool(hidden: mx.array, lengths: mx.array, mode: str) -> mx.array:
    """(batch, length, hidden) -> (batch, hidden) over each row's first `lengths` tokens."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        idx = (lengths - 1)[:, None, None]
        return mx.take_along_axis(hidden, idx, axis=1)[:, 0]
    valid = (mx.arange(hidden.shape[1])[None] < lengths[:, None])[..., None]
    if mode == "max":
        return mx.max(mx.where(valid, hidden, -mx.inf), axis=1)
    summed = mx.sum(mx.where(valid, hidden, 0.0), axis=1)
    return summed / lengths[:, None].astype(hidden.dtype)


def normalize(vectors: mx.array, dimensions: int | None = None) -> mx.array:
    """L2-normalize rows in float32, keeping the first `dimensions` components first."""
    v = vectors.astype(mx.float32)
    if dimensions is not None:
        v = v[:, :dimensions]
    norm = mx.linalg.norm(v, axis=1, keepdims=True)
    return v / mx.maximum(norm, 1e-12)


class EmbeddingModel:
    """One embedding model: tokenizer, backbone and pooling, as its files describe them."""

    def __init__(self, model_dir: Path, spec: EmbedSpec) -> None:
        self.spec = spec
        config = json.loads((model_dir / "config.json").read_text())
        self.tokenizer = load_tokenizer(model_dir)
        if spec.encoder:
            encoder = load_encoder(model_dir, config)
            self._forward = lambda ids, valid: encoder(ids, valid)
            self.dimensions = encoder.hidden_size
            model_max = encoder.max_tokens
        else:
            from mlx_lm.utils import load_model

            loaded = load_model(model_dir)
            model = loaded[0] if isinstance(loaded, tuple) else loaded
            backbone = model.model
            # Causal: right padding never reaches a real token, so no key mask is needed.
            self._forward = lambda ids, valid: backbone(ids)
            self.dimensions = int(config.get("hidden_size") or 0)
            model_max = int(config.get("max_position_embeddings") or 0) or 1 << 30
        self.max_tokens = min(spec.max_seq_length or model_max, model_max)

    def embed_batch(self, batch: list[list[int]], dimensions: int | None = None) -> mx.array:
        """Normalized vectors for token lists of any lengths, run as one padded batch."""
        longest = max(len(ids) for ids in batch)
        padded = mx.array([ids + [0] * (longest - len(ids)) for ids in batch], dtype=mx.int32)
        lengths = mx.array([len(ids) for ids in batch], dtype=mx.int32)
        valid = mx.arange(longest)[None] < lengths[:, None]
        hidden = self._forward(padded, valid)
        return normalize(pool(hidden, lengths, self.spec.pooling), dimensions)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The fast tokenizer with its post-processor (it adds [CLS]/[SEP], or an EOS for Qwen3-Embedding)."""
    path = model_dir / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer  # type: ignore[no-any-return]


# ---- batching ---------------------------------------------------------------


@dataclass
class EmbedJob:
    """One /embed request: token lists in, vectors out (through `future`).

    encoding "float": each vector a list of floats; "base64": each vector the
    base64 of its float32 little-endian bytes (what the supervisor asks for:
    no float formatting or parsing on either side of the hop).
    """

    inputs: list[list[int]]
    dimensions: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    encoding: str = "float"
    results: list[np.ndarray | None] = field(default_factory=list)
    pending: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.inputs)
        self.pending = len(self.inputs)

    def vectors(self) -> list[Any]:
        """The finished vectors, cut to `dimensions` and encoded (on the engine thread, off the event loop)."""
        rows = _cut(np.stack([r for r in self.results if r is not None]), self.dimensions)
        if self.encoding == "base64":
            little = rows.astype("<f4", copy=False)
            return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
        return rows.tolist()  # type: ignore[no-any-return]


class EmbedEngine:
    """The thread that runs every forward pass; jobs from concurrent requests share batches."""

    kind = "embedding"

    def __init__(self, model: EmbeddingModel, *, num_ctx: int, num_parallel: int) -> None:
        self.model = model
        self.num_ctx = min(num_ctx, model.max_tokens)
        self.tokenizer = TokenizerView(model.tokenizer, self.num_ctx)
        self.num_parallel = num_parallel
        self._inbox: queue.Queue[EmbedJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedding", daemon=True)
        self.active_count = 0  # requests in the forward pass now (written by the thread only)

    def start(self) -> None:
        self._thread.start()

    @property
    def queued_count(self) -> int:
        return self._inbox.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, job: EmbedJob) -> None:
        self._inbox.put(job)

    def cancel_all(self) -> None:
        pass  # a forward pass is short and cannot be cut; pending jobs finish first

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._take()
            if not jobs:
                continue
            self.active_count = len(jobs)
            try:
                self._run_jobs(jobs)
            except Exception as e:  # fail these requests, keep serving the next ones
                log.exception("embedding forward pass failed")
                for job in jobs:
                    job.loop.call_soon_threadsafe(_fail, job.future, f"embedding failed: {e}")
            self.active_count = 0

    def _take(self) -> list[EmbedJob]:
        """Every job waiting now (blocking for the first)."""
        try:
            first = self._inbox.get(timeout=0.5)
        except queue.Empty:
            return []
        jobs = [first] if first is not None else []
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _run_jobs(self, jobs: list[EmbedJob]) -> None:
        # Requests asking for different `dimensions` share the forward pass; only the
        # cut and normalization differ, so items carry their job and position.
        items = sorted(((len(ids), j, i) for j, job in enumerate(jobs) for i, ids in enumerate(job.inputs)),
                       key=lambda t: t[0])
        for batch in _batches(items):
            vectors = np.array(self.model.embed_batch([jobs[j].inputs[i] for _, j, i in batch]), dtype=np.float32)
            for (_, j, i), row in zip(batch, vectors, strict=True):
                job = jobs[j]
                job.results[i] = row
                job.pending -= 1
                if job.pending == 0:
                    job.loop.call_soon_threadsafe(_resolve, job.future, job.vectors())


def _batches(items: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Length-sorted items grouped under EMBED_MAX_BATCH and EMBED_BATCH_TOKENS (padded)."""
    out: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    for item in items:
        longest = max(item[0], current[-1][0] if current else 0)
        if current and (len(current) + 1 > EMBED_MAX_BATCH or (len(current) + 1) * longest > EMBED_BATCH_TOKENS):
            out.append(current)
            current = []
        current.append(item)
    if current:
        out.append(current)
    return out


def _cut(rows: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components of unit vectors (rows) and normalize again."""
    if dimensions is None or dimensions >= rows.shape[1]:
        return rows
    head = rows[:, :dimensions]
    norm = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.maximum(norm, 1e-12)).astype(np.float32)


def _resolve(future: asyncio.Future[list[Any]], results: list[Any]) -> None:
    if not future.done():
        future.set_result(results)


def _fail(future: asyncio.Future[list[Any]], message: str) -> None:
    if not future.done():
        future.set_exception(RuntimeError(message))


class TooLong(ValueError):
    """An input over the context length with truncate false (HTTP 400)."""


class TokenizerView:
    """The slice of a transformers tokenizer the runner's /tokenize and /detokenize use."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        self._tok = tokenizer
        self.bos_token = None
        self.max_tokens = max_tokens
        # A copy that truncates: the tokenizer cuts the text's tokens and keeps the
        # special ones its post-processor adds ([CLS] ... [SEP], a final EOS).
        self._cut = Tokenizer.from_str(tokenizer.to_str())
        self._cut.enable_truncation(max_length=max_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_inputs(self, texts: list[str], *, truncate: bool) -> list[list[int]]:
        """Token ids with special tokens; over max_tokens: cut when `truncate`, else TooLong."""
        out = [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=True)]
        long = [i for i, ids in enumerate(out) if len(ids) > self.max_tokens]
        if long and not truncate:
            i = long[0]
            raise TooLong(f"input {i} is {len(out[i])} tokens, more than the model's "
                          f"context length ({self.max_tokens}); set truncate to cut it")
        for i, e in zip(long, self._cut.encode_batch([texts[i] for i in long], add_special_tokens=True),
                        strict=True):
            out[i] = list(e.ids)
        return out

    def decode(self, tokens: list[int]) -> str:
        return str(self._tok.decode(tokens, skip_special_tokens=False))

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tok.get_vocab(with_added_tokens=True))

    def get_vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))


def load(model_dir: Path, spec: EmbedSpec, *, num_ctx: int, num_parallel: int) -> EmbedEngine:
    t0 = time.perf_counter()
    engine = EmbedEngine(EmbeddingModel(model_dir, spec), num_ctx=num_ctx, num_parallel=num_parallel)
    log.info("embedding model: pooling=%s max_tokens=%d dims=%d (%.2fs)", spec.pooling,
             engine.num_ctx, engine.model.dimensions, time.perf_counter() - t0)
    return engine

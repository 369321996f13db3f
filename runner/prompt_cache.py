"""The runner's prompt cache: KV state of earlier prompts, reused by prefix.

What mlx_lm provides and this module uses as is:

- `LRUPromptCache` (mlx_lm.models.cache): a token trie with byte-bounded LRU
  eviction. `fetch_nearest_cache` returns a deep copy of the entry sharing the
  longest prefix with a prompt (trimming a longer entry with
  `trim_prompt_cache` when the cache type allows it) and the tokens still to
  prefill; `insert_cache` drops entries that are prefixes of a new one.
  mlx_lm's own server uses it the same way, so no new cache structure here.
- `BatchGenerator.insert(caches=..., all_tokens=...)` takes a per-sequence
  cache and prefills only the rest; `GenerationBatch` responses and
  `BatchGenerator.remove(return_prompt_caches=True)` hand a finished
  sequence's cache back (the engine stores it here).
- `save_prompt_cache` / `load_prompt_cache` for the disk tier (safetensors).

What is added: the budget arithmetic (CORRAL_PROMPT_CACHE, a size or a share
of the model's memory), hit counters for /status, and the disk tier under
CORRAL_HOME/kv/<model key>/: MRU-first writes within a time bound at
shutdown, with CORRAL_KV_DISK bounding all models' files together (oldest
files go first), and validation on load (model key, layer count, cache
classes, shapes and dtype against a one-token reference cache); a file that
fails any check is deleted.

Everything here runs on the generation thread (the only thread touching MLX),
except `stats`, which reads plain integers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from corral.runner.protocol import (
    DEFAULT_KV_DISK,
    DEFAULT_PROMPT_CACHE,
    KV_DIR_ENV,
    KV_DISK_ENV,
    PROMPT_CACHE_ENV,
    kv_dir_name,
    parse_size,
    prompt_cache_budget,
)
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

log = logging.getLogger("runner")

_FORMAT = "corral-kv-1"
_SUFFIX = ".safetensors"
_LRU_TYPE = "assistant"  # one LRUPromptCache class for every entry: plain LRU order


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0
    disk_loaded: int = 0
    disk_rejected: int = 0


def kv_files(directory: Path) -> Iterator[Path]:
    """The cache files in one model's kv directory."""
    if directory.is_dir():
        yield from (p for p in directory.iterdir() if p.name.endswith(_SUFFIX))


def enforce_disk_budget(kv_root: Path, budget: int) -> None:
    """Delete the least recently written files under kv_root until all fit in `budget`."""
    files = [(p.stat().st_mtime, p.stat().st_size, p) for d in _subdirs(kv_root) for p in kv_files(d)]
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= budget:
            break
        path.unlink(missing_ok=True)
        total -= size


def _subdirs(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []


class PromptCache:
    """LRU prompt cache of one model, bounded by `max_bytes`, with an optional disk tier."""

    def __init__(self, model: Any, *, max_bytes: int, key: str, disk_dir: Path | None = None,
                 disk_bytes: int = 0) -> None:
        self.model = model
        self.max_bytes = max(0, int(max_bytes))
        self.key = key
        self.disk_dir = disk_dir
        self.disk_bytes = max(0, int(disk_bytes))
        self.stats = CacheStats()
        self.disk_used = 0
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=self.max_bytes)
        self._reference: list[tuple[str, list[tuple[tuple[int, ...], Any]]]] | None = None

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return int(self._lru.nbytes)

    @property
    def entries(self) -> int:
        return len(self._lru)

    # -- memory tier --------------------------------------------------------

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """(a private copy of the best cache for `tokens`, how many tokens it covers).

        At least one token is always left to prefill (BatchGenerator needs the
        last prompt token to start decoding), so an exact match is trimmed by one.
        """
        if not self.enabled or len(tokens) < 2:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(self.key, tokens)
        if cache is None:
            self.stats.misses += 1
            return None, 0
        cached = len(tokens) - len(rest)
        if cached >= len(tokens):
            if not can_trim_prompt_cache(cache):
                self.stats.misses += 1
                return None, 0
            trim_prompt_cache(cache, cached - (len(tokens) - 1))
            cached = len(tokens) - 1
        if cached <= 0:
            self.stats.misses += 1
            return None, 0
        self.stats.hits += 1
        self.stats.cached_tokens += cached
        return cache, cached

    def store(self, tokens: list[int], cache: list[Any] | None) -> None:
        """Keep `cache` (the KV state of exactly `tokens`) if it fits the budget."""
        if not self.enabled or not cache or len(tokens) < 2:
            return
        if cache[0].empty() if hasattr(cache[0], "empty") else False:
            return
        size = sum(c.nbytes for c in cache)
        if size > self.max_bytes:
            return
        self._lru.insert_cache(self.key, list(tokens), cache, cache_type=_LRU_TYPE)

    def _mru_entries(self) -> list[tuple[list[int], list[Any]]]:
        # mlx_lm's LRUPromptCache has no public iteration; its LRU order lives in
        # CacheOrder deques of (model, tokens), oldest first, and its trie maps
        # those to entries. Read-only use of both.
        order = list(self._lru._lru._lrus[_LRU_TYPE])
        out = []
        for model_key, tokens in reversed(order):
            entry = self._lru._trie.get(model_key, tokens)
            out.append((list(tokens), entry.prompt_cache))
        return out

    # -- disk tier ----------------------------------------------------------

    def save(self, time_budget_s: float) -> tuple[int, int]:
        """Write the most recently used entries to the disk tier, newest first, until
        `time_budget_s` runs out or the disk budget is full; delete this model's
        files not rewritten. Returns (files written, bytes written)."""
        if self.disk_dir is None or self.disk_bytes <= 0:
            return 0, 0
        deadline = time.monotonic() + time_budget_s
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        keep: set[str] = set()
        written = total = 0
        for tokens, cache in self._mru_entries():
            if time.monotonic() >= deadline:
                break
            size = sum(c.nbytes for c in cache)
            if total + size > self.disk_bytes:
                continue
            name = _file_name(tokens)
            path = self.disk_dir / name
            if not path.exists():
                tmp = self.disk_dir / f".{name}.tmp{_SUFFIX}"
                save_prompt_cache(str(tmp), cache, {"format": _FORMAT, "key": self.key,
                                                    "tokens": json.dumps(tokens)})
                os.replace(tmp, path)
                written += 1
            else:
                os.utime(path)
            keep.add(name)
            total += path.stat().st_size
        for path in kv_files(self.disk_dir):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        enforce_disk_budget(self.disk_dir.parent, self.disk_bytes)
        self.disk_used = total
        return written, total

    def load(self) -> int:
        """Bring this model's disk-tier files into the memory tier (newest first, within
        the memory budget). A file that fails to load or does not match the model is
        deleted. Returns how many entries were restored."""
        if self.disk_dir is None or not self.enabled:
            return 0
        files = sorted(kv_files(self.disk_dir), key=lambda p: p.stat().st_mtime)
        restored = 0
        for path in files:  # oldest first, so the newest ends most recently used
            entry = self._load_file(path)
            if entry is None:
                self.stats.disk_rejected += 1
                path.unlink(missing_ok=True)
                continue
            tokens, cache = entry
            self.store(tokens, cache)
            restored += 1
        self.stats.disk_loaded += restored
        self.disk_used = sum(p.stat().st_size for p in kv_files(self.disk_dir))
        return restored

    def _load_file(self, path: Path) -> tuple[list[int], list[Any]] | None:
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
            if meta.get("format") != _FORMAT or meta.get("key") != self.key:
                raise ValueError("written for another model or format")
            tokens = json.loads(meta["tokens"])
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ValueError("bad token list")
            self._check_shapes(cache, len(tokens))
            mx.eval([c.state for c in cache])
            return tokens, cache
        except Exception as e:  # any failure: the file is useless
            log.warning("prompt cache: dropping %s: %s", path.name, e)
            return None

    def _check_shapes(self, cache: list[Any], n_tokens: int) -> None:
        ref = self._reference_layout()
        got = [(type(c).__name__, _layout(c)) for c in cache]
        if len(got) != len(ref):
            raise ValueError(f"{len(got)} layers, the model has {len(ref)}")
        for (cls, arrays), (ref_cls, ref_arrays) in zip(got, ref, strict=True):
            if cls != ref_cls or len(arrays) != len(ref_arrays):
                raise ValueError(f"cache class {cls}, the model uses {ref_cls}")
            for (shape, dtype), (ref_shape, ref_dtype) in zip(arrays, ref_arrays, strict=True):
                # the sequence axis (2) differs by design; everything else must match
                if dtype != ref_dtype or len(shape) != len(ref_shape) or \
                        any(a != b for i, (a, b) in enumerate(zip(shape, ref_shape, strict=True)) if i != 2):
                    raise ValueError(f"array {shape} {dtype}, the model makes {ref_shape} {ref_dtype}")
        if any(getattr(c, "offset", n_tokens) != n_tokens for c in cache):
            raise ValueError("cache length does not match its tokens")

    def kv_bytes_per_token(self) -> int:
        """What one token of one sequence costs in this model's KV cache."""
        total = 0
        for _, arrays in self._reference_layout():
            for shape, dtype in arrays:
                if len(shape) == 4:  # (batch, heads, tokens, dim): per token
                    total += shape[0] * shape[1] * shape[3] * dtype.size
        return total

    def _reference_layout(self) -> list[tuple[str, list[tuple[tuple[int, ...], Any]]]]:
        # One token through the model gives the exact per-layer cache classes,
        # shapes and dtypes this model produces.
        if self._reference is None:
            cache = make_prompt_cache(self.model)
            self.model(mx.array([[0]]), cache=cache)
            mx.eval([c.state for c in cache])
            self._reference = [(type(c).__name__, _layout(c)) for c in cache]
        return self._reference


def from_env(model: Any, model_dir: Path, *, num_ctx: int, num_parallel: int) -> PromptCache:
    """The prompt cache the environment asks for (CORRAL_PROMPT_CACHE, CORRAL_KV_DISK,
    CORRAL_KV_DIR); with none set, the defaults and no disk tier."""
    from mlx.utils import tree_flatten

    cache = PromptCache(model, max_bytes=0, key=kv_dir_name(str(model_dir)))
    params: list[Any] = list(tree_flatten(model.parameters()))
    weights = sum(int(v.nbytes) for _, v in params if isinstance(v, mx.array))
    model_bytes = weights + cache.kv_bytes_per_token() * num_ctx * num_parallel
    cache.max_bytes = prompt_cache_budget(os.environ.get(PROMPT_CACHE_ENV) or DEFAULT_PROMPT_CACHE, model_bytes)
    cache._lru.max_bytes = cache.max_bytes
    kv_dir = os.environ.get(KV_DIR_ENV)
    if kv_dir:
        cache.disk_dir = Path(kv_dir)
        cache.disk_bytes = parse_size(os.environ.get(KV_DISK_ENV) or DEFAULT_KV_DISK)
    log.info("prompt cache: %d bytes in memory, disk tier %s (%d bytes)", cache.max_bytes,
             cache.disk_dir or "off", cache.disk_bytes)
    return cache


def _layout(cache: Any) -> list[tuple[tuple[int, ...], Any]]:
    state = cache.state
    arrays = state if isinstance(state, (list, tuple)) else [state]
    return [(tuple(a.shape), a.dtype) for a in arrays if isinstance(a, mx.array)]


def _file_name(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32] + _SUFFIX

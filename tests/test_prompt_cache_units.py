"""Fast tests of the prompt cache's pure parts: budgets, LRU-by-bytes eviction, the
disk tier's bounds and validation, usage fields, settings and memory accounting."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from corral.runner.protocol import (
    Done,
    done_from_line,
    done_line,
    kv_dir_name,
    parse_size,
    prompt_cache_budget,
)


def test_budget_is_a_size_or_a_share() -> None:
    assert prompt_cache_budget("1GiB", 10) == 1 << 30
    assert prompt_cache_budget("50%", 1000) == 500
    assert prompt_cache_budget("0", 1000) == 0
    assert prompt_cache_budget("off", 1000) == 0
    assert parse_size("512MiB") == 512 << 20 and parse_size("2GB") == 2_000_000_000 and parse_size("123") == 123
    for bad in ("lots", "-1GB", "5 parsecs", "nan%"):
        with pytest.raises(ValueError):
            prompt_cache_budget(bad, 1000)


def test_kv_dir_name_is_the_snapshot_commit_or_the_path_digest() -> None:
    import hashlib

    assert kv_dir_name("/hub/models--a--b/snapshots/abc123") == "abc123"
    assert kv_dir_name("/models/mine") == hashlib.sha256(b"/models/mine").hexdigest()


def test_done_line_carries_cached_tokens() -> None:
    line = done_line("stop", prompt_eval_count=3, prompt_eval_duration=1, eval_count=2, eval_duration=1,
                     cached_tokens=40)
    done = done_from_line(line)
    assert (done.prompt_eval_count, done.cached_tokens, done.prompt_tokens) == (3, 40, 43)
    assert done_from_line({"done": True}).cached_tokens == 0


def test_usage_fields_per_family() -> None:
    from corral.supervisor.api import openai
    from corral.supervisor.api.anthropic import MessageRequest

    done = Done(prompt_eval_count=5, eval_count=7, cached_tokens=95)
    usage = openai._usage(done)
    assert usage["prompt_tokens"] == 100 and usage["total_tokens"] == 107
    assert usage["prompt_tokens_details"] == {"cached_tokens": 95}
    # Anthropic: input_tokens excludes what was read from the cache
    assert MessageRequest._usage(done) == {"input_tokens": 5, "output_tokens": 7,
                                           "cache_read_input_tokens": 95, "cache_creation_input_tokens": 0}


# -- the cache itself, on real mlx KV caches ---------------------------------


class _Model:
    """Just enough of a model for PromptCache: none of these tests run it."""


def _kv(n_tokens: int, value: float = 0.0) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    layers = []
    for _ in range(2):
        c = KVCache()
        c.update_and_fetch(mx.full((1, 2, n_tokens, 8), float(value)), mx.full((1, 2, n_tokens, 8), float(value)))
        layers.append(c)
    return layers


def _cache(budget: int, disk: Path | None = None, disk_bytes: int = 0) -> Any:
    from corral.runner.prompt_cache import PromptCache

    return PromptCache(_Model(), max_bytes=budget, key="k", disk_dir=disk, disk_bytes=disk_bytes)


def test_hit_partial_and_miss() -> None:
    pc = _cache(1 << 20)
    pc.store(list(range(10)), _kv(10))
    cache, n = pc.fetch([*range(6), 99, 98])
    assert n == 6 and cache is not None and cache[0].offset == 6
    cache, n = pc.fetch(list(range(10)))
    assert n == 9 and cache is not None and cache[0].offset == 9  # one token always left
    assert pc.fetch([50, 51, 52]) == (None, 0)
    assert (pc.stats.hits, pc.stats.misses, pc.stats.cached_tokens) == (2, 1, 15)


def test_eviction_is_lru_by_bytes() -> None:
    one = sum(c.nbytes for c in _kv(10))
    pc = _cache(2 * one + one // 2)  # room for two entries
    for start in (0, 100, 200):
        pc.store(list(range(start, start + 10)), _kv(10))
    assert pc.nbytes <= pc.max_bytes and pc.entries == 2
    assert pc.fetch(list(range(0, 10)))[1] == 0  # the oldest went first
    assert pc.fetch(list(range(200, 210)))[1] == 9
    pc.store(list(range(300, 310)), _kv(600))  # bigger than the whole budget: not kept
    assert pc.fetch(list(range(300, 310)))[1] == 0


def test_disk_tier_writes_newest_first_within_budgets(tmp_path: Path) -> None:
    one = sum(c.nbytes for c in _kv(10))
    kv_root = tmp_path / "kv"
    pc = _cache(1 << 20, kv_root / "k", disk_bytes=one * 2 + 2048)
    for start in (0, 100, 200):
        pc.store(list(range(start, start + 10)), _kv(10, start))
    written, nbytes = pc.save(5.0)
    assert written == 2 and 0 < nbytes <= pc.disk_bytes
    pc2 = _cache(1 << 20, kv_root / "k", disk_bytes=1 << 20)
    pc2._reference = [("KVCache", [((1, 2, 1, 8), c.keys.dtype)] * 2) for c in _kv(1)]
    assert pc2.load() == 2
    assert pc2.fetch(list(range(200, 212)))[1] == 10  # the newest survived
    assert pc2.fetch(list(range(0, 12)))[1] == 0  # the oldest did not fit


def test_disk_budget_is_shared_by_models(tmp_path: Path) -> None:
    from corral.runner.prompt_cache import enforce_disk_budget

    root = tmp_path / "kv"
    for i, model in enumerate(("a", "b", "c")):
        (root / model).mkdir(parents=True)
        f = root / model / "x.safetensors"
        f.write_bytes(b"0" * 1000)
        os.utime(f, (time.time() - 100 + i, time.time() - 100 + i))
    enforce_disk_budget(root, 2500)
    assert not (root / "a" / "x.safetensors").exists()
    assert (root / "b" / "x.safetensors").exists() and (root / "c" / "x.safetensors").exists()


def test_bad_files_are_deleted(tmp_path: Path) -> None:
    d = tmp_path / "kv" / "k"
    d.mkdir(parents=True)
    (d / "bad.safetensors").write_bytes(b"\x00\x01junk")
    pc = _cache(1 << 20, d, disk_bytes=1 << 20)
    pc._reference = []
    assert pc.load() == 0
    assert pc.stats.disk_rejected == 1 and not (d / "bad.safetensors").exists()


def test_shape_mismatch_is_rejected(tmp_path: Path) -> None:
    d = tmp_path / "kv" / "k"
    pc = _cache(1 << 20, d, disk_bytes=1 << 20)
    pc.store(list(range(10)), _kv(10))
    pc.save(5.0)
    other = _cache(1 << 20, d, disk_bytes=1 << 20)
    import mlx.core as mx

    other._reference = [("KVCache", [((1, 4, 1, 8), mx.float32)] * 2)] * 2  # 4 heads, not 2
    assert other.load() == 0 and other.stats.disk_rejected == 1
    assert not list(d.glob("*.safetensors"))


# -- settings and memory ----------------------------------------------------


def test_settings_parse_and_reject() -> None:
    from corral.supervisor.config import Settings, _cache_budget, _size
    from corral.supervisor.errors import BadRequest

    assert _cache_budget("prompt_cache", "25%", 0) == {"prompt_cache": "25%"}
    assert _size("kv_disk", "1GiB", 0) == {"kv_disk": 1 << 30}
    with pytest.raises(BadRequest):
        _cache_budget("prompt_cache", "a lot", 0)
    s = Settings()
    assert s.prompt_cache == "25%" and s.kv_disk == 4 << 30


def test_runner_env_points_at_the_kv_dir(tmp_path: Path) -> None:
    from corral.supervisor.config import Settings
    from corral.supervisor.process import runner_env

    env = runner_env(Settings(home=tmp_path, prompt_cache="1GiB", kv_disk=100), Path("/m/x"))
    assert env["CORRAL_PROMPT_CACHE"] == "1GiB" and env["CORRAL_KV_DISK"] == "100"
    assert env["CORRAL_KV_DIR"] == str(tmp_path / "kv" / kv_dir_name("/m/x"))
    assert "CORRAL_KV_DIR" not in runner_env(Settings(home=tmp_path, kv_disk=0), Path("/m/x"))


def test_estimate_charges_the_cache_budget(tiny_model: Path) -> None:
    from corral.supervisor.manifest import read_manifest
    from corral.supervisor.memory import estimate_need

    m = read_manifest(tiny_model)
    off = estimate_need(m, 256, 4, prompt_cache="0")
    half = estimate_need(m, 256, 4, prompt_cache="50%")
    fixed = estimate_need(m, 256, 4, prompt_cache="8MiB")
    assert off.prompt_cache == 0
    assert half.prompt_cache == (m.weight_bytes + half.kv) // 2
    assert half.total == off.total + half.prompt_cache
    assert fixed.total == off.total + (8 << 20)


def test_deleting_a_model_deletes_its_caches(tiny_model: Path, tmp_path: Path) -> None:
    from corral.supervisor.store import ModelStore

    store = ModelStore(tmp_path / "home", hf_cache=tmp_path / "hub")
    ref = store.register("mine", tiny_model)
    store.register("alias", tiny_model)  # `cp`: two names, one model
    kv = tmp_path / "home" / "kv" / kv_dir_name(str(ref.path))
    kv.mkdir(parents=True)
    (kv / "a.safetensors").write_bytes(b"x")
    store.delete("mine")
    assert kv.exists()  # another name still uses these caches
    store.delete("alias")
    assert not kv.exists()

"""supervisor.store: finding models in the hub cache and the registry; names; changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from corral.supervisor import store as store_mod
from corral.supervisor.errors import BadRequest, InvalidModelName, ModelNotFound
from corral.supervisor.manifest import Manifest
from corral.supervisor.store import (
    ModelStore,
    default_hf_cache,
    normalize_name,
    supported_model_type,
)

from tests.conftest import TINY, TINY_B
from tests.support.models import make_hf_model

LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}


def snapshot(cache: Path, repo: str, files: dict[str, bytes], commit: str = "c0ffee", kind: str = "models") -> Path:
    """A hand-made hub cache entry (real files, no blobs: enough for discovery)."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> Path:
    """The session's two real models plus every kind of entry that is not an MLX model."""
    c = tmp_path_factory.mktemp("store") / "hub"
    shutil.copytree(hf_cache, c, symlinks=True)
    cfg = json.dumps(LLAMA_CONFIG).encode()
    weights = (c / f"models--{TINY.replace('/', '--')}" / "snapshots").iterdir().__next__() / "model.safetensors"
    st = weights.read_bytes()
    snapshot(c, "other/gguf-only", {"model.Q4_K_M.gguf": b"GGUF...", "README.md": b"x"})
    snapshot(c, "other/bin-only", {"config.json": cfg, "pytorch_model.bin": b"PK.."})
    snapshot(c, "other/no-config", {"model.safetensors": st})
    snapshot(c, "other/vision", {"config.json": json.dumps({"model_type": "clip_vision_model"}).encode(),
                                 "model.safetensors": st})
    snapshot(c, "other/evil-type", {"config.json": json.dumps({"model_type": "../../etc"}).encode(),
                                    "model.safetensors": st})
    snapshot(c, "other/dataset", {"config.json": cfg, "model.safetensors": st}, kind="datasets")
    snapshot(c, "other/space", {"config.json": cfg, "model.safetensors": st}, kind="spaces")
    snapshot(c, "Org/Mistral-Tiny", {"config.json": json.dumps({**LLAMA_CONFIG, "model_type": "mistral"}).encode(),
                                     "model.safetensors": st})
    (c / "version.txt").write_text("1")
    return c


@pytest.fixture
def store(cache: Path, tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "home", hf_cache=cache)


# --- discovery -------------------------------------------------------------------


def test_lists_only_mlx_language_models(store: ModelStore, cache: Path) -> None:
    refs = store.list()
    assert [r.name for r in refs] == ["corral-test/tiny", "corral-test/tiny-b", "Org/Mistral-Tiny"]
    tiny = refs[0]
    root = cache / "models--corral-test--tiny"
    assert tiny.source == "hf"
    assert tiny.digest == (root / "refs" / "main").read_text()
    assert tiny.path == root / "snapshots" / tiny.digest
    assert tiny.size == sum(p.stat().st_size for p in tiny.path.iterdir())
    assert tiny.size > 100_000  # followed the symlinks into blobs/
    assert abs(tiny.modified_at - time.time()) < 86400


def test_supported_model_types() -> None:
    assert supported_model_type("llama")
    assert supported_model_type("qwen2")
    assert supported_model_type("mistral")  # remapped to llama by mlx_lm
    assert not supported_model_type("clip_vision_model")
    assert not supported_model_type("../llama")
    assert not supported_model_type("")


def test_refs_main_wins_else_newest_snapshot(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snap = make_hf_model(cache, "org/m")
    root = cache / "models--org--m"
    older = root / "snapshots" / "0ld"
    shutil.copytree(snap, older, symlinks=True)
    os.utime(older, (1, 1))
    (root / "refs" / "main").write_text("0ld")
    s = ModelStore(tmp_path / "home", hf_cache=cache)
    assert s.resolve("org/m").path == older
    (root / "refs" / "main").unlink()
    assert s.resolve("org/m").path == snap


def test_cache_location_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_hf_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_hf_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert default_hf_cache() == tmp_path / "direct"
    assert ModelStore(tmp_path / "home").hf_cache == tmp_path / "direct"


def test_missing_cache_is_empty(tmp_path: Path) -> None:
    assert ModelStore(tmp_path / "home", hf_cache=tmp_path / "nope").list() == []


# --- names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY, "Corral-Test/TINY", "corral-test/tiny:latest", "CORRAL-TEST/tiny:LATEST"])
def test_names_match_case_insensitively_with_latest(store: ModelStore, name: str) -> None:
    assert store.resolve(name).name == TINY


def test_resolve_unknown(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound) as e:
        store.resolve("corral-test/nope")
    assert e.value.status == 404
    for name in ("other/gguf-only", "other/bin-only", "other/no-config", "other/vision", "other/dataset"):
        with pytest.raises(ModelNotFound):
            store.resolve(name)


HOSTILE: list[Any] = [
    "", " ", "..", "../x", "a/../b", "a/..", "./a", "a/./b", "/etc/passwd", "/abs", "a\\b", "..\\..\\x",
    "a\x00b", "a\nb", "a\tb", "a\x7fb", "x" * 257, "a//b", "a/", "a:", "a:.x", "a:-x", "a:b:c", "a:" + "t" * 129, "a:latest:latest",
    "C:\\Windows", "~/model", "$HOME/x", "a b", "mødel", ".hidden", "a/b/c/d",
    None, 3, ["a"], {"a": 1}, b"bytes",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_rejected_without_touching_files(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch, name: Any
) -> None:
    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("file access for a rejected name")

    for attr in ("iterdir", "stat", "read_text", "is_dir", "is_file", "exists", "open"):
        monkeypatch.setattr(Path, attr, forbidden)
    for call in (lambda: store.resolve(name), lambda: store.delete(name), lambda: store.register(name, Path("/tmp"))):
        with pytest.raises(InvalidModelName) as e:
            call()
        assert e.value.status == 400


def test_normalize_name() -> None:
    assert normalize_name("Org/Model-1.5B_x:latest") == "org/model-1.5b_x"
    assert normalize_name("gpt2") == "gpt2"
    assert normalize_name("x" * 256) == "x" * 256


# --- registry ------------------------------------------------------------------------


def test_register_lists_resolves_and_persists(store: ModelStore, tiny_model: Path) -> None:
    ref = store.register("My-Model", tiny_model)
    assert (ref.name, ref.path, ref.source) == ("My-Model", tiny_model.resolve(), "local")
    assert len(ref.digest) == 64
    assert store.resolve("my-model:latest") == ref
    assert "My-Model" in [r.name for r in store.list()]
    again = ModelStore(store.home, hf_cache=store.hf_cache)
    assert again.resolve("MY-MODEL").path == tiny_model.resolve()
    data = json.loads((store.home / "models.json").read_text())
    assert data["models"]["my-model"]["path"] == str(tiny_model.resolve())


def test_registered_name_shadows_hub_name(store: ModelStore, tiny_q4_model: Path) -> None:
    store.register(TINY, tiny_q4_model)
    assert store.resolve(TINY).path == tiny_q4_model.resolve()
    assert [r.source for r in store.list() if r.name.lower() == TINY] == ["local"]
    store.delete(TINY)  # unregisters; the hub copy is still there
    assert store.resolve(TINY).source == "hf"


@pytest.fixture
def bad_dir(tiny_model: Path, tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    shutil.copytree(tiny_model, d)
    return d


def test_register_rejects_what_cannot_load(store: ModelStore, bad_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="not a directory"):
        store.register("x", tmp_path / "missing")
    (bad_dir / "tokenizer.json").unlink()
    with pytest.raises(BadRequest, match="no tokenizer"):
        store.register("x", bad_dir)
    (bad_dir / "tokenizer.json").write_text("{}")
    st = bad_dir / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(BadRequest, match="truncated"):
        store.register("x", bad_dir)
    st.unlink()
    (bad_dir / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(BadRequest, match="safetensors"):
        store.register("x", bad_dir)
    (bad_dir / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(BadRequest, match="not supported"):
        store.register("x", bad_dir)
    (bad_dir / "config.json").unlink()
    with pytest.raises(BadRequest, match=r"no config\.json"):
        store.register("x", bad_dir)
    assert not (store.home / "models.json").exists()


def test_dangling_registration_is_not_listed(store: ModelStore, bad_dir: Path) -> None:
    store.register("gone", bad_dir)
    shutil.rmtree(bad_dir)
    assert "gone" not in [r.name for r in store.list()]
    with pytest.raises(ModelNotFound, match="no longer"):
        store.resolve("gone")
    store.delete("gone")


def test_copy_registers_another_name(store: ModelStore, tiny_model: Path) -> None:
    hub = store.resolve(TINY_B)
    ref = store.copy(TINY_B + ":latest", "me/copy")
    assert (ref.name, ref.path, ref.source) == ("me/copy", hub.path, "local")
    store.register("other", tiny_model)
    assert store.copy("other", "me/copy").path == tiny_model.resolve()  # overwrite, like ollama cp
    with pytest.raises(InvalidModelName):
        store.copy(TINY, "../evil")
    with pytest.raises(InvalidModelName):
        store.copy("nope/missing", "../evil")
    with pytest.raises(ModelNotFound):
        store.copy("nope/missing", "fine")
    store.delete("me/copy")
    assert store.resolve(TINY_B).source == "hf"  # deleting a copy leaves its source


def test_delete_hub_entry_removes_its_directory(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    make_hf_model(cache, "org/doomed")
    (cache / "models--org--keep").mkdir()
    s = ModelStore(tmp_path / "home", hf_cache=cache)
    s.delete("ORG/Doomed:latest")
    assert not (cache / "models--org--doomed").exists()
    assert (cache / "models--org--keep").exists()
    with pytest.raises(ModelNotFound):
        s.delete("org/doomed")
    with pytest.raises(ModelNotFound):
        s.delete("org/keep")  # not a model: never removed


def test_resolve_answers_from_cache_until_the_files_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    make_hf_model(cache, "org/kept")
    s = ModelStore(tmp_path / "home", hf_cache=cache)
    first = s.resolve("org/kept")
    calls: list[str] = []
    real = s._resolve
    monkeypatch.setattr(s, "_resolve", lambda name, key: calls.append(name) or real(name, key))
    assert s.resolve("ORG/kept:latest") == first and calls == []  # no listing, no reads
    (first.path / "config.json").unlink()  # the model's files change under it
    with pytest.raises(ModelNotFound):
        s.resolve("org/kept")
    assert calls == ["org/kept"]


# --- manifest cache -------------------------------------------------------------------


def test_manifest_cached_by_file_identity(store: ModelStore, bad_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = store_mod.read_manifest

    def counting(d: Path) -> Manifest:
        calls.append(d)
        return real(d)

    monkeypatch.setattr(store_mod, "read_manifest", counting)
    ref = store.register("cached", bad_dir)
    calls.clear()
    m1 = store.manifest(ref)
    assert store.manifest(ref) is m1
    assert len(calls) == 1
    cfg = json.loads((bad_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = 999
    (bad_dir / "config.json").write_text(json.dumps(cfg))
    os.utime(bad_dir / "config.json", ns=(1, 1))  # identity changes even within one mtime tick
    m2 = store.manifest(ref)
    assert len(calls) == 2 and m2.max_context == 999


def test_listing_many_models_is_fast(tmp_path: Path, hf_cache: Path) -> None:
    cache = tmp_path / "hub"
    src = hf_cache / "models--corral-test--tiny"
    for i in range(200):
        shutil.copytree(src, cache / f"models--org--m{i:03d}", symlinks=True)
    s = ModelStore(tmp_path / "home", hf_cache=cache)
    refs = s.list()
    assert len(refs) == 200
    for r in refs:
        s.manifest(r)
    t = time.perf_counter()
    refs = s.list()
    for r in refs:
        s.manifest(r)
    assert time.perf_counter() - t < 5.0  # generous: a 2-core box shared with other tests


def test_store_never_imports_mlx(cache: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from supervisor.store import ModelStore\n"
        f"s = ModelStore(Path({str(tmp_path)!r}), hf_cache=Path({str(cache)!r}))\n"
        "refs = s.list(); [s.manifest(r) for r in refs]\n"
        "assert len(refs) == 3, refs\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_recent_answers_skip_the_disk_for_a_second_and_changes_made_here_clear_them(
        store: ModelStore, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(store_mod.time, "monotonic", lambda: now[0])
    assert store.resolve_recent(TINY) is None  # never checked
    ref = store.resolve(TINY)
    assert store.resolve_recent(TINY.upper()) == ref
    assert store.manifest_recent(ref) is None
    manifest = store.manifest(ref)
    assert store.manifest_recent(ref) == manifest
    now[0] += store_mod.RECENT_S + 0.01
    assert store.resolve_recent(TINY) is None and store.manifest_recent(ref) is None
    assert store.resolve(TINY) == ref  # a cached answer, checked again: recent once more
    assert store.resolve_recent(TINY) == ref
    store.register("mine", tiny_model)  # the registry changed: names may resolve elsewhere now
    assert store.resolve_recent(TINY) is None
    assert store.resolve_recent("no/such:model") is None and store.resolve_recent("bad name!") is None

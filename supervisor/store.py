"""Where models live.

Two sources: the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub) and a registry under CORRAL_HOME (name -> directory,
written by `corral create` and `corral cp`), kept in $CORRAL_HOME/models.json.
Registered names shadow hub names.

Names follow Ollama's rules (supervisor.names): a hub repo is `org/repo`
with the tag "latest"; registered names may carry any tag, and keep what
`/api/create` stored with them (ModelDefaults). A bare Ollama library name
(`qwen3:0.6b`) resolves to the hub repo its table maps it to (supervisor.library).

A requested name never becomes a file path: it is validated by
`normalize_name` and then only compared with names found by listing, so no
request can make the store touch a file outside its two roots.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from corral.runner.embed_spec import ENCODER_MODEL_TYPES
from corral.runner.protocol import kv_dir_name
from corral.supervisor.errors import BadRequest, CorralError, ModelNotFound
from corral.supervisor.library import load_library, looks_like_library_name
from corral.supervisor.manifest import (
    Manifest,
    ManifestError,
    read_config,
    read_manifest,
    weight_files,
)
from corral.supervisor.names import (
    display_name,
    normalize_name,
    tagged_name,
)

REGISTRY_FILE = "models.json"
RECENT_S = 1.0
"""Seconds a resolve or manifest answer is served without a stat (Store.resolve_recent)."""

# The snapshot commit directory names the hub cache uses.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MODEL_TYPE = re.compile(r"^[A-Za-z0-9_\-]+$")
# Used only when mlx_lm's own table cannot be read (see _model_remapping).
_FALLBACK_REMAPPING = {"mistral": "llama", "llava": "mistral3", "phi-msft": "phixtral", "falcon_mamba": "mamba"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")


@dataclass(frozen=True)
class ModelDefaults:
    """What `/api/create` stores with a name and requests get unless they say otherwise.

    `parameters` holds Ollama option names (num_ctx, temperature, stop as a
    list, ...) already validated by the API; `messages` is a conversation
    prefix put before every chat; `template` a Jinja chat template replacing
    the tokenizer's.
    """

    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: tuple[dict[str, Any], ...] = ()
    license: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("system", "template", "license"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        if self.messages:
            out["messages"] = [dict(m) for m in self.messages]
        return out

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> ModelDefaults:
        def text(key: str) -> str | None:
            value = rec.get(key)
            return value if isinstance(value, str) else None

        params = rec.get("parameters")
        messages = rec.get("messages")
        return cls(
            system=text("system"), template=text("template"), license=text("license"),
            parameters=dict(params) if isinstance(params, dict) else {},
            messages=tuple(m for m in messages if isinstance(m, dict)) if isinstance(messages, list) else (),
        )

    def over(self, base: ModelDefaults) -> ModelDefaults:
        """These defaults laid over `base` (what a model created FROM another inherits)."""
        return ModelDefaults(
            system=self.system if self.system is not None else base.system,
            template=self.template if self.template is not None else base.template,
            parameters={**base.parameters, **self.parameters},
            messages=self.messages or base.messages,
            license=self.license if self.license is not None else base.license,
        )


@dataclass(frozen=True)
class ModelRef:
    name: str  # display name: the repo id as found ("corral-test/tiny") or the registered name ("m:v2")
    path: Path  # directory holding config.json (an HF snapshot dir or a registered dir)
    source: Literal["hf", "local"]
    digest: str  # HF snapshot commit hash, or the registration's digest (kept by `cp`)
    modified_at: float  # unix time
    size: int  # bytes on disk of the model's files
    # what `/api/create` stored with the name; never part of equality or hashing
    defaults: ModelDefaults = field(default_factory=ModelDefaults, compare=False)
    parent: str = field(default="", compare=False)  # the model it was created or copied from


def default_hf_cache() -> Path:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


# --- which model types mlx_lm can load, decided without importing it ---------


@lru_cache(maxsize=1)
def _mlx_lm_dir() -> Path | None:
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# lru_cache does not stop concurrent first calls, and CPython 3.11's ast.parse
# is not safe in several threads at once (SystemError seen under 8 racing requests).
_AST_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _model_remapping() -> dict[str, str]:
    """mlx_lm.utils.MODEL_REMAPPING, read from the source with ast (never executed)."""
    pkg = _mlx_lm_dir()
    try:
        with _AST_LOCK:
            tree = ast.parse((pkg / "utils.py").read_text()) if pkg else None
    except (OSError, SyntaxError):
        tree = None
    for node in tree.body if tree else []:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MODEL_REMAPPING" for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                break
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return dict(_FALLBACK_REMAPPING)


def supported_model_type(model_type: str) -> bool:
    """True when mlx_lm has an architecture module for this config model_type."""
    if not _MODEL_TYPE.match(model_type):
        return False
    if model_type in ENCODER_MODEL_TYPES:  # embedding encoders: the runner's own code loads them
        return True
    pkg = _mlx_lm_dir()
    if pkg is None:  # mlx_lm not installed here: the runner will be the judge
        return True
    arch = _model_remapping().get(model_type, model_type)
    return _MODEL_TYPE.match(arch) is not None and (pkg / "models" / f"{arch}.py").is_file()


def check_loadable(model_dir: Path, *, need_tokenizer: bool = False) -> str | None:
    """Why `model_dir` is not an MLX language model, or None when it is (cheap: no headers)."""
    if not (model_dir / "config.json").is_file():
        return f"{model_dir}: no config.json"
    try:
        model_type = read_config(model_dir)["model_type"]
    except ManifestError as e:
        return str(e)
    if not supported_model_type(model_type):
        return f"{model_dir}: model_type {model_type!r} is not supported by mlx_lm"
    if not weight_files(model_dir):
        return f"{model_dir}: no model*.safetensors weights (GGUF and .bin checkpoints cannot be loaded by MLX)"
    if need_tokenizer and not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        return f"{model_dir}: no tokenizer (tokenizer.json or tokenizer.model)"
    return None


def _files(model_dir: Path) -> list[os.stat_result]:
    out = []
    for p in model_dir.iterdir():
        try:
            st = p.stat()  # follows the hub's symlinks into blobs/
        except OSError:
            continue
        if not p.is_dir():
            out.append(st)
    return out


def _stats(model_dir: Path) -> tuple[int, float]:
    """(bytes on disk, newest mtime) of a model directory's files."""
    sts = _files(model_dir)
    return sum(s.st_size for s in sts), max((s.st_mtime for s in sts), default=0.0)


def _repo_id(dirname: str) -> str:
    """models--org--name -> org/name (as huggingface_hub names its cache dirs)."""
    org, _, repo = dirname[len("models--") :].partition("--")
    return f"{org}/{repo}" if repo else org


# --- the store ---------------------------------------------------------------


@dataclass(frozen=True)
class _HubEntry:
    repo_id: str
    root: Path  # models--org--name
    snapshot: Path
    commit: str


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ModelStore:
    def __init__(self, home: Path, hf_cache: Path | None = None) -> None:
        self.home = Path(home).expanduser()
        self.hf_cache = Path(hf_cache).expanduser() if hf_cache is not None else default_hf_cache()
        self.registry_path = self.home / REGISTRY_FILE
        self._lock = threading.RLock()
        # path -> (file identity, manifest); see manifest()
        self._manifests: dict[Path, tuple[tuple[Any, ...], Manifest]] = {}
        self._resolved: dict[str, tuple[tuple[Any, ...], ModelRef]] = {}
        # name key / model path -> when its answer was last checked against the disk; see recent()
        self._checked: dict[str | Path, float] = {}
        # Ollama library names -> Hub repo ids (read once; config.toml's [library] over the shipped table)
        self.library = load_library(self.home)

    # -- listing ------------------------------------------------------------

    def list(self) -> list[ModelRef]:
        """Every model present locally (HF cache + registry), sorted by name."""
        refs: dict[str, ModelRef] = {}
        for entry in self._hub_entries():
            refs[entry.repo_id.lower()] = self._hub_ref(entry)
        for key, rec in self._registry().items():  # registered names shadow hub names
            ref = self._local_ref(rec)
            if ref is not None:
                refs[key] = ref
        return sorted(refs.values(), key=lambda r: r.name.lower())

    def resolve(self, name: str) -> ModelRef:
        """The model for a requested name; InvalidModelName (400) or ModelNotFound (404).

        Registered names first, then Hub repos (only as `repo` / `repo:latest`),
        then Ollama library names whose mapped repo is in the cache.

        Every request resolves its model, and a full resolve lists the hub
        cache and reads the registry and the model's files; so an answer is
        kept until a stat of the files it came from says anything changed.
        """
        key = normalize_name(name)
        hit = self._resolved.get(key)
        if hit is not None and hit[0] == self._resolve_stamp(hit[1]):
            self._checked[key] = time.monotonic()
            return hit[1]
        ref = self._resolve(name, key)
        self._resolved[key] = (self._resolve_stamp(ref), ref)
        self._checked[key] = time.monotonic()
        return ref

    def resolve_recent(self, name: str) -> ModelRef | None:
        """resolve()'s answer when it was checked against the disk within RECENT_S, else None.

        For the event loop: every request resolves its model, and a hop to a
        worker thread for resolve()'s handful of stats costs more than the stats
        (on a busy server it was a tenth of the CPU per request). Changes made
        through this store (create, copy, delete) are seen at once; changes made
        behind its back are seen within RECENT_S.
        """
        try:
            key = normalize_name(name)
        except CorralError:
            return None
        hit = self._resolved.get(key)
        return hit[1] if hit is not None and self._fresh(key) else None

    def manifest_recent(self, ref: ModelRef) -> Manifest | None:
        """manifest()'s answer when it was checked within RECENT_S, else None (see resolve_recent)."""
        cached = self._manifests.get(ref.path)
        return cached[1] if cached is not None and self._fresh(ref.path) else None

    def _fresh(self, key: str | Path) -> bool:
        checked = self._checked.get(key)
        return checked is not None and time.monotonic() - checked < RECENT_S

    def _resolve_stamp(self, ref: ModelRef) -> tuple[Any, ...]:
        """What a resolved name depends on: the registry, the cache's list of repos,
        the model's directory and config, and the repo's refs/main."""
        paths = (self.registry_path, self.hf_cache, ref.path, ref.path / "config.json",
                 ref.path.parent.parent / "refs" / "main")
        return tuple(_stat_key(p) for p in paths)

    def _resolve(self, name: str, key: str) -> ModelRef:
        rec = self._registry().get(key)
        if rec is not None:
            ref = self._local_ref(rec)
            if ref is None:
                raise ModelNotFound(name, f"model '{name}' is registered but {rec['path']} is no longer a loadable model")
            return ref
        entry = self._hub_entry(key)
        if entry is None:
            repo = self.library_repo(name)
            entry = self._hub_entry(repo.lower()) if repo is not None else None
        if entry is None:
            raise ModelNotFound(name)
        return self._hub_ref(entry)

    def library_repo(self, name: str) -> str | None:
        """The Hub repo an Ollama library name stands for (None: not a library name)."""
        key = normalize_name(name)
        if not looks_like_library_name(key):
            return None
        return self.library.get(key)

    def manifest(self, ref: ModelRef) -> Manifest:
        """Cached by file identity (path, size, mtime) so listing a large cache stays fast."""
        identity = self._identity(ref.path)
        cached = self._manifests.get(ref.path)
        self._checked[ref.path] = time.monotonic()
        if cached is not None and cached[0] == identity:
            return cached[1]
        manifest = read_manifest(ref.path)
        self._manifests[ref.path] = (identity, manifest)
        return manifest

    @staticmethod
    def _identity(model_dir: Path) -> tuple[Any, ...]:
        paths = [model_dir / "config.json", *weight_files(model_dir)]
        out = []
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p.name, st.st_size, st.st_mtime_ns))
        return tuple(out)

    # -- changes ------------------------------------------------------------

    def register(self, name: str, path: Path, defaults: ModelDefaults | None = None) -> ModelRef:
        """`corral create NAME --from DIR`: checks the directory is a loadable model."""
        normalize_name(name)
        model_dir = Path(path).expanduser()
        if not model_dir.is_absolute():
            model_dir = Path.cwd() / model_dir
        model_dir = model_dir.resolve()
        if not model_dir.is_dir():
            raise BadRequest(f"{path}: not a directory")
        why = check_loadable(model_dir, need_tokenizer=True)
        if why is not None:
            raise BadRequest(why)
        try:
            read_manifest(model_dir)  # every safetensors header must be sound
        except ManifestError as e:
            raise BadRequest(str(e)) from e
        defaults = defaults or ModelDefaults()
        return self._record(name, model_dir, _digest(str(model_dir), defaults), defaults, str(model_dir))

    def create(self, name: str, source: str, defaults: ModelDefaults) -> ModelRef:
        """`/api/create` FROM an existing model: its files, its defaults with `defaults` laid over.

        The digest changes with the defaults, as Ollama's does with a new config layer.
        """
        normalize_name(name)
        ref = self.resolve(source)
        merged = defaults.over(ref.defaults)
        digest = ref.digest if merged == ref.defaults else _digest(ref.digest, merged)
        return self._record(name, ref.path, digest, merged, tagged_name(ref.name))

    def copy(self, src: str, dst: str) -> ModelRef:
        """`corral cp` / POST /api/copy: dst becomes another name for src, digest and defaults kept.

        Like `ollama cp`, an existing dst is overwritten.
        """
        normalize_name(dst)  # a bad dst is a 400 even when src is missing
        ref = self.resolve(src)
        return self._record(dst, ref.path, ref.digest, ref.defaults, ref.parent or tagged_name(ref.name))

    def _record(self, name: str, path: Path, digest: str, defaults: ModelDefaults, parent: str) -> ModelRef:
        key = normalize_name(name)
        rec = {"name": display_name(name), "path": str(path), "digest": digest, "parent": parent,
               "created_at": time.time(), **defaults.to_json()}
        with self._lock:
            reg = self._registry()
            reg[key] = rec
            self._write_registry(reg)
        ref = self._local_ref(rec)
        if ref is None:
            raise BadRequest(f"{path}: not a loadable model")
        return ref

    def delete(self, name: str) -> None:
        """Registered names are unregistered; HF cache entries are removed from the cache."""
        key = normalize_name(name)
        self._checked.clear()
        with self._lock:
            reg = self._registry()
            if key in reg:
                path = str(reg.pop(key).get("path", ""))
                self._write_registry(reg)
                if path and all(str(r.get("path", "")) != path for r in reg.values()):
                    self._drop_prompt_caches(Path(path))
                return
        entry = self._hub_entry(key)
        if entry is None:
            raise ModelNotFound(name)
        # entry.root was found by listing hf_cache, so it is a direct child of it.
        if entry.root.parent.resolve() != self.hf_cache.resolve():
            raise BadRequest(f"refusing to delete {entry.root}: outside the hub cache")
        shutil.rmtree(entry.root)
        self._manifests.pop(entry.snapshot, None)
        self._resolved.clear()
        self._drop_prompt_caches(entry.snapshot)

    def _drop_prompt_caches(self, model_dir: Path) -> None:
        """A deleted model's disk-tier prompt caches go with it (CORRAL_HOME/kv/<model key>)."""
        shutil.rmtree(self.home / "kv" / kv_dir_name(str(model_dir)), ignore_errors=True)

    # -- the hub cache --------------------------------------------------------

    def _hub_entries(self) -> builtins.list[_HubEntry]:
        try:
            dirs = sorted(self.hf_cache.iterdir())
        except OSError:
            return []
        out = []
        for d in dirs:
            entry = self._hub_entry_at(d)
            if entry is not None:
                out.append(entry)
        return out

    def _hub_entry(self, key: str) -> _HubEntry | None:
        try:
            dirs = sorted(self.hf_cache.iterdir())
        except OSError:
            return None
        # Match on the directory name first so only the one candidate is read.
        for d in dirs:
            if d.name.startswith("models--") and _repo_id(d.name).lower() == key:
                entry = self._hub_entry_at(d)
                if entry is not None:
                    return entry
        return None

    def _hub_entry_at(self, root: Path) -> _HubEntry | None:
        """The MLX model a models--org--name dir holds, or None (datasets, spaces, GGUF, ...)."""
        if not root.name.startswith("models--") or not root.is_dir():
            return None
        repo_id = _repo_id(root.name)
        snapshot = self._snapshot(root)
        if snapshot is None or check_loadable(snapshot) is not None:
            return None
        return _HubEntry(repo_id, root, snapshot, snapshot.name)

    @staticmethod
    def _snapshot(root: Path) -> Path | None:
        """refs/main's snapshot, else the newest one."""
        snaps = root / "snapshots"
        try:
            commit = (root / "refs" / "main").read_text().strip()
        except OSError:
            commit = ""
        if commit and _SEGMENT.match(commit) and (snaps / commit).is_dir():
            return snaps / commit
        try:
            candidates = [p for p in snaps.iterdir() if p.is_dir()]
        except OSError:
            return None
        return max(candidates, key=lambda p: p.stat().st_mtime, default=None)

    def _hub_ref(self, entry: _HubEntry) -> ModelRef:
        size, mtime = _stats(entry.snapshot)
        return ModelRef(entry.repo_id, entry.snapshot, "hf", entry.commit, mtime, size)

    # -- the registry -----------------------------------------------------------

    def _registry(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.registry_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # A server-side fault (500), and never silently treated as empty:
            # the next write would then drop every registration.
            raise CorralError(f"model registry {self.registry_path} is unreadable: {e}") from e
        models = data.get("models", {}) if isinstance(data, dict) else {}
        return {
            k: v
            for k, v in models.items()
            if isinstance(v, dict) and isinstance(v.get("path"), str) and isinstance(v.get("name"), str)
        }

    def _write_registry(self, reg: dict[str, dict[str, Any]]) -> None:
        self._checked.clear()  # names may now resolve elsewhere: check the disk again
        # Write-then-rename so a crash never leaves a half-written registry.
        self.home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=".models.", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "models": reg}, f, indent=2, sort_keys=True)
            os.replace(tmp, self.registry_path)
            self._resolved.clear()
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def _local_ref(rec: dict[str, Any]) -> ModelRef | None:
        path = Path(rec["path"])
        if not (path / "config.json").is_file():
            return None
        size, mtime = _stats(path)
        digest = rec.get("digest")
        if not isinstance(digest, str) or not digest:  # registered before digests were stored
            digest = hashlib.sha256(str(path).encode()).hexdigest()
        parent = rec.get("parent")
        return ModelRef(rec["name"], path, "local", digest, mtime, size,
                        ModelDefaults.from_json(rec), parent if isinstance(parent, str) else "")


def _digest(base: str, defaults: ModelDefaults) -> str:
    """A stable digest of a model's files (by `base`: a path or a digest) and its stored defaults."""
    stored = defaults.to_json()
    if not stored:  # what registrations without defaults always had
        return hashlib.sha256(base.encode()).hexdigest()
    text = json.dumps([base, stored], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()

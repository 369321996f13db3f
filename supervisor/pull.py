"""Pulling MLX models from the Hugging Face Hub into the Hugging Face cache.

A pull has two phases:

1. `plan_pull` (before any response is sent, so failures get a real HTTP
   status): read the repo's file list, refuse repos that are not MLX language
   models (GGUF-only, PyTorch .bin-only, no config.json), then fetch only
   config.json and refuse unsupported `model_type`s. No weights are fetched
   until the repo has passed these checks; a refused repo leaves nothing in
   the cache that was not there before.
2. `run_pull`: download each selected file with huggingface_hub (in a worker
   thread) while polling the partial file in the cache's blobs dir for
   progress, verify every file against the digest the Hub listed, check the
   directory reads as a model, and yield Ollama's progress statuses.

Files land in the same cache other MLX tools use (HF_HUB_CACHE / HF_HOME).
huggingface_hub resumes a download whose connection breaks with an HTTP Range
request from the bytes it already holds; tests/test_pull.py proves it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.supervisor.errors import CorralError, PullFailed
from corral.supervisor.library import looks_like_library_name, not_on_hub_message
from corral.supervisor.names import DEFAULT_TAG, normalize_name, split_name
from corral.supervisor.store import default_hf_cache, supported_model_type

if TYPE_CHECKING:
    from corral.supervisor.api.context import AppContext

log = logging.getLogger("corral")

# Files an MLX language model needs; everything else in a repo (other weight
# formats, images, training code) is never downloaded.
MLX_FILE_PATTERNS = (
    "*.safetensors", "*.json", "*.jinja", "*.txt", "*.tiktoken", "tokenizer.model",
    "LICENSE*", "README.md",
)
ST_MODULE_SETTINGS = re.compile(r"^\d+_[A-Za-z]+/[^/]+\.json$")
"""A sentence-transformers module's settings in its folder (1_Pooling/config.json): embedding
models say how they pool there."""
POLL_SECONDS = 0.2



class RepoNotFound(PullFailed):
    """The repo (or revision) does not exist on the Hub, or is private/gated without a token."""

    def __init__(self, repo: str) -> None:
        super().__init__(f"pull model manifest: file does not exist: '{repo}' was not found on "
                         f"the Hugging Face Hub", status=404)


@dataclass(frozen=True)
class RepoFile:
    name: str
    size: int
    digest: str  # "sha256:<hex>" for LFS files, "sha1:<git blob id>" for small ones; "" unknown


@dataclass
class PullPlan:
    repo: str
    revision: str  # commit the Hub reported
    files: list[RepoFile]
    cache_dir: Path
    endpoint: str | None
    repo_was_cached: bool  # the repo's cache folder existed before this pull
    snapshot: Path | None = None
    done: set[str] = field(default_factory=set)

    @property
    def repo_dir(self) -> Path:
        return self.cache_dir / ("models--" + self.repo.replace("/", "--"))

    @property
    def lock_dir(self) -> Path:
        return self.cache_dir / ".locks" / ("models--" + self.repo.replace("/", "--"))


# ---- names, settings, cache location ---------------------------------------


def repo_id_for(name: object, library: Mapping[str, str] | None = None) -> str:
    """The Hub repo id for a requested model name (validated; case kept).

    A bare Ollama library name (`qwen3:0.6b`) goes through `library` (the
    store's table); one not in it is a 404 saying corral pulls from the Hub.
    A repo id takes no tag but ':latest'.
    """
    base, tag = split_name(name)  # InvalidModelName (400) for hostile or malformed names
    if looks_like_library_name(base):
        key = normalize_name(name)
        repo = (library or {}).get(key)
        if repo is None:
            raise PullFailed(not_on_hub_message(str(name)), status=404)
        return repo
    if tag.lower() != DEFAULT_TAG:
        raise PullFailed(f"invalid model name '{name}': a Hugging Face repo id has no tag but "
                         f"':latest' (give other tags with `corral cp REPO NAME:TAG`)", status=400)
    if base.count("/") > 1:
        raise PullFailed(f"invalid model name '{name}': expected a Hub repo id like "
                         f"'mlx-community/Qwen3-0.6B-4bit'", status=400)
    return base


def pull_allowed(patterns: str | None, repo: str) -> bool:
    """CORRAL_ALLOW_PULL: None/"" = never, "*" = always, else comma-separated fnmatch patterns."""
    if not patterns or not patterns.strip():
        return False
    wanted = repo.lower()
    for pattern in patterns.split(","):
        pattern = pattern.strip().lower()
        if pattern and fnmatch.fnmatchcase(wanted, pattern):
            return True
    return False


def hub_cache_dir(ctx: AppContext | None = None) -> Path:
    """The store's Hugging Face cache dir, else HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub."""
    if ctx is not None:
        for attr in ("hf_cache", "hub_cache", "cache_dir"):
            value = getattr(ctx.store, attr, None)
            if isinstance(value, (str, Path)):
                return Path(value)
    return default_hf_cache()


# ---- phase 1: plan ----------------------------------------------------------


def _hf_endpoint(endpoint: str | None) -> str | None:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _list_repo(repo: str, endpoint: str | None) -> tuple[str, list[RepoFile]]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi(endpoint=endpoint).model_info(repo, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
        raise RepoNotFound(repo) from None
    except HFValidationError as e:  # a malformed repo id is the client's error, not the Hub's
        raise PullFailed(f"invalid model name '{repo}': {e}", status=400) from None
    except OfflineModeIsEnabled:
        raise PullFailed("cannot pull: HF_HUB_OFFLINE is set on the server", status=503) from None
    except HfHubHTTPError as e:
        raise PullFailed(f"pull model manifest: the Hugging Face Hub answered: {e}") from None
    except OSError as e:  # connection refused, DNS, TLS
        raise PullFailed(f"pull model manifest: cannot reach the Hugging Face Hub: {e}") from None
    except Exception as e:  # httpx transport errors are not OSErrors
        raise PullFailed(f"pull model manifest: cannot reach the Hugging Face Hub: "
                         f"{type(e).__name__}: {e}") from None
    files = []
    for s in info.siblings or []:
        if s.lfs is not None:
            files.append(RepoFile(s.rfilename, int(s.lfs.size), f"sha256:{s.lfs.sha256}"))
        else:
            files.append(RepoFile(s.rfilename, int(s.size or 0),
                                  f"sha1:{s.blob_id}" if s.blob_id else ""))
    return str(info.sha or "main"), files


def select_files(repo: str, files: list[RepoFile]) -> list[RepoFile]:
    """The files an MLX model needs, or PullFailed(400) saying why the repo is not one."""
    top = [f for f in files if "/" not in f.name]
    names = {f.name for f in top}
    all_names = [f.name for f in files]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    if not has_safetensors:
        if any(n.lower().endswith(".gguf") for n in all_names):
            why = "it holds GGUF files only (for llama.cpp/ollama)"
        elif any(n.endswith((".bin", ".pt", ".pth")) for n in all_names):
            why = "it holds PyTorch .bin/.pt weights only, no safetensors"
        else:
            why = "it has no .safetensors weights"
        raise PullFailed(f"'{repo}' is not an MLX model: {why}; look for an MLX conversion "
                         f"(for example under mlx-community/)", status=400)
    if "config.json" not in names:
        raise PullFailed(f"'{repo}' is not an MLX language model: it has no config.json", status=400)
    wanted = [f for f in top if any(fnmatch.fnmatch(f.name, p) for p in MLX_FILE_PATTERNS)]
    wanted += [f for f in files if ST_MODULE_SETTINGS.match(f.name)]
    return sorted(wanted, key=lambda f: (f.name.endswith(".safetensors"), f.name))


def check_config(repo: str, config_path: Path) -> None:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise PullFailed(f"'{repo}' has an unreadable config.json: {e}", status=400) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise PullFailed(f"'{repo}' is not an MLX language model: config.json has no model_type",
                         status=400)
    model_type = config["model_type"]
    # mlx_lm's own list, read without importing it (skipped where mlx_lm is absent).
    if not supported_model_type(model_type):
        raise PullFailed(f"'{repo}' is not a supported MLX language model: model_type "
                         f"'{model_type}' is not one mlx-lm can load", status=400)


def remove_partial(plan: PullPlan) -> None:
    """Undo a failed pull: drop the repo's cache entry when this pull created it."""
    if plan.repo_was_cached:
        # Keep other revisions; drop only temporary files this pull may have left.
        for tmp in (plan.repo_dir / "blobs").glob("*.incomplete"):
            tmp.unlink(missing_ok=True)
        return
    shutil.rmtree(plan.repo_dir, ignore_errors=True)
    shutil.rmtree(plan.lock_dir, ignore_errors=True)


def _download(plan: PullPlan, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    # The default branch (not the commit) so refs/main is written, as other MLX tools expect.
    path = hf_hub_download(plan.repo, filename, cache_dir=str(plan.cache_dir),
                           endpoint=plan.endpoint)
    return Path(path)


def plan_pull(name: object, cache_dir: Path, endpoint: str | None = None) -> PullPlan:
    """Check the repo before downloading weights (blocking: run it in a thread)."""
    repo = repo_id_for(name)
    endpoint = _hf_endpoint(endpoint)
    revision, files = _list_repo(repo, endpoint)
    wanted = select_files(repo, files)
    plan = PullPlan(repo, revision, wanted, cache_dir, endpoint,
                    repo_was_cached=(cache_dir / ("models--" + repo.replace("/", "--"))).exists())
    try:
        config = _download(plan, "config.json")
        check_config(repo, config)
    except CorralError:
        remove_partial(plan)
        raise
    except Exception as e:
        remove_partial(plan)
        raise PullFailed(f"pulling config.json of '{repo}' failed: {e}") from None
    plan.snapshot = config.parent
    plan.done.add("config.json")
    return plan


# ---- phase 2: download with progress ----------------------------------------


def _partial_bytes(blobs: Path) -> int:
    total = 0
    for tmp in blobs.glob("*.incomplete"):
        try:
            total += tmp.stat().st_size
        except OSError:
            pass  # renamed into place between glob and stat
    return total


def verify_file(path: Path, expected: RepoFile) -> None:
    """The downloaded bytes match the digest the Hub listed (LFS sha256 or git blob sha1)."""
    if not expected.digest:
        return
    kind, _, want = expected.digest.partition(":")
    if kind == "sha256":
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        raise PullFailed(f"digest mismatch for {expected.name}: expected {expected.digest}, "
                         f"got {kind}:{h.hexdigest()}")


def _progress(f: RepoFile, completed: int) -> dict[str, Any]:
    return {"status": f"pulling {f.name}", "digest": f.digest, "total": f.size,
            "completed": min(completed, f.size)}


async def _download_with_progress(plan: PullPlan, f: RepoFile) -> AsyncIterator[dict[str, Any]]:
    blobs = plan.repo_dir / "blobs"
    result: dict[str, Any] = {}
    finished = threading.Event()

    def work() -> None:
        try:
            result["path"] = _download(plan, f.name)
        except BaseException as e:  # handed to the event loop below
            result["error"] = e
        finally:
            finished.set()

    # A daemon thread, not the default executor: a client that goes away does
    # not stop the download, and the server must not wait on it at exit.
    threading.Thread(target=work, name=f"pull {f.name}", daemon=True).start()
    yield _progress(f, 0)
    last = 0
    while not finished.is_set():
        await asyncio.sleep(POLL_SECONDS)
        now = _partial_bytes(blobs)
        if now > last:
            last = now
            yield _progress(f, now)
    error = result.get("error")
    if isinstance(error, CorralError):
        raise error
    if error is not None:
        raise PullFailed(f"downloading {f.name} of '{plan.repo}' failed: {error}")
    yield _progress(f, f.size)


def _check_model_dir(plan: PullPlan) -> None:
    from corral.supervisor.manifest import ManifestError, read_manifest

    assert plan.snapshot is not None
    try:
        read_manifest(plan.snapshot)
    except ManifestError as e:
        raise PullFailed(f"'{plan.repo}' is not a usable MLX model: {e}", status=400) from None


def _verify_all(plan: PullPlan) -> None:
    assert plan.snapshot is not None
    for f in plan.files:
        verify_file(plan.snapshot / f.name, f)


async def run_pull(plan: PullPlan) -> AsyncIterator[dict[str, Any]]:
    """Ollama's progress statuses for an already-planned pull; raises CorralError on failure.

    On failure the repo's cache entry is removed when this pull created it.
    """
    try:
        yield {"status": "pulling manifest"}
        for f in plan.files:
            if f.name in plan.done:
                yield _progress(f, f.size)
                continue
            async for event in _download_with_progress(plan, f):
                yield event
            plan.done.add(f.name)
        yield {"status": "verifying sha256 digest"}
        await asyncio.to_thread(_verify_all, plan)
        yield {"status": "writing manifest"}
        await asyncio.to_thread(_check_model_dir, plan)
        yield {"status": "success"}
    except BaseException:
        await asyncio.to_thread(remove_partial, plan)
        raise


# ---- entry points used by the API -------------------------------------------

_locks: dict[str, asyncio.Lock] = {}


def repo_lock(repo: str) -> asyncio.Lock:
    """One pull per repo at a time; a second request for it waits, then finds the files cached."""
    return _locks.setdefault(repo.lower(), asyncio.Lock())


# Pulls run as tasks of their own: a client that disconnects (or a request that
# is cancelled) stops watching, not the pull, so the cache never holds half a
# model because somebody closed a terminal.
_running: set[asyncio.Task[None]] = set()


async def start_pull(cache_dir: Path, name: object,
                     library: Mapping[str, str] | None = None) -> AsyncGenerator[dict[str, Any], None]:
    """Check the repo (raising CorralError before anything streams), then pull it in the background.

    Returns the progress statuses as they happen; an in-pull failure is raised
    from the iterator.
    """
    repo = repo_id_for(name, library)
    lock = repo_lock(repo)
    await lock.acquire()
    try:
        plan = await asyncio.to_thread(plan_pull, repo, cache_dir)
    except BaseException:
        lock.release()
        raise
    queue: asyncio.Queue[dict[str, Any] | Exception | None] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for event in run_pull(plan):
                queue.put_nowait(event)
        except Exception as e:
            queue.put_nowait(e)
        finally:
            lock.release()
            queue.put_nowait(None)

    task = asyncio.create_task(produce(), name=f"pull {repo}")
    _running.add(task)
    task.add_done_callback(_running.discard)
    return _drain(queue)


async def _drain(
    queue: asyncio.Queue[dict[str, Any] | Exception | None],
) -> AsyncGenerator[dict[str, Any], None]:
    while (item := await queue.get()) is not None:
        if isinstance(item, Exception):
            if isinstance(item, CorralError):
                raise item
            raise PullFailed(f"pull failed: {type(item).__name__}: {item}")
        yield item


async def pull_model(ctx: AppContext, name: object) -> list[dict[str, Any]]:
    """Pull to completion (no streaming); the statuses seen, the last one "success"."""
    return [event async for event in await start_pull(hub_cache_dir(ctx), name, library_of(ctx))]


def library_of(ctx: AppContext) -> Mapping[str, str] | None:
    """The store's Ollama library table (None for stores without one)."""
    return getattr(ctx.store, "library", None)


async def pull_if_allowed(ctx: AppContext, name: str) -> bool:
    """For a request naming a model that is not local: pull it when CORRAL_ALLOW_PULL permits.

    False when pulls of it are not allowed or the Hub has no such repo (the
    caller then answers its own 404); other failures (not an MLX model, a
    broken download) raise PullFailed so the client learns why.
    """
    try:
        repo = repo_id_for(name, library_of(ctx))
    except CorralError:
        return False
    if not pull_allowed(getattr(ctx.settings, "allow_pull", None), repo):
        return False
    log.info("pulling %s on request (CORRAL_ALLOW_PULL)", repo)
    try:
        await pull_model(ctx, repo)
    except RepoNotFound:
        return False
    return True

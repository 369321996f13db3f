"""Pulling from the Hub: the real huggingface_hub client against our loopback fake hub.

In-process tests drive supervisor.pull directly (resumption, refusals, patterns);
end-to-end tests go through a real `corral serve` with HF_ENDPOINT pointed at
the fake hub: /api/pull's progress stream, then the model is listed and answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from corral.supervisor import pull as pulling
from corral.supervisor.errors import CorralError, InvalidModelName, PullFailed

from tests.support.fake_hub import FakeHub
from tests.support.live_server import ServerProcess
from tests.support.models import make_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hosted_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("hosted") / "tiny")


@pytest.fixture(scope="module")
def hub(hosted_model: Path) -> Iterator[FakeHub]:
    config = json.loads((hosted_model / "config.json").read_text())
    weights = (hosted_model / "model.safetensors").read_bytes()
    with FakeHub() as h:
        for repo in ("org/tiny", "org/resume", "org/auto-tiny", "org/cli-tiny"):
            h.add_dir(repo, hosted_model)
        h.add_repo("org/gguf-only", {"model-q4_k_m.gguf": b"GGUF" + bytes(256), "README.md": b"# gguf"})
        h.add_repo("org/bin-only", {"config.json": json.dumps(config).encode(),
                                    "pytorch_model.bin": bytes(512), "README.md": b"# bin"})
        h.add_repo("org/no-config", {"model.safetensors": weights, "tokenizer.json": b"{}"})
        h.add_repo("org/alien-type", {"config.json": json.dumps({**config, "model_type": "no_such_arch"}).encode(),
                                      "model.safetensors": weights})
        yield h


def _events(repo: str, cache: Path, hub: FakeHub) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        plan = await asyncio.to_thread(pulling.plan_pull, repo, cache, hub.url)
        return [e async for e in pulling.run_pull(plan)]

    return asyncio.run(go())


def _repo_traces(cache: Path, repo: str) -> list[Path]:
    folder = "models--" + repo.replace("/", "--")
    return [p for p in (cache / folder, cache / ".locks" / folder) if p.exists()]


# ---- in-process -------------------------------------------------------------


def test_progress_reaches_total_and_files_match(hub: FakeHub, hosted_model: Path, tmp_path: Path) -> None:
    events = _events("org/tiny", tmp_path / "hub", hub)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    last: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["status"].startswith("pulling ") and "total" in e:
            assert 0 <= e["completed"] <= e["total"]
            last[e["status"]] = e
    assert {"pulling model.safetensors", "pulling config.json", "pulling tokenizer.json"} <= set(last)
    for e in last.values():
        assert e["completed"] == e["total"] > 0
    weights = last["pulling model.safetensors"]
    assert weights["digest"] == "sha256:" + hashlib.sha256(
        (hosted_model / "model.safetensors").read_bytes()).hexdigest()
    snapshot = next((tmp_path / "hub" / "models--org--tiny" / "snapshots").iterdir())
    for f in hosted_model.iterdir():
        assert (snapshot / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").read_text() == snapshot.name


def test_cut_download_resumes_with_range(hub: FakeHub, hosted_model: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Small read chunks so the client has written part of the file when the link drops
    # (with the default 10 MB chunks a tiny file is all-or-nothing).
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    size = (hosted_model / "model.safetensors").stat().st_size
    cut = size // 2
    hub.cut_next("model.safetensors", cut)
    events = _events("org/resume", tmp_path / "hub", hub)
    assert events[-1] == {"status": "success"}
    gets = [g for g in hub.gets("model.safetensors") if "/org/resume/" in g.path]
    assert len(gets) == 2, gets
    assert gets[0].range is None
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    offset = int(gets[1].range[len("bytes="):].split("-")[0])
    # It asked only for what it did not have: from the partial offset, not from 0.
    assert 0 < offset <= cut
    snapshot = next((tmp_path / "hub" / "models--org--resume" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").read_bytes() == (hosted_model / "model.safetensors").read_bytes()
    assert not list((tmp_path / "hub" / "models--org--resume" / "blobs").glob("*.incomplete"))


def test_pull_outlives_a_client_that_goes_away(hub: FakeHub, hosted_model: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    cache = tmp_path / "hub"
    hub.add_dir("org/abandoned", hosted_model)
    hub.slow_next("model.safetensors", 1.5)

    async def go() -> None:
        events = await pulling.start_pull(cache, "org/abandoned")
        first = await events.__anext__()
        assert first == {"status": "pulling manifest"}
        await events.aclose()  # the client is gone
        while pulling._running:
            await asyncio.gather(*pulling._running)

    asyncio.run(go())
    snapshot = next((cache / "models--org--abandoned" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").read_bytes() == (hosted_model / "model.safetensors").read_bytes()


@pytest.mark.parametrize("repo, status, words", [
    ("org/does-not-exist", 404, "file does not exist"),
    ("org/gguf-only", 400, "GGUF"),
    ("org/bin-only", 400, ".bin"),
    ("org/no-config", 400, "config.json"),
    ("org/alien-type", 400, "no_such_arch"),
])
def test_refusals_leave_nothing_behind(hub: FakeHub, tmp_path: Path, repo: str, status: int,
                                       words: str) -> None:
    cache = tmp_path / "hub"
    with pytest.raises(PullFailed) as info:
        _events(repo, cache, hub)
    assert info.value.status == status
    assert words in info.value.message
    assert _repo_traces(cache, repo) == []


def test_unsupported_model_type_never_fetches_weights(hub: FakeHub, tmp_path: Path) -> None:
    before = len(hub.requests)
    with pytest.raises(PullFailed):
        _events("org/alien-type", tmp_path / "hub", hub)
    fetched = [r.path for r in hub.requests[before:] if r.method == "GET"]
    assert any(p.endswith("/config.json") for p in fetched)
    assert not any(p.endswith(".safetensors") for p in fetched)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a\\b", "org/x\x00y", "", 7,
                                  "org/tiny:q4"])
def test_hostile_names_are_400(name: object) -> None:
    with pytest.raises(CorralError) as info:
        pulling.repo_id_for(name)
    assert info.value.status == 400
    assert isinstance(info.value, (InvalidModelName, PullFailed))


def test_latest_tag_is_stripped_and_case_kept() -> None:
    assert pulling.repo_id_for("mlx-community/Qwen3-0.6B-4bit:latest") == "mlx-community/Qwen3-0.6B-4bit"


@pytest.mark.parametrize("patterns, repo, allowed", [
    (None, "org/tiny", False),
    ("", "org/tiny", False),
    ("*", "anyone/anything", True),
    ("mlx-community/*", "mlx-community/Qwen3-0.6B-4bit", True),
    ("mlx-community/*", "evil/Qwen3", False),
    ("org/auto*, mlx-community/*", "org/auto-tiny", True),
    ("org/auto*, mlx-community/*", "org/tiny", False),
    ("MLX-Community/*", "mlx-community/x", True),
])
def test_allow_pull_patterns(patterns: str | None, repo: str, allowed: bool) -> None:
    assert pulling.pull_allowed(patterns, repo) is allowed


# ---- the API in process (real store, fake scheduler) ---------------------------


@pytest.fixture
async def app_client(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from corral.supervisor.app import create_app
    from corral.supervisor.config import Settings
    from corral.supervisor.store import ModelStore

    from tests.support.fake_scheduler import FakeScheduler, fake_context, text_script

    store = ModelStore(tmp_path / "home", tmp_path / "hub")
    sched = FakeScheduler(store, script=text_script("Hi", " there"))  # type: ignore[arg-type]
    ctx = fake_context(store, sched, Settings(home=tmp_path / "home", allow_pull="org/auto*",
                                                models_dirs=[tmp_path.parent]))  # type: ignore[arg-type]
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read by supervisor.pull at each pull
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as c:
        c.cache = tmp_path / "hub"  # type: ignore[attr-defined]
        yield c


async def test_app_pull_stream_then_listed(app_client: httpx.AsyncClient) -> None:
    r = await app_client.post("/api/pull", json={"model": "org/tiny:latest"})
    assert r.status_code == 200
    events = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert events[0] == {"status": "pulling manifest"} and events[-1] == {"status": "success"}
    tags = (await app_client.get("/api/tags")).json()["models"]
    assert [m["name"].split(":")[0] for m in tags] == ["org/tiny"]


async def test_app_pull_if_allowed(app_client: httpx.AsyncClient) -> None:
    body = {"prompt": "hi", "stream": False}
    denied = await app_client.post("/api/generate", json={"model": "org/tiny", **body})
    assert denied.status_code == 404
    assert not (app_client.cache / "models--org--tiny").exists()  # type: ignore[attr-defined]
    allowed = await app_client.post("/api/generate", json={"model": "org/auto-tiny", **body})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["response"] == "Hi there"
    assert (app_client.cache / "models--org--auto-tiny").is_dir()  # type: ignore[attr-defined]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "mine"}, 400, "from"),
    ({"model": "mine", "from": "relative/dir"}, 404, "absolute directory"),
    ({"model": "mine", "from": "/no/such/dir"}, 400, "no such directory"),
    ({"model": "../evil", "from": "/tmp"}, 400, ""),
    ({"from": "/tmp"}, 400, "model"),
])
async def test_app_create_errors(app_client: httpx.AsyncClient, body: dict[str, Any], status: int,
                                 words: str) -> None:
    r = await app_client.post("/api/create", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


async def test_app_create_checks_the_directory(app_client: httpx.AsyncClient, hosted_model: Path,
                                               tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    bad = await app_client.post("/api/create", json={"model": "mine", "from": str(tmp_path / "empty")})
    assert bad.status_code == 400 and "config.json" in bad.json()["error"]
    ok = await app_client.post("/api/create", json={"model": "mine", "from": str(hosted_model),
                                                     "stream": False})
    assert ok.status_code == 200 and ok.json()["status"] == "success"
    names = [m["name"] for m in (await app_client.get("/api/tags")).json()["models"]]
    assert "mine:latest" in names or "mine" in names


# ---- end to end through `corral serve` --------------------------------------


@pytest.fixture(scope="module")
def server(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("pullserver")
    cache = base / "hub"
    cache.mkdir()
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "CORRAL_ALLOW_PULL": "org/auto*",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    with ServerProcess(base / "home", cache, env=env) as s:
        s.cache = cache  # type: ignore[attr-defined]
        yield s


def _ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def test_api_pull_streams_then_model_is_listed_and_answers(server: ServerProcess) -> None:
    with server.client() as c:
        with c.stream("POST", "/api/pull", json={"model": "org/tiny"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            events = _ndjson(r)
        assert events[0] == {"status": "pulling manifest"}
        assert events[-1] == {"status": "success"}
        weights = [e for e in events if e["status"] == "pulling model.safetensors"]
        assert weights[-1]["completed"] == weights[-1]["total"] > 0
        names = [m["name"] for m in c.get("/api/tags").json()["models"]]
        assert any(n.split(":")[0] == "org/tiny" for n in names), names
        out = c.post("/api/generate", json={"model": "org/tiny", "prompt": "Hello", "stream": False,
                                            "options": {"num_predict": 4, "temperature": 0}})
        assert out.status_code == 200, out.text
        assert out.json()["done"] is True and out.json()["eval_count"] >= 1


def test_api_pull_no_stream_and_official_client(server: ServerProcess) -> None:
    with server.client() as c:
        r = c.post("/api/pull", json={"name": "org/tiny", "stream": False})
        assert r.status_code == 200 and r.json() == {"status": "success"}
    client = ollama.Client(host=server.url)
    statuses = [p.status for p in client.pull("org/cli-tiny", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"


@pytest.mark.parametrize("body, status, words", [
    ({"model": "org/does-not-exist"}, 404, "file does not exist"),
    ({"model": "org/gguf-only"}, 400, "GGUF"),
    ({"model": "org/gguf-only", "stream": False}, 400, "GGUF"),
    ({"model": "../../etc"}, 400, ""),
    ({"stream": True}, 400, "model"),
    ({"model": "org/tiny", "stream": "yes"}, 400, "stream"),
])
def test_api_pull_errors(server: ServerProcess, body: dict[str, Any], status: int, words: str) -> None:
    with server.client() as c:
        r = c.post("/api/pull", json=body)
        assert r.status_code == status, r.text
        assert words in r.json()["error"]
        assert c.get("/").status_code == 200  # still serving
    assert _repo_traces(server.cache, "org/gguf-only") == []  # type: ignore[attr-defined]


def test_allow_pull_pulls_on_request_only_when_allowed(server: ServerProcess) -> None:
    with server.client() as c:
        denied = c.post("/api/generate", json={"model": "org/resume", "prompt": "hi",
                                               "stream": False})
        assert denied.status_code == 404
        out = c.post("/api/generate", json={"model": "org/auto-tiny", "prompt": "Hello", "stream": False,
                                            "options": {"num_predict": 3, "temperature": 0}})
        assert out.status_code == 200, out.text
        assert out.json()["done"] is True
    assert (server.cache / "models--org--auto-tiny").is_dir()  # type: ignore[attr-defined]
    assert not (server.cache / "models--org--resume").exists()  # type: ignore[attr-defined]

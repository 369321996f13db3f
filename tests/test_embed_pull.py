"""Embed routes pull a missing model on demand, as generation does (CORRAL_ALLOW_PULL).

A real `corral serve` with HF_ENDPOINT pointed at the loopback fake hub, which
hosts tiny embedding models laid out as sentence-transformers ships them
(1_Pooling/config.json in its folder). The first /api/embed or /v1/embeddings
naming an allowed repo pulls it, with its pooling settings, then answers with
the vectors the in-process reference computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.embed_models import make_embed_model
from tests.support.embed_reference import Reference, cosine
from tests.support.fake_hub import FakeHub
from tests.support.live_server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # cls pooling: a pull that dropped 1_Pooling/config.json could not even load it
    return make_embed_model(tmp_path_factory.mktemp("hosted") / "nomic", "--family", "nomic",
                            "--pooling", "cls", "--seed", "4")


@pytest.fixture(scope="module")
def server(hosted: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    files = {str(p.relative_to(hosted)): p.read_bytes() for p in sorted(hosted.rglob("*")) if p.is_file()}
    base = tmp_path_factory.mktemp("embedpull")
    cache = base / "hub"
    cache.mkdir()
    with FakeHub() as hub:
        for repo in ("org/auto-embed", "org/auto-v1", "org/manual-embed"):
            hub.add_repo(repo, files)
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "CORRAL_ALLOW_PULL": "org/auto*",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        with ServerProcess(base / "home", cache, env=env) as s:
            s.cache = cache  # type: ignore[attr-defined]
            yield s


def test_api_embed_pulls_an_allowed_model_with_its_pooling_settings(server: ServerProcess, hosted: Path) -> None:
    r = httpx.post(server.url + "/api/embed", json={"model": "org/auto-embed", "input": ["pulled on demand"]},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert cosine(r.json()["embeddings"][0], Reference(hosted).embed("pulled on demand")) >= 0.9999
    snapshots = list((server.cache / "models--org--auto-embed" / "snapshots").iterdir())  # type: ignore[attr-defined]
    assert (snapshots[0] / "1_Pooling" / "config.json").is_file()


def test_openai_and_legacy_routes_pull_too_and_refusals_stay_404(server: ServerProcess, hosted: Path) -> None:
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "org/auto-v1", "input": "openai pull"},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert cosine(r.json()["data"][0]["embedding"], Reference(hosted).embed("openai pull")) >= 0.9999
    r = httpx.post(server.url + "/api/embeddings", json={"model": "org/manual-embed", "prompt": "x"}, timeout=60)
    assert r.status_code == 404
    assert not (server.cache / "models--org--manual-embed").exists()  # type: ignore[attr-defined]

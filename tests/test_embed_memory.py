"""Embedding runners and memory: the runner reports its kind, stays under its estimate,
and an embedding model and a chat model evict each other under a memory limit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from corral.runner.embed_spec import EMBED_BATCH_TOKENS
from corral.runner.protocol import Done, RunnerRequest
from corral.supervisor.config import Settings
from corral.supervisor.manifest import read_manifest
from corral.supervisor.memory import estimate_need
from corral.supervisor.scheduler import Scheduler
from corral.supervisor.store import ModelStore

from tests.conftest import TINY
from tests.support.embed_models import make_embed_model, make_hf_embed_model
from tests.support.models import make_hf_model
from tests.test_runner import RunnerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EMB = "corral-test/emb-mem"
CTX = 256


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_embed_model(tmp_path_factory.mktemp("m") / "bert", "--family", "bert", "--hidden", "128")


@pytest.fixture(scope="module")
def runner(bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    r = RunnerProcess(bert_dir, tmp_path_factory.mktemp("runner"), "--num-ctx", "512")
    r.start()
    yield r
    r.stop()


def test_runner_status_kind_and_completion_refused(runner: RunnerProcess) -> None:
    status = httpx.get(runner.url + "/status", timeout=10).json()
    assert status["kind"] == "embedding" and status["context_length"] == 512
    r = httpx.post(runner.url + "/completion", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 400 and "embedding model" in r.json()["error"]
    r = httpx.post(runner.url + "/embed", json={"input": ["a", [5, 6, 7]]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 2
    for bad in ({"input": "not a list"}, {"input": [[]]}, {"input": [[10**9]]}, {"input": ["a"], "truncate": 1}):
        assert httpx.post(runner.url + "/embed", json=bad, timeout=10).status_code == 400


def test_peak_memory_stays_under_the_estimate(runner: RunnerProcess, bert_dir: Path) -> None:
    # Full batches of full-length inputs, several requests at once: the most the runner holds.
    long = "the quick brown fox jumps over the lazy dog " * 200
    per_request = EMBED_BATCH_TOKENS // 512  # one full batch between two requests' inputs

    def post() -> int:
        return httpx.post(runner.url + "/embed", json={"input": [long] * per_request}, timeout=280).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        assert list(ex.map(lambda _: post(), range(2))) == [200] * 2
    peak = httpx.get(runner.url + "/status", timeout=10).json()["memory"]["peak_rss"]
    estimate = estimate_need(read_manifest(bert_dir), 512, 4).total
    print(f"embedding runner: peak RSS {peak / 2**20:.1f} MiB, estimate {estimate / 2**20:.1f} MiB")
    assert peak <= estimate <= 3 * peak, (peak, estimate)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Scheduler, ModelStore]]:
    cache = tmp_path / "hub"
    make_hf_model(cache, TINY)
    make_hf_embed_model(cache, EMB, "--family", "bert", "--hidden", "128")
    store = ModelStore(tmp_path / "home", cache)
    needs = [estimate_need(store.manifest(store.resolve(n)), CTX, 1).total for n in (TINY, EMB)]
    # room for the bigger of the two, not for both
    settings = Settings(home=tmp_path / "home", context_length=CTX, num_parallel=1, load_timeout=180.0,
                        memory_limit=max(needs) + min(needs) // 2, reserve=0, keep_alive=-1)
    sched = Scheduler(settings, store)
    await sched.start()
    yield sched, store
    await sched.shutdown()


def _loaded(sched: Scheduler) -> list[str]:
    return [m.name for m in sched.loaded()]


async def test_embedding_and_chat_models_evict_each_other(world: tuple[Scheduler, ModelStore]) -> None:
    sched, _ = world
    async with await sched.acquire(await sched.resolve(EMB)) as lease:
        first = await lease.embed({"input": ["evict me"]})
    assert _loaded(sched) == [EMB]
    async with await sched.acquire(await sched.resolve(TINY)) as lease:
        events = [e async for e in lease.completion(RunnerRequest({"num_predict": 4}, prompt="hi"))]
        assert isinstance(events[-1], Done)
    assert _loaded(sched) == [TINY]
    async with await sched.acquire(await sched.resolve(EMB)) as lease:
        again = await lease.embed({"input": ["evict me"]})
    assert _loaded(sched) == [EMB]
    assert again["embeddings"] == first["embeddings"]
    assert sched.loads == 3

"""End to end: embedding models through a real `corral serve` and real runners.

One server for the module over a hub cache with one tiny model per supported
family (BERT with CLS pooling and a default prompt, XLM-RoBERTa with mean
pooling, nomic-bert with nomic's search_query: prompt as default, ModernBERT
with global and sliding-window layers, Qwen3 with last-token pooling), a BERT
and a ModernBERT with a short max_seq_length for truncation, and a chat model. Vectors are checked against in-process
references that share no code with the runner (tests/support/embed_reference.py).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import TINY
from tests.support.embed_models import make_hf_embed_model
from tests.support.embed_reference import Reference, cosine
from tests.support.live_server import ServerProcess
from tests.support.models import make_hf_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BERT = "corral-test/emb-bert"
ROBERTA = "corral-test/emb-roberta"
QWEN3 = "corral-test/emb-qwen3"
NOMIC = "corral-test/emb-nomic"
MODERNBERT = "corral-test/emb-modernbert"
SHORT = "corral-test/emb-short"
MODERNBERT_SHORT = "corral-test/emb-modernbert-short"
FAMILIES = {
    BERT: ("--family", "bert", "--pooling", "cls", "--prefix", "query: "),
    ROBERTA: ("--family", "roberta"),
    QWEN3: ("--family", "qwen3", "--seed", "3"),
    NOMIC: ("--family", "nomic", "--default-prompt", "query", "--seed", "7"),
    MODERNBERT: ("--family", "modernbert", "--seed", "9"),
    SHORT: ("--family", "bert", "--pooling", "mean", "--max-seq-length", "16", "--seed", "5"),
    MODERNBERT_SHORT: ("--family", "modernbert", "--pooling", "cls", "--max-seq-length", "24", "--seed", "11"),
}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "model",
         "server", "keeps", "models", "in", "memory", "and", "answers", "requests", "for", "them", "café", "東京"]


def texts(n: int) -> list[str]:
    """n inputs of mixed lengths: 1 to ~90 tokens."""
    return [" ".join(WORDS[(i * 7) % len(WORDS):] + WORDS * (i % 4))[: 5 + (i * 37) % 300] for i in range(n)]


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf-embed") / "hub"
    for repo, args in FAMILIES.items():
        make_hf_embed_model(cache, repo, *args)
    make_hf_model(cache, TINY)
    return cache


@pytest.fixture(scope="module")
def snapshots(embed_cache: Path) -> dict[str, Path]:
    out = {}
    for repo in FAMILIES:
        root = embed_cache / f"models--{repo.replace('/', '--')}"
        out[repo] = root / "snapshots" / (root / "refs" / "main").read_text().strip()
    return out


@pytest.fixture(scope="module")
def refs(snapshots: dict[str, Path]) -> dict[str, Reference]:
    return {repo: Reference(path) for repo, path in snapshots.items()}


@pytest.fixture(scope="module")
def server(embed_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("home"), embed_cache, env={"CORRAL_KEEP_ALIVE": "-1"}) as s:
        yield s


def embed(server: ServerProcess, model: str, inputs: Any, **extra: Any) -> httpx.Response:
    return httpx.post(server.url + "/api/embed", json={"model": model, "input": inputs, **extra}, timeout=120)


@pytest.mark.parametrize("model", [BERT, ROBERTA, QWEN3, NOMIC, MODERNBERT])
def test_single_and_batch_of_64_equal_the_reference(server: ServerProcess, refs: dict[str, Reference],
                                                    model: str) -> None:
    ref = refs[model]
    r = embed(server, model, "Hello, world!")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and len(body["embeddings"]) == 1
    assert body["prompt_eval_count"] == len(ref.tokens("Hello, world!"))
    assert body["total_duration"] > 0 and body["load_duration"] >= 0
    assert cosine(body["embeddings"][0], ref.embed("Hello, world!")) >= 0.9999
    assert abs(np.linalg.norm(body["embeddings"][0]) - 1.0) < 1e-5

    batch = texts(64)
    assert len({len(ref.tokens(t)) for t in batch}) > 20  # really mixed lengths
    r = embed(server, model, batch)
    assert r.status_code == 200, r.text
    got = r.json()["embeddings"]
    assert len(got) == 64
    worst = min(cosine(g, ref.embed(t)) for g, t in zip(got, batch, strict=True))
    assert worst >= 0.9999
    # Different inputs give different vectors (a broken pooling would collapse them).
    assert cosine(got[0], got[1]) < 0.999


def test_concurrent_requests_share_the_runner_and_match_single_runs(server: ServerProcess) -> None:
    batch = texts(24)
    singles = [embed(server, ROBERTA, t).json()["embeddings"][0] for t in batch[:8]]
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: embed(server, ROBERTA, batch[i * 3:(i + 1) * 3]), range(8)))
    together = [v for r in results for v in r.json()["embeddings"]]
    assert len(together) == 24
    for i in range(8):
        assert cosine(together[i], singles[i]) >= 0.9999


@pytest.mark.parametrize("model, limit", [(SHORT, 16), (MODERNBERT_SHORT, 24)])
def test_truncation(server: ServerProcess, refs: dict[str, Reference], model: str, limit: int) -> None:
    long = " ".join(WORDS * 3)
    ref = refs[model]
    assert len(ref.tokens(long)) == limit  # the reference tokenizer truncates to max_seq_length
    r = embed(server, model, [long, "short one"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert cosine(body["embeddings"][0], ref.embed(long)) >= 0.9999
    assert cosine(body["embeddings"][1], ref.embed("short one")) >= 0.9999
    assert body["prompt_eval_count"] == limit + len(ref.tokens("short one"))
    r = embed(server, model, [long], truncate=False)
    assert r.status_code == 400
    assert "context length" in r.json()["error"]


@pytest.mark.parametrize("model", [BERT, NOMIC, MODERNBERT])
def test_dimensions(server: ServerProcess, refs: dict[str, Reference], model: str) -> None:
    full = refs[model].embed("dimensions please")
    r = embed(server, model, "dimensions please", dimensions=16)
    assert r.status_code == 200, r.text
    vec = r.json()["embeddings"][0]
    assert len(vec) == 16
    want = full[:16] / np.linalg.norm(full[:16])
    assert cosine(vec, want) >= 0.9999 and abs(np.linalg.norm(vec) - 1.0) < 1e-5
    for bad in (0, 65, "8"):
        assert embed(server, model, "x", dimensions=bad).status_code == 400


def test_legacy_embeddings_route(server: ServerProcess, refs: dict[str, Reference]) -> None:
    r = httpx.post(server.url + "/api/embeddings", json={"model": QWEN3, "prompt": "legacy route"}, timeout=60)
    assert r.status_code == 200, r.text
    assert cosine(r.json()["embedding"], refs[QWEN3].embed("legacy route")) >= 0.9999
    r = httpx.post(server.url + "/api/embeddings", json={"model": QWEN3, "prompt": ""}, timeout=60)
    assert r.json() == {"embedding": []}


def test_ollama_client(server: ServerProcess, refs: dict[str, Reference]) -> None:
    import ollama

    client = ollama.Client(host=server.url)
    out = client.embed(model=BERT, input=["first text", "second text"])
    assert len(out.embeddings) == 2
    assert cosine(out.embeddings[1], refs[BERT].embed("second text")) >= 0.9999
    single = client.embeddings(model=BERT, prompt="first text")
    assert cosine(single.embedding, out.embeddings[0]) >= 0.9999


def test_openai_client_float_base64_and_token_ids(server: ServerProcess, refs: dict[str, Reference]) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    want = refs[ROBERTA].embed("open ai")
    floats = oai.embeddings.create(model=ROBERTA, input=["open ai", "other"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert cosine(floats.data[0].embedding, want) >= 0.9999
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    # Without encoding_format the client asks for base64 and decodes it itself.
    default = oai.embeddings.create(model=ROBERTA, input="open ai")
    assert cosine(default.data[0].embedding, want) >= 0.9999
    raw = httpx.post(server.url + "/v1/embeddings", timeout=60,
                     json={"model": ROBERTA, "input": "open ai", "encoding_format": "base64"}).json()
    b64 = base64.b64decode(raw["data"][0]["embedding"])
    assert cosine(struct.unpack(f"<{len(b64) // 4}f", b64), want) >= 0.9999
    ids = refs[ROBERTA].tokens("open ai")
    by_ids = oai.embeddings.create(model=ROBERTA, input=[ids, ids[:2]], encoding_format="float")
    assert cosine(by_ids.data[0].embedding, want) >= 0.9999
    assert cosine(by_ids.data[1].embedding, refs[ROBERTA].embed_ids(ids[:2])) >= 0.9999
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model=TINY, input="a chat model")
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="corral-test/nope", input="x")


def test_langchain_ollama_embeddings(server: ServerProcess, refs: dict[str, Reference]) -> None:
    from langchain_ollama import OllamaEmbeddings

    emb = OllamaEmbeddings(model=QWEN3, base_url=server.url)
    docs = emb.embed_documents(["a document", "another document"])
    query = emb.embed_query("a question")
    assert len(docs) == 2
    assert cosine(docs[1], refs[QWEN3].embed("another document")) >= 0.9999
    assert cosine(query, refs[QWEN3].embed("a question")) >= 0.9999


def test_show_tags_and_wrong_kind_errors(server: ServerProcess) -> None:
    show = httpx.post(server.url + "/api/show", json={"model": BERT}, timeout=30).json()
    assert show["capabilities"] == ["embedding"]
    assert show["details"]["family"] == "bert"
    nomic = httpx.post(server.url + "/api/show", json={"model": NOMIC}, timeout=30).json()
    assert nomic["capabilities"] == ["embedding"] and nomic["details"]["family"] == "nomic-bert"
    chat_show = httpx.post(server.url + "/api/show", json={"model": TINY}, timeout=30).json()
    assert "embedding" not in chat_show["capabilities"]
    names = {m["name"] for m in httpx.get(server.url + "/api/tags", timeout=30).json()["models"]}
    assert {f"{m}:latest" for m in FAMILIES} <= names
    r = httpx.post(server.url + "/api/generate", json={"model": BERT, "prompt": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == f'"{BERT}" does not support generate'
    r = httpx.post(server.url + "/api/chat", json={"model": BERT, "messages": [{"role": "user", "content": "hi"}]},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"] == f'"{BERT}" does not support chat'
    r = embed(server, TINY, "hi")
    assert r.status_code == 400 and r.json()["error"] == f'"{TINY}" does not support embeddings'
    loaded = {m["name"] for m in httpx.get(server.url + "/api/ps", timeout=30).json()["models"]}
    assert f"{TINY}:latest" not in loaded  # refused before loading anything


def test_empty_input_loads_only(server: ServerProcess) -> None:
    r = embed(server, BERT, [])
    assert r.status_code == 200 and r.json()["embeddings"] == []

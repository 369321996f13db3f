"""End to end: Ollama's vocabulary through the official `ollama` and `anthropic` clients,
against a real `corral serve` with real runners on tiny generated models.

Any tag (copy keeps the digest, /api/tags lists the tag), /api/create from a
Modelfile whose system prompt and parameters the chat then uses, capabilities
and model_info, /api/ps rows, library names from config.toml, count_tokens,
and the routes corral does not serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from corral.supervisor.modelfile import parse_modelfile

from tests.conftest import TINY
from tests.support.live_server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SYSTEM = "You are a cowboy who answers every question about corrals and horses at length."
MODELFILE = f'''FROM {TINY}
SYSTEM """{SYSTEM}"""
PARAMETER temperature 0
PARAMETER num_predict 5
MESSAGE user Howdy
MESSAGE assistant Howdy partner
'''
HI: Any = [{"role": "user", "content": "Tell me about corrals."}]


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("home")
    (home / "config.toml").write_text(f'[library]\n"tiny:0.1b" = "{TINY}"\n')
    # Prompt counts are compared across requests here: no prompt cache, whose hits would shorten them.
    with ServerProcess(home, hf_cache, env={"CORRAL_PROMPT_CACHE": "0"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def test_any_tag_and_copy_keeps_the_digest(client: ollama.Client) -> None:
    client.copy(TINY, "mymodel:v2")
    client.copy(TINY, "registry.ollama.ai/library/other:1b")
    listed = {m.model: m.digest for m in client.list().models}
    assert listed["mymodel:v2"] == listed[f"{TINY}:latest"]
    assert listed["other:1b"] == listed[f"{TINY}:latest"]
    answer = client.chat(model="MyModel:V2", messages=HI, options={"temperature": 0, "num_predict": 3})
    assert answer.done and answer.eval_count and answer.eval_count <= 3
    with pytest.raises(ollama.ResponseError) as e:
        client.show("mymodel:v3")
    assert e.value.status_code == 404
    client.delete("mymodel:v2")
    assert "mymodel:v2" not in [m.model for m in client.list().models]


def test_create_from_modelfile_then_chat_uses_it(server: ServerProcess, client: ollama.Client,
                                                 tmp_path: Path) -> None:
    fields = parse_modelfile(MODELFILE, tmp_path)
    client.create(model="cowboy:v1", from_=fields["from"], system=fields["system"],
                  parameters=fields["parameters"], messages=fields["messages"])
    mine = client.chat(model="cowboy:v1", messages=HI)
    # The same conversation spelt out against the base model gives the same greedy answer.
    spelt = [{"role": "system", "content": SYSTEM}, *fields["messages"], *HI]
    base = client.chat(model=TINY, messages=spelt, options={"temperature": 0, "num_predict": 5})
    assert mine.message.content == base.message.content
    assert mine.prompt_eval_count == base.prompt_eval_count
    plain = client.chat(model=TINY, messages=HI, options={"temperature": 0, "num_predict": 5})
    assert mine.prompt_eval_count > (plain.prompt_eval_count or 0) + 10  # the system prompt was applied
    assert mine.eval_count is not None and mine.eval_count <= 5  # PARAMETER num_predict
    # request values override the model's
    short = client.chat(model="cowboy:v1", messages=HI, options={"num_predict": 2})
    assert short.eval_count is not None and short.eval_count <= 2
    own = client.chat(model="cowboy:v1", messages=[{"role": "system", "content": "Be terse."}, *HI])
    assert (own.prompt_eval_count or 0) < (mine.prompt_eval_count or 0)
    # /api/generate gets the same system prompt
    gen = client.generate(model="cowboy:v1", prompt="Tell me about corrals.")
    assert gen.prompt_eval_count == mine.prompt_eval_count

    shown = client.show("cowboy:v1")
    # the ollama package's ShowResponse has no `system` field; Ollama's /api/show sends it
    raw = httpx.post(server.url + "/api/show", json={"model": "cowboy:v1"}, timeout=30).json()
    assert raw["system"] == SYSTEM and raw["messages"] == fields["messages"]
    assert shown.parameters is not None and "num_predict" in shown.parameters
    assert shown.modelfile is not None and f"FROM {TINY}:latest" in shown.modelfile
    assert "SYSTEM" in shown.modelfile and "MESSAGE user" in shown.modelfile
    assert shown.details.parent_model == f"{TINY}:latest"
    assert "cowboy:v1" in [m.model for m in client.list().models]


@pytest.mark.parametrize("fields, words", [
    ({"quantize": "q4_K_M"}, "quantiz"),
    ({"files": {"model.gguf": "sha256:" + "0" * 64}}, "blob"),
    ({"parameters": {"mirostat": 1}}, "mirostat"),
    ({"template": "{{ .System }}{{ .Prompt }}"}, "Go template"),
])
def test_create_refuses_what_it_cannot_honour(client: ollama.Client, fields: dict[str, Any],
                                              words: str) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="refused", from_=TINY, **fields)
    assert e.value.status_code == 400 and words in str(e.value.error)
    assert "refused:latest" not in [m.model for m in client.list().models]


def test_capabilities_and_model_info(client: ollama.Client) -> None:
    shown = client.show(TINY)
    assert shown.capabilities == ["completion", "tools"]  # the test template takes tools
    info = shown.modelinfo or {}
    arch = info["general.architecture"]
    assert arch == "llama"
    for key in ("general.parameter_count", f"{arch}.context_length", f"{arch}.embedding_length",
                f"{arch}.block_count", f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
        assert key in info, key


def test_ps_rows_have_every_ollama_field(server: ServerProcess, client: ollama.Client) -> None:
    client.generate(model=TINY, prompt="hi", options={"num_predict": 1})
    row = httpx.get(server.url + "/api/ps", timeout=30).json()["models"][0]
    for key in ("name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"):
        assert key in row, key
    assert set(row["details"]) >= {"parent_model", "format", "family", "families", "parameter_size",
                                   "quantization_level"}
    assert client.ps().models[0].model == f"{TINY}:latest"


def test_library_name_from_config(client: ollama.Client) -> None:
    answer = client.generate(model="tiny:0.1b", prompt="hi", options={"num_predict": 2})
    assert answer.done
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama9:7b")
    assert e.value.status_code == 404 and "Hugging Face Hub" in str(e.value.error)


def test_count_tokens_through_anthropic(server: ServerProcess) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=120, max_retries=0)
    counted = claude.messages.count_tokens(model=TINY, messages=HI)
    sent = claude.messages.create(model=TINY, max_tokens=1, messages=HI)
    usage = sent.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0) > 0
    more = claude.messages.count_tokens(model=TINY, messages=HI, system=SYSTEM)
    assert more.input_tokens > counted.input_tokens + 10


def test_routes_not_served_answer_in_each_family(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/api/push", json={"model": TINY}, timeout=30)
    assert r.status_code == 501 and "not supported by corral" in r.json()["error"]
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        oai.responses.create(model=TINY, input="hi")
    assert e.value.status_code == 501 and "not supported by corral" in e.value.message
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as ae:
        claude.messages.batches.list()
    assert ae.value.status_code == 501 and "not supported by corral" in ae.value.message

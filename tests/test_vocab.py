"""Ollama's vocabulary, pure logic: names with tags, Modelfiles, stored defaults applied by the
pipeline, /api/create validation, library names, capabilities, honest 501s, `corral run` flags.

The same behaviour through the official clients and real runners is in test_vocab_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from corral.runner.protocol import RunnerRequest, options_to_wire, parse_options
from corral.supervisor import cli
from corral.supervisor.api.completion import CompletionRequest, apply_model_defaults
from corral.supervisor.api.manage import create_defaults
from corral.supervisor.api.ollama import capabilities
from corral.supervisor.app import create_app
from corral.supervisor.config import Settings
from corral.supervisor.errors import BadRequest, InvalidModelName, PullFailed
from corral.supervisor.library import load_library, shipped_table
from corral.supervisor.modelfile import ModelfileError, parse_modelfile
from corral.supervisor.names import display_name, normalize_name, split_name, tagged_name
from corral.supervisor.pull import repo_id_for
from corral.supervisor.store import ModelDefaults, ModelStore

from tests.support.fake_scheduler import FakeScheduler, FakeStore, fake_context, text_script

# ---- names ---------------------------------------------------------------------


@pytest.mark.parametrize("name, key", [
    ("qwen2.5:0.5b", "qwen2.5:0.5b"),
    ("MyModel:V2", "mymodel:v2"),
    ("llama3.1:8b-instruct-q4", "llama3.1:8b-instruct-q4"),
    ("org/Repo", "org/repo"),
    ("org/Repo:latest", "org/repo"),
    ("org/Repo:LATEST", "org/repo"),
    ("library/qwen3:0.6b", "qwen3:0.6b"),
    ("registry.ollama.ai/library/qwen3:0.6b", "qwen3:0.6b"),
    ("localhost:5000/team/model:v1", "localhost:5000/team/model:v1"),
])
def test_ollama_names(name: str, key: str) -> None:
    assert normalize_name(name) == key


def test_display_and_tagged_names_keep_case() -> None:
    assert split_name("Org/Repo") == ("Org/Repo", "latest")
    assert display_name("Org/Repo:latest") == "Org/Repo"
    assert display_name("Mine:V2") == "Mine:V2"
    assert tagged_name("Org/Repo") == "Org/Repo:latest"
    assert tagged_name("mine:v2") == "mine:v2"


@pytest.mark.parametrize("name", ["a:", "a:.x", "a:b:c", "a:" + "t" * 129, "a/b/c/d", "a:b/c", "h:x/ns/m"])
def test_bad_tags_and_shapes(name: str) -> None:
    with pytest.raises(InvalidModelName):
        normalize_name(name)


# ---- Modelfiles ---------------------------------------------------------------------

MODELFILE = '''# a comment
FROM corral-test/tiny
SYSTEM """You are a cowboy.
You answer briefly."""
PARAMETER temperature 0
PARAMETER num_predict 5
PARAMETER stop "<|im_end|>"
PARAMETER stop END
PARAMETER num_ctx 512
MESSAGE user Howdy
MESSAGE assistant "Howdy, partner"
LICENSE MIT
template """{% for m in messages %}{{ m.content }}{% endfor %}"""
'''


def test_parse_modelfile(tmp_path: Path) -> None:
    body = parse_modelfile(MODELFILE, tmp_path)
    assert body == {
        "from": "corral-test/tiny",
        "system": "You are a cowboy.\nYou answer briefly.",
        "template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "parameters": {"temperature": 0, "num_predict": 5, "stop": ["<|im_end|>", "END"], "num_ctx": 512},
        "messages": [{"role": "user", "content": "Howdy"}, {"role": "assistant", "content": "Howdy, partner"}],
        "license": "MIT",
    }


def test_modelfile_from_a_relative_directory_is_taken_from_its_folder(tmp_path: Path) -> None:
    assert parse_modelfile("FROM ./weights\n", tmp_path)["from"] == str((tmp_path / "weights").resolve())


@pytest.mark.parametrize("text, words", [
    ("SYSTEM hi\n", "no FROM"),
    ("FROM x\nBOGUS y\n", "unknown instruction"),
    ('FROM x\nSYSTEM """never closed\n', "unterminated"),
    ("FROM x\nPARAMETER temperature\n", "name and a value"),
])
def test_bad_modelfiles(text: str, words: str) -> None:
    with pytest.raises(ModelfileError, match=words):
        parse_modelfile(text)


# ---- /api/create fields ------------------------------------------------------------------


def test_create_defaults_validate_and_convert() -> None:
    d = create_defaults({"system": "S", "parameters": {"temperature": 0, "stop": "x", "num_ctx": 256},
                         "messages": [{"role": "user", "content": "u"}], "license": ["A", "B"]})
    assert d.system == "S"
    assert d.parameters == {"num_ctx": 256, "temperature": 0.0, "stop": ["x"]}
    assert d.messages == ({"role": "user", "content": "u"},)
    assert d.license == "A\nB"


@pytest.mark.parametrize("body, param", [
    ({"quantize": "q4_K_M"}, "quantize"),
    ({"adapters": {"a.safetensors": "sha256:x"}}, "adapters"),
    ({"files": {"model.gguf": "sha256:x"}}, "files"),
    ({"modelfile": "FROM x"}, "modelfile"),
    ({"parameters": {"mirostat": 1}}, "parameters"),
    ({"parameters": {"temperature": "hot"}}, "parameters"),
    ({"parameters": {"num_ctx": 0}}, "parameters"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"template": "{{ .System }} {{ .Prompt }}"}, "template"),
    ({"system": 3}, "system"),
    ({"license": 3}, "license"),
])
def test_create_refuses_what_it_cannot_honour(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        create_defaults(body)
    assert e.value.param == param


# ---- stored defaults at request time -----------------------------------------------------


def _request(messages: list[dict[str, Any]] | None, given: set[str] | None = None,
             prompt: str | None = None, num_ctx: int | None = None) -> CompletionRequest:
    options = options_to_wire(parse_options({"temperature": 0.9} if given else None))
    return CompletionRequest("m", RunnerRequest(options, prompt=prompt, messages=messages),
                             num_ctx=num_ctx, options_set=frozenset(given or ()))


DEFAULTS = ModelDefaults(system="SYS", template="TPL", parameters={"temperature": 0.0, "num_predict": 5,
                                                                   "num_ctx": 512},
                         messages=({"role": "user", "content": "pre"}, {"role": "assistant", "content": "ok"}))


def test_defaults_fill_what_the_request_left_out() -> None:
    out = apply_model_defaults(_request([{"role": "user", "content": "hi"}]), DEFAULTS)
    assert [m["content"] for m in out.runner.messages or []] == ["SYS", "pre", "ok", "hi"]
    assert out.runner.options["temperature"] == 0.0 and out.runner.options["num_predict"] == 5
    assert "num_ctx" not in out.runner.options and out.num_ctx == 512
    assert out.runner.template == "TPL"
    assert out.runner.to_wire()["chat_template"] == "TPL"


def test_request_values_win() -> None:
    request = _request([{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}],
                       given={"temperature"}, num_ctx=2048)
    out = apply_model_defaults(request, DEFAULTS)
    assert [m["content"] for m in out.runner.messages or []] == ["mine", "pre", "ok", "hi"]
    assert out.runner.options["temperature"] == 0.9 and out.runner.options["num_predict"] == 5
    assert out.num_ctx == 2048


def test_raw_prompt_gets_parameters_only() -> None:
    out = apply_model_defaults(_request(None, prompt="raw"), DEFAULTS)
    assert out.runner.prompt == "raw" and out.runner.messages is None and out.runner.template is None
    assert out.runner.options["num_predict"] == 5


def test_no_defaults_change_nothing() -> None:
    request = _request([{"role": "user", "content": "hi"}])
    assert apply_model_defaults(request, ModelDefaults()) == request


# ---- the store: tags, create, copy -----------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, tiny_model: Path) -> ModelStore:
    s = ModelStore(tmp_path / "home", hf_cache=tmp_path / "hub")
    s.register("base", tiny_model)
    return s


def test_copy_keeps_digest_and_any_tag(store: ModelStore) -> None:
    base = store.resolve("base")
    copy = store.copy("base", "Mine:V2")
    assert (copy.name, copy.digest) == ("Mine:V2", base.digest)
    assert store.resolve("mine:v2").digest == base.digest
    assert "Mine:V2" in [r.name for r in store.list()]
    with pytest.raises(Exception, match="not found"):
        store.resolve("mine:v3")


def test_create_from_a_model_inherits_and_persists(store: ModelStore) -> None:
    first = store.create("cowboy:v1", "base", ModelDefaults(system="S1", parameters={"temperature": 0.0}))
    assert first.parent == "base:latest" and first.digest != store.resolve("base").digest
    second = store.create("cowboy:v2", "cowboy:v1", ModelDefaults(parameters={"num_predict": 3}))
    assert second.defaults.system == "S1"
    assert second.defaults.parameters == {"temperature": 0.0, "num_predict": 3}
    again = ModelStore(store.home, hf_cache=store.hf_cache)
    assert again.resolve("COWBOY:V2").defaults == second.defaults
    assert again.copy("cowboy:v2", "cp").defaults == second.defaults


# ---- library names ---------------------------------------------------------------------------


def test_shipped_library_and_config_override(tmp_path: Path) -> None:
    shipped = shipped_table()
    assert shipped["qwen3:0.6b"] == "mlx-community/Qwen3-0.6B-4bit"
    assert all("/" in repo for repo in shipped.values())
    (tmp_path / "config.toml").write_text('[library]\n"qwen3:0.6b" = "me/mine"\n"tiny" = "org/tiny"\n')
    table = load_library(tmp_path)
    assert table["qwen3:0.6b"] == "me/mine" and table["tiny"] == "org/tiny"
    assert table["qwen3"] == shipped["qwen3:8b"]  # ":latest" is the bare name
    assert repo_id_for("Qwen3:0.6B", table) == "me/mine"
    assert repo_id_for("tiny", table) == "org/tiny"


def test_unknown_library_name_says_where_corral_pulls_from() -> None:
    with pytest.raises(PullFailed) as e:
        repo_id_for("llama9:7b", shipped_table())
    assert e.value.status == 404
    assert "Hugging Face Hub" in e.value.message and "mlx-community/" in e.value.message
    with pytest.raises(PullFailed) as e:
        repo_id_for("org/repo:v2", {})
    assert e.value.status == 400


def test_library_name_resolves_to_the_cached_repo(tmp_path: Path) -> None:
    from tests.support.models import make_hf_model

    make_hf_model(tmp_path / "hub", "corral-test/lib")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text('[library]\n"lib:1b" = "corral-test/lib"\n')
    store = ModelStore(tmp_path / "home", hf_cache=tmp_path / "hub")
    assert store.resolve("lib:1b").name == "corral-test/lib"
    with pytest.raises(Exception, match="not found"):
        store.resolve("lib:2b")


# ---- capabilities ------------------------------------------------------------------------------


def test_capabilities_from_template_and_kind(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert capabilities(tmp_path, "{{ messages }}") == ["completion"]
    assert capabilities(tmp_path, "{% if tools %}{% endif %}") == ["completion", "tools"]
    assert capabilities(tmp_path, "{% if enable_thinking %}<think>{% endif %}") == ["completion", "thinking"]
    assert capabilities(tmp_path, "{% if tools %}{% endif %}", kind="embedding") == ["embedding"]
    # corral refuses `suffix` and images, so fill-in-the-middle and vision are never advertised
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens": ["<|fim_prefix|>"]}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}}))
    assert capabilities(tmp_path, "") == ["completion"]


# ---- routes corral does not serve --------------------------------------------------------------


@pytest.fixture
async def app_client(tmp_path: Path) -> Any:
    store = FakeStore.with_models("corral-test/tiny")
    sched = FakeScheduler(store, text_script("a"))
    app = create_app(fake_context(store, sched, Settings(home=tmp_path / "home")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://corral") as c:
        yield c


@pytest.mark.parametrize("method, path, shape", [
    ("POST", "/api/push", "ollama"),
    ("POST", "/api/blobs/sha256:abc", "ollama"),
    ("POST", "/v1/responses", "openai"),
    ("GET", "/v1/files/file-1", "openai"),
    ("POST", "/v1/audio/transcriptions", "openai"),
    ("POST", "/v1/messages/batches", "anthropic"),
    ("POST", "/v1/complete", "openai"),
])
async def test_routes_not_served_say_so(app_client: httpx.AsyncClient, method: str, path: str,
                                        shape: str) -> None:
    r = await app_client.request(method, path, json={})
    assert r.status_code == 501
    body = r.json()
    message = {"ollama": lambda b: b["error"], "openai": lambda b: b["error"]["message"],
               "anthropic": lambda b: b["error"]["message"]}[shape](body)
    assert "not supported by corral" in message
    if shape == "anthropic":
        assert body["type"] == "error"


async def test_anthropic_header_picks_anthropics_shape(app_client: httpx.AsyncClient) -> None:
    r = await app_client.post("/v1/complete", json={}, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 501 and r.json()["type"] == "error"


async def test_served_routes_are_not_shadowed(app_client: httpx.AsyncClient) -> None:
    r = await app_client.post("/v1/chat/completions", json={
        "model": "corral-test/tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


async def test_create_then_show_reports_what_was_stored(app_client: httpx.AsyncClient) -> None:
    r = await app_client.post("/api/create", json={
        "model": "cowboy:v1", "from": "corral-test/tiny", "system": "S", "stream": False,
        "parameters": {"temperature": 0, "stop": ["END"]}, "messages": [{"role": "user", "content": "u"}],
        "license": "L"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success"
    tags = (await app_client.get("/api/tags")).json()["models"]
    assert "cowboy:v1" in [m["name"] for m in tags]


# ---- `corral run` flags ------------------------------------------------------------------------


def test_run_takes_flags_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(args: Any) -> int:
        seen.update(prompt=args.prompt, verbose=args.verbose, keepalive=args.keepalive)
        return 0

    monkeypatch.setattr(cli, "cmd_run", fake_run)  # build_parser binds it when main() runs
    assert cli.main(["run", "m", "--verbose", "hi", "there", "--keepalive", "1m", "again"]) == 0
    assert seen == {"prompt": ["hi", "there", "again"], "verbose": True, "keepalive": "1m"}


def test_unknown_flags_are_still_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "m", "--bogus", "hi"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeStore, FakeScheduler, Any]:
    store = FakeStore.with_models("corral-test/tiny")
    sched = FakeScheduler(store, text_script("a"))
    return store, sched, create_app(fake_context(store, sched, Settings(home=tmp_path / "home")))


async def test_created_defaults_reach_the_runner_from_every_family(
        parts: tuple[FakeStore, FakeScheduler, Any]) -> None:
    store, sched, app = parts
    store.create("cowboy:v1", "corral-test/tiny",
                 ModelDefaults(system="SYS", parameters={"temperature": 0.0, "num_ctx": 512}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://corral") as c:
        user = [{"role": "user", "content": "hi"}]
        assert (await c.post("/api/chat", json={"model": "cowboy:v1", "messages": user,
                                                "stream": False})).status_code == 200
        assert (await c.post("/v1/chat/completions", json={"model": "cowboy:v1", "messages": user,
                                                           "temperature": 0.5})).status_code == 200
        assert (await c.post("/v1/messages", json={"model": "cowboy:v1", "messages": user,
                                                   "max_tokens": 4})).status_code == 200
    for body in sched.bodies:
        assert body["messages"][0] == {"role": "system", "content": "SYS"}
    assert [b["options"]["temperature"] for b in sched.bodies] == [0.0, 0.5, 0.0]
    assert [call.num_ctx for call in sched.calls] == [512, 512, 512]


async def test_generate_template_and_context(parts: tuple[FakeStore, FakeScheduler, Any]) -> None:
    _, sched, app = parts
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://corral") as c:
        ok = await c.post("/api/generate", json={"model": "corral-test/tiny", "prompt": "hi", "stream": False,
                                                 "template": "{{ messages[0].content }}"})
        assert ok.status_code == 200
        assert sched.bodies[-1]["chat_template"] == "{{ messages[0].content }}"
        go = await c.post("/api/generate", json={"model": "corral-test/tiny", "prompt": "hi",
                                                 "template": "{{ .Prompt }}"})
        assert go.status_code == 400 and "Go template" in go.json()["error"]
        ctx = await c.post("/api/generate", json={"model": "corral-test/tiny", "prompt": "hi", "context": [1, 2]})
        assert ctx.status_code == 400 and "not supported by corral" in ctx.json()["error"]


def test_a_failing_slash_command_keeps_the_session(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from corral.supervisor.cli_client import ServerError

    class Broken:
        def show(self, model: str) -> dict[str, Any]:
            raise ServerError(404, f"model '{model}' not found")

    session = cli.Session(Broken(), argparse.Namespace(model="gone", verbose=False, format=None))  # type: ignore[arg-type]
    assert session.command("/show info") is True
    assert "Error: model 'gone' not found" in capsys.readouterr().out
    assert session.command("/show") is True
    assert "/show modelfile" in capsys.readouterr().out

"""Issue 9, items 5 and 7: overflowing values and hostile bodies are 4xx JSON errors, never 500s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from corral.runner.protocol import BodyError, json_object
from corral.supervisor.app import create_app
from corral.supervisor.config import (
    FOREVER,
    MAX_DURATION_S,
    MAX_PINNED,
    Settings,
    apply_patch,
    parse_keep_alive,
    parse_memory_limit,
)
from corral.supervisor.errors import BadRequest

from tests.support.fake_scheduler import FakeScheduler, FakeStore, fake_context

TINY = "corral-test/tiny"
HUGE_INT = "9" * 5000


# ---- durations and sizes clamp instead of overflowing ----------------------


@pytest.mark.parametrize("raw", [1e300, float("inf"), 10**400, "99999999h", "1e300", "200000000000",
                                 "9999999999999999999999999d"])
def test_durations_beyond_a_century_are_forever(raw: object) -> None:
    if raw == "1e300":  # not a duration form Ollama accepts
        with pytest.raises(BadRequest):
            parse_keep_alive(raw)
        return
    assert parse_keep_alive(raw) == FOREVER


def test_durations_up_to_a_century_are_kept() -> None:
    assert parse_keep_alive("87600h") == 87600 * 3600.0
    assert parse_keep_alive(MAX_DURATION_S) == MAX_DURATION_S
    assert parse_keep_alive(-(10**400)) == FOREVER
    with pytest.raises(BadRequest):
        parse_keep_alive(float("nan"))


@pytest.mark.parametrize("raw", [1e300, float("inf"), float("nan"), 10**400, "9" * 400 + "GB", "2EB"])
def test_memory_limits_are_bounded(raw: object) -> None:
    with pytest.raises(BadRequest):
        parse_memory_limit(raw, 64 * 2**30)


def test_patch_pinned_must_be_a_bounded_list_of_valid_names() -> None:
    s = Settings()
    for bad in (["../../etc"], ["a\x00b"], [f"org/m{i}" for i in range(MAX_PINNED + 1)], 7, {"a": 1},
                ["x" * 10_000]):
        with pytest.raises(BadRequest):
            apply_patch(s, {"pinned": bad}, total_memory=2**30)
        assert s.pinned == []  # nothing changed
    apply_patch(s, {"pinned": ["org/a", "org/b:latest"]}, total_memory=2**30)
    assert s.pinned == ["org/a", "org/b:latest"]


# ---- the one JSON body reader ----------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"num_predict": ' + HUGE_INT.encode() + b"}",
    b'{"prompt": "\\ud800"}',
    b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}',
    b'{"\\udc00": 1}',
])
def test_json_reader_refuses_what_later_steps_cannot_handle(raw: bytes) -> None:
    with pytest.raises(BodyError, match="malformed JSON body"):
        json_object(raw)


def test_json_reader_keeps_surrogate_pairs() -> None:
    assert json_object(b'{"prompt": "\\ud83d\\ude00 ok"}')["prompt"] == "\U0001f600 ok"


# ---- through the app: every bad input is a 4xx JSON error ------------------


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx2.AsyncClient]:
    sched = FakeScheduler(FakeStore.with_models(TINY))
    app = create_app(fake_context(sched.store, sched, Settings(home=tmp_path)))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app, raise_app_exceptions=False),
                                  base_url="http://127.0.0.1:11434") as c:
        yield c


HOSTILE: list[tuple[str, str, bytes]] = [
    ("POST", "/api/generate", b'{"model": "corral-test/tiny", "prompt": "x", "options": {"seed": ' +
     HUGE_INT.encode() + b"}}"),
    ("POST", "/api/generate", b'{"model": "corral-test/tiny", "prompt": "\\ud800"}'),
    ("POST", "/api/chat", b'{"model": "corral-test/tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("POST", "/v1/chat/completions", b'{"model": "corral-test/tiny", "max_tokens": ' + HUGE_INT.encode() +
     b', "messages": [{"role": "user", "content": "x"}]}'),
    ("POST", "/v1/messages", b'{"model": "corral-test/tiny", "max_tokens": 5, "messages": '
     b'[{"role": "user", "content": "\\udfff"}]}'),
    ("POST", "/api/create", b'{"model": "mine", "from": "/' + b"a" * 20000 + b'"}'),
    ("POST", "/api/create", b'{"model": "mine", "from": "/tmp/\\u0000x"}'),
    ("POST", "/api/show", b'{"model": ' + HUGE_INT.encode() + b"}"),
    ("PATCH", "/api/settings", b'{"keep_alive": ' + HUGE_INT.encode() + b"}"),
    ("PATCH", "/api/settings", b'{"memory_limit": 1e999}'),
    ("DELETE", "/api/delete", b'{"model": "\\ud800"}'),
]


@pytest.mark.parametrize(("method", "path", "body"), HOSTILE, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(HOSTILE)])
async def test_hostile_bodies_are_4xx_json(http: httpx2.AsyncClient, method: str, path: str, body: bytes) -> None:
    r = await http.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert json.loads(r.text)


async def test_keep_alive_overflow_leaves_ps_and_settings_working(http: httpx2.AsyncClient) -> None:
    r = await http.patch("/api/settings", json={"keep_alive": 1e300})
    assert r.status_code == 200
    assert (await http.get("/api/settings")).json()["keep_alive"] == FOREVER
    for ka in (1e300, "99999999h", 10**30):
        r = await http.post("/api/generate", json={"model": TINY, "prompt": "x", "stream": False,
                                                   "keep_alive": ka})
        assert r.status_code == 200, r.text
    assert (await http.get("/api/ps")).status_code == 200


# ---- /api/create registers only directories under the model roots (item 8) ----


async def test_create_only_under_roots_with_one_error_text(tmp_path: Path) -> None:
    from corral.supervisor.store import ModelStore

    root, outside = tmp_path / "models", tmp_path / "secret"
    (root / "empty").mkdir(parents=True)
    (outside / ".ssh").mkdir(parents=True)
    (root / "escape").symlink_to(outside / ".ssh")
    store = ModelStore(tmp_path / "home", tmp_path / "hub")
    sched = FakeScheduler(store)  # type: ignore[arg-type]
    app = create_app(fake_context(store, sched, Settings(home=tmp_path / "home", models_dirs=[root])))  # type: ignore[arg-type]
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        async def error(source: str) -> str:
            r = await c.post("/api/create", json={"model": "mine", "from": source})
            assert r.status_code == 400, r.text
            return str(r.json()["error"]).replace(source, "<from>")

        texts = {await error(str(p)) for p in (outside / ".ssh", outside / "nope", root / "escape",
                                                Path("/proc/self"), root / ".." / "secret" / ".ssh")}
        assert len(texts) == 1 and "no such directory" in texts.pop()  # existing or not: the same text
        # inside a root the check of the directory itself goes on as before
        assert "config.json" in await error(str(root / "empty"))


def test_default_model_roots_are_home_and_the_hf_cache(tmp_path: Path) -> None:
    from corral.supervisor.api.manage import model_roots
    from corral.supervisor.store import ModelStore

    store = ModelStore(tmp_path / "home", tmp_path / "hub")
    ctx = fake_context(store, FakeScheduler(store), Settings(home=tmp_path / "home"))  # type: ignore[arg-type]
    assert model_roots(ctx) == [Path.home(), tmp_path / "hub"]

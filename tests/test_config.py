"""Configuration precedence: CLI flag > environment > $CORRAL_HOME/config.toml > default.

Every setting is checked through the real `corral serve` argument parser, a
real environment mapping and a real config file; /api/settings changes the
running Settings; a port already in use gives one clear line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from corral.supervisor.app import create_app
from corral.supervisor.cli_client import ClientError, base_url
from corral.supervisor.config import (
    RUNTIME_MUTABLE,
    SETTINGS,
    HostSpec,
    Setting,
    Settings,
    apply_patch,
    load_settings,
    settings_to_json,
)
from corral.supervisor.errors import BadRequest
from corral.supervisor.serve import add_serve_arguments, flags_from_args

from tests.support.fake_scheduler import FakeScheduler, FakeStore, fake_context

ROOT = Path(__file__).resolve().parents[1]
GB = 1000**3
TOTAL = 64 * GB  # the "physical memory" percentages are taken of

# name, flag argv, env value, config.toml line, then the expected values from
# flag, env, file, and the default (Settings attribute `attr`).
CASES: list[tuple[str, str, list[str], str, str, Any, Any, Any, Any]] = [
    ("keep_alive", "keep_alive", ["--keep-alive", "10m"], "30s", 'keep_alive = "1h"', 600.0, 30.0, 3600.0, 300.0),
    ("max_loaded_models", "max_loaded_models", ["--max-loaded-models", "3"], "2", "max_loaded_models = 1", 3, 2, 1, 0),
    ("single_model", "single_model", ["--single-model"], "true", "single_model = true", True, True, True, False),
    ("pinned", "pinned", ["--pinned", "a/x,b/y"], "c/z", 'pinned = ["d/w", "e/v"]', ["a/x", "b/y"], ["c/z"], ["d/w", "e/v"], []),
    ("num_parallel", "num_parallel", ["--num-parallel", "8"], "2", "num_parallel = 6", 8, 2, 6, 4),
    ("max_queue", "max_queue", ["--max-queue", "10"], "20", "max_queue = 30", 10, 20, 30, 512),
    ("context_length", "context_length", ["--context-length", "1024"], "2048", "context_length = 512", 1024, 2048, 512, 0),
    ("memory_limit", "memory_limit", ["--memory-limit", "24GB"], "50%", 'memory_limit = "8GiB"', 24 * GB, 32 * GB, 8 * 1024**3, None),
    ("load_timeout", "load_timeout", ["--load-timeout", "2m"], "30", "load_timeout = 45", 120.0, 30.0, 45.0, 300.0),
    ("stall_timeout", "stall_timeout", ["--stall-timeout", "2m"], "30", "stall_timeout = 45", 120.0, 30.0, 45.0, 60.0),
    ("drain_timeout", "drain_timeout", ["--drain-timeout", "1m"], "0", 'drain_timeout = "5m"', 60.0, 0.0, 300.0, 120.0),
    ("header_timeout", "header_timeout", ["--header-timeout", "10s"], "5s", 'header_timeout = "1m"',
     10.0, 5.0, 60.0, 30.0),
    ("body_timeout", "body_timeout", ["--body-timeout", "2m"], "0", 'body_timeout = "90s"', 120.0, 0.0, 90.0, 60.0),
    ("allowed_hosts", "allowed_hosts", ["--allowed-hosts", "a.lan"], "b.lan,*.c.lan", 'allowed_hosts = ["d.lan"]', ["a.lan"], ["b.lan", "*.c.lan"], ["d.lan"], []),
    ("api_key", "api_key", ["--api-key", "flag-key"], "env-key", 'api_key = "file-key"', "flag-key", "env-key", "file-key", None),
    ("origins", "origins", ["--origins", "http://a.test"], "http://b.test,http://c.test", 'origins = ["http://d.test"]', ["http://a.test"], ["http://b.test", "http://c.test"], ["http://d.test"], []),
    ("models_dirs", "models_dirs", ["--models-dirs", "/m/a,/m/b"], "/e", 'models_dirs = ["/f"]', [Path("/m/a"), Path("/m/b")], [Path("/e")], [Path("/f")], []),
    ("allow_pull", "allow_pull", ["--allow-pull"], "mlx-community/*", 'allow_pull = "org/*"', "*", "mlx-community/*", "org/*", None),
    ("default_model", "default_model", ["--default-model", "f/m"], "e/m", 'default_model = "c/m"', "f/m", "e/m", "c/m", None),
    ("runner_ports", "runner_ports", ["--runner-ports", "40000-40009"], "41000-41009", 'runner_ports = "42000-42009"', (40000, 40009), (41000, 41009), (42000, 42009), None),
    ("host", "port", ["--host", "0.0.0.0:9000"], "127.0.0.1:9001", 'host = "127.0.0.1:9002"', 9000, 9001, 9002, 11434),
    ("prompt_cache", "prompt_cache", ["--prompt-cache", "1GiB"], "10%", 'prompt_cache = "0"', "1GiB", "10%", "0", "25%"),
    ("kv_disk", "kv_disk", ["--kv-disk", "1KiB"], "2KiB", 'kv_disk = "0"', 1024, 2048, 0, 4 * 1024**3),
    ("hosts", "hosts", ["--hosts", "127.0.0.1,10.0.0.2=1KiB"], "127.0.0.1,10.0.0.3",
     'hosts = ["127.0.0.1", "10.0.0.4=2KiB"]',
     [HostSpec("127.0.0.1", "127.0.0.1"), HostSpec("10.0.0.2", "10.0.0.2", 1024)],
     [HostSpec("127.0.0.1", "127.0.0.1"), HostSpec("10.0.0.3", "10.0.0.3")],
     [HostSpec("127.0.0.1", "127.0.0.1"), HostSpec("10.0.0.4", "10.0.0.4", 2048)], []),
]


def parse_flags(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return flags_from_args(parser.parse_args(argv))


def settings(home: Path, argv: list[str], env: dict[str, str], file_line: str | None) -> Settings:
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    if file_line is None:
        config.unlink(missing_ok=True)
    else:
        config.write_text(file_line + "\n")
    return load_settings(parse_flags(["--home", str(home), *argv]), env=env, total_memory=TOTAL)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_precedence_for_every_setting(tmp_path: Path, case: tuple[Any, ...]) -> None:
    name, attr, argv, env_value, file_line, from_flag, from_env, from_file, default = case
    env = {f"CORRAL_{name.upper()}": env_value}
    # all four sources present: the flag wins
    assert getattr(settings(tmp_path, argv, env, file_line), attr) == from_flag
    # no flag: the environment wins over the file
    assert getattr(settings(tmp_path, [], env, file_line), attr) == from_env
    # only the file
    assert getattr(settings(tmp_path, [], {}, file_line), attr) == from_file
    # nothing: the default
    assert getattr(settings(tmp_path, [], {}, None), attr) == default


def test_every_declared_setting_has_a_precedence_case() -> None:
    # home, api_key_file: their own tests below; reserve has no flag (test_reserve_has_no_flag).
    assert {c[0] for c in CASES} | {"home", "reserve", "api_key_file"} == {s.name for s in SETTINGS}


def test_api_key_file_sets_the_key_and_reads_like_any_setting(tmp_path: Path) -> None:
    flag_file, env_file = tmp_path / "flag.key", tmp_path / "env.key"
    flag_file.write_text("from-flag-file\n")
    env_file.write_text("  from-env-file  \nignored second line\n")
    env = {"CORRAL_API_KEY_FILE": str(env_file)}
    s = settings(tmp_path / "h", ["--api-key-file", str(flag_file)], env, None)
    assert (s.api_key, s.api_key_file) == ("from-flag-file", flag_file)
    assert settings(tmp_path / "h", [], env, None).api_key == "from-env-file"
    shown = settings_to_json(settings(tmp_path / "h", [], env, None))
    assert shown["api_key_set"] is True and "from-env-file" not in json.dumps(shown)
    (tmp_path / "empty.key").write_text("\n")
    for bad in (tmp_path / "missing.key", tmp_path / "empty.key"):
        with pytest.raises(BadRequest, match="api_key_file"):
            settings(tmp_path / "h", [], {"CORRAL_API_KEY_FILE": str(bad)}, None)


def test_reserve_has_no_flag_but_env_file_and_default(tmp_path: Path) -> None:
    env = {"CORRAL_RESERVE": "1GB"}
    assert settings(tmp_path, [], env, 'reserve = "2GB"').reserve == GB
    assert settings(tmp_path, [], {}, 'reserve = "2GB"').reserve == 2 * GB
    assert settings(tmp_path, [], {}, None).reserve == 512 * 1024**2
    with pytest.raises(SystemExit):
        parse_flags(["--reserve", "1GB"])


def test_defaults_are_fresh_per_settings() -> None:
    a, b = Settings(), Settings()
    a.pinned.append("x/y")
    assert b.pinned == [] and Settings().origins is not Settings().origins
    assert Settings().home == Path.home() / ".corral"


def test_home_flag_beats_env_and_picks_the_config_file(tmp_path: Path) -> None:
    flag_home, env_home = tmp_path / "flag", tmp_path / "env"
    for home, value in ((flag_home, 7), (env_home, 9)):
        home.mkdir()
        (home / "config.toml").write_text(f"max_loaded_models = {value}\n")
    env = {"CORRAL_HOME": str(env_home)}
    s = load_settings(parse_flags(["--home", str(flag_home)]), env=env, total_memory=TOTAL)
    assert s.home == flag_home and s.max_loaded_models == 7
    s = load_settings(parse_flags([]), env=env, total_memory=TOTAL)
    assert s.home == env_home and s.max_loaded_models == 9


def test_single_model_flag_can_turn_off_what_env_turned_on(tmp_path: Path) -> None:
    s = settings(tmp_path, ["--single-model=false"], {"CORRAL_SINGLE_MODEL": "1"}, None)
    assert s.single_model is False


def test_host_forms(tmp_path: Path) -> None:
    for raw, expected in (("0.0.0.0", ("0.0.0.0", 11434)), (":8080", ("127.0.0.1", 8080)),
                          ("http://localhost:1234/", ("localhost", 1234)),
                          ("[::1]:11500", ("::1", 11500))):
        s = settings(tmp_path, [], {"CORRAL_HOST": raw}, None)
        assert (s.host, s.port) == expected, raw


@pytest.mark.parametrize("env", [
    {"CORRAL_KEEP_ALIVE": "soon"}, {"CORRAL_MAX_QUEUE": "many"}, {"CORRAL_NUM_PARALLEL": "0"},
    {"CORRAL_MEMORY_LIMIT": "150%"}, {"CORRAL_SINGLE_MODEL": "perhaps"},
])
def test_bad_values_are_clear_errors(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        settings(tmp_path, [], env, None)


def test_a_bad_duration_names_its_setting(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="load_timeout"):
        settings(tmp_path, [], {"CORRAL_LOAD_TIMEOUT": "soon"}, None)


def test_broken_config_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match=r"config\.toml"):
        settings(tmp_path, [], {}, "keep_alive = = 3")


def _serve(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "serve", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def test_serve_rejects_bad_configuration(tmp_path: Path) -> None:
    out = _serve([], {"CORRAL_HOME": str(tmp_path), "CORRAL_KEEP_ALIVE": "soon"})
    assert out.returncode == 2
    assert "invalid configuration" in out.stderr and "keep_alive" in out.stderr


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _serve(["--host", f"127.0.0.1:{port}"], {"CORRAL_HOME": str(tmp_path)})
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if "in use" in line]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "CORRAL_HOST" in lines[0]
    assert "Traceback" not in out.stderr


# ---- /api/settings: the running server's settings ------------------------


@pytest.mark.parametrize("source", ["flag", "env", "file"])
async def test_single_model_and_pinned_from_each_source_show_in_api_settings(
        tmp_path: Path, source: str) -> None:
    argv: list[str] = []
    env: dict[str, str] = {}
    line = None
    if source == "flag":
        argv = ["--single-model", "--pinned", "corral-test/tiny"]
    elif source == "env":
        env = {"CORRAL_SINGLE_MODEL": "yes", "CORRAL_PINNED": "corral-test/tiny"}
    else:
        line = 'single_model = true\npinned = "corral-test/tiny"'
    s = settings(tmp_path, argv, env, line)
    store = FakeStore.with_models("corral-test/tiny")
    app = create_app(fake_context(store, FakeScheduler(store), s))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as c:
        got = (await c.get("/api/settings")).json()
        assert got["single_model"] is True and got["pinned"] == ["corral-test/tiny"]
        # and PATCH turns them off again on the running server
        r = await c.patch("/api/settings", json={"single_model": False, "pinned": []})
        assert r.status_code == 200
        got = (await c.get("/api/settings")).json()
        assert got["single_model"] is False and got["pinned"] == []
    assert s.single_model is False and s.pinned == []


async def test_settings_hide_the_api_key(tmp_path: Path) -> None:
    s = settings(tmp_path, ["--api-key", "sekret"], {}, None)
    store = FakeStore.with_models()
    app = create_app(fake_context(store, FakeScheduler(store), s))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c",
                                 headers={"Authorization": "Bearer sekret"}) as c:
        r = await c.get("/api/settings")
        assert r.status_code == 200
        assert "sekret" not in r.text and r.json()["api_key_set"] is True


def test_api_settings_json_of_the_defaults() -> None:
    assert settings_to_json(Settings(home=Path("/srv/corral"))) == {
        "host": "127.0.0.1:11434", "home": "/srv/corral", "keep_alive": 300.0,
        "max_loaded_models": 0, "single_model": False, "pinned": [], "num_parallel": 4,
        "max_queue": 512, "context_length": 0, "memory_limit": None,
        "memory_limit_raw": None, "load_timeout": 300.0, "stall_timeout": 60.0, "drain_timeout": 120.0,
        "header_timeout": 30.0, "body_timeout": 60.0,
        "api_key_set": False, "api_key_file": None, "origins": [], "allowed_hosts": [],
        "models_dirs": [], "allow_pull": None, "default_model": None, "runner_ports": None,
        "reserve": 512 * 1024**2, "prompt_cache": "25%", "kv_disk": 4 * 1024**3, "hosts": [],
    }
    ports = Settings(runner_ports=(40000, 40999))
    assert settings_to_json(ports)["runner_ports"] == "40000-40999"


# One valid value for each setting PATCH may change, and the field values it gives.
PATCHES: dict[str, tuple[Any, dict[str, Any]]] = {
    "keep_alive": ("1h", {"keep_alive": 3600.0}),
    "max_loaded_models": (2, {"max_loaded_models": 2}),
    "single_model": (True, {"single_model": True}),
    "pinned": (["a/b"], {"pinned": ["a/b"]}),
    "memory_limit": ("50%", {"memory_limit": 32 * GB, "memory_limit_raw": "50%"}),
}


def test_patch_changes_exactly_the_runtime_mutable_settings() -> None:
    assert set(PATCHES) == set(RUNTIME_MUTABLE) == {s.name for s in SETTINGS if s.mutable}
    for name, (raw, fields) in PATCHES.items():
        s = Settings()
        assert apply_patch(s, {name: raw}, total_memory=TOTAL) == [name]
        assert {k: getattr(s, k) for k in fields} == fields
    for setting in SETTINGS:
        if not setting.mutable:
            with pytest.raises(BadRequest, match=f"cannot change {setting.name} at run time"):
                apply_patch(Settings(), {setting.name: setting.default}, total_memory=TOTAL)


def test_patch_memory_limit_null_means_physical_memory_again() -> None:
    s = Settings()
    apply_patch(s, {"memory_limit": "8GB"}, total_memory=TOTAL)
    apply_patch(s, {"memory_limit": None}, total_memory=TOTAL)
    assert (s.memory_limit, s.memory_limit_raw) == (None, None)


def test_serve_flags_are_the_declared_ones() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help", "--log-level", "--access-log"}
    assert flags == {s.flag_name for s in SETTINGS if s.flag}
    text = parser.format_help()
    for s in SETTINGS:
        assert (s.env in text) == s.flag, s.name


# ---- the README's configuration table is the declaration -------------------


def _readme_configuration() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]


def _readme_row(setting: Setting) -> list[str]:
    flag = f"`{setting.flag_name}`" if setting.flag else "—"
    return [f"`{setting.env}`", flag, setting.default_text(lambda v: f"`{v}`"), setting.doc]


def test_readme_table_matches_the_declaration_row_by_row() -> None:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in _readme_configuration().splitlines() if line.startswith("| `CORRAL_")]
    assert len(rows) == len(SETTINGS)
    for row, setting in zip(rows, SETTINGS, strict=True):
        assert row == _readme_row(setting), f"README row for {setting.name}"


def test_readme_names_the_runtime_mutable_settings() -> None:
    sentence = _readme_configuration().split("`PATCH /api/settings` changes", 1)[1]
    sentence = sentence.split("at run time", 1)[0]
    assert tuple(re.findall(r"`(\w+)`", sentence)) == RUNTIME_MUTABLE


# ---- the CLI client reads CORRAL_HOST as the server does -------------------


@pytest.mark.parametrize(("raw", "url"), [
    ("", "http://127.0.0.1:11434"),
    (":8080", "http://127.0.0.1:8080"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("localhost:9", "http://localhost:9"),
    ("https://example.test:8443/", "https://example.test:8443"),
    ("[::]:9000", "http://[::1]:9000"),
    ("::1", "http://[::1]:11434"),
])
def test_client_reaches_the_address_serve_binds(tmp_path: Path, raw: str, url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HOST", raw)
    assert base_url() == url
    if raw:
        served = settings(tmp_path, [], {"CORRAL_HOST": raw}, None)
        assert url.endswith(f":{served.port}")


def test_client_rejects_a_bad_address() -> None:
    with pytest.raises(ClientError, match="invalid server address"):
        base_url("localhost:http")


def test_runner_ports_setting() -> None:
    assert Settings().runner_ports is None
    assert load_settings({"runner_ports": "40000-40999"}, env={}).runner_ports == (40000, 40999)
    for bad in ("40000", "a-b", "5-4", "0-10", "1-70000"):
        with pytest.raises(BadRequest, match="runner_ports"):
            load_settings({"runner_ports": bad}, env={})

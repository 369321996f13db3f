"""The `corral` CLI, each command as a subprocess against a real `corral serve`.

One server per module (models from the session's HF cache fixture, pulls from
the loopback fake hub); the interactive session is driven through a
pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import TINY, TINY_B
from tests.support.fake_hub import FakeHub
from tests.support.live_server import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.timeout(240)

CONNECT_ERROR = "could not connect to corral at"


@pytest.fixture(scope="module")
def hub(tiny_model: Path) -> Iterator[FakeHub]:
    with FakeHub() as h:
        h.add_dir("org/cli-pull", tiny_model)
        h.add_dir("org/run-pull", tiny_model)
        h.add_repo("org/gguf-only", {"model.gguf": b"GGUF" + bytes(64)})
        yield h


@pytest.fixture(scope="module")
def cache(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A private copy: this module pulls and deletes models.
    own = tmp_path_factory.mktemp("cli-hf") / "hub"
    shutil.copytree(hf_cache, own, symlinks=True)
    return own


@pytest.fixture(scope="module")
def server(cache: Path, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "CORRAL_MODELS_DIRS": str(tmp_path_factory.getbasetemp())}  # where the tests' models are
    with ServerProcess(tmp_path_factory.mktemp("cli-home"), cache, env=env) as s:
        yield s


def corral(server: ServerProcess | None, *args: str, input: str | None = None,
           env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full.pop("CORRAL_API_KEY", None)
    if server is not None:
        full["CORRAL_HOST"] = f"127.0.0.1:{server.port}"
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=ROOT, env=full, text=True,
                          capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL if input is None else None, input=input)


def _table(stdout: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.strip().splitlines()]


# ---- no server needed -----------------------------------------------------------


COMMANDS = ["serve", "run", "pull", "list", "ps", "stop", "rm", "show", "cp", "create", "version", "top"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    result = corral(None, *([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: corral")
    if command is None:
        assert "exit status" in result.stdout and "3    cannot connect" in result.stdout
        for c in COMMANDS:
            assert c in result.stdout


@pytest.mark.parametrize("args", [["run"], ["bogus"], ["cp", "only-one"], ["create"], ["rm"],
                                  ["run", TINY, "--bogus", "hi"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = corral(None, *args)
    assert result.returncode == 2
    assert "usage: corral" in result.stderr


@pytest.mark.parametrize("args", [["list"], ["ps"], ["run", TINY, "hi"], ["pull", "org/x"], ["show", TINY],
                                  ["stop", TINY], ["rm", TINY], ["cp", TINY, "x"], ["create", "x", "--from", "."]])
def test_server_down_is_one_clear_line_and_exit_3(args: list[str]) -> None:
    port = free_port()
    result = corral(None, *args, env={"CORRAL_HOST": f"127.0.0.1:{port}"})
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{CONNECT_ERROR} http://127.0.0.1:{port}" in lines[0] and "corral serve" in lines[0]


def test_version_without_server() -> None:
    result = corral(None, "--version", env={"CORRAL_HOST": f"127.0.0.1:{free_port()}"})
    assert result.returncode == 0
    assert "client version is" in result.stdout


# ---- against the server -----------------------------------------------------------


def test_version(server: ServerProcess) -> None:
    result = corral(server, "--version")
    assert result.returncode == 0
    assert re.match(r"corral version is \d+\.\d+", result.stdout)


def test_list(server: ServerProcess) -> None:
    result = corral(server, "list")
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert rows[0] == ["NAME", "ID", "SIZE", "MODIFIED"]
    names = {r[0].split(":")[0]: r for r in rows[1:]}
    assert TINY in names and TINY_B in names
    row = names[TINY]
    assert re.fullmatch(r"[0-9a-f]{12}", row[1]), row
    assert re.fullmatch(r"[\d.]+ (B|KB|MB|GB)", row[2]), row
    assert row[3].endswith("ago") or row[3] == "just now"


def test_run_with_prompt_then_ps_then_stop(server: ServerProcess) -> None:
    result = corral(server, "run", TINY, "Hello", "there", "--verbose", "--keepalive", "10m")
    assert result.returncode == 0, result.stderr
    assert "eval rate:" in result.stderr and "tokens/s" in result.stderr
    assert re.search(r"eval count:\s+\d+ token", result.stderr)

    ps = corral(server, "ps")
    assert ps.returncode == 0, ps.stderr
    rows = _table(ps.stdout)
    assert rows[0] == ["NAME", "ID", "SIZE", "CONTEXT", "UNTIL", "PID"]
    row = next(r for r in rows[1:] if r[0].split(":")[0] == TINY)
    assert int(row[3]) > 0
    assert "from now" in row[4] or row[4] == "Forever"
    assert psutil.pid_exists(int(row[5]))

    stop = corral(server, "stop", TINY)
    assert stop.returncode == 0, stop.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if TINY not in corral(server, "ps").stdout:
            break
        time.sleep(0.3)
    assert TINY not in corral(server, "ps").stdout
    assert not psutil.pid_exists(int(row[5])) or psutil.Process(int(row[5])).status() == psutil.STATUS_ZOMBIE


def test_run_reads_stdin_when_not_a_tty(server: ServerProcess) -> None:
    result = corral(server, "run", TINY_B, input="Hello from a pipe\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    assert "Error" not in result.stderr


def test_unknown_model_errors(server: ServerProcess) -> None:
    for args in (["run", "nobody/nothing", "hi"], ["show", "nobody/nothing"], ["stop", "nobody/nothing"],
                 ["rm", "nobody/nothing"], ["cp", "nobody/nothing", "alias-x"]):
        result = corral(server, *args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("Error: "), (args, result.stderr)
        assert "nobody/nothing" in lines[-1] or "not found" in lines[-1] or "does not exist" in lines[-1]


@pytest.mark.parametrize("command", ["stop", "rm"])
def test_stop_and_rm_of_an_unknown_name_say_not_found(server: ServerProcess, command: str) -> None:
    result = corral(server, command, "nobody/nothing")
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: model 'nobody/nothing' not found"


def test_ps_columns_match_the_readme(server: ServerProcess) -> None:
    readme = (ROOT / "README.md").read_text()
    documented = re.search(r"corral ps +# loaded models: ([A-Z ]+)", readme)
    assert documented is not None
    header = corral(server, "ps").stdout.splitlines()[0].split()
    assert header == documented.group(1).split()


def test_serve_with_a_bad_host_is_one_line() -> None:
    result = corral(None, "serve", "--host", "nonsense:abc")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("corral: invalid configuration: host 'nonsense:abc': port 'abc' is not a "
                         "number from 0 to 65535")
    assert not any("Traceback" in line or "invalid literal" in line for line in lines)


def test_serve_help_has_a_description() -> None:
    result = corral(None, "serve", "--help")
    assert result.returncode == 0
    assert "start the server:" in result.stdout and "--access-log" in result.stdout


def test_server_error_on_bad_name(server: ServerProcess) -> None:
    result = corral(server, "show", "../../etc/passwd")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ")


def test_show(server: ServerProcess) -> None:
    result = corral(server, "show", TINY)
    assert result.returncode == 0, result.stderr
    assert "Model" in result.stdout and "architecture" in result.stdout and "llama" in result.stdout
    assert "context length" in result.stdout
    template = corral(server, "show", TINY, "--template")
    assert template.returncode == 0 and "<|im_start|>" in template.stdout
    modelfile = corral(server, "show", TINY, "--modelfile")
    assert modelfile.returncode == 0 and "FROM " in modelfile.stdout
    lic = corral(server, "show", TINY, "--license")
    assert lic.returncode == 0 and "No license" in lic.stdout
    params = corral(server, "show", TINY, "--parameters")
    assert params.returncode == 0


def test_show_license_when_the_model_ships_one(server: ServerProcess, tmp_path: Path) -> None:
    from tests.support.models import make_model

    model = make_model(tmp_path / "licensed", "--license")
    assert corral(server, "create", "licensed-model", "--from", str(model)).returncode == 0
    result = corral(server, "show", "licensed-model", "--license")
    assert result.returncode == 0
    assert result.stdout.strip() and "No license" not in result.stdout
    assert "License" in corral(server, "show", "licensed-model").stdout


def test_cp_then_rm(server: ServerProcess) -> None:
    cp = corral(server, "cp", TINY, "my-alias")
    assert cp.returncode == 0, cp.stderr
    assert "copied" in cp.stdout
    assert "my-alias" in corral(server, "list").stdout
    rm = corral(server, "rm", "my-alias")
    assert rm.returncode == 0, rm.stderr
    assert "deleted 'my-alias'" in rm.stdout
    assert "my-alias" not in corral(server, "list").stdout
    assert TINY in corral(server, "list").stdout  # the source stays


def test_create_from_directory(server: ServerProcess, tiny_model: Path, tmp_path: Path) -> None:
    ok = corral(server, "create", "mine", "--from", str(tiny_model))
    assert ok.returncode == 0, ok.stderr
    assert "mine" in corral(server, "list").stdout
    run = corral(server, "run", "mine", "Hi")
    assert run.returncode == 0, run.stderr
    (tmp_path / "empty").mkdir()
    bad = corral(server, "create", "broken", "--from", str(tmp_path / "empty"))
    assert bad.returncode == 1
    assert bad.stderr.startswith("Error: ") and "config.json" in bad.stderr
    missing = corral(server, "create", "broken", "--from", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no such directory" in missing.stderr
    assert "broken" not in corral(server, "list").stdout


def test_rm_removes_hub_cache_entry_and_stops_it(server: ServerProcess, cache: Path) -> None:
    pulled = corral(server, "pull", "org/cli-pull")
    assert pulled.returncode == 0, pulled.stderr
    assert (cache / "models--org--cli-pull").is_dir()
    assert corral(server, "run", "org/cli-pull", "Hi").returncode == 0
    rm = corral(server, "rm", "--yes", "org/cli-pull")  # it is in the shared HF cache
    assert rm.returncode == 0, rm.stderr
    assert not (cache / "models--org--cli-pull" / "snapshots").exists() or not any(
        (cache / "models--org--cli-pull" / "snapshots").iterdir())
    assert "org/cli-pull" not in corral(server, "ps").stdout
    assert "org/cli-pull" not in corral(server, "list").stdout


def test_pull_progress_and_errors(server: ServerProcess) -> None:
    result = corral(server, "pull", "org/cli-pull")
    assert result.returncode == 0, result.stderr
    # Not a terminal: one line per status, ending in success.
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "pulling manifest" and lines[-1] == "success"
    assert "pulling model.safetensors" in lines and "verifying sha256 digest" in lines
    gguf = corral(server, "pull", "org/gguf-only")
    assert gguf.returncode == 1 and "GGUF" in gguf.stderr
    missing = corral(server, "pull", "org/missing")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_run_pulls_a_missing_model_first(server: ServerProcess) -> None:
    result = corral(server, "run", "org/run-pull", "Hello")
    assert result.returncode == 0, result.stderr
    assert "pulling manifest" in result.stderr and "success" in result.stderr
    assert "org/run-pull" in corral(server, "list").stdout


def test_api_key_is_sent(cache: Path, tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "home", cache, env={"CORRAL_API_KEY": "s3cret"}) as s:
        if httpx.get(s.url + "/api/tags").status_code != 401:
            pytest.skip("this build's server does not enforce CORRAL_API_KEY")
        denied = corral(s, "list")
        assert denied.returncode == 1 and denied.stderr.startswith("Error: ")
        allowed = corral(s, "list", env={"CORRAL_API_KEY": "s3cret"})
        assert allowed.returncode == 0, allowed.stderr
        assert TINY in allowed.stdout


def test_create_with_a_modelfile(server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text(f'FROM {TINY}\nSYSTEM """You herd cattle."""\n'
                                        "PARAMETER temperature 0\nPARAMETER num_predict 3\n")
    ok = corral(server, "create", "herder:v1", "-f", str(tmp_path / "Modelfile"))
    assert ok.returncode == 0, ok.stderr
    assert "herder:v1" in corral(server, "list").stdout
    system = corral(server, "show", "herder:v1", "--system")
    assert system.returncode == 0 and system.stdout.strip() == "You herd cattle."
    params = corral(server, "show", "herder:v1", "--parameters").stdout
    assert "num_predict" in params and "temperature" in params
    run = corral(server, "run", "herder:v1", "--verbose", "Hi", "there")  # flags before the prompt
    assert run.returncode == 0, run.stderr
    assert re.search(r"eval count:\s+[0-3] token", run.stderr), run.stderr
    (tmp_path / "empty").mkdir()
    no_file = subprocess.run([sys.executable, "-m", "corral.supervisor", "create", "x"], cwd=tmp_path / "empty",
                             env={**os.environ, "CORRAL_HOST": f"127.0.0.1:{server.port}"},
                             text=True, capture_output=True, timeout=60)
    assert no_file.returncode == 1 and "Modelfile" in no_file.stderr
    (tmp_path / "Bad").write_text("SYSTEM no from\n")
    bad = corral(server, "create", "x", "-f", str(tmp_path / "Bad"))
    assert bad.returncode == 1 and "FROM" in bad.stderr


# ---- the interactive session, through a pseudo-terminal ------------------------------


def _take_terminal() -> None:
    # In the child, after setsid: make the pty its controlling terminal, so
    # Ctrl-C typed into it is a real SIGINT, as in a user's shell.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`corral run MODEL` on a pty; expect() reads until a pattern shows up."""

    def __init__(self, server: ServerProcess, *args: str, term: str = "dumb") -> None:
        self.master, slave = os.openpty()
        env = {**os.environ, "CORRAL_HOST": f"127.0.0.1:{server.port}", "TERM": term,
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", *args], cwd=ROOT,
                                     env=env, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.seen)
            if match:
                before = self.seen[: match.end()]
                self.seen = self.seen[match.end():]
                return before
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"did not see {pattern!r}; got {self.seen[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"terminal closed before {pattern!r}; got {self.seen[-2000:]!r}")
                self.seen += data.decode(errors="replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def term(server: ServerProcess) -> Iterator[Terminal]:
    t = Terminal(server, TINY)
    try:
        yield t
    finally:
        t.kill()


def test_run_shows_a_spinner_naming_the_model_while_it_loads(server: ServerProcess) -> None:
    corral(server, "stop", TINY)
    deadline = time.monotonic() + 30
    while TINY in corral(server, "ps").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    t = Terminal(server, TINY, term="xterm-256color")
    try:
        t.expect(f"loading {re.escape(TINY)}")
        t.expect(">>> ")
        t.send("/bye\n")
        assert t.wait() == 0
    finally:
        t.kill()


def test_interactive_session(term: Terminal) -> None:
    term.expect(">>> ")
    term.send("/set parameter num_predict 4\n")
    term.expect("Set parameter 'num_predict' to '4'")
    term.send("/set parameter temperature 0\n")
    term.expect("Set parameter 'temperature' to '0'")
    term.send("/show parameters\n")
    term.expect(r"num_predict\s+4")
    term.send("/set system You are terse.\n")
    term.expect("Set system message.")
    term.send("Hello\n")
    term.expect(">>> ")
    # A multi-line message: continuation prompts until the closing quotes.
    term.send('"""\n')
    term.expect(r"\.\.\. ")
    term.send("first line\n")
    term.expect(r"\.\.\. ")
    term.send('second line"""\n')
    term.expect(">>> ")
    term.send("/show info\n")
    term.expect("architecture")
    term.expect(">>> ")
    term.send("/show\n")
    term.expect(r"/show modelfile")
    term.send("/set\n")
    term.expect(r"/set verbose")
    term.send("/show template\n")
    term.expect(r"im_start")
    term.send("/show system\n")
    term.expect("You are terse.")
    term.send("/set verbose\n")
    term.expect("Set 'verbose' mode.")
    term.send("Hello again\n")
    term.expect(r"eval rate:")
    term.send("/set quiet\n")
    term.expect("Set 'quiet' mode.")
    term.send("/clear\n")
    term.expect("Cleared session context")
    term.send("/nonsense\n")
    term.expect("Unknown command")
    term.send("/bye\n")
    assert term.wait() == 0


def test_interactive_ctrl_c_stops_answer_not_session_and_ctrl_d_leaves(term: Terminal) -> None:
    term.expect(">>> ")
    term.send("/set parameter num_predict 100000\n")
    term.expect("Set parameter")
    term.expect(">>> ")
    term.send("Tell me a long story\n")
    term.expect("Tell me a long story\n")  # the terminal's echo
    term.expect(r"\S")  # the first piece of the answer
    assert ">>> " not in term.seen, "the answer ended before Ctrl-C could interrupt it"
    term.send("\x03")
    stopped = term.expect(">>> ", timeout=30)
    assert "Use Ctrl + d" not in stopped  # it stopped the answer, it was not at the prompt
    term.send("/set parameter num_predict 2\n")
    term.expect("Set parameter")
    term.expect(">>> ")
    term.send("Still here?\n")
    term.expect(">>> ")
    term.send("\x04")  # Ctrl-D at the prompt leaves
    assert term.wait() == 0


def test_create_with_shards_pins_the_rank_count(server: ServerProcess, tiny_model: Path) -> None:
    ok = corral(server, "create", "sharded", "--from", str(tiny_model), "--shards", "2")
    assert ok.returncode == 0, ok.stderr
    assert "num_shards" in corral(server, "show", "sharded", "--parameters").stdout
    # this server has no hosts setting: 2 ranks fit nowhere, a clear error rather than one rank
    run = corral(server, "run", "sharded", "Hi")
    assert run.returncode == 1 and "pinned to 2 shards" in run.stderr
    assert corral(server, "rm", "sharded").returncode == 0


def test_tables_go_to_the_stdout_of_the_moment(capsys: pytest.CaptureFixture[str]) -> None:
    """print_table looks sys.stdout up when it prints, not when the module was imported
    (a redirected or captured stdout must get the table)."""
    from corral.supervisor import cli

    cli.print_table(["NAME", "SIZE"], [["a", "1 MB"], ["long-name", "2 GB"]])
    assert capsys.readouterr().out == "NAME         SIZE\na            1 MB\nlong-name    2 GB\n"

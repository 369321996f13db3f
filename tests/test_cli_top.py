"""`corral top` and `corral rm`'s confirmation, as subprocesses against a real `corral serve`.

The live view and the y/N question run on a pseudo-terminal, as a user's shell
would run them; `--once` and the refusal without a terminal run on pipes.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.filesize import decimal as human_size

from tests.conftest import TINY
from tests.support.live_server import ROOT, ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cache(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    own = tmp_path_factory.mktemp("top-hf") / "hub"  # a private copy: this module deletes models
    shutil.copytree(hf_cache, own, symlinks=True)
    return own


@pytest.fixture(scope="module")
def server(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("top-home"), cache) as s:
        yield s


def corral(server: ServerProcess, *args: str, stdin: int | None = subprocess.DEVNULL,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_HOST": f"127.0.0.1:{server.port}", "PYTHONUNBUFFERED": "1"}
    env.pop("CORRAL_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120, stdin=stdin if input is None else None, input=input)


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is its terminal: Ctrl-C is a real SIGINT
    # As a shell starts a program: no signal blocked or ignored. A child inherits both
    # from the test process, where event-loop libraries and job control may leave some.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Pty:
    """`corral ARGS` on a pseudo-terminal; expect() reads until a text shows up."""

    def __init__(self, server: ServerProcess, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
        env = {**os.environ, "CORRAL_HOST": f"127.0.0.1:{server.port}", "TERM": "xterm-256color",
               "PYTHONUNBUFFERED": "1"}
        env.pop("CORRAL_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", *args], cwd=ROOT, env=env,
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=_take_terminal)
        os.close(slave)
        self.seen = ""

    def _read(self, timeout: float) -> bytes | None:
        """What the program wrote within `timeout` (None: nothing; b"": the terminal is closed)."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return None
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the program's side of the pty is closed
            data = b""
        self.seen += data.decode(errors="replace")
        return data

    def expect(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"did not see {text!r}; got {self.seen[-2000:]!r}")
            if self._read(min(left, 0.5)) == b"":
                raise AssertionError(f"terminal closed before {text!r}; got {self.seen[-2000:]!r}")
        self.seen = self.seen[self.seen.index(text) + len(text):]

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30) -> int:
        """The program's exit status. Its output is read meanwhile and to the end, as a
        terminal does, so what it writes while quitting is in `seen` too."""
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"still running after {timeout} s; got {self.seen[-2000:]!r}")
            self._read(min(left, 0.1))
        while self._read(0):  # what it wrote last, until nothing is left or the pty is closed
            pass
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def pty_factory(server: ServerProcess) -> Iterator[type[Pty]]:
    opened: list[Pty] = []

    class Tracked(Pty):
        def __init__(self, *args: str) -> None:
            super().__init__(server, *args)
            opened.append(self)

    yield Tracked  # type: ignore[misc]
    for p in opened:
        p.close()


def load(server: ServerProcess, model: str) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": model, "prompt": "Hi", "stream": False,
                                                       "options": {"num_predict": 3}}, timeout=120)
    assert r.status_code == 200, r.text


def test_top_once_prints_one_frame(server: ServerProcess) -> None:
    load(server, TINY)
    result = corral(server, "top", "--once")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    size = next(m["size"] for m in httpx.get(server.url + "/api/ps").json()["models"]
                if m["name"].startswith(TINY))
    for expected in (TINY, "ready", human_size(size), "limit", "OS free", "recent requests", "ollama"):
        assert expected in out, expected
    assert "\x1b[?1049h" not in out  # one plain frame, no alternate screen


def test_top_once_without_a_server_is_one_line(tmp_path: Path) -> None:
    from tests.support.live_server import free_port

    env = {**os.environ, "CORRAL_HOST": f"127.0.0.1:{free_port()}"}
    result = subprocess.run([sys.executable, "-m", "supervisor", "top", "--once"], cwd=ROOT, env=env,
                            text=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 3 and result.stderr.count("\n") == 1
    assert "could not connect to corral" in result.stderr


def test_top_live_updates_and_q_quits(server: ServerProcess, pty_factory: type[Pty]) -> None:
    load(server, TINY)
    top = pty_factory("top", "--interval", "0.3")
    top.expect(TINY)
    top.expect("q or Ctrl-C quits")
    httpx.post(server.url + "/api/generate", json={"model": TINY, "keep_alive": 0}, timeout=60)
    top.expect("no model is loaded", timeout=10)  # the next frames show the unload
    top.send("q")
    assert top.wait() == 0
    top.expect("\x1b[?1049l", timeout=5)  # the alternate screen was left: the terminal is given back


def test_top_live_ctrl_c_quits_cleanly(server: ServerProcess, pty_factory: type[Pty]) -> None:
    top = pty_factory("top")
    top.expect("q or Ctrl-C quits")
    top.send("\x03")
    assert top.wait() == 0
    assert "Traceback" not in top.seen


def _hub_copy(cache: Path, repo: str) -> Path:
    """A second hub-cache model: a copy of tiny's cache folder under another repo id."""
    org, name = repo.split("/")
    target = cache / f"models--{org}--{name}"
    shutil.copytree(cache / "models--corral-test--tiny", target, symlinks=True)
    return target


def test_rm_of_a_hub_model_refuses_without_a_terminal_or_yes(server: ServerProcess, cache: Path) -> None:
    folder = _hub_copy(cache, "org/rm-refused")
    result = corral(server, "rm", "org/rm-refused")
    assert result.returncode == 1
    assert "shared Hugging Face cache" in result.stderr and "other tools" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: not deleting 'org/rm-refused' without confirmation (stdin is not a terminal): "
        "run `corral rm --yes org/rm-refused` to delete it")
    assert folder.is_dir() and "org/rm-refused" in corral(server, "list").stdout
    yes = corral(server, "rm", "--yes", "org/rm-refused")
    assert yes.returncode == 0, yes.stderr
    assert "deleted 'org/rm-refused'" in yes.stdout and not folder.exists()


def test_rm_of_a_hub_model_asks_on_a_terminal(server: ServerProcess, cache: Path,
                                              pty_factory: type[Pty]) -> None:
    folder = _hub_copy(cache, "org/rm-asked")
    no = pty_factory("rm", "org/rm-asked")
    no.expect("shared Hugging Face cache")
    no.expect("Delete 'org/rm-asked'? [y/N]")
    no.send("\n")
    assert no.wait() == 0
    no.expect("kept 'org/rm-asked'")
    assert folder.is_dir()
    yes = pty_factory("rm", "org/rm-asked")
    yes.expect("[y/N]")
    yes.send("y\n")
    assert yes.wait() == 0
    yes.expect("deleted 'org/rm-asked'")
    assert not folder.exists()


def test_rm_of_a_registered_name_does_not_ask(server: ServerProcess, cache: Path) -> None:
    assert corral(server, "cp", TINY, "top-alias").returncode == 0
    result = corral(server, "rm", "top-alias")
    assert result.returncode == 0, result.stderr
    assert "Hugging Face" not in result.stderr and "deleted 'top-alias'" in result.stdout
    assert (cache / "models--corral-test--tiny").is_dir()  # its source stays

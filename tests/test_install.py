"""corral installs under its own namespace and lives next to supervisord.

supervisord's distribution ships a top-level `supervisor` package; before
corral moved to `corral.supervisor`, installing it into corral's environment
broke `corral --version`. This test makes a throwaway venv, installs both for
real (corral from a wheel built from this checkout, not editable) and runs
both. The venv borrows this environment's already-installed dependencies
through a .pth line, so only the two packages themselves are installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from corral.supervisor import __version__
from corral.supervisor.process import free_port

ROOT = Path(__file__).resolve().parents[1]
# What a wheel of corral is built from (pyproject.toml maps the folders).
SOURCES = ("pyproject.toml", "README.md", "corral", "supervisor", "runner")

pytestmark = pytest.mark.slow


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 240,
         **extra_env: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: no PYTHONPATH or venv of the caller leaks in.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra_env)
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _make_venv(venv: Path) -> Path:
    """A venv without pip whose site-packages also sees this environment's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv)
    # Lines of a .pth file are added to sys.path but their own .pth files are not
    # run, so this environment's editable hook for corral does not come along.
    Path(site.stdout.strip(), "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # This environment's pip, installing into the throwaway venv.
    return _run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                 "--no-deps", *args], cwd)


def _copy_sources(dest: Path) -> Path:
    """The checkout's packaging inputs, so the build writes nothing into the repository."""
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _supervisord_wheel(dest: Path) -> Path:
    """supervisord's wheel from PyPI; skips the test when PyPI cannot be reached."""
    try:  # offline, fail fast: one try, a short socket timeout
        fetched = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--retries", "0",
                        "--timeout", "20", "-d", dest, "supervisor"], dest.parent, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("cannot download supervisord from PyPI: timed out")
    if fetched.returncode != 0:
        pytest.skip(f"cannot download supervisord from PyPI: {fetched.stderr.strip()[-300:]}")
    return next(dest.glob("supervisor-*.whl"))


def test_corral_and_supervisord_share_a_venv(tmp_path: Path) -> None:
    wheel = _supervisord_wheel(tmp_path / "wheels")
    python = _make_venv(tmp_path / "venv")
    installed = _pip(python, str(wheel), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    installed = _pip(python, str(_copy_sources(tmp_path / "src")), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    bin_dir = python.parent
    work = tmp_path / "elsewhere"  # not the checkout: nothing may import from the working tree
    work.mkdir()

    where = _run([python, "-c", "import corral.runner, corral.supervisor, supervisor.supervisord as d\n"
                  "print(corral.supervisor.__file__, corral.runner.__file__, d.__file__, sep='\\n')"],
                 work)
    assert where.returncode == 0, where.stderr
    ours, runner, theirs = (Path(p) for p in where.stdout.split())
    site = tmp_path / "venv"
    assert ours.is_relative_to(site) and runner.is_relative_to(site), where.stdout
    assert ours.parent.parent.name == "corral" and theirs.parent.name == "supervisor"

    # No server listens on a fresh free port: --version reports the client's version.
    version = _run([bin_dir / "corral", "--version"], work, CORRAL_HOST=f"127.0.0.1:{free_port()}")
    assert version.returncode == 0, version.stderr
    assert f"client version is {__version__}" in version.stdout

    supervisord = _run([bin_dir / "supervisord", "--version"], work)
    assert supervisord.returncode == 0, supervisord.stderr
    assert supervisord.stdout.strip()[:1].isdigit()
    conf = _run([bin_dir / "echo_supervisord_conf"], work)
    assert conf.returncode == 0 and "[supervisord]" in conf.stdout, conf.stderr

"""scripts/smoke.sh, the CI smoke script, run as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "scripts" / "smoke.sh"

pytestmark = pytest.mark.timeout(300)


def _smoke(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHON": sys.executable, "CORRAL": f"{sys.executable} -m supervisor",
                "TMPDIR": str(tmp_path), **env}
    for name in ("CORRAL_HOST", "CORRAL_HOME", "HF_HUB_CACHE", "HF_HOME"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run(["bash", str(SMOKE)], cwd=ROOT, env=full_env, text=True,
                          capture_output=True, timeout=280, stdin=subprocess.DEVNULL)


def test_smoke_script_passes_and_cleans_up(tmp_path: Path) -> None:
    result = _smoke(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: OK" in result.stdout
    assert "smoke/tiny" in result.stdout  # listed by `corral list` and `corral ps`
    assert list(tmp_path.glob("corral-smoke.*")) == []  # its temp dir is gone
    # Nothing left running: not the server, not the runner `corral ps` showed.
    server_pid = int(re.search(r"smoke: server pid (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    runner_pid = int(re.search(r"smoke/tiny\S*\s.*\s(\d+)\s*$", result.stdout, re.M).group(1))  # type: ignore[union-attr]
    for pid in (server_pid, runner_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_smoke_script_fails_loudly(tmp_path: Path) -> None:
    # A "corral" that cannot serve: the script must stop with a non-zero status.
    result = _smoke(tmp_path, CORRAL="false")
    assert result.returncode != 0
    assert "smoke:" in result.stderr
    assert list(tmp_path.glob("corral-smoke.*")) == []

"""scripts/demo.sh: stops at once, with a clear message, when its port is taken."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_stops_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as other:  # another server on the demo's port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = {**os.environ, "CORRAL_HOST": f"127.0.0.1:{port}", "CORRAL_HOME": str(tmp_path),
               "CORRAL_VENV": str(tmp_path / "never-made")}
        result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"demo: 127.0.0.1:{port} is already in use (another corral or "
                                     f"ollama?); stop it or set CORRAL_HOST=127.0.0.1:PORT")
    assert not (tmp_path / "never-made").exists()  # nothing installed first

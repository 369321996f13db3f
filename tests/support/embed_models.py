"""Generate the tiny random-weight embedding models tests use (scripts/make_embed_model.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKE = ROOT / "scripts" / "make_embed_model.py"


def make_embed_model(out: Path, *args: str) -> Path:
    """A plain model directory at `out` (extra args go to make_embed_model.py)."""
    subprocess.run([sys.executable, str(MAKE), str(out), *args], check=True, capture_output=True)
    return out


def make_hf_embed_model(cache: Path, repo: str, *args: str) -> Path:
    """A Hugging Face cache entry for `repo` under the hub cache `cache`; returns the snapshot."""
    out = subprocess.run([sys.executable, str(MAKE), "--hf-cache", str(cache), "--repo", repo, *args],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])

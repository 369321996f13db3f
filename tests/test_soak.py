"""The short soak (scripts/soak.py): ~100 requests from 8 clients over three models that evict each
other, all three API families, streams cancelled by the client, one runner SIGSTOPped and one
SIGKILLed. Nothing may hang, leak or fail except what the injected faults cut short."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _soak_module() -> object:
    spec = importlib.util.spec_from_file_location("corral_soak", ROOT / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["corral_soak"] = module
    spec.loader.exec_module(module)
    return module


def test_short_soak(tmp_path: Path) -> None:
    soak = _soak_module()
    random.seed(1)
    # sticky: most requests stay on the model last asked for; ~7 model switches, plus the faults' reloads
    result = soak.soak(100, 8, tmp_path, sticky=0.93)  # type: ignore[attr-defined]
    assert result["requests"] == 100 and result["hung"] == 0, result
    assert result["unexplained_errors"] == 0, result
    assert set(result["errors_by_status"]) <= {500, 503}, result  # 500s only from the faults
    assert len(result["faults"]) == 2, result
    assert result["orphans_after_shutdown"] == 0 and result["runners_reaped"] == result["runners_started"]
    assert result["server_exit"] == 0

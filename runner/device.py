"""What the device the runner computes on can hold, for the supervisor's memory limit.

The supervisor never imports mlx, so runners report these facts: on /status
(`device_facts`, read afresh each time so `free` is current) and, from a
standby runner that serves no HTTP yet, as one stderr line (`facts_line`) once
its imports are done, so the supervisor knows the device before the first
load. The facts: `device` ("metal", "cuda" or "cpu"), `total` bytes,
`recommended` (Metal's recommended working set: what the GPU may use, about
65-75% of RAM; None elsewhere) and `free` (None where the backend cannot tell).

mlx is imported inside device_facts only: the supervisor imports this module
for the stderr line's format.
"""

from __future__ import annotations

import json
from typing import Any

FACTS_PREFIX = "corral-device-facts "
"""Starts the standby's one stderr line that carries its device facts as JSON."""


def device_facts() -> dict[str, Any]:
    import mlx.core as mx
    import psutil

    if mx.default_device() == mx.gpu and mx.metal.is_available():
        info = mx.metal.device_info()
        return {"device": "metal", "total": int(info.get("memory_size", 0)),
                "recommended": int(info.get("max_recommended_working_set_size", 0)) or None, "free": None}
    cuda = getattr(mx, "cuda", None)
    if mx.default_device() == mx.gpu and cuda is not None and cuda.is_available():
        # mlx's CUDA device_info reads total and free memory afresh on each call (NVML, else cudaMemGetInfo)
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        total = int(info.get("memory_size", 0) or info.get("total_memory", 0) or 0)
        free = info.get("free_memory")
        return {"device": "cuda", "total": total, "recommended": None,
                "free": int(free) if free is not None else None}
    ram = psutil.virtual_memory()
    return {"device": "cpu", "total": int(ram.total), "recommended": None, "free": int(ram.available)}


def facts_line(facts: dict[str, Any]) -> str:
    """The stderr line a standby writes (no newline)."""
    return FACTS_PREFIX + json.dumps(facts, separators=(",", ":"))


def parse_facts_line(line: str) -> dict[str, Any] | None:
    """The facts a `facts_line` carries; None for any other line or a malformed one."""
    if not line.startswith(FACTS_PREFIX):
        return None
    try:
        facts = json.loads(line[len(FACTS_PREFIX):])
    except ValueError:
        return None
    if not isinstance(facts, dict) or facts.get("device") not in ("metal", "cuda", "cpu"):
        return None
    return facts

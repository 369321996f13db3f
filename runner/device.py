"""What the device the runner computes on can hold, for the supervisor's memory limit.

The supervisor never imports mlx, so runners report these facts on /status
(`device_facts`): `device` ("metal", "cuda" or "cpu"), `total` bytes,
`recommended` (Metal's recommended working set: what the GPU may use, about
65-75% of RAM; None elsewhere) and `free` (None where the backend cannot tell).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import psutil


def device_facts() -> dict[str, Any]:
    if mx.default_device() == mx.gpu and mx.metal.is_available():
        info = mx.metal.device_info()
        return {"device": "metal", "total": int(info.get("memory_size", 0)),
                "recommended": int(info.get("max_recommended_working_set_size", 0)) or None, "free": None}
    cuda = getattr(mx, "cuda", None)
    if mx.default_device() == mx.gpu and cuda is not None and cuda.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        total = int(info.get("memory_size", 0) or info.get("total_memory", 0) or 0)
        free = info.get("free_memory")
        return {"device": "cuda", "total": total, "recommended": None,
                "free": int(free) if free is not None else None}
    ram = psutil.virtual_memory()
    return {"device": "cpu", "total": int(ram.total), "recommended": None, "free": int(ram.available)}

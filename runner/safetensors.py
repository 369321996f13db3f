"""safetensors headers, read without reading any tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header
(tensor name -> dtype, shape, data_offsets) and then the data. Pure Python
with no mlx import: the runner checks its weights with this before importing
mlx, and the supervisor (which must never import mlx) sizes models with it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bytes per element of every dtype the safetensors format defines. F4 packs two
# values a byte, so its stored size is not shape x bytes (see _tensor_info).
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
}

# A real header is a few MB at most (one entry per tensor); anything larger is
# a corrupt length field, and we refuse to allocate for it.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is not a readable safetensors file; str() names the file and the fault."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "F32", "U32"
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors a safetensors file holds, from its header alone.

    Validates the header length against the file size and every tensor's byte
    range against its shape and dtype, so a truncated or corrupt file fails
    here with a message instead of later inside mlx.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path.name}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(
                    f"{path.name}: corrupt or truncated safetensors header "
                    f"(header length {n}, file size {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path.name}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path.name}: safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    return [_tensor_info(path.name, k, v, data_size) for k, v in header.items() if k != "__metadata__"]


def _tensor_info(fname: str, name: str, entry: Any, data_size: int) -> TensorInfo:
    bad = f"{fname}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{bad}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise SafetensorsError(f"{bad}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsError(f"{bad}: invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"{bad}: invalid data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[1] - offsets[0])
    expected = info.numel * DTYPE_BYTES[dtype]
    if dtype != "F4" and info.nbytes != expected:
        raise SafetensorsError(f"{bad}: {info.nbytes} bytes stored but shape x dtype needs {expected}")
    if offsets[1] > data_size:
        raise SafetensorsError(f"{bad}: data runs past the end of the file (file truncated?)")
    return info

"""What a model costs, read without loading it (STUB: interface fixed, body to implement).

weights come from the safetensors headers (8-byte little-endian length + JSON
header; no tensor data is read); the rest from config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Manifest:
    model_type: str  # config.json model_type, e.g. "llama"
    family: str  # Ollama's details.family, e.g. "llama", "qwen2"
    weight_bytes: int  # sum of tensor byte sizes over all safetensors files
    parameter_count: int  # unquantized parameter count (packed 4-bit weights counted x8)
    quant_bits: int | None  # None when not quantized
    quant_group_size: int | None
    dtype: str  # "float32", "bfloat16", ... (of the non-quantized tensors)
    max_context: int  # max_position_embeddings (or a conservative default)
    num_layers: int
    kv_heads: int
    head_dim: int
    kv_bytes_per_token: int  # 2 x layers x kv_heads x head_dim x dtype bytes (one sequence)

    @property
    def parameter_size(self) -> str:
        """Ollama's details.parameter_size, e.g. "135.3K", "0.6B", "8.0B"."""
        raise NotImplementedError

    @property
    def quantization_level(self) -> str:
        """Ollama's details.quantization_level, e.g. "Q4" (4-bit), "F32", "BF16"."""
        raise NotImplementedError


def read_manifest(model_dir: Path) -> Manifest:
    """Read config.json and safetensors headers. Raises BadRequest/RunnerFailed-free errors:
    ManifestError (a ValueError) with a clear message when the directory is not a usable model."""
    raise NotImplementedError


class ManifestError(ValueError):
    """The directory is not an MLX-loadable language model (message says why)."""

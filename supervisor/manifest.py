"""What a model costs, read without loading it.

weights come from the safetensors headers (corral.runner.safetensors, shared
with the runner's own checks; no tensor data is read); the rest from
config.json. Nothing here imports mlx: the supervisor must stay free of
accelerator memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.runner.embed_spec import KIND_COMPLETION, KIND_EMBEDDING, model_kind
from corral.runner.protocol import DEFAULT_NUM_CTX
from corral.runner.safetensors import SafetensorsError, TensorInfo, read_header

_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_NAME_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}

# When config.json names no context length the runner runs DEFAULT_NUM_CTX
# tokens, so that is the context such a model is sized for.
DEFAULT_CONTEXT = DEFAULT_NUM_CTX
DEFAULT_KV_DTYPE_BYTES = 4  # float32: the largest activation dtype we expect

# Ollama's details.family for model types it files under another name.
_FAMILY = {"mistral": "llama", "mixtral": "llama", "nomic_bert": "nomic-bert"}


class ManifestError(ValueError):
    """The directory is not an MLX-loadable language model (message says why)."""


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
    # Added: what the memory model needs besides the KV cache.
    hidden_size: int = 0
    vocab_size: int = 0
    num_heads: int = 0  # query heads (attention scores scale with these)
    intermediate_size: int = 0  # MLP width (0: unknown)
    kind: str = KIND_COMPLETION  # KIND_EMBEDDING: an embedding model (no KV cache, /api/embed only)

    @property
    def parameter_size(self) -> str:
        """Ollama's details.parameter_size, e.g. "135.3K", "0.6B", "8.0B"."""
        return human_count(self.parameter_count)

    @property
    def quantization_level(self) -> str:
        """Ollama's details.quantization_level, e.g. "Q4" (4-bit), "F32", "BF16"."""
        if self.quant_bits is not None:
            return f"Q{self.quant_bits}"
        return self.dtype.replace("bfloat", "BF").replace("float", "F").upper()


def human_count(n: int) -> str:
    """135_300 -> "135.3K"; from 400M up counts show in billions ("0.5B"), as model names do."""
    for scale, suffix in ((4e8, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            div = 1e9 if suffix == "B" else scale
            return f"{n / div:.1f}{suffix}"
    return str(n)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{model_dir}: no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{model_dir}: config.json is unreadable or not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ManifestError(f"{model_dir}: config.json is not a JSON object")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ManifestError(f"{model_dir}: config.json has no model_type")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The weights mlx_lm loads: model*.safetensors (Mistral-style repos also ship a
    consolidated.safetensors copy, which is neither loaded nor counted)."""
    return sorted(p for p in model_dir.glob("model*.safetensors") if p.is_file())


def read_manifest(model_dir: Path) -> Manifest:
    """Read config.json and safetensors headers. Raises ManifestError (a ValueError)
    with a clear message when the directory is not a usable model."""
    config = read_config(model_dir)
    files = weight_files(model_dir)
    if not files:
        raise ManifestError(f"{model_dir}: no model*.safetensors weights (MLX loads only safetensors)")
    try:
        tensors = [t for f in files for t in read_header(f)]
    except SafetensorsError as e:
        raise ManifestError(str(e)) from e
    text = _text_config(config)
    bits, group = _quantization(config)
    dtype = _activation_dtype(tensors, text, config)
    layers, heads, kv_heads, head_dim, hidden = _attention_shape(text)
    dtype_bytes = _NAME_BYTES.get(dtype, DEFAULT_KV_DTYPE_BYTES)
    model_type = config["model_type"]
    kind = model_kind(model_dir, config)
    if kind == KIND_EMBEDDING:  # embedding models keep no KV cache
        dtype_bytes = 0
    return Manifest(
        model_type=model_type,
        family=_FAMILY.get(model_type, model_type),
        weight_bytes=sum(t.nbytes for t in tensors),
        parameter_count=count_parameters(tensors, bits),
        quant_bits=bits,
        quant_group_size=group,
        dtype=dtype,
        max_context=_max_context(text, config),
        num_layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        hidden_size=hidden,
        vocab_size=_int(text, "vocab_size", "n_vocab") or _int(config, "vocab_size") or 0,
        num_heads=heads,
        intermediate_size=_int(text, "intermediate_size", "ffn_dim", "n_inner") or 0,
        kind=kind,
    )


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config: multimodal configs nest it under text_config."""
    nested = config.get("text_config") or config.get("language_config") or config.get("llm_config")
    if isinstance(nested, dict) and ("num_hidden_layers" in nested or "hidden_size" in nested):
        return {**config, **nested}
    return config


def _int(cfg: Mapping[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _quantization(config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if not isinstance(q, dict):
            tc = config.get("text_config")
            q = tc.get(key) if isinstance(tc, dict) else None
        if isinstance(q, dict):
            bits = _int(q, "bits", "w_bit")
            if bits is not None:
                return bits, _int(q, "group_size", "q_group_size")
    return None, None


def count_parameters(tensors: Iterable[TensorInfo], bits: int | None) -> int:
    """Parameters as the unquantized model would have them.

    A quantized linear stores `weight` packed in uint32 (32/bits values each)
    plus `scales` and `biases` per group; the latter are bookkeeping, not
    parameters, so they are left out.
    """
    tensors = list(tensors)
    packed = {t.name[: -len(".weight")] for t in tensors if t.name.endswith(".weight") and t.dtype == "U32"}
    total = 0
    for t in tensors:
        stem, _, leaf = t.name.rpartition(".")
        if leaf in ("scales", "biases") and stem in packed:
            continue
        if t.dtype == "U32" and bits and stem in packed:
            total += t.numel * (32 // bits)
        else:
            total += t.numel
    return total


def _activation_dtype(tensors: list[TensorInfo], text: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The dtype activations (and so the KV cache) take: that of the floating tensors.

    In a quantized model those are the scales, norms and embeddings, which MLX
    keeps in the model's compute dtype. Weighted by bytes so a stray float32
    buffer in a bfloat16 model does not decide it.
    """
    weight: dict[str, int] = {}
    for t in tensors:
        if t.dtype in _FLOAT_NAMES:
            weight[t.dtype] = weight.get(t.dtype, 0) + t.nbytes
    if weight:
        return _FLOAT_NAMES[max(weight, key=lambda d: weight[d])]
    declared = text.get("torch_dtype") or config.get("torch_dtype") or config.get("dtype")
    return declared if isinstance(declared, str) and declared in _NAME_BYTES else "float32"


def _attention_shape(cfg: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    """(layers, heads, kv_heads, head_dim, hidden) with the common spellings and fallbacks.

    Missing num_key_value_heads means plain multi-head attention; missing
    head_dim means hidden / heads. Both fallbacks can only overestimate.
    """
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model", "dim")
    heads = _int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if layers is None:
        raise ManifestError("config.json gives no layer count (num_hidden_layers)")
    if heads is None and hidden is None:
        raise ManifestError("config.json gives neither hidden_size nor num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
    head_dim = _int(cfg, "head_dim", "kv_channels")
    if heads is None:  # unknown split: one "head" as wide as the model is the same KV size as MHA
        heads, head_dim = 1, head_dim or hidden
    kv_heads = kv_heads or heads
    if head_dim is None:
        head_dim = (hidden or heads) // heads if hidden else 128
    return layers, heads, kv_heads, head_dim, hidden or heads * head_dim


def _max_context(text: Mapping[str, Any], config: Mapping[str, Any]) -> int:
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
    return _int(text, *keys) or _int(config, *keys) or DEFAULT_CONTEXT

"""Cheap checks on a model directory, done before importing mlx.

A runner that cannot load its model must say why in one line within seconds.
Most broken directories (missing config, unknown architecture, truncated
weights, no tokenizer) can be recognised from file metadata alone, which is
far faster and clearer than letting mlx_lm fail deep inside a load.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from corral.runner.embed_spec import ENCODER_MODEL_TYPES
from corral.runner.safetensors import SafetensorsError, read_header

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")

# model_type values mlx_lm maps onto another module (mlx_lm.utils MODEL_REMAPPING).
_REMAPPED = {"mistral": "llama", "llava": "mistral3", "phi-msft": "phixtral", "falcon_mamba": "mamba"}


class ModelDirError(Exception):
    """The model directory cannot be loaded; str() is the one-line reason."""


def read_config(model_dir: Path) -> dict[str, object]:
    """config.json as a dict, or ModelDirError saying what is wrong with it."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return config


def check_model_type(config: dict[str, object], model_dir: Path) -> None:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelDirError(f"{model_dir}/config.json: no model_type")
    if model_type in ENCODER_MODEL_TYPES:  # the runner's own encoder code (runner/embedding.py)
        return
    module = _REMAPPED.get(model_type, model_type).replace("-", "_")
    # Locate mlx_lm without importing it (importing pulls in mlx: slow).
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        raise ModelDirError("mlx_lm is not installed")
    if not any((Path(loc) / "models" / f"{module}.py").is_file() for loc in spec.submodule_search_locations):
        raise ModelDirError(f"{model_dir}: model_type {model_type!r} is not supported by mlx_lm")


def check_safetensors(path: Path) -> None:
    """Header parses and every tensor's bytes lie inside the file."""
    try:
        read_header(path)
    except SafetensorsError as e:
        # The parser names the file; the runner's one line names its full path.
        raise ModelDirError(f"{path.parent}/{e}") from None


def check_model_dir(model_dir: Path) -> dict[str, object]:
    """Raise ModelDirError for a directory that cannot load; return its config."""
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a directory")
    config = read_config(model_dir)
    check_model_type(config, model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ModelDirError(f"{model_dir}: no *.safetensors weight files")
    for path in weights:
        check_safetensors(path)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelDirError(f"{model_dir}: no tokenizer (tokenizer.json or tokenizer.model)")
    return config


def default_num_ctx(config: dict[str, object], cap: int) -> int:
    """min(cap, max_position_embeddings) where the config says it."""
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return min(cap, value)
    text = config.get("text_config")
    if isinstance(text, dict):
        return default_num_ctx(text, cap)
    return cap

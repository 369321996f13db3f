"""Rotary encoder families for embedding models, on MLX: nomic-bert and ModernBERT.

BERT and (XLM-)RoBERTa live in runner/embedding.py; the families here share
what sets them apart from those: rotary position embeddings instead of learned
positions, gated MLPs, fused QKV projections and (mostly) no biases.

Each family is an nn.Module whose parameter names are the Hugging Face
checkpoint's own (after dropping a wrapper prefix such as "model."), so loading
needs no renaming table. The mlx-embeddings package was evaluated and not used:
it has no nomic-bert, and it imports mlx-vlm and transformers 5 at load time.

Every encoder is called as `model(ids, valid)` with right-padded ids
(batch, length) and the (batch, length) bool mask of real tokens, and returns
the last hidden states (batch, length, hidden).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.runner.encoders import modernbert, nomic
from corral.runner.encoders.common import (
    Encoder,
    UnsupportedConfig,
    checkpoint_weights,
    load_weights,
)

__all__ = ["FAMILIES", "Encoder", "UnsupportedConfig", "build", "load"]

_BUILDERS: dict[str, Callable[[dict[str, Any]], Encoder]] = {
    "nomic_bert": nomic.NomicBert.from_config,
    "modernbert": modernbert.ModernBert.from_config,
}

FAMILIES: frozenset[str] = frozenset(_BUILDERS)
"""config.json model_type values built here."""


def build(config: dict[str, Any]) -> Encoder:
    """A randomly initialized encoder for config.json (its model_type must be in FAMILIES)."""
    return _BUILDERS[str(config.get("model_type"))](config)


def load(model_dir: Path, config: dict[str, Any]) -> Encoder:
    model = build(config)
    load_weights(model, checkpoint_weights(model_dir))  # type: ignore[arg-type]
    return model

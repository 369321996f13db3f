"""Is a model directory an embedding model, and how does it pool? (pure Python)

Both sides read this: the runner to pick its mode, the supervisor (which must
never import mlx) to list the model's capability and size its estimate. The
answers come from the model's own files, as sentence-transformers writes them:

- modules.json lists the pipeline: a Transformer, then a Pooling module (its
  folder, e.g. 1_Pooling, holds config.json with pooling_mode_* flags), then
  optionally Normalize. Dense projection modules are not supported (refused).
- sentence_bert_config.json: max_seq_length (inputs longer are truncated).
- config_sentence_transformers.json: named prompts and default_prompt_name;
  the default prompt (a prefix such as "search_query: ") goes before every
  text input.

A directory with modules.json is an embedding model. So is an encoder-only
architecture (BERT and relatives) without it: those cannot generate, and
sentence-transformers wraps such a bare model with mean pooling, as done here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KIND_COMPLETION = "completion"
KIND_EMBEDDING = "embedding"

ENCODER_MODEL_TYPES: frozenset[str] = frozenset({"bert", "roberta", "xlm-roberta", "nomic_bert", "modernbert"})
"""config.json model_type values the runner's own encoder code loads (runner/embedding.py, runner/encoders)."""

POOLING_MODES = ("cls", "mean", "max", "lasttoken")

EMBED_MAX_BATCH = 64
"""Most inputs the runner runs in one forward pass."""

EMBED_BATCH_TOKENS = 8192
"""Most padded tokens (batch x longest input) in one forward pass; bounds activation memory."""

_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_DENSE = "sentence_transformers.models.Dense"


class EmbedSpecError(ValueError):
    """The embedding model's sentence-transformers files are unusable (message says why)."""


@dataclass(frozen=True)
class EmbedSpec:
    pooling: str  # one of POOLING_MODES
    normalize: bool  # the model's own pipeline ends in Normalize (the API normalizes always)
    max_seq_length: int | None  # from sentence_bert_config.json; None: the model's positions decide
    prefix: str  # the default prompt put before every text input ("" when none)
    encoder: bool  # True: an encoder-only architecture (bidirectional); False: a decoder (mlx_lm)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmbedSpecError(f"{path}: unreadable or not valid JSON ({e})") from None


def _modules(model_dir: Path) -> list[dict[str, Any]] | None:
    raw = _json(model_dir / "modules.json")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise EmbedSpecError(f"{model_dir}/modules.json: expected a list of objects")
    return raw


def _pooling_mode(model_dir: Path, modules: list[dict[str, Any]]) -> str:
    pooling = [m for m in modules if m.get("type") == _ST_POOLING]
    if not pooling:
        raise EmbedSpecError(f"{model_dir}/modules.json: no Pooling module")
    folder = str(pooling[0].get("path") or "1_Pooling")
    cfg = _json(model_dir / folder / "config.json")
    if not isinstance(cfg, dict):
        raise EmbedSpecError(f"{model_dir}/{folder}/config.json: missing or not an object")
    flags = {
        "cls": cfg.get("pooling_mode_cls_token"),
        "mean": cfg.get("pooling_mode_mean_tokens"),
        "max": cfg.get("pooling_mode_max_tokens"),
        "lasttoken": cfg.get("pooling_mode_lasttoken"),
    }
    chosen = [mode for mode, on in flags.items() if on is True]
    if cfg.get("pooling_mode_mean_sqrt_len_tokens") is True or cfg.get("pooling_mode_weightedmean_tokens") is True:
        raise EmbedSpecError(f"{model_dir}/{folder}: this pooling mode is not supported")
    if len(chosen) != 1:
        raise EmbedSpecError(f"{model_dir}/{folder}/config.json: expected exactly one pooling mode, got {chosen}")
    return chosen[0]


def _prefix(model_dir: Path) -> str:
    cfg = _json(model_dir / "config_sentence_transformers.json")
    if not isinstance(cfg, dict):
        return ""
    name, prompts = cfg.get("default_prompt_name"), cfg.get("prompts")
    if isinstance(name, str) and isinstance(prompts, dict) and isinstance(prompts.get(name), str):
        return str(prompts[name])
    return ""


def _max_seq_length(model_dir: Path) -> int | None:
    cfg = _json(model_dir / "sentence_bert_config.json")
    value = cfg.get("max_seq_length") if isinstance(cfg, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def embedding_spec(model_dir: Path, config: dict[str, Any] | None = None) -> EmbedSpec | None:
    """The model's embedding pipeline, or None when it is a generative (chat) model.

    Raises EmbedSpecError when the files say "embedding" but cannot be honoured.
    """
    if config is None:
        config = _json(model_dir / "config.json")
        if not isinstance(config, dict):
            return None
    encoder = config.get("model_type") in ENCODER_MODEL_TYPES
    modules = _modules(model_dir)
    if modules is None:
        if not encoder:
            return None
        return EmbedSpec("mean", True, _max_seq_length(model_dir), _prefix(model_dir), True)
    if any(m.get("type") == _ST_DENSE for m in modules):
        raise EmbedSpecError(f"{model_dir}/modules.json: Dense projection modules are not supported")
    return EmbedSpec(
        pooling=_pooling_mode(model_dir, modules),
        normalize=any(m.get("type") == _ST_NORMALIZE for m in modules),
        max_seq_length=_max_seq_length(model_dir),
        prefix=_prefix(model_dir),
        encoder=encoder,
    )


def model_kind(model_dir: Path, config: dict[str, Any] | None = None) -> str:
    """KIND_EMBEDDING or KIND_COMPLETION (an unusable embedding spec still says embedding)."""
    try:
        spec = embedding_spec(model_dir, config)
    except EmbedSpecError:
        return KIND_EMBEDDING
    return KIND_COMPLETION if spec is None else KIND_EMBEDDING

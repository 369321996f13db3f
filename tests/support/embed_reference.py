"""In-process reference embeddings, computed independently of corral's runner code.

- Encoders (BERT, XLM-RoBERTa, nomic-bert, ModernBERT): each architecture's
  forward pass as its Hugging Face modeling code defines it, written out in
  numpy (float64) over the checkpoint's own tensor names, one unpadded input at
  a time: ModernBERT's local layers as an explicit |i - j| <= window / 2 band.
- Decoders (Qwen3): mlx_lm's model, `model.model(ids)` on one unpadded input.

Then the pooling named in 1_Pooling/config.json and L2 normalization, as
sentence-transformers does. Tokenization: the model's tokenizer.json (with
its post-processor), with the default prompt prefix in front.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer


class Reference:
    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self.config = json.loads((model_dir / "config.json").read_text())
        pool_cfg = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        self.pooling = next(m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                             ("lasttoken", "pooling_mode_lasttoken")) if pool_cfg.get(key))
        st = model_dir / "config_sentence_transformers.json"
        self.prefix = ""
        if st.is_file():
            cfg = json.loads(st.read_text())
            name = cfg.get("default_prompt_name")
            self.prefix = cfg["prompts"][name] if name else ""
        max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_len)
        self._decoder: Any = None
        self._weights: dict[str, np.ndarray] | None = None

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(self.prefix + text).ids)

    def embed(self, text: str) -> np.ndarray:
        return self.embed_ids(self.tokens(text))

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        states = {"qwen3": self._decoder_states, "nomic_bert": self._nomic_states,
                  "modernbert": self._modernbert_states}.get(self.config["model_type"], self._bert_states)
        hidden = states(ids)
        if self.pooling == "cls":
            v = hidden[0]
        elif self.pooling == "lasttoken":
            v = hidden[-1]
        else:
            v = hidden.mean(axis=0)
        return v / np.linalg.norm(v)

    def _decoder_states(self, ids: list[int]) -> np.ndarray:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        if self._decoder is None:
            loaded = load_model(self.dir)
            self._decoder = loaded[0] if isinstance(loaded, tuple) else loaded
        out = self._decoder.model(mx.array([ids]))
        return np.array(out[0].astype(mx.float32))

    def _w(self) -> dict[str, np.ndarray]:
        if self._weights is None:
            import mlx.core as mx

            raw = mx.load(str(self.dir / "model.safetensors"))
            self._weights = {k: np.array(v, dtype=np.float64) for k, v in raw.items()}  # type: ignore[union-attr]
        return self._weights

    def _bert_states(self, ids: list[int]) -> np.ndarray:
        c, w = self.config, self._w()
        eps = c["layer_norm_eps"]
        offset = c["pad_token_id"] + 1 if c["model_type"] == "xlm-roberta" else 0
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][
            np.arange(n) + offset] + w["embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, w, "embeddings.LayerNorm", eps)
        heads = c["num_attention_heads"]
        d = c["hidden_size"] // heads
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (_lin(x, w, p + f"attention.self.{t}") for t in ("query", "key", "value"))
            q, k, v = (t.reshape(n, heads, d).transpose(1, 0, 2) for t in (q, k, v))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            a = (probs @ v).transpose(1, 0, 2).reshape(n, heads * d)
            x = _ln(x + _lin(a, w, p + "attention.output.dense"), w, p + "attention.output.LayerNorm", eps)
            h = _lin(x, w, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))  # exact GELU
            x = _ln(x + _lin(h, w, p + "output.dense"), w, p + "output.LayerNorm", eps)
        return x

    def _nomic_states(self, ids: list[int]) -> np.ndarray:
        """Post-norm blocks: norm1(x + attn), norm2(x + fc2(fc11(x) * silu(fc12(x))))."""
        c, w = self.config, self._w()
        eps, heads = c["layer_norm_epsilon"], c["n_head"]
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, w, "emb_ln", eps)
        for i in range(c["n_layer"]):
            p = f"encoder.layers.{i}."
            a = _rotary_attention(_lin(x, w, p + "attn.Wqkv"), heads, c["rotary_emb_base"], window=None)
            x = _ln(x + _lin(a, w, p + "attn.out_proj"), w, p + "norm1", eps)
            gate = _lin(x, w, p + "mlp.fc12")
            h = _lin(x, w, p + "mlp.fc11") * gate / (1.0 + np.exp(-gate))
            x = _ln(x + _lin(h, w, p + "mlp.fc2"), w, p + "norm2", eps)
        return x

    def _modernbert_states(self, ids: list[int]) -> np.ndarray:
        """Pre-norm blocks, GeGLU (gelu of the first half times the second), a final norm."""
        c, w = self.config, self._w()
        eps, heads = c["norm_eps"], c["num_attention_heads"]
        x = _ln(w["embeddings.tok_embeddings.weight"][ids], w, "embeddings.norm", eps)
        for i in range(c["num_hidden_layers"]):
            p = f"layers.{i}."
            is_global = i % c["global_attn_every_n_layers"] == 0
            base = c["global_rope_theta"] if is_global else c["local_rope_theta"]
            h = _ln(x, w, p + "attn_norm", eps) if i > 0 else x
            a = _rotary_attention(_lin(h, w, p + "attn.Wqkv"), heads, base,
                                  window=None if is_global else c["local_attention"] // 2)
            x = x + _lin(a, w, p + "attn.Wo")
            up = _lin(_ln(x, w, p + "mlp_norm", eps), w, p + "mlp.Wi")
            half = up.shape[-1] // 2
            x = x + _lin(_gelu(up[:, :half]) * up[:, half:], w, p + "mlp.Wo")
        return _ln(x, w, "final_norm", eps)


def _rotary_attention(qkv: np.ndarray, heads: int, base: float, window: int | None) -> np.ndarray:
    """Softmax attention over one unpadded input; window: keys further than that are not seen."""
    n = qkv.shape[0]
    d = qkv.shape[1] // 3 // heads
    q, k, v = (qkv[:, j * heads * d:(j + 1) * heads * d].reshape(n, heads, d).transpose(1, 0, 2) for j in range(3))
    q, k = _rotate(q, base), _rotate(k, base)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    if window is not None:
        far = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) > window
        scores = np.where(far[None], -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(n, heads * d)


def _rotate(x: np.ndarray, base: float) -> np.ndarray:
    """Rotary embedding, rotate-half form: pairs (i, i + d/2) turn by position * base^(-2i/d)."""
    n, d = x.shape[1], x.shape[2]
    angles = np.arange(n)[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _gelu(h: np.ndarray) -> np.ndarray:
    return 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))


def _lin(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    bias = w.get(name + ".bias")
    return x @ w[name + ".weight"].T + (0.0 if bias is None else bias)


def _ln(x: np.ndarray, w: dict[str, np.ndarray], name: str, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    bias = w.get(name + ".bias")
    return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + (0.0 if bias is None else bias)


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

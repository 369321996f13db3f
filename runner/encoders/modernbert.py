"""ModernBERT: a pre-norm encoder with rotary positions, GeGLU and alternating attention spans.

Per layer (config.json model_type "modernbert"):

    x = x + Wo(attention(Wqkv(attn_norm(x))))   attn_norm is the identity in layer 0
    x = x + mlp.Wo(act(a) * g)                   a, g = halves of mlp.Wi(mlp_norm(x))

after tok_embeddings and the embeddings' norm, and a final_norm at the end.
Every global_attn_every_n_layers-th layer (0, 3, 6, ...) attends over the whole
input with rotary base global_rope_theta; the others see only keys within
local_attention / 2 positions of the query, with base local_rope_theta.
LayerNorms and linears have biases only when norm_bias, attention_bias and
mlp_bias say so (the released models have none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from corral.runner.encoders.common import activation, key_mask, rotary_attention


@dataclass(frozen=True)
class ModernBertArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_activation: str
    global_every: int
    local_window: int
    global_base: float
    local_base: float
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> ModernBertArgs:
        # transformers >= 5 saves rope_parameters per layer type instead of the *_rope_theta pair
        raw = c.get("rope_parameters")
        rope: dict[str, Any] = raw if isinstance(raw, dict) else {}
        full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        global_base = float(full.get("rope_theta") or c.get("global_rope_theta") or 160000.0)
        local_base = float(sliding.get("rope_theta") or c.get("local_rope_theta") or global_base)
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=int(c["num_attention_heads"]),
            intermediate_size=int(c["intermediate_size"]),
            max_positions=int(c.get("max_position_embeddings") or 8192),
            eps=float(c.get("norm_eps") or 1e-5),
            norm_bias=bool(c.get("norm_bias", False)),
            attention_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            hidden_activation=str(c.get("hidden_activation") or "gelu"),
            global_every=int(c.get("global_attn_every_n_layers") or 1),
            local_window=int(c.get("local_attention") or 0),
            global_base=global_base,
            local_base=local_base,
            layer_types=tuple(str(t) for t in c.get("layer_types") or ()),
        )

    def is_global(self, layer: int) -> bool:
        """layer_types when config.json lists them, else every global_every-th layer from 0."""
        if self.local_window <= 0:
            return True
        if self.layer_types:
            return self.layer_types[layer] != "sliding_attention"
        return layer % self.global_every == 0


class _Embeddings(nn.Module):
    def __init__(self, a: ModernBertArgs) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.norm = nn.LayerNorm(a.hidden_size, eps=a.eps, bias=a.norm_bias)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.norm(self.tok_embeddings(ids))


class _Attention(nn.Module):
    def __init__(self, a: ModernBertArgs, base: float) -> None:
        super().__init__()
        self.heads, self.base = a.num_heads, base
        self.rotary_dims = a.hidden_size // a.num_heads
        self.Wqkv = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=a.attention_bias)
        self.Wo = nn.Linear(a.hidden_size, a.hidden_size, bias=a.attention_bias)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        a = rotary_attention(self.Wqkv(x), self.heads, mask, rotary_dims=self.rotary_dims, base=self.base)
        return self.Wo(a)


class _GeGLU(nn.Module):
    def __init__(self, a: ModernBertArgs) -> None:
        super().__init__()
        self.Wi = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.Wo = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.act = activation(a.hidden_activation)

    def __call__(self, x: mx.array) -> mx.array:
        h, gate = mx.split(self.Wi(x), 2, axis=-1)
        return self.Wo(self.act(h) * gate)


class _Layer(nn.Module):
    def __init__(self, a: ModernBertArgs, index: int) -> None:
        super().__init__()
        self.is_global = a.is_global(index)
        if index > 0:  # layer 0's input is already the normalized embeddings
            self.attn_norm = nn.LayerNorm(a.hidden_size, eps=a.eps, bias=a.norm_bias)
        self.attn = _Attention(a, a.global_base if self.is_global else a.local_base)
        self.mlp_norm = nn.LayerNorm(a.hidden_size, eps=a.eps, bias=a.norm_bias)
        self.mlp = _GeGLU(a)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        normed = self.attn_norm(x) if "attn_norm" in self else x
        x = x + self.attn(normed, mask)
        return x + self.mlp(self.mlp_norm(x))


class ModernBert(nn.Module):
    def __init__(self, args: ModernBertArgs) -> None:
        super().__init__()
        self.args = args
        self.hidden_size = args.hidden_size
        self.max_tokens = args.max_positions
        self.embeddings = _Embeddings(args)
        self.layers = [_Layer(args, i) for i in range(args.num_layers)]
        self.final_norm = nn.LayerNorm(args.hidden_size, eps=args.eps, bias=args.norm_bias)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModernBert:
        return cls(ModernBertArgs.from_config(config))

    def local_mask(self, valid: mx.array, dtype: mx.Dtype) -> mx.array:
        """Additive (batch, 1, length, length) mask hiding padded keys and keys out of the window.

        Every query may always see itself, so a padded query far past the real
        tokens never has all its keys hidden (its row would be NaN and spread
        through the values); real queries see themselves anyway.
        """
        pos = mx.arange(valid.shape[1])
        distance = mx.abs(pos[:, None] - pos[None, :])
        band = (distance <= self.args.local_window // 2)[None, None]
        seen = (valid[:, None, None, :] & band) | (distance == 0)[None, None]
        return mx.where(seen, 0.0, mx.finfo(dtype).min).astype(dtype)

    def __call__(self, ids: mx.array, valid: mx.array) -> mx.array:
        x = self.embeddings(ids)
        full = key_mask(valid, x.dtype)
        local = self.local_mask(valid, x.dtype) if not all(layer.is_global for layer in self.layers) else full
        for layer in self.layers:
            x = layer(x, full if layer.is_global else local)
        return self.final_norm(x)

"""nomic-bert (nomic-embed-text): a post-norm BERT with rotary positions and a SwiGLU MLP.

config.json (model_type "nomic_bert") spells its sizes GPT-2 style: n_embd,
n_layer, n_head, n_inner, n_positions, layer_norm_epsilon (transformers' own
port spells them BERT style; both are read). Per layer:

    x = norm1(x + out_proj(attention(Wqkv(x))))      rotary on q and k
    x = norm2(x + fc2(fc11(x) * silu(fc12(x))))       SwiGLU

after word + token-type embeddings and emb_ln. The released models have no
biases (qkv_proj_bias, mlp_fc1_bias, mlp_fc2_bias false); the flags are
honoured either way. Variants this code does not implement (pre-norm, RMS
norm, interleaved or scaled rotary, a plain MLP) are refused at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from corral.runner.encoders.common import UnsupportedConfig, key_mask, rotary_attention


@dataclass(frozen=True)
class NomicArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    rotary_dims: int
    rotary_base: float
    qkv_bias: bool
    fc1_bias: bool
    fc2_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> NomicArgs:
        _refuse_variants(c)
        hidden = int(c.get("n_embd") or c["hidden_size"])
        heads = int(c.get("n_head") or c["num_attention_heads"])
        fraction = float(c.get("rotary_emb_fraction", 1.0))
        raw = c.get("rope_parameters")
        rope: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(c.get("n_layer") or c["num_hidden_layers"]),
            num_heads=heads,
            intermediate_size=int(c.get("n_inner") or c.get("intermediate_size") or 4 * hidden),
            max_positions=int(c.get("n_positions") or c.get("max_position_embeddings") or 2048),
            type_vocab_size=int(c.get("type_vocab_size") or 0),
            eps=float(c.get("layer_norm_epsilon") or c.get("layer_norm_eps") or 1e-12),
            rotary_dims=int(hidden // heads * fraction),
            rotary_base=float(c.get("rotary_emb_base") or rope.get("rope_theta") or 1000.0),
            qkv_bias=bool(c.get("qkv_proj_bias", False)),
            fc1_bias=bool(c.get("mlp_fc1_bias", False)),
            fc2_bias=bool(c.get("mlp_fc2_bias", False)),
        )


def _refuse_variants(c: dict[str, Any]) -> None:
    why = []
    if c.get("prenorm"):
        why.append("prenorm")
    if c.get("use_rms_norm"):
        why.append("use_rms_norm")
    if c.get("rotary_emb_interleaved"):
        why.append("rotary_emb_interleaved")
    if c.get("rotary_scaling_factor"):
        why.append("rotary_scaling_factor")
    if c.get("causal"):
        why.append("causal")
    if (c.get("activation_function") or "swiglu") != "swiglu" or (c.get("hidden_act") or "silu") != "silu":
        why.append(f"activation {c.get('activation_function') or c.get('hidden_act')!r}")
    if why:
        raise UnsupportedConfig(f"nomic_bert with {', '.join(why)} is not supported")


class _Embeddings(nn.Module):
    def __init__(self, a: NomicArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        if a.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(a.type_vocab_size, a.hidden_size)

    def __call__(self, ids: mx.array) -> mx.array:
        x = self.word_embeddings(ids)
        if "token_type_embeddings" in self:
            x = x + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        return x


class _Attention(nn.Module):
    def __init__(self, a: NomicArgs) -> None:
        super().__init__()
        self.heads, self.rotary_dims, self.base = a.num_heads, a.rotary_dims, a.rotary_base
        self.Wqkv = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=a.qkv_bias)
        self.out_proj = nn.Linear(a.hidden_size, a.hidden_size, bias=a.qkv_bias)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        a = rotary_attention(self.Wqkv(x), self.heads, mask, rotary_dims=self.rotary_dims, base=self.base)
        return self.out_proj(a)


class _SwiGLU(nn.Module):
    def __init__(self, a: NomicArgs) -> None:
        super().__init__()
        self.fc11 = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.fc1_bias)
        self.fc12 = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.fc1_bias)
        self.fc2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.fc2_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.fc11(x) * nn.silu(self.fc12(x)))


class _Block(nn.Module):
    def __init__(self, a: NomicArgs) -> None:
        super().__init__()
        self.attn = _Attention(a)
        self.mlp = _SwiGLU(a)
        self.norm1 = nn.LayerNorm(a.hidden_size, eps=a.eps)
        self.norm2 = nn.LayerNorm(a.hidden_size, eps=a.eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class _Stack(nn.Module):
    def __init__(self, a: NomicArgs) -> None:
        super().__init__()
        self.layers = [_Block(a) for _ in range(a.num_layers)]


class NomicBert(nn.Module):
    def __init__(self, args: NomicArgs) -> None:
        super().__init__()
        self.args = args
        self.hidden_size = args.hidden_size
        self.max_tokens = args.max_positions
        self.embeddings = _Embeddings(args)
        self.emb_ln = nn.LayerNorm(args.hidden_size, eps=args.eps)
        self.encoder = _Stack(args)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NomicBert:
        return cls(NomicArgs.from_config(config))

    def __call__(self, ids: mx.array, valid: mx.array) -> mx.array:
        x = self.emb_ln(self.embeddings(ids))
        mask = key_mask(valid, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x

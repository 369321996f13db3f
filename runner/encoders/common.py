"""What the rotary encoder families share: activations, masks, rotary attention, weight loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_fast_approx, "relu": nn.relu, "silu": nn.silu, "swish": nn.silu,
}


class UnsupportedConfig(ValueError):
    """config.json asks for a variant of the architecture this code does not implement."""


def activation(name: str) -> Callable[[mx.array], mx.array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedConfig(f"activation {name!r} is not supported") from None


def key_mask(valid: mx.array, dtype: mx.Dtype) -> mx.array:
    """Additive (batch, 1, 1, length) mask: padded keys get the dtype's lowest value."""
    return mx.where(valid[:, None, None, :], 0.0, mx.finfo(dtype).min).astype(dtype)


def rotary_attention(qkv: mx.array, heads: int, mask: mx.array, *, rotary_dims: int, base: float) -> mx.array:
    """Self-attention from a fused (batch, length, 3 * hidden) q|k|v projection, rotary on q and k.

    The rotation is the rotate-half (GPT-NeoX) form both families use, over
    the first `rotary_dims` components of each head.
    """
    b, n, three_h = qkv.shape
    d = three_h // 3 // heads
    split = qkv.reshape(b, n, 3, heads, d).transpose(2, 0, 3, 1, 4)  # (3, batch, heads, length, d)
    q, k, v = split[0], split[1], split[2]
    q = mx.fast.rope(q, rotary_dims, traditional=False, base=base, scale=1.0, offset=0)
    k = mx.fast.rope(k, rotary_dims, traditional=False, base=base, scale=1.0, offset=0)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(b, n, heads * d)


class Encoder(Protocol):
    hidden_size: int
    max_tokens: int

    def __call__(self, ids: mx.array, valid: mx.array) -> mx.array: ...


_PREFIXES = ("model.", "bert.")
_DROP = ("head.", "decoder.", "cls.", "pooler.", "lm_head.")  # masked-LM heads: not part of the encoder


def checkpoint_weights(model_dir: Path) -> dict[str, mx.array]:
    """Every tensor of the model's safetensors files, wrapper prefixes dropped, heads left out."""
    out: dict[str, mx.array] = {}
    for path in sorted(model_dir.glob("model*.safetensors")):
        loaded: dict[str, mx.array] = mx.load(str(path))  # type: ignore[assignment]
        for name, w in loaded.items():
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if not name.startswith(_DROP):
                out[name] = w
    return out


def load_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Load exactly the module's parameters (a missing one is an error naming it)."""
    wanted = {str(item[0]) for item in tree_flatten(model.parameters())}
    missing = sorted(wanted - weights.keys())
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensor(s), e.g. {missing[0]!r}")
    model.load_weights([(k, v) for k, v in weights.items() if k in wanted], strict=True)
    model.eval()
    mx.eval(model.parameters())

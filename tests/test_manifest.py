"""supervisor.manifest: weights, parameters and KV cost read from headers and config."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from corral.runner.precheck import ModelDirError, check_model_dir
from corral.runner.safetensors import SafetensorsError, TensorInfo, read_header
from corral.supervisor.manifest import (
    DEFAULT_CONTEXT,
    Manifest,
    ManifestError,
    count_parameters,
    human_count,
    read_manifest,
)

_NUMPY_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I64": 8, "U8": 1}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file of zeros, written by hand (no library involved)."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = _NUMPY_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def llama_params(cfg: dict[str, Any]) -> int:
    """Parameter count of mlx_lm's llama from its config (untied embeddings)."""
    h, inter, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd, heads, kvh = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    attn = h * heads * hd * 2 + h * kvh * hd * 2
    per_layer = attn + 3 * h * inter + 2 * h
    return 2 * v * h + layers * per_layer + h


def config_of(model: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((model / "config.json").read_text())
    return cfg


# --- the generated test models --------------------------------------------


def test_weight_bytes_match_arrays_loaded_with_mlx(tiny_model: Path, tiny_q4_model: Path) -> None:
    for model in (tiny_model, tiny_q4_model):
        arrays = mx.load(str(model / "model.safetensors"))
        assert isinstance(arrays, dict)
        assert read_manifest(model).weight_bytes == sum(a.nbytes for a in arrays.values())


def test_float32_model(tiny_model: Path) -> None:
    cfg = config_of(tiny_model)
    m = read_manifest(tiny_model)
    arrays = mx.load(str(tiny_model / "model.safetensors"))
    assert isinstance(arrays, dict)
    assert m.parameter_count == sum(a.size for a in arrays.values()) == llama_params(cfg)
    assert (m.model_type, m.family, m.dtype) == ("llama", "llama", "float32")
    assert (m.quant_bits, m.quant_group_size, m.quantization_level) == (None, None, "F32")
    assert m.max_context == cfg["max_position_embeddings"]
    assert (m.num_layers, m.kv_heads, m.head_dim) == (2, 4, 16)
    assert m.kv_bytes_per_token == 2 * 2 * 4 * 16 * 4
    assert (m.hidden_size, m.vocab_size, m.num_heads) == (64, cfg["vocab_size"], 4)
    assert m.parameter_size == human_count(m.parameter_count)
    assert m.parameter_size.endswith("K")


def test_quantized_model_counts_packed_weights(tiny_q4_model: Path) -> None:
    cfg = config_of(tiny_q4_model)
    m = read_manifest(tiny_q4_model)
    assert (m.quant_bits, m.quant_group_size, m.quantization_level) == (4, 32, "Q4")
    # Unpacked count equals the float model of the same shape; scales/biases are not parameters.
    assert m.parameter_count == llama_params(cfg)
    # KV and activations run in the dtype of the scales (float32 here).
    assert m.dtype == "float32"
    assert m.kv_bytes_per_token == 2 * 2 * 4 * 32 * 4
    assert m.weight_bytes < m.parameter_count * 4 / 3  # really packed


# --- formatting --------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [(999, "999"), (135_300, "135.3K"), (1_234_567, "1.2M"), (135_300_000, "135.3M"),
     (600_000_000, "0.6B"), (494_000_000, "0.5B"), (8_030_000_000, "8.0B")],
)
def test_human_count(n: int, text: str) -> None:
    assert human_count(n) == text


@pytest.mark.parametrize(
    ("dtype", "bits", "level"),
    [("float32", None, "F32"), ("bfloat16", None, "BF16"), ("float16", None, "F16"), ("bfloat16", 8, "Q8")],
)
def test_quantization_level(dtype: str, bits: int | None, level: str) -> None:
    m = Manifest("llama", "llama", 1, 1, bits, 64 if bits else None, dtype, 4096, 1, 1, 1, 1)
    assert m.quantization_level == level


# --- corrupt files -------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(tiny_model, dst)
    return dst


def test_only_model_safetensors_count(model_copy: Path) -> None:
    before = read_manifest(model_copy).weight_bytes
    shutil.copyfile(model_copy / "model.safetensors", model_copy / "consolidated.safetensors")
    (model_copy / "adapters.safetensors").write_bytes(b"junk that is never read")
    assert read_manifest(model_copy).weight_bytes == before


def test_sharded_weights_are_summed(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("F32", [10, 10])})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": ("BF16", [100])})
    m = read_manifest(tmp_path)
    assert (m.weight_bytes, m.parameter_count) == (400 + 200, 200)


def test_truncated_weights(model_copy: Path) -> None:
    st = model_copy / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="truncated"):
        read_manifest(model_copy)


def test_truncated_inside_header(model_copy: Path) -> None:
    st = model_copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[:40])
    with pytest.raises(ManifestError, match="corrupt or truncated safetensors header"):
        read_manifest(model_copy)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a safetensors file"),
        (b"1234", "not a safetensors file"),
        (struct.pack("<Q", 2**62) + b"{}", "corrupt or truncated"),
        (struct.pack("<Q", 5) + b"nope!", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_corrupt_header(model_copy: Path, content: bytes, match: str) -> None:
    (model_copy / "model.safetensors").write_bytes(content)
    with pytest.raises(ManifestError, match=match):
        read_manifest(model_copy)
    # The runner's pre-load check reads headers with the same parser: same fault,
    # told with the file's full path.
    with pytest.raises(ModelDirError, match=match) as raised:
        check_model_dir(model_copy)
    assert str(model_copy / "model.safetensors") in str(raised.value)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "shape x dtype needs 12"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "past the end"),
        ("x", "not an object"),
    ],
)
def test_bad_tensor_entries(tmp_path: Path, entry: Any, match: str) -> None:
    raw = json.dumps({"w": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(SafetensorsError, match=match):
        read_header(path)


def test_missing_pieces(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ManifestError, match=r"no model\*\.safetensors"):
        read_manifest(model_copy)
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(model_copy)
    (model_copy / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ManifestError, match="no model_type"):
        read_manifest(model_copy)
    (model_copy / "config.json").unlink()
    with pytest.raises(ManifestError, match=r"no config\.json"):
        read_manifest(model_copy)


# --- config variants (hand-written weights) -------------------------------------


def synthetic(tmp_path: Path, config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]] | None = None) -> Manifest:
    d = tmp_path / "synthetic"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    write_safetensors(d / "model.safetensors", tensors or {"embed.weight": ("BF16", [10, 8])})
    return read_manifest(d)


BASE = {"model_type": "qwen2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}


def test_gqa_and_explicit_head_dim(tmp_path: Path) -> None:
    m = synthetic(tmp_path, {**BASE, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 32768})
    assert (m.kv_heads, m.head_dim, m.num_heads, m.max_context) == (2, 128, 16, 32768)
    assert m.dtype == "bfloat16"
    assert m.kv_bytes_per_token == 2 * 24 * 2 * 128 * 2


def test_missing_kv_heads_and_head_dim_fall_back_to_mha(tmp_path: Path) -> None:
    m = synthetic(tmp_path, BASE)
    assert (m.kv_heads, m.head_dim) == (16, 64)
    assert m.max_context == DEFAULT_CONTEXT
    assert m.kv_bytes_per_token == 2 * 24 * 16 * 64 * 2


def test_nested_text_config(tmp_path: Path) -> None:
    cfg = {
        "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8,
                        "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072},
        "quantization": {"bits": 4, "group_size": 64},
    }
    m = synthetic(tmp_path, cfg)
    assert (m.num_layers, m.kv_heads, m.head_dim, m.max_context) == (34, 4, 256, 131072)
    assert (m.quant_bits, m.quant_group_size) == (4, 64)


def test_gpt2_style_names_and_quantization_config(tmp_path: Path) -> None:
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
           "quantization_config": {"bits": 8, "group_size": 64}}
    m = synthetic(tmp_path, cfg, {"w": ("F16", [4, 4])})
    assert (m.num_layers, m.kv_heads, m.head_dim, m.max_context, m.dtype) == (12, 12, 64, 1024, "float16")
    assert m.quantization_level == "Q8"


def test_config_without_layers_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="layer count"):
        synthetic(tmp_path, {"model_type": "llama", "hidden_size": 64})


def test_quantized_dtype_is_that_of_the_scales(tmp_path: Path) -> None:
    tensors = {
        "l.weight": ("U32", [64, 8]),  # 64 x 64 params at 4 bits
        "l.scales": ("BF16", [64, 2]),
        "l.biases": ("BF16", [64, 2]),
        "norm.weight": ("BF16", [64]),
        "norm.bias": ("BF16", [64]),
    }
    m = synthetic(tmp_path, {**BASE, "quantization": {"bits": 4, "group_size": 32}}, tensors)
    assert m.dtype == "bfloat16"
    assert m.parameter_count == 64 * 64 + 64 + 64


def test_count_parameters_unpacks_only_quantized_weights() -> None:
    # A uint32 buffer that is not a layer's weight is counted as stored.
    assert count_parameters([TensorInfo("ids", "U32", (10,), 40)], 4) == 10
    packed = [TensorInfo("q.weight", "U32", (8, 2), 64), TensorInfo("q.scales", "F16", (8, 1), 16)]
    assert count_parameters(packed, 4) == 8 * 2 * 8
    assert count_parameters(packed, 8) == 8 * 2 * 4

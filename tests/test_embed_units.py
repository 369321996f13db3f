"""Embedding pieces without a server: the spec read from sentence-transformers files,
the manifest's kind, the estimate, the store, batching and the API's input parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from corral.runner.embed_spec import (
    EMBED_BATCH_TOKENS,
    EMBED_MAX_BATCH,
    KIND_COMPLETION,
    KIND_EMBEDDING,
    EmbedSpecError,
    embedding_spec,
)
from corral.supervisor.api.embed import _floats, _openai_input
from corral.supervisor.errors import BadRequest, RunnerFailed
from corral.supervisor.manifest import read_manifest
from corral.supervisor.memory import estimate_need
from corral.supervisor.store import ModelStore

from tests.support.embed_models import make_embed_model, make_hf_embed_model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_embed_model(tmp_path_factory.mktemp("m") / "bert", "--family", "bert", "--prefix", "query: ")


def _pooling(d: Path, **flags: bool) -> None:
    cfg = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
           "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": False, **flags}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg))


def test_spec_comes_from_the_model_files(bert_dir: Path, tmp_path: Path) -> None:
    spec = embedding_spec(bert_dir)
    assert spec is not None
    assert (spec.pooling, spec.normalize, spec.encoder, spec.prefix) == ("cls", True, True, "query: ")
    assert spec.max_seq_length == 512


def test_spec_pooling_flags_and_refusals(bert_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    import shutil

    shutil.copytree(bert_dir, d)
    _pooling(d, pooling_mode_mean_tokens=True)
    assert embedding_spec(d).pooling == "mean"  # type: ignore[union-attr]
    _pooling(d, pooling_mode_mean_tokens=True, pooling_mode_cls_token=True)
    with pytest.raises(EmbedSpecError, match="exactly one pooling mode"):
        embedding_spec(d)
    _pooling(d, pooling_mode_lasttoken=True)
    modules = json.loads((d / "modules.json").read_text())
    (d / "modules.json").write_text(json.dumps([*modules, {"path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(EmbedSpecError, match="Dense"):
        embedding_spec(d)
    # A bare encoder without sentence-transformers files: mean pooling, as sentence-transformers wraps it.
    (d / "modules.json").unlink()
    spec = embedding_spec(d)
    assert spec is not None and spec.pooling == "mean" and spec.encoder


def test_chat_model_is_not_an_embedding_model(tiny_model: Path) -> None:
    assert embedding_spec(tiny_model) is None
    assert read_manifest(tiny_model).kind == KIND_COMPLETION


def test_manifest_and_estimate_have_no_kv(bert_dir: Path) -> None:
    m = read_manifest(bert_dir)
    assert m.kind == KIND_EMBEDDING and m.kv_bytes_per_token == 0 and m.family == "bert"
    est = estimate_need(m, 512, 4)
    assert est.kv == 0
    assert est.total == est.weights + est.overhead and est.weights == m.weight_bytes
    # Batch activations do not grow with num_parallel (requests share batches).
    assert estimate_need(m, 512, 1).total == est.total
    assert estimate_need(m, 128, 4).total < est.total


def test_store_lists_embedding_models(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    make_hf_embed_model(cache, "corral-test/emb-bert", "--family", "bert")
    make_hf_embed_model(cache, "corral-test/emb-qwen3", "--family", "qwen3")
    store = ModelStore(tmp_path / "home", cache)
    names = sorted(r.name for r in store.list())
    assert names == ["corral-test/emb-bert", "corral-test/emb-qwen3"]
    for ref in store.list():
        assert store.manifest(ref).kind == KIND_EMBEDDING


def test_batches_respect_size_and_token_limits() -> None:
    from corral.runner.embedding import _batches

    items = sorted([(n, 0, i) for i, n in enumerate([3, 500, 7, 40] * 50)])
    batches = _batches(items)
    assert sorted(i for b in batches for _, _, i in b) == list(range(200))
    for b in batches:
        assert len(b) <= EMBED_MAX_BATCH
        assert len(b) * max(n for n, _, _ in b) <= EMBED_BATCH_TOKENS


def test_cut_renormalizes() -> None:
    import numpy as np
    from corral.runner.embedding import _cut

    v = np.array([[0.6, 0.8, 0.0], [0.5, 0.5, 0.5]], dtype=np.float32)
    assert _cut(v, None) is v
    assert _cut(v, 1).tolist() == [[1.0], [1.0]]
    three = _cut(np.full((1, 4), 0.5, dtype=np.float32), 3)
    assert three.shape == (1, 3) and math.isclose(float((three**2).sum()), 1.0, rel_tol=1e-6)


def test_job_encodes_floats_or_float32_base64() -> None:
    import asyncio
    import base64
    import struct

    import numpy as np
    from corral.runner.embedding import EmbedJob

    loop = asyncio.new_event_loop()
    try:
        def job(encoding: str, dimensions: int | None) -> EmbedJob:
            j = EmbedJob(inputs=[[1], [2]], dimensions=dimensions, loop=loop, future=loop.create_future(),
                         encoding=encoding)
            j.results = [np.array([0.6, 0.8, 0.0], dtype=np.float32), np.array([0.0, 0.0, 1.0], dtype=np.float32)]
            return j

        floats = job("float", None).vectors()
        assert np.allclose(floats, [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
        encoded = job("base64", 2).vectors()
        assert struct.unpack("<2f", base64.b64decode(encoded[0])) == pytest.approx((0.6, 0.8))
        assert _floats(encoded[0]) == pytest.approx([0.6, 0.8])
    finally:
        loop.close()


def test_openai_input_shapes() -> None:
    assert _openai_input({"input": "hi"}) == ["hi"]
    assert _openai_input({"input": ["a", "b"]}) == ["a", "b"]
    assert _openai_input({"input": [1, 2, 3]}) == [[1, 2, 3]]
    assert _openai_input({"input": [[1, 2], [3]]}) == [[1, 2], [3]]
    for bad in ("", [], [1, "a"], [[1], "a"], [[]], None, 3):
        with pytest.raises(BadRequest):
            _openai_input({"input": bad})


def test_base64_is_float32_little_endian() -> None:
    import base64
    import struct

    assert _floats(base64.b64encode(struct.pack("<2f", 1.0, -0.5)).decode()) == [1.0, -0.5]
    for bad in ("not base64!", base64.b64encode(b"12345").decode()):
        with pytest.raises(RunnerFailed):
            _floats(bad)


def test_hugging_face_bert_names_map_both_ways() -> None:
    from corral.runner.embedding import encoder_to_hf_names, hf_to_encoder_names

    hf = {
        "bert.embeddings.word_embeddings.weight": 0,
        "bert.encoder.layer.3.attention.self.query.weight": 1,
        "bert.encoder.layer.3.attention.output.dense.bias": 2,
        "bert.encoder.layer.3.attention.output.LayerNorm.gamma": 3,
        "bert.encoder.layer.3.intermediate.dense.weight": 4,
        "bert.encoder.layer.3.output.dense.weight": 5,
        "bert.encoder.layer.3.output.LayerNorm.beta": 6,
        "bert.pooler.dense.weight": 7,
    }
    ours = hf_to_encoder_names(hf)  # type: ignore[arg-type]
    assert ours == {
        "embeddings.word_embeddings.weight": 0,
        "layers.3.query.weight": 1,
        "layers.3.attn_out.bias": 2,
        "layers.3.attn_norm.weight": 3,
        "layers.3.intermediate.weight": 4,
        "layers.3.out_proj.weight": 5,
        "layers.3.out_norm.bias": 6,
    }
    assert encoder_to_hf_names({"layers.3.out_norm.weight": 1}) == {  # type: ignore[dict-item]
        "encoder.layer.3.output.LayerNorm.weight": 1}


def test_nomic_config_spellings_and_refused_variants() -> None:
    from corral.runner.encoders import UnsupportedConfig
    from corral.runner.encoders.nomic import NomicArgs

    gpt2_style = {"vocab_size": 100, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 96, "n_positions": 2048,
                  "layer_norm_epsilon": 1e-12, "rotary_emb_base": 1000, "rotary_emb_fraction": 0.5,
                  "activation_function": "swiglu", "type_vocab_size": 2}
    a = NomicArgs.from_config(gpt2_style)
    assert (a.hidden_size, a.num_layers, a.intermediate_size, a.rotary_dims, a.rotary_base) == (64, 2, 96, 8, 1000.0)
    bert_style = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 96, "max_position_embeddings": 2048, "layer_norm_eps": 1e-12,
                  "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    b = NomicArgs.from_config(bert_style)
    assert (b.hidden_size, b.intermediate_size, b.rotary_dims, b.rotary_base) == (64, 96, 16, 500.0)
    for variant in ({"prenorm": True}, {"rotary_emb_interleaved": True}, {"rotary_scaling_factor": 2.0},
                    {"activation_function": "gelu"}, {"use_rms_norm": True}):
        with pytest.raises(UnsupportedConfig):
            NomicArgs.from_config({**gpt2_style, **variant})


def test_modernbert_layer_kinds_and_local_mask() -> None:
    import mlx.core as mx
    from corral.runner.encoders.modernbert import ModernBert, ModernBertArgs

    base = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
            "intermediate_size": 24, "global_attn_every_n_layers": 3, "local_attention": 4,
            "global_rope_theta": 160000.0, "local_rope_theta": 10000.0}
    a = ModernBertArgs.from_config(base)
    assert [a.is_global(i) for i in range(4)] == [True, False, False, True]
    assert (a.global_base, a.local_base) == (160000.0, 10000.0)
    v5 = ModernBertArgs.from_config({**base, "layer_types": ["full_attention", "sliding_attention"] * 2,
                                     "rope_parameters": {"full_attention": {"rope_theta": 8.0},
                                                         "sliding_attention": {"rope_theta": 2.0}}})
    assert [v5.is_global(i) for i in range(4)] == [True, False, True, False] and (v5.global_base, v5.local_base) == (8.0, 2.0)

    model = ModernBert(a)
    valid = mx.array([[True] * 3 + [False] * 5])
    seen = (model.local_mask(valid, mx.float32) == 0)[0, 0].tolist()
    # a real query sees real keys within local_attention / 2 = 2 positions
    assert seen[0][:3] == [True, True, True] and seen[2][:3] == [True, True, True]
    assert [row[:3] for row in seen[3:]][:2] == [[False, True, True], [False, False, True]]
    # padded keys are never seen by other queries; a padded query far away sees only itself
    assert not any(seen[q][k] for q in range(8) for k in range(3, 8) if q != k)
    assert seen[7] == [False] * 7 + [True]

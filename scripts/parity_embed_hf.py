"""Parity of corral's rotary encoders (nomic-bert, ModernBERT) with Hugging Face transformers.

For each family: a tiny random-weight model from make_embed_model.py, then the
same inputs through corral's EmbeddingModel (the runner's code: padded batches
of mixed lengths) and through transformers' own model (PyTorch, float32,
eager attention), pooled and normalized as the model's 1_Pooling/config.json
says. Prints the worst cosine for single inputs and for a batch of 64 of mixed
lengths (target >= 0.9999).

transformers loads ModernBERT straight from the directory. Its nomic-bert port
uses BERT-style config names and split q/k/v projections, so the script builds
that model from the directory's config and hands it the checkpoint's tensors
under transformers' names (Wqkv split in three, fc11 -> up_proj, ...).

Needs torch and transformers >= 5 next to corral (not in the test extra):
    pip install torch==2.13.0 transformers && python scripts/parity_embed_hf.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "model",
         "server", "keeps", "models", "in", "memory", "and", "answers", "requests", "for", "them", "café"]


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7) % len(WORDS):] + WORDS * (i % 4))[: 5 + (i * 37) % 300] for i in range(n)]


def make(out: Path, family: str) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_embed_model.py"), str(out), "--family", family,
                    "--default-prompt", "query", "--seed", "13"], check=True, capture_output=True)
    return out


def nomic_hf(model_dir: Path) -> Any:
    import torch
    from safetensors.numpy import load_file
    from transformers import NomicBertConfig, NomicBertModel

    c = json.loads((model_dir / "config.json").read_text())
    config = NomicBertConfig(
        vocab_size=c["vocab_size"], hidden_size=c["n_embd"], num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"], intermediate_size=c["n_inner"], max_position_embeddings=c["n_positions"],
        type_vocab_size=c["type_vocab_size"], layer_norm_eps=c["layer_norm_epsilon"], hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(c["rotary_emb_base"])})
    model = NomicBertModel(config, add_pooling_layer=False)
    renames = {"attn.out_proj": "self_attn.o_proj", "mlp.fc11": "mlp.up_proj", "mlp.fc12": "mlp.gate_proj",
               "mlp.fc2": "mlp.down_proj", "norm1": "post_attention_layernorm", "norm2": "post_mlp_layernorm"}
    state: dict[str, Any] = {}
    for name, w in load_file(str(model_dir / "model.safetensors")).items():
        name = name.replace("encoder.layers.", "layers.").replace("emb_ln.", "embeddings.LayerNorm.")
        if ".attn.Wqkv." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(w, 3, axis=0), strict=True):
                state[name.replace("attn.Wqkv", f"self_attn.{part}")] = torch.from_numpy(chunk.copy())
            continue
        for old, new in renames.items():
            name = name.replace(f".{old}.", f".{new}.")
        state[name] = torch.from_numpy(w.copy())
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [m for m in missing if "position_ids" not in m and "token_type_ids" not in m]
    assert not real_missing and not unexpected, (real_missing, unexpected)
    return model.eval()


def modernbert_hf(model_dir: Path) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()


def hf_vectors(model: Any, ids: list[list[int]], pooling: str, batched: bool) -> np.ndarray:
    import torch

    def run(rows: list[list[int]]) -> np.ndarray:
        longest = max(map(len, rows))
        padded = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
        with torch.no_grad():
            hidden = model(input_ids=padded, attention_mask=mask).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask[..., None].to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1)
        v = pooled.numpy().astype(np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)  # type: ignore[no-any-return]

    return run(ids) if batched else np.concatenate([run([r]) for r in ids])


def check(family: str, model_dir: Path) -> tuple[float, float]:
    from corral.runner.embed_spec import embedding_spec
    from corral.runner.embedding import EmbeddingModel, TokenizerView

    spec = embedding_spec(model_dir)
    assert spec is not None
    ours = EmbeddingModel(model_dir, spec)
    tok = TokenizerView(ours.tokenizer, ours.max_tokens)
    batch = texts(64)
    ids = tok.encode_inputs([spec.prefix + t for t in batch], truncate=True)
    hf = nomic_hf(model_dir) if family == "nomic" else modernbert_hf(model_dir)
    want_single = hf_vectors(hf, ids, spec.pooling, batched=False)
    want_batch = hf_vectors(hf, ids, spec.pooling, batched=True)
    single = np.concatenate([np.array(ours.embed_batch([i]), dtype=np.float64) for i in ids])
    together = np.array(ours.embed_batch(ids), dtype=np.float64)
    worst_single = float(min((single * want_single).sum(1)))
    worst_batch = float(min((together * want_batch).sum(1)))
    print(f"{family:>10}: {len(ids)} inputs of {min(map(len, ids))}-{max(map(len, ids))} tokens; worst cosine "
          f"single {worst_single:.7f}, batch of 64 {worst_batch:.7f}")
    return worst_single, worst_batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["nomic", "modernbert"], action="append")
    args = p.parse_args()
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family or ["nomic", "modernbert"]:
            worst = min(worst, *check(family, make(Path(tmp) / family, family)))
    print("PASS" if worst >= 0.9999 else "FAIL", f"(worst {worst:.7f}, target >= 0.9999)")
    return 0 if worst >= 0.9999 else 1


if __name__ == "__main__":
    sys.exit(main())

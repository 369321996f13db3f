"""Make small random-weight language models that mlx_lm loads.

No model can be downloaded in CI, so tests, benchmarks and the demo use models
made here: a llama-family config, a byte-level BPE tokenizer trained on a
built-in text, a ChatML chat template and safetensors weights. The result is
deterministic for a given seed, so two runs write the same bytes.

Usage:
    python scripts/make_test_model.py OUT_DIR [--hidden 64] [--layers 2] ...
    python scripts/make_test_model.py --hf-cache CACHE_DIR --repo org/name ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# A short built-in corpus: enough for a tokenizer with merges that make real
# multi-byte tokens (including non-ASCII ones, so UTF-8 handling is exercised).
CORPUS = """
The quick brown fox jumps over the lazy dog. A model server keeps models in
memory and answers requests for them. Continuous batching decodes several
sequences together. The supervisor evicts idle models when memory is tight.
Hello, world! How are you today? I am fine, thank you. What is the weather like?
It is sunny and warm. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159.
Unicode text: café, naïve, résumé, Grüße, 東京, 日本語, emoji 🙂 🚀 ✓.
def main():\n    print("hello")\n    return 0\n
{"key": "value", "list": [1, 2, 3], "nested": {"a": true, "b": null}}
Once upon a time there was a small model that wanted to speak. It read every
book in the library and learned to say many things, some of them true.
""" * 4

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]

# ChatML, with tools rendered as JSON in a system block when given; close to
# what many instruct models on the Hub ship.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou can call these tools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The same ChatML with a Qwen3-style thinking switch: the generation prompt opens a
# `<think>` block unless enable_thinking is false, which renders an empty one.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return tok


FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def model_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> dict[str, Any]:
    heads = args.heads
    return {
        "model_type": args.family,
        "architectures": [FAMILIES[args.family]],
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate or args.hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": args.kv_heads or heads,
        "head_dim": args.hidden // heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": args.max_context,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eos_token_id": eos_id,
    }


def write_model(args: argparse.Namespace, out: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import llama, qwen2

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.vocab)
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id("<|im_end|>")
    config = model_config(args, vocab_size, eos_id)
    config = {k: v for k, v in config.items() if v is not None}

    mx.random.seed(args.seed)
    family = qwen2 if args.family == "qwen2" else llama
    model = family.Model(family.ModelArgs.from_dict(config))
    # Larger-than-default init scale makes logits peaked enough that greedy
    # decoding is not decided by float noise, so batched and single runs agree.
    params = tree_map(lambda p: p * args.init_scale if p.ndim >= 2 else p, model.parameters())
    model.update(params)
    mx.eval(model.parameters())

    if args.quantize:
        from mlx_lm.utils import quantize_model

        model, config = quantize_model(model, config, group_size=32, bits=4)
        config.pop("quantization_config", None)

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    if args.family == "qwen2":
        # mlx_lm's pipeline-parallel loader picks each stage's files from this index.
        index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in sorted(weights)}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "unk_token": "<unk>",
                "pad_token": "</s>",
                "model_max_length": args.max_context,
                "chat_template": THINKING_TEMPLATE if args.thinking else CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "</s>"})
    )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    if args.license:
        (out / "LICENSE").write_text("MIT License\n\nRandom weights made for tests.\n")
    (out / "README.md").write_text(
        f"---\nlibrary_name: mlx\ntags: [mlx]\n---\n# {args.repo or out.name}\n"
        "Random-weight test model made by corral's scripts/make_test_model.py.\n"
    )
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hf_cache_entry(src: Path, cache: Path, repo: str) -> Path:
    """Lay out `src` the way huggingface_hub stores a download.

    models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/main = <commit>}. The commit hash is derived from the file hashes so
    the same model always lands in the same snapshot.
    """
    org_name = repo.replace("/", "--")
    root = cache / f"models--{org_name}"
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file())
    digests = {p.name: _sha256(p) for p in files}
    commit = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = blobs / digests[p.name]
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / p.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, snap), link)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="plain model directory to write")
    p.add_argument("--hf-cache", help="write a Hugging Face cache entry under this hub cache dir")
    p.add_argument("--repo", default=None, help="repo id for --hf-cache, e.g. corral-test/tiny-llama")
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama",
                   help="qwen2 supports pipeline as well as tensor parallel in mlx_lm")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    p.add_argument("--intermediate", type=int, default=0, help="0: 2 x hidden")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-scale", type=float, default=4.0)
    p.add_argument("--quantize", action="store_true", help="4-bit, group size 32")
    p.add_argument("--license", action="store_true", help="ship a LICENSE file")
    p.add_argument("--thinking", action="store_true", help="a chat template with a thinking switch")
    args = p.parse_args(argv)
    if not args.out and not args.hf_cache:
        p.error("give OUT_DIR or --hf-cache")
    if args.hf_cache and not args.repo:
        p.error("--hf-cache needs --repo org/name")
    return args


def make(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.hf_cache:
        with tempfile.TemporaryDirectory() as tmp:
            src = write_model(args, Path(tmp) / "model")
            return write_hf_cache_entry(src, Path(args.hf_cache), args.repo)
    return write_model(args, Path(args.out))


def main() -> int:
    path = make(sys.argv[1:])
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make small random-weight embedding models, laid out as sentence-transformers ships them.

Families (--family):
  bert    BERT encoder (bge / e5 / all-MiniLM shape): WordPiece tokenizer that adds
          [CLS] ... [SEP], Hugging Face BERT tensor names, CLS or mean pooling.
  roberta XLM-RoBERTa-style encoder: byte-level BPE with <s> ... </s>, positions
          offset by padding_idx + 1, one token type.
  nomic   nomic-embed-text shape (model_type nomic_bert): rotary positions, SwiGLU,
          fused Wqkv, no biases; WordPiece tokenizer with [CLS] ... [SEP];
          nomic's prompts (search_query: / search_document:), mean pooling.
  modernbert ModernBERT: rotary, GeGLU, global attention every 3rd layer and a
          --local-attention window in the others, pre-norm, no biases; byte-level
          BPE with [CLS] ... [SEP]; nomic's prompts, mean pooling.
  qwen3   Qwen3-Embedding shape: mlx_lm's qwen3 decoder, a tokenizer that appends
          <|endoftext|>, last-token pooling.

Every model gets modules.json, 1_Pooling/config.json, sentence_bert_config.json
and config_sentence_transformers.json when it has prompts: --prefix makes a
default prompt ("query"); nomic and modernbert get nomic's query/document
prompts, with --default-prompt naming the one put before every input (none
by default, as nomic ships them).
Deterministic for a given seed; float32.

Usage:
    python scripts/make_embed_model.py OUT_DIR --family bert [--pooling cls] ...
    python scripts/make_embed_model.py --hf-cache CACHE_DIR --repo org/name --family qwen3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_test_model import CORPUS, write_hf_cache_entry

DEFAULT_POOLING = {"bert": "cls", "roberta": "mean", "qwen3": "lasttoken", "nomic": "mean", "modernbert": "mean"}
DEFAULT_LAYERS = {"modernbert": 4}  # layers 0 and 3 global, 1 and 2 local
NOMIC_PROMPTS = {"query": "search_query: ", "document": "search_document: "}


def wordpiece_tokenizer(vocab_size: int) -> Any:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([CORPUS], trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def bpe_tokenizer(vocab_size: int, specials: list[str], single: str, marks: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(m, tok.token_to_id(m)) for m in marks])
    return tok


def encoder_config(args: argparse.Namespace, vocab: int, roberta: bool) -> dict[str, Any]:
    return {
        "model_type": "xlm-roberta" if roberta else "bert",
        "architectures": ["XLMRobertaModel" if roberta else "BertModel"],
        "vocab_size": vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": args.hidden * 4,
        "max_position_embeddings": args.max_context + (2 if roberta else 0),
        "type_vocab_size": 1 if roberta else 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 1 if roberta else 0,
        "torch_dtype": "float32",
    }


def qwen3_config(args: argparse.Namespace, vocab: int, eos: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": max(1, args.heads // 2),
        "head_dim": args.hidden // args.heads,
        "intermediate_size": args.hidden * 3,
        "max_position_embeddings": args.max_context,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def nomic_config(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "nomic_bert",
        "architectures": ["NomicBertModel"],
        "auto_map": {"AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                     "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel"},
        "vocab_size": vocab,
        "n_embd": args.hidden,
        "n_layer": args.layers,
        "n_head": args.heads,
        "n_inner": args.hidden * 3,
        "n_positions": args.max_context,
        "layer_norm_epsilon": 1e-12,
        "activation_function": "swiglu",
        "rotary_emb_fraction": 1.0,
        "rotary_emb_base": 1000,
        "rotary_emb_interleaved": False,
        "rotary_scaling_factor": None,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "prenorm": False,
        "causal": False,
        "use_rms_norm": False,
        "type_vocab_size": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def modernbert_config(args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    ids = {name: tok.token_to_id(f"[{name.upper()}]") for name in ("cls", "sep", "pad", "mask")}
    return {
        "model_type": "modernbert",
        "architectures": ["ModernBertModel"],
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": args.hidden * 3 // 2,
        "max_position_embeddings": args.max_context,
        "norm_eps": 1e-5,
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_activation": "gelu",
        "global_attn_every_n_layers": 3,
        "local_attention": args.local_attention,
        "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0,
        "classifier_pooling": "mean",
        **{f"{name}_token_id": i for name, i in ids.items()},
        "bos_token_id": ids["cls"],
        "eos_token_id": ids["sep"],
        "torch_dtype": "float32",
    }


def random_weights(model: Any, seed: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    mx.random.seed(seed)
    # Re-draw every matrix at a scale that keeps activations lively through the layers.
    params = tree_map(lambda p: mx.random.normal(p.shape) * 0.2 if p.ndim >= 2 else p, model.parameters())
    model.update(params)
    mx.eval(model.parameters())
    return dict(tree_flatten(model.parameters()))


def write_encoder(args: argparse.Namespace, out: Path, roberta: bool) -> tuple[dict[str, Any], Any]:
    from corral.runner.embedding import Encoder, EncoderArgs, encoder_to_hf_names

    if roberta:
        tok = bpe_tokenizer(args.vocab, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", ["<s>", "</s>"])
    else:
        tok = wordpiece_tokenizer(args.vocab)
    config = encoder_config(args, tok.get_vocab_size(), roberta)
    weights = random_weights(Encoder(EncoderArgs.from_config(config)), args.seed)
    return config, (tok, encoder_to_hf_names(weights))


def write_qwen3(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from mlx_lm.models import qwen3

    end = "<|endoftext|>"
    tok = bpe_tokenizer(args.vocab, [end, "<|im_start|>", "<|im_end|>"], f"$A {end}", [end])
    config = qwen3_config(args, tok.get_vocab_size(), tok.token_to_id(end))
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    return config, (tok, random_weights(model, args.seed))


def write_rotary_encoder(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """nomic or modernbert: the runner's modules carry the checkpoints' own tensor names."""
    from corral.runner import encoders

    if args.family == "nomic":
        tok = wordpiece_tokenizer(args.vocab)
        config = nomic_config(args, tok.get_vocab_size())
    else:
        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        tok = bpe_tokenizer(args.vocab, specials, "[CLS] $A [SEP]", ["[CLS]", "[SEP]"])
        config = modernbert_config(args, tok)
    return config, (tok, random_weights(encoders.build(config), args.seed))


def write_model(args: argparse.Namespace, out: Path) -> Path:
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    if args.family == "qwen3":
        config, (tok, weights) = write_qwen3(args)
    elif args.family in ("nomic", "modernbert"):
        config, (tok, weights) = write_rotary_encoder(args)
    else:
        config, (tok, weights) = write_encoder(args, out, roberta=args.family == "roberta")
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": args.max_context}, indent=2))
    _sentence_transformers_files(args, out)
    (out / "README.md").write_text(
        f"---\nlibrary_name: sentence-transformers\ntags: [sentence-transformers]\n---\n# {args.repo or out.name}\n"
        "Random-weight embedding test model made by corral's scripts/make_embed_model.py.\n")
    return out


def _sentence_transformers_files(args: argparse.Namespace, out: Path) -> None:
    pooling = args.pooling or DEFAULT_POOLING[args.family]
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": args.hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
    }, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": args.max_seq_length or args.max_context, "do_lower_case": False}))
    prompts = dict(NOMIC_PROMPTS) if args.family in ("nomic", "modernbert") else {}
    default = args.default_prompt
    if args.prefix:
        prompts = {"query": args.prefix, "document": ""}
        default = "query"
    if prompts:
        (out / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": prompts, "default_prompt_name": default}, indent=2))


def write_hf_tree(src: Path, cache: Path, repo: str) -> Path:
    """The hub cache layout; files in sub-folders (1_Pooling/) are linked like the rest."""
    import os
    import shutil

    snap = write_hf_cache_entry(src, cache, repo)
    for sub in (p for p in src.iterdir() if p.is_dir()):
        target = snap / sub.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(sub, target)
        os.utime(target)
    return snap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="plain model directory to write")
    p.add_argument("--hf-cache", help="write a Hugging Face cache entry under this hub cache dir")
    p.add_argument("--repo", default=None, help="repo id for --hf-cache")
    p.add_argument("--family", choices=sorted(DEFAULT_POOLING), default="bert")
    p.add_argument("--pooling", choices=["cls", "mean", "max", "lasttoken"], default=None)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="default 2 (modernbert: 4)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=600)
    p.add_argument("--max-context", type=int, default=512, help="position embeddings")
    p.add_argument("--max-seq-length", type=int, default=0, help="sentence_bert_config max_seq_length")
    p.add_argument("--prefix", default="", help="default prompt put before each text")
    p.add_argument("--default-prompt", default=None, help="nomic/modernbert: the prompt name used by default")
    p.add_argument("--local-attention", type=int, default=16, help="modernbert: local attention window")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = DEFAULT_LAYERS.get(args.family, 2)
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
            return write_hf_tree(src, Path(args.hf_cache), args.repo)
    return write_model(args, Path(args.out))


def main() -> int:
    print(make(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

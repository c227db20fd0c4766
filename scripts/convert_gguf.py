"""Import a llama-architecture GGUF file (llama.cpp's format) as a fastllama float checkpoint.

Tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...) are read with the `gguf` package and dequantized to
float32; GGUF already stores q/k in the adjacent-pairs rotary layout model.py uses, so no permute.
The model config comes from the GGUF metadata; the byte-level BPE tokenizer (vocab, merges, special
tokens, pre-tokenizer) and the chat template are written as tokenizer.json / tokenizer_config.json.

Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
Usage: python scripts/convert_gguf.py --gguf model.Q4_1.gguf --checkpoint_dir checkpoints/NAME
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import save_checkpoint  # noqa: E402
from convert_hf_checkpoint import layer_names  # noqa: E402
from model import ModelArgs  # noqa: E402

TENSOR_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}
# llama.cpp's pre-tokenizer names -> the split that matches them (llama-vocab.cpp)
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL_TOKEN = 3


def read_metadata(reader) -> dict:
    """GGUF key/value metadata as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def model_args_from_gguf(meta: dict, tensor_names: set) -> ModelArgs:
    """ModelArgs from llama.* metadata; ValueError for what we cannot represent."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama")
    if "rope_freqs.weight" in tensor_names or meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError("GGUF rope scaling (Llama 3.1 rope_freqs, linear, yarn) is not supported; "
                         "convert the Hugging Face repo with scripts/prepare.sh instead")
    n_head = meta["llama.attention.head_count"]
    dim = meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or dim // n_head
    return ModelArgs(
        vocab_size=meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        n_layer=meta["llama.block_count"],
        n_head=n_head,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_head),
        dim=dim,
        intermediate_size=meta["llama.feed_forward_length"],
        head_dim=head_dim,
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        tie_embeddings="output.weight" not in tensor_names,
        block_size=meta.get("llama.context_length", 2048),
    )


def dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as a float32 torch tensor in (out_features, in_features) order."""
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists dims innermost first
    data = gguf_dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a writable copy


def convert_tensors(reader, args: ModelArgs) -> dict:
    """model.py state dict from the GGUF tensors; q, k, v fused into wqkv."""
    tensors = {t.name: t for t in reader.tensors}
    sd = {}
    for src, dst in layer_names(TENSOR_MAP, args.n_layer):
        if src in tensors:
            sd[dst] = dequantize(tensors[src])
    for i in range(args.n_layer):
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [dequantize(tensors[f"blk.{i}.attn_{p}.weight"]) for p in "qkv"]
        )
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def build_tokenizer_json(meta: dict) -> str:
    """A Hugging Face tokenizers JSON for a GGUF byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama3", "llama-v3", "llama-bpe"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: gpt2, llama-bpe, {', '.join(DIGITS_THEN_GPT2)}")
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN])
    return tok.to_str()


def build_tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: special tokens, whether to prepend BOS, and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def name(key):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if idx is not None else None

    return {
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def convert_gguf(gguf_file: Path, checkpoint_dir: Path) -> Path:
    """Write model.pth, model_config.json and tokenizer files for gguf_file into checkpoint_dir."""
    from gguf import GGUFReader

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} not found")
    reader = GGUFReader(gguf_file)
    meta = read_metadata(reader)
    args = model_args_from_gguf(meta, {t.name for t in reader.tensors})
    sd = convert_tensors(reader, args)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "tokenizer.json").write_text(build_tokenizer_json(meta))
    (checkpoint_dir / "tokenizer_config.json").write_text(json.dumps(build_tokenizer_config(meta), indent=2) + "\n")
    qtypes = sorted({t.tensor_type.name for t in reader.tensors})
    fmt = {"dtype": "float32", "source": "gguf", "gguf_file": gguf_file.name, "gguf_tensor_types": qtypes,
           "name": re.sub(r"\s+", " ", str(meta.get("general.name", "")))}
    return save_checkpoint(checkpoint_dir, sd, args, fmt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="folder to write the checkpoint into")
    return parser


if __name__ == "__main__":
    a = build_parser().parse_args()
    try:
        print(f"wrote {convert_gguf(a.gguf, a.checkpoint_dir)}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

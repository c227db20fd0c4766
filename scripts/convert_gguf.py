"""Import a llama-architecture GGUF file (llama.cpp's format) as a fastllama float checkpoint.

Tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...) are read with the `gguf` package and dequantized to
float32 into model.pth; GGUF already stores q/k in the adjacent-pairs rotary layout model.py uses, so no
permute. When every linear layer is Q4_0/Q4_1 (or every one Q8_0) and the embedding Q8_0, the blocks
are also copied as they are into model_gguf.pth, an int4 group-32 (or int8) checkpoint for quantize.py's
modules: the same numbers as the file, no float detour.
The model config comes from the GGUF metadata; the byte-level BPE tokenizer (vocab, merges, special
tokens, pre-tokenizer) and the chat template are written as tokenizer.json / tokenizer_config.json.

Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
Usage: python scripts/convert_gguf.py --gguf model.Q4_1.gguf --checkpoint_dir checkpoints/NAME
"""
import argparse
import contextlib
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from convert_hf_checkpoint import layer_names

import files
from checkpoint import Checkpoint, Format, Quantization, save_checkpoint
from files import BadFile, first_line
from layers import pack_int4
from model import ModelArgs
from tokenizer import chat_template_of


class Unsupported(ValueError):
    """A readable GGUF file of a kind fastllama does not run."""


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
    """ModelArgs from llama.* metadata; Unsupported for what we cannot represent."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise Unsupported(f"unsupported GGUF architecture {arch!r}; supported: llama")
    if "rope_freqs.weight" in tensor_names or meta.get("llama.rope.scaling.type", "none") != "none":
        raise Unsupported("GGUF rope scaling (Llama 3.1 rope_freqs, linear, yarn) is not supported; "
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


# GGUF block types that map onto our quantized formats without a float detour: bytes per block of 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def gguf_blocks(tensor) -> tuple[str, np.ndarray]:
    """(type name, raw blocks (N, K // 32, bytes per block) uint8) of a Q4_0 / Q4_1 / Q8_0 tensor."""
    kind = tensor.tensor_type.name
    N, K = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dims innermost first
    return kind, np.asarray(tensor.data, dtype=np.uint8).reshape(N, K // 32, BLOCK_BYTES[kind])


def _halves(raw: np.ndarray, offset: int) -> torch.Tensor:
    """The float16 field at byte offset of every block, as float32 (N, K // 32)."""
    field = np.ascontiguousarray(raw[..., offset:offset + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(field.astype(np.float32))


def q4_blocks_to_int4(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor as our int4 group-32 pair (packed q (N, K // 2), scales_and_zeros (K // 32, N, 2)).

    Q4_1 stores w = q * d + m, Q4_0 w = (q - 8) * d; ours is w = (q - 8) * s + z, so s = d and
    z = m + 8 d (Q4_1) or 0 (Q4_0): the same numbers, no rounding. In a block, byte j holds element j
    in its low nibble and element j + 16 in its high nibble.
    """
    kind, raw = gguf_blocks(tensor)
    N, B = raw.shape[:2]
    d = _halves(raw, 0)
    m = _halves(raw, 2) if kind == "Q4_1" else -8 * d
    qs = torch.from_numpy(np.ascontiguousarray(raw[..., -16:]))  # (N, B, 16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(N, B * 32)  # (N, K)
    sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()  # (B, N, 2)
    return pack_int4(q), sz


def q8_blocks_to_int8(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor as int8 q (N, K) and per-block scales (N, K // 32): w = q * d, exactly."""
    _, raw = gguf_blocks(tensor)
    N, B = raw.shape[:2]
    q = torch.from_numpy(np.ascontiguousarray(raw[..., 2:]).view(np.int8)).reshape(N, B * 32)
    return q, _halves(raw, 0)


def quantized_layout(reader) -> Quantization | None:
    """The quantization entry for importing a GGUF without dequantizing, or None if its types don't allow it.

    Every linear layer must be Q4_0/Q4_1 (-> int4 group 32) or every one Q8_0 (-> int8 per block of 32),
    and the embedding / output layer Q8_0 (our int4 checkpoints keep those int8, as such files do)."""
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    layers = {k for n, k in kinds.items() if n.startswith("blk.") and not n.endswith("norm.weight")}
    ends = {kinds.get("token_embd.weight"), kinds.get("output.weight", "Q8_0")}
    if ends != {"Q8_0"}:
        return None
    if layers <= {"Q4_0", "Q4_1"}:
        return Quantization("int4", groupsize=32, int8_groupsize=32)
    if layers == {"Q8_0"}:
        return Quantization("int8", int8_groupsize=32)
    return None


def convert_quantized_tensors(reader, args: ModelArgs, quantization: Quantization) -> dict:
    """Our quantized state dict straight from the GGUF blocks (see quantized_layout)."""
    tensors = {t.name: t for t in reader.tensors}
    sd = {}

    def linear(dst: str, srcs: list[str]) -> None:
        if quantization.kind == "int4":
            parts = [q4_blocks_to_int4(tensors[s]) for s in srcs]
            sd[f"{dst}.weight"] = torch.cat([p[0] for p in parts])
            sd[f"{dst}.scales_and_zeros"] = torch.cat([p[1] for p in parts], dim=1)
        else:
            parts = [q8_blocks_to_int8(tensors[s]) for s in srcs]
            sd[f"{dst}.weight"] = torch.cat([p[0] for p in parts])
            sd[f"{dst}.scales"] = torch.cat([p[1] for p in parts])

    for src, dst in layer_names(TENSOR_MAP, args.n_layer):
        if src not in tensors:
            continue
        if src.endswith("norm.weight"):
            sd[dst] = dequantize(tensors[src])
        elif src in ("token_embd.weight", "output.weight"):
            sd[dst], sd[dst.replace(".weight", ".scales")] = q8_blocks_to_int8(tensors[src])
        else:
            linear(dst.removesuffix(".weight"), [src])
    for i in range(args.n_layer):
        linear(f"layers.{i}.attention.wqkv", [f"blk.{i}.attn_{p}.weight" for p in "qkv"])
    return sd


def convert_tensors(reader, args: ModelArgs) -> dict:
    """model.py state dict from the GGUF tensors; q, k, v fused into wqkv (a tied model has no output.weight)."""
    tensors = {t.name: t for t in reader.tensors}
    sd = {}
    for src, dst in layer_names(TENSOR_MAP, args.n_layer):
        if src in tensors:
            sd[dst] = dequantize(tensors[src])
    for i in range(args.n_layer):
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [dequantize(tensors[f"blk.{i}.attn_{p}.weight"]) for p in "qkv"]
        )
    return sd


def build_tokenizer_json(meta: dict) -> str:
    """A Hugging Face tokenizers JSON for a GGUF byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise Unsupported(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
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
        raise Unsupported(f"GGUF pre-tokenizer {pre!r} is not supported; supported: gpt2, llama-bpe, "
                         f"{', '.join(DIGITS_THEN_GPT2)}")
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

    template = meta.get("tokenizer.chat_template")  # a file without one: no key (a null one is no template)
    return {"bos_token": name("bos"), "eos_token": name("eos"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            **({"chat_template": template} if template is not None else {})}


FETCH_AGAIN = "download or copy it again (a GGUF file from llama.cpp's convert_hf_to_gguf.py)"
GGUF_WEIGHTS = "model_gguf.pth"  # the file's own int4 / int8 weights, when its block types allow


@contextlib.contextmanager
def reading(gguf_file: Path):
    """Errors met while reading gguf_file, as BadFile naming it: what we cannot represent (Unsupported), or the gguf
    reader's own errors on a damaged or cut-short file (KeyError, IndexError, ...)."""
    try:
        yield
    except Unsupported as e:
        raise BadFile(gguf_file, str(e), "use a llama-architecture GGUF (or the model's Hugging Face repo)") from None
    except Exception as e:
        raise BadFile(gguf_file, f"not a readable GGUF file ({first_line(e)})", FETCH_AGAIN) from None


def read_gguf(gguf_file: Path):
    """(reader, metadata, ModelArgs) of a GGUF file; BadFile when it is damaged or of a model we cannot run."""
    from gguf import GGUFReader

    with reading(gguf_file):
        reader = GGUFReader(gguf_file)
        meta = read_metadata(reader)
        return reader, meta, model_args_from_gguf(meta, {t.name for t in reader.tensors})


def convert_gguf(gguf_file: Path, checkpoint_dir: Path) -> Path:
    """Write model.pth (float32), model_gguf.pth (the file's quantized blocks, when it can) and tokenizer files."""

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} not found")
    reader, meta, args = read_gguf(gguf_file)
    with reading(gguf_file):  # everything is read before anything is written: a bad file leaves the folder as it was
        sd = convert_tensors(reader, args)
        quantization = quantized_layout(reader)
        qsd = convert_quantized_tensors(reader, args, quantization) if quantization is not None else None
        tokenizer = build_tokenizer_json(meta), json.dumps(build_tokenizer_config(meta), indent=2) + "\n"
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(checkpoint_dir / "tokenizer.json", tokenizer[0])
    files.write_text(checkpoint_dir / "tokenizer_config.json", tokenizer[1])
    files.record(checkpoint_dir / "tokenizer.json", checkpoint_dir / "tokenizer_config.json")
    fmt = Format("float32", "gguf", re.sub(r"\s+", " ", str(meta.get("general.name", ""))) or None)
    weights = save_checkpoint(checkpoint_dir, sd, args, fmt)
    if qsd is not None:  # the file's own quantized weights too, as model_gguf.pth
        save_checkpoint(checkpoint_dir, qsd, args, replace(fmt, quantization=quantization), weights_name=GGUF_WEIGHTS)
    return weights


# ---- export: a float checkpoint as a GGUF that llama.cpp runs (benchmark.py --compare llama.cpp) ----------

EXPORT_TYPES = ("F32", "BF16")


def gguf_tokenizer_metadata(folder: Path) -> dict:
    """tokenizer.ggml.* values from a byte-level BPE tokenizer.json (and tokenizer_config.json)."""
    tj = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export needs a byte-level BPE tokenizer.json in {folder}; sentencepiece models are "
                         "not exported")
    ids = dict(model["vocab"], **{t["content"]: t["id"] for t in tj.get("added_tokens", [])})
    tokens = [f"[PAD{i}]" for i in range(max(ids.values()) + 1)]
    for t, i in ids.items():
        tokens[i] = t
    special = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    return {"tokens": tokens, "types": [CONTROL_TOKEN if i in special else 1 for i in range(len(tokens))],
            "merges": merges, "bos": ids.get(cfg.get("bos_token")), "eos": ids.get(cfg.get("eos_token")),
            "chat_template": chat_template_of(folder, cfg)}  # llama.cpp's server renders chats with it


def export_gguf(checkpoint_path: Path, out: Path, dtype: str = "F32") -> Path:
    """Write a float fastllama checkpoint as a llama GGUF of F32 or BF16 tensors (norms stay F32)."""
    import gguf

    if dtype not in EXPORT_TYPES:
        raise ValueError(f"GGUF export type {dtype!r} is not supported; choose from {', '.join(EXPORT_TYPES)}")
    ckpt = Checkpoint.open(checkpoint_path)
    weights, args = ckpt.weights, ckpt.args
    if ckpt.quantization is not None:
        raise ValueError(f"{weights} is quantized; export its float checkpoint (llama.cpp quantizes that itself)")
    if args.rope_scaling or args.attention_bias or args.sliding_window:
        raise ValueError("GGUF export covers plain llama models only (no rope scaling, qkv bias or sliding window)")
    tok = gguf_tokenizer_metadata(ckpt.folder)
    sd = ckpt.state_dict()
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(ckpt.format.name or ckpt.folder.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "F32" else gguf.LlamaFileType.MOSTLY_BF16)
    w.add_block_count(args.n_layer)
    w.add_context_length(args.block_size)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.n_head)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_base)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    if tok["chat_template"] is not None:
        w.add_chat_template(tok["chat_template"])
    for key, value in (("bos", tok["bos"]), ("eos", tok["eos"])):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    tensors = {}
    for src, dst in layer_names(TENSOR_MAP, args.n_layer):
        if dst in sd and not (dst == "output.weight" and args.tie_embeddings):
            tensors[src] = sd[dst]
    q_rows, kv_rows = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    for i in range(args.n_layer):
        q, k, v = sd[f"layers.{i}.attention.wqkv.weight"].split([q_rows, kv_rows, kv_rows])
        tensors.update({f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k, f"blk.{i}.attn_v.weight": v})
    for name, t in tensors.items():
        data = t.float().numpy()
        if dtype == "BF16" and not name.endswith("norm.weight"):
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, data)
    with files.written(out) as tmp:  # whole or not at all
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="folder to write the checkpoint into")
    return parser


def main(*, gguf: Path, checkpoint_dir: Path) -> Path:
    return convert_gguf(gguf, checkpoint_dir)


if __name__ == "__main__":
    from cli import run_cli

    print(f"wrote {run_cli(main, build_parser())}")

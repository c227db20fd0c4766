"""Convert a Hugging Face llama / mistral / qwen2 checkpoint folder into fastllama's format.

Reads config.json and the weights (model.safetensors, sharded *.safetensors with an index, or
pytorch_model*.bin loaded with weights_only=True), fuses q/k/v into `wqkv`, permutes q and k from
Hugging Face's rotate-half layout into the adjacent-pairs layout model.py uses, keeps the source
dtype, and writes model.pth + model_config.json into the same folder (see checkpoint.py).

Usage: python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
"""
import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import Format, save_checkpoint
from files import BadFile, first_line, read_json, record
from model import ModelArgs
from tokenizer import TOKENIZER_FILES

DOWNLOAD_AGAIN = "download it again (scripts/prepare.sh REPO_ID) or copy it again"
WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
QKV = ("q_proj", "k_proj", "v_proj")


def hf_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder q/k rows (weight or bias) from rotate-half to adjacent-pairs rotary layout."""
    rest = w.shape[1:]
    return w.view(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def layer_names(table: dict, n_layer: int):
    """(source, ours) name pairs of a rename table, the `{}` entries expanded for every layer."""
    for src, dst in table.items():
        if "{}" in src:
            yield from ((src.format(i), dst.format(i)) for i in range(n_layer))
        else:
            yield src, dst


def read_hf_weights(checkpoint_dir: Path) -> dict:
    """All tensors of a Hugging Face folder: safetensors preferred, then pytorch_model*.bin."""
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        index = checkpoint_dir / "model.safetensors.index.json"
        if index.is_file():  # only the shards the index names (a folder may also hold consolidated copies)
            files = sorted({checkpoint_dir / f for f in read_json(index, DOWNLOAD_AGAIN)["weight_map"].values()})
        out = {}
        for f in files:
            try:
                out.update(load_file(f))
            except Exception as e:  # safetensors' own error on a cut-short or damaged file (SafetensorError)
                raise BadFile(f, f"cannot be read as safetensors ({first_line(e)})", DOWNLOAD_AGAIN) from None
        return out
    files = sorted(checkpoint_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {checkpoint_dir}")
    out = {}
    for f in files:
        try:
            out.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch.load of a damaged file: RuntimeError, UnpicklingError, EOFError, ...
            raise BadFile(f, f"cannot be read as a torch file ({first_line(e)})", DOWNLOAD_AGAIN) from None
    return out


def convert_state_dict(hf: dict, args: ModelArgs) -> dict:
    """Rename, fuse and permute a Hugging Face state dict into model.py's names."""
    sd, used = {}, set()
    for i in range(args.n_layer):
        prefix = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            names = [f"{prefix}{p}.{kind}" for p in QKV]
            if names[0] not in hf:
                continue
            q, k, v = (hf[n] for n in names)
            used.update(names)
            q = hf_to_interleaved(q, args.n_head, args.head_dim)
            k = hf_to_interleaved(k, args.n_kv_heads, args.head_dim)
            sd[f"layers.{i}.attention.wqkv.{kind}"] = torch.cat([q, k, v])
    for src, dst in layer_names(WEIGHT_MAP, args.n_layer):
        if src in hf:
            used.add(src)
            if not (dst == "output.weight" and args.tie_embeddings):  # a tied model's copy of its embedding
                sd[dst] = hf[src]
    unused = sorted(k for k in set(hf) - used if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ValueError(f"the checkpoint has weights this model does not use, e.g. {unused[:3]}; "
                         "refusing to drop them")
    return sd  # a tied model's output layer is its embedding (save_checkpoint)


def interleaved_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of hf_to_interleaved."""
    rest = w.shape[1:]
    return w.view(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def to_hf_state_dict(sd: dict, args: ModelArgs) -> dict:
    """model.py state dict -> Hugging Face Llama/Qwen2 names (the inverse of convert_state_dict); no lm_head when
    tied, as transformers saves such models."""
    hf = {}
    q_size, kv_size = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    for i in range(args.n_layer):
        for kind in ("weight", "bias"):
            fused = sd.get(f"layers.{i}.attention.wqkv.{kind}")
            if fused is None:
                continue
            q, k, v = fused.split([q_size, kv_size, kv_size])
            prefix = f"model.layers.{i}.self_attn."
            hf[f"{prefix}q_proj.{kind}"] = interleaved_to_hf(q, args.n_head, args.head_dim)
            hf[f"{prefix}k_proj.{kind}"] = interleaved_to_hf(k, args.n_kv_heads, args.head_dim)
            hf[f"{prefix}v_proj.{kind}"] = v
    for dst, src in layer_names(WEIGHT_MAP, args.n_layer):
        if not (src == "output.weight" and args.tie_embeddings):
            hf[dst] = sd[src]
    return hf


def to_hf_config(args: ModelArgs) -> dict:
    """A Hugging Face config.json dict (llama, or qwen2 when the model has q/k/v bias) for ModelArgs."""
    rope = {"rope_type": "default", "rope_theta": args.rope_base}
    if args.rope_scaling:
        rope = {**args.rope_scaling, "rope_type": "llama3", "rope_theta": args.rope_base}
    cfg = dict(model_type="qwen2" if args.attention_bias else "llama", vocab_size=args.vocab_size,
               num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_kv_heads,
               hidden_size=args.dim, intermediate_size=args.intermediate_size, head_dim=args.head_dim,
               rms_norm_eps=args.norm_eps, tie_word_embeddings=args.tie_embeddings,
               max_position_embeddings=args.block_size, rope_parameters=rope, rope_theta=args.rope_base)
    if args.sliding_window is not None:
        cfg.update(model_type="mistral", sliding_window=args.sliding_window)
    return cfg


def read_hf_config(config_file: Path) -> ModelArgs:
    """ModelArgs of a Hugging Face config.json; BadFile when it is damaged or of a model we cannot run."""
    try:
        return ModelArgs.from_hf_config(read_json(config_file, DOWNLOAD_AGAIN))
    except BadFile:
        raise
    except (ValueError, KeyError, TypeError) as e:
        problem = str(e) if isinstance(e, ValueError) else f"not a usable model config ({type(e).__name__}: {e})"
        raise BadFile(config_file, problem, "convert a llama, mistral or qwen2 model") from None


def convert_hf_checkpoint(checkpoint_dir: Path) -> Path:
    """Convert the Hugging Face folder checkpoint_dir in place; return the written model.pth."""
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {checkpoint_dir} a Hugging Face model folder?")
    args = read_hf_config(config_file)
    hf = read_hf_weights(checkpoint_dir)
    if "lm_head.weight" not in hf and not args.tie_embeddings:  # no output layer of its own: it reads the embedding
        args = replace(args, tie_embeddings=True)
    sd = convert_state_dict(hf, args)
    dtypes = {t.dtype for t in sd.values()}
    original_tok = checkpoint_dir / "original" / "tokenizer.model"  # Llama 3: the tiktoken file
    if original_tok.is_file() and not (checkpoint_dir / "tokenizer.model").exists():
        shutil.copy(original_tok, checkpoint_dir / "tokenizer.model")
    fmt = Format(str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "mixed", "huggingface")
    weights = save_checkpoint(checkpoint_dir, sd, args, fmt)
    record(*(checkpoint_dir / n for n in TOKENIZER_FILES if (checkpoint_dir / n).is_file()))  # as they are now
    return weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="Hugging Face model folder")
    return parser


def main(*, checkpoint_dir: Path) -> Path:
    return convert_hf_checkpoint(checkpoint_dir)


if __name__ == "__main__":
    from cli import run_cli

    print(f"wrote {run_cli(main, build_parser())}")

"""Prefill caching: the KV of a shared prefix (system prompt, document, few-shot examples) computed once.

Within a process, `generate.generate_cached` reuses whatever prefix of a prompt the KV cache already holds.
Across processes, `save` writes the first P positions of every layer's KV cache with the P tokens they
hold, and `load` reads them back, after checking that the file was made with the same checkpoint, the
same tokenizer and the same cache dtype (anything else would give silently wrong outputs); `restore`
writes them into a model's cache.
"""
import hashlib
import pickle
from pathlib import Path

import torch

from checkpoint import checkpoint_files
from tokenizer import tokenizer_fingerprint

FORMAT_VERSION = 1


def fingerprint(checkpoint_path, model) -> dict:
    """What a prefix cache depends on: the checkpoint (config + weights file), its tokenizer, the cache dtype."""
    weights, config = checkpoint_files(checkpoint_path)
    h = hashlib.sha256(config.read_bytes())
    size = weights.stat().st_size
    with open(weights, "rb") as f:  # the file's size and its first and last MiB: cheap even for 100 GB files
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(str(size).encode())
    dtype = model.norm.weight.dtype  # what setup_caches gives the KV cache
    return {"checkpoint": h.hexdigest(), "tokenizer": tokenizer_fingerprint(checkpoint_path), "dtype": str(dtype)}


def save(path: Path, model, tokens: list[int], text: str, fp: dict) -> None:
    """Write the KV of positions 0..len(tokens)-1 (batch row 0), the tokens and the prefix text."""
    P = len(tokens)
    caches = [b.attention.kv_cache for b in model.layers]
    torch.save({"version": FORMAT_VERSION, "fingerprint": fp, "tokens": tokens, "text": text,
                "k": [c.k_cache[0, :, :P].clone() for c in caches],  # (n_kv_heads, P, head_dim) each
                "v": [c.v_cache[0, :, :P].clone() for c in caches]}, path)


def load(path: Path, fp: dict) -> dict:
    """Read a file made by save, after checking it fits fp; restore() puts it into a model's cache."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prefix cache at {path}; make one with --prefix_file F --save_prefix_cache {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError):
        data = None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a fastllama prefix cache (version {FORMAT_VERSION}); make it again")
    for key, what in (("checkpoint", "checkpoint"), ("tokenizer", "tokenizer"), ("dtype", "precision")):
        if data["fingerprint"][key] != fp[key]:
            raise ValueError(f"{path} was made with a different {what} ({data['fingerprint'][key][:16]} vs "
                             f"{fp[key][:16]}); make it again with this model and precision")
    return data


def restore(model, data: dict) -> list[int]:
    """Fill the start of the KV cache (batch row 0) from load()'s data; return the tokens it holds."""
    P = len(data["tokens"])
    assert P <= model.max_seq_length, "setup_caches with room for the prefix"
    for block, k, v in zip(model.layers, data["k"], data["v"]):
        cache = block.attention.kv_cache
        cache.k_cache[0, :, :P] = k.to(cache.k_cache.device)
        cache.v_cache[0, :, :P] = v.to(cache.v_cache.device)
    return list(data["tokens"])

"""Prefill caching: the KV of a shared prefix (system prompt, document, few-shot examples) computed once.

Within a process, `generate.generate_cached` reuses whatever prefix of a prompt the KV cache already holds.
Across processes, `save` writes the first P positions of every layer's KV cache with the P tokens they
hold, and `load` reads them back, after checking that the file was made with the same checkpoint, the
same tokenizer and the same cache dtype (anything else would give silently wrong outputs); `restore`
writes them into a model's cache. `setup` does whichever a run asks for.
"""
import hashlib
import time
from pathlib import Path
from typing import Callable

import torch

import layers
from checkpoint import Checkpoint
from files import BadFile, written
from tokenizer import tokenizer_fingerprint

FORMAT_VERSION = 2  # 2: "kv", each layer's KVCache.read (scales too for an int8 cache), for "k" and "v"


def fingerprint(ckpt: Checkpoint, model) -> dict:
    """What a prefix cache depends on: the checkpoint (config + weights file), its tokenizer, the activations' and the
    cache's dtypes, how its quantized layers round activations (layers.activations)."""
    h = hashlib.sha256(ckpt.config_file.read_bytes())
    size = ckpt.weights.stat().st_size
    with open(ckpt.weights, "rb") as f:  # the file's size and its first and last MiB: cheap even for 100 GB files
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(str(size).encode())
    return {"checkpoint": h.hexdigest(), "tokenizer": tokenizer_fingerprint(ckpt.folder), "dtype": str(model.dtype),
            "kv_dtype": str(model.kv_dtype or model.dtype), "activations": layers.activations(model)}


def save(path: Path, model, tokens: list[int], text: str, fp: dict) -> None:
    """Write the KV of positions 0..len(tokens)-1 (batch row 0), the tokens and the prefix text."""
    kv = [b.attention.kv_cache.read(0, len(tokens)) for b in model.layers]  # (n_kv_heads, P, ...) each
    with written(path) as tmp:
        torch.save({"version": FORMAT_VERSION, "fingerprint": fp, "tokens": tokens, "text": text, "kv": kv}, tmp)


def load(path: Path, fp: dict) -> dict:
    """Read a file made by save, after checking it fits fp; restore() puts it into a model's cache."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prefix cache at {path}; make one with --prefix_file F --save_prefix_cache {path}")
    remake = f"make it again with --prefix_file F --save_prefix_cache {path}"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch.load of a file that is not one: RuntimeError, UnpicklingError, EOFError, KeyError, ...
        data = None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("fingerprint"),
                                                                                          dict):
        raise BadFile(path, f"not a fastllama prefix cache (version {FORMAT_VERSION})", remake)
    kv = data.get("kv")
    if not (isinstance(kv, list) and all(isinstance(t, list) for t in kv) and isinstance(data.get("tokens"), list)):
        raise BadFile(path, "a damaged prefix cache (its keys, values and tokens do not agree)", remake)
    for key, what in (("checkpoint", "checkpoint"), ("tokenizer", "tokenizer"), ("dtype", "precision"),
                      ("kv_dtype", "--kv_dtype"), ("activations", "--quant_activations")):
        if data["fingerprint"].get(key) != fp[key]:
            raise ValueError(f"{path} was made with a different {what} ({str(data['fingerprint'].get(key))[:16]} vs "
                             f"{fp[key][:16]}); make it again with this model and these flags")
    return data


def restore(model, data: dict) -> list[int]:
    """Fill the start of the KV cache (batch row 0) from load()'s data; return the tokens it holds."""
    assert len(data["tokens"]) <= model.max_seq_length, "setup_caches with room for the prefix"
    for block, saved in zip(model.layers, data["kv"], strict=True):
        block.attention.kv_cache.write(0, saved)
    return list(data["tokens"])


def setup(model, tokenizer, text: str, saved: dict | None, save_path: Path | None, fp: dict, prefill_step: Callable,
          log: Callable) -> list[int]:
    """Put the prefix's KV into the cache (from saved data when it holds this text, else by prefilling it, then
    saving it to save_path if given); return the tokens the cache holds. prefill_step is generate.py's."""
    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    if saved is not None and (not text or saved["tokens"] == ids):
        cached = restore(model, saved)
        log(f"prefix: {len(cached)} tokens loaded from the cache file in {time.perf_counter() - t0:.2f} s")
        return cached
    prefill_step(model, torch.tensor([ids], device=model.device), torch.arange(len(ids), device=model.device))
    log(f"prefix: {len(ids)} tokens prefilled in {time.perf_counter() - t0:.2f} s")
    if save_path is not None:
        save(save_path, model, ids, text, fp)
        log(f"prefix cache written to {save_path}")
    return ids

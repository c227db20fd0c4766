"""Generate text with a fastllama checkpoint: prefill the prompt, then decode one token at a time.

    python generate.py --compile --prompt "Hello, my name is"
    python generate.py --interactive            # multi-turn chat with the model's chat template

The steps are pure functions of (model, tokens, positions) so that `torch.compile` can turn each into one
fused graph (`--compile`, `--compile_prefill`). Reading order: sampling, the model steps, the decode loop,
loading, the command line. engine.py, server.py, eval.py, quantize.py, benchmark.py, memory_bench.py and
serve_bench.py import the steps, the loop and the loader.
References: gpt-fast generate.py, https://github.com/pytorch-labs/gpt-fast
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import cli
import cuda
import files
import huge_pages
import kernels
import layers
import prefix_cache
import speculative
import tp
from checkpoint import KV_DTYPES, PRECISIONS, Checkpoint, kv_dtype_name, resolve_kv_dtype, resolve_precision
from memory import Sizer, available_bytes, check_fits, model_bytes_read_per_token, peak_memory_bytes
from model import Transformer, fit_context
from tokenizer import get_tokenizer, tokenizer_fingerprint

DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth")
DEFAULT_PROMPT = "Hello, my name is"


# ---- sampling: pure functions of the logits ---------------------------------------------------------------

def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> Tensor:
    """Probabilities (..., vocab) after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest set with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Next token (B, 1) and its distribution (B, vocab) from the last position of logits (B, T, vocab); the draw
    takes its randomness from generator (default: torch's global one)."""
    logits = logits[:, -1]  # (B, vocab)
    if temperature == 0:
        idx = logits.argmax(-1, keepdim=True)
        return idx, torch.zeros_like(logits, dtype=torch.float).scatter_(-1, idx, 1.0)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    # Gumbel-style draw: argmax(p / Exp(1)) samples from p without a host sync
    idx = torch.argmax(probs / torch.empty_like(probs).exponential_(1, generator=generator), dim=-1, keepdim=True)
    return idx, probs


def token_probs(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None) -> Tensor:
    """The distributions (T, vocab) that `sample` draws from, for logits (T, vocab) (one-hot when greedy)."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    return logits_to_probs(logits, temperature, top_k, top_p)


# ---- the model steps --------------------------------------------------------------------------------------

def prefill(model: Transformer, x: Tensor, input_pos: Tensor, key_mask: Tensor | None = None, **sampling) -> Tensor:
    """Run the prompt x (B, T) at positions input_pos (T,); return the first new token (B, 1)."""
    return sample(model(x, input_pos, key_mask, last_only=True), **sampling)[0]


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, key_mask: Tensor | None = None,
                     **sampling) -> tuple[Tensor, Tensor]:
    """Feed one token x (B, 1) at position input_pos (1,); return the next token (B, 1) and its probs."""
    return sample(model(x, input_pos, key_mask), **sampling)


def decode_rows(model: Transformer, x: Tensor, input_pos: Tensor, rows: Tensor | None = None) -> Tensor:
    """One token for each of B rows, each at its own position: x and input_pos (B, 1); the logits (B, vocab). rows
    (B,) names each one's cache row (default: rows 0..B-1)."""
    if rows is not None:  # one batch size for the three (a compiled step with a dynamic batch size)
        torch._check(input_pos.size(0) == x.size(0))
        torch._check(rows.size(0) == x.size(0))
    return model(x, input_pos, cache_row=0 if rows is None else rows)[:, -1]


def verify(model: Transformer, x: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    """Speculation's target pass: the distributions (T, vocab) after each of the tokens x (1, T) at input_pos (T,)."""
    return token_probs(model(x, input_pos)[0], **sampling)


def compile_step(fn, device: torch.device, dynamic: bool = False):
    """torch.compile a step fn(model, ...) for the device: cuda.py's rules on a GPU, kernels.compile_cpu's on a CPU."""
    if device.type == "cuda":
        return cuda.compile_step(fn, dynamic)
    return kernels.compile_cpu(fn, dynamic)


def compile_decode_rows(device: torch.device, rows: int):
    """decode_rows compiled once for any count of 1..rows rows, so that a row's arithmetic is the same whatever else
    runs. The count is an unbacked size: a backed one would make a count of 1 a constant (a second graph), and the
    compiler plans the graph's loops for the hint of 1 row (one row costs about what generate.py's step does)."""
    step = compile_step(decode_rows, device)

    def run(model: Transformer, x: Tensor, input_pos: Tensor, cache_rows: Tensor) -> Tensor:
        for t in (x, input_pos, cache_rows):
            torch._dynamo.decorators.mark_unbacked(t, 0, min=1, max=rows, hint_override=1)
        return step(model, x, input_pos, cache_rows)

    return run


# ---- the decode loop --------------------------------------------------------------------------------------

def prefill_pieces(start: int, end: int, chunk: int | None) -> list[tuple[int, int]]:
    """The prefill passes over positions start..end-1: one (chunk None), or pieces of at most chunk positions cut at
    multiples of chunk, the same pieces wherever a prefill resumes at a cut, so that every position is computed by
    the same arithmetic (the server's engine, which reuses cached chunks, relies on it)."""
    bounds = [start] + ([] if chunk is None else list(range((start // chunk + 1) * chunk, end, chunk))) + [end]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, start_pos: int = 0,
             stop_ids=(), callback=None, prefill_step=prefill, decode_step=decode_one_token,
             key_mask: Tensor | None = None, prefill_chunk: int | None = None, **sampling) -> Tensor:
    """Generate up to max_new_tokens after prompt (B, T) or (T,); return the new tokens (B, N).

    The prompt is written into the KV cache at positions start_pos.. (earlier positions hold a cached
    prefix); generation stops early once every row has produced a stop id (rows that stopped earlier
    go on: cut them with until_stop). key_mask (B, S) masks the padding of left-padded rows (left_pad).
    prefill_chunk: prefill in pieces of this many positions (prefill_pieces), as the server's engine does.
    callback(tokens (B, 1)) sees each new token as soon as it exists; on a GPU, which the loop asks whether every
    row has stopped only every cuda.stop_check_every tokens, it may see a few more than are returned. The last
    returned token is not yet in the cache.
    """
    prompt = prompt.view(1, -1) if prompt.dim() == 1 else prompt
    B, T = prompt.shape
    assert T > 0 and max_new_tokens > 0
    assert start_pos + T + max_new_tokens - 1 <= model.max_seq_length, "setup_caches with a longer max_seq_length"
    device = prompt.device
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=prompt.dtype)
    done = torch.zeros(B, 1, dtype=torch.bool, device=device)
    *pieces, (a, b) = prefill_pieces(start_pos, start_pos + T, prefill_chunk)
    for p, q in pieces:  # the pieces before the last only fill the cache
        model(prompt[:, p - start_pos:q - start_pos], torch.arange(p, q, device=device), key_mask, last_only=True)
    token = prefill_step(model, prompt[:, a - start_pos:], torch.arange(a, b, device=device), key_mask, **sampling)
    out, pos, every = [token], torch.tensor([start_pos + T], device=device), cuda.stop_check_every(device)
    for i in range(max_new_tokens - 1):  # the position stays on the device; stops are read back every `every` tokens
        if callback is not None:
            callback(token)
        done |= torch.isin(token, stops)
        if (i + 1) % every == 0 and bool(done.all()):
            break
        token, _ = decode_step(model, token.clone(), pos, key_mask, **sampling)
        pos = pos + 1
        out.append(token)
    else:
        if callback is not None:
            callback(token)
    return cut_after_stops(torch.cat(out, dim=1), stops)


def cut_after_stops(tokens: Tensor, stops: Tensor) -> Tensor:
    """tokens (B, N) up to the token by which every row has produced a stop id (all of them if some row has not):
    what checking after each token gives, whatever `every` the loop checked at."""
    hit = torch.isin(tokens, stops)
    if not bool(hit.any(dim=1).all()):
        return tokens
    return tokens[:, :int(hit.int().argmax(dim=1).max()) + 1]


def generate_cached(model: Transformer, ids: list[int], cached: list[int], max_new_tokens: int, **kw):
    """Generate after ids (batch 1), reusing the KV of the longest prefix shared with `cached`.

    cached lists the tokens whose KV the cache holds now. Returns (new tokens, tokens cached after).
    """
    shared = 0
    for a, b in zip(ids[:-1], cached):  # at least one token must be run to get logits
        if a != b:
            break
        shared += 1
    new = generate(model, torch.tensor(ids[shared:], device=model.device), max_new_tokens, start_pos=shared, **kw)[0]
    new = new.tolist()
    return new, ids + new[:-1]


def left_pad(rows: list[list[int]], max_seq_length: int, device) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths as one batch: (x (B, T) left-padded with 0, key_mask (B, S))."""
    T = max(len(r) for r in rows)
    x = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=device)
    pad = torch.tensor([T - len(r) for r in rows], device=device)
    return x, torch.arange(max_seq_length, device=device)[None, :] >= pad[:, None]


def until_stop(row: list[int], stop_ids) -> list[int]:
    """The tokens of row before its first stop id."""
    return next((row[:i] for i, t in enumerate(row) if t in stop_ids), row)


# ---- loading ----------------------------------------------------------------------------------------------

def resolve_device(device: str | None) -> torch.device:
    """torch.device for --device (default: cuda when available, else cpu); ValueError when unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def load_model(checkpoint, device="cpu", precision: str = "auto", transform=None, quant_activations: str = "auto",
               kv_dtype: str = "auto") -> Transformer:
    """The Transformer of a checkpoint (a Checkpoint, a folder or its model.pth) on device, in precision; a quantized
    one's layers on the C++ kernels round their activations as kernels.Cpu.activations resolves quant_activations
    for their kind; its KV cache stores keys and values as checkpoint.resolve_kv_dtype resolves kv_dtype.

    transform(model), when given, cuts or places the model while its weights are still where the checkpoint left them
    (the CPU): tp.shard keeps this rank's slices, tp.split_layers puts runs of layers on their devices; so a device
    receives only its own part. It runs before quantized layers pick their kernels.
    """
    ckpt = Checkpoint.open(checkpoint)
    device = torch.device(device)
    kernels.this_cpu().activations(quant_activations)  # an unknown value: one line before anything loads
    precision = resolve_precision(precision, ckpt.quantization, device)
    dtype, kv = PRECISIONS[precision], KV_DTYPES[resolve_kv_dtype(kv_dtype, precision, ckpt.quantization, device)]
    model = ckpt.build()
    model.load_state_dict(ckpt.state_dict(), assign=True)
    if ckpt.args.tie_embeddings:
        model.tie_weights()  # assign= gave the output layer tensors of its own
    if ckpt.quantization is None and device.type == "cpu":
        layers.use_cpu_linear(model)  # float32 / bf16 linears by the C++ kernel where kernels.OPS says so
    if transform is not None:  # after the swap above, so that hooks it adds (tp's all-reduces) stay in use
        transform(model)
    # a float model staying on the CPU is cast on its way into huge pages (below): one copy of the weights, not two
    cast_later = ckpt.quantization is None and transform is None and device.type == "cpu"
    model = (model if cast_later else model.to(dtype=dtype)).eval()
    if model.device != device:  # what the transform did not place (split_layers places every part)
        model = model.to(device)
    if ckpt.args.tie_embeddings and model.output.weight.device == model.device:
        model.tie_weights()  # .to() copies a tied layer's buffers (an int8 table) one module at a time
    if ckpt.quantization is not None:
        layers.prepare(model, activations=quant_activations)
    model.kv_dtype = kv
    if model.device.type == "cpu":
        layers.use_cpu_attention(model)  # decode attention over the visible cache positions only (C++)
        # decode streams every weight once per token: fewer TLB misses
        huge_pages.weights_in_huge_pages(model, dtype if cast_later else None)
    return model


# ---- the command line -------------------------------------------------------------------------------------

def check_flags(*, prompts, interactive, max_new_tokens, num_samples, batch_size, speculate_k, prompt_lookup,
                temperature, top_k, top_p, draft_checkpoint_path, prefix_file, save_prefix_cache,
                load_prefix_cache, world_size: int = 1) -> None:
    """ValueError naming the first flag, or combination of flags, that a run cannot use (world_size: torchrun's)."""
    speculate = draft_checkpoint_path is not None or prompt_lookup is not None
    use_prefix = prefix_file is not None or load_prefix_cache is not None
    if not interactive and not all(prompts):
        raise ValueError("empty prompt; pass --prompt TEXT")
    if min(max_new_tokens, num_samples, batch_size, speculate_k, 1 if prompt_lookup is None else prompt_lookup) < 1:
        raise ValueError("--max_new_tokens, --num_samples, --batch_size, --speculate_k and --prompt_lookup must be at "
                         "least 1")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need --temperature >= 0, --top_k >= 1 and 0 < --top_p <= 1")
    if draft_checkpoint_path is not None and prompt_lookup is not None:
        raise ValueError("choose one way to speculate: --draft_checkpoint_path or --prompt_lookup")
    if save_prefix_cache is not None and prefix_file is None:
        raise ValueError("--save_prefix_cache needs the prefix text: add --prefix_file F")
    if (speculate or use_prefix) and (batch_size != 1 or interactive):
        raise ValueError("speculation and prefix caches work on one sequence: use --batch_size 1, not --interactive")
    if speculate and use_prefix:
        raise ValueError("speculation and a prefix cache cannot be combined (yet); use one of them")
    if use_prefix and world_size > 1:  # each rank holds its own heads' KV: one file would mix the ranks' caches
        raise ValueError("--prefix_file / --load_prefix_cache cannot run under torchrun (each rank caches its own "
                         "heads); run on one process")


def load_draft(path, ckpt: Checkpoint, model: Transformer, device, precision: str) -> Transformer:
    """The draft model of speculative decoding; ValueError unless it has the target's tokenizer."""
    draft = load_model(path, device, precision)
    if (tokenizer_fingerprint(Checkpoint.open(path).folder) != tokenizer_fingerprint(ckpt.folder)
            or draft.config.vocab_size != model.config.vocab_size):
        raise ValueError(f"the draft {path} has a different tokenizer than the target {ckpt.weights}; "
                         "speculation needs the same one")
    return draft


class CachedPrefix:
    """Generation after whatever prefix the KV cache holds (generate_cached), as a strategy's run()."""

    def __init__(self, model: Transformer, cached: list[int], max_new_tokens: int, **kw):
        self.model, self.cached, self.max_new_tokens, self.kw = model, cached, max_new_tokens, kw

    def __call__(self, ids: list[int], callback, stats) -> Tensor:
        new, self.cached = generate_cached(self.model, ids, self.cached, self.max_new_tokens, callback=callback,
                                           **self.kw)
        return torch.tensor([new])


def strategy(model: Transformer, n_new: int, *, draft, prompt_lookup, speculate_k, cached, batch_size, verify_step,
             decode_step, **kw):
    """The one way a run generates, as run(ids, callback, stats) -> new tokens (B, N): speculative decoding (a draft
    model or prompt lookup), generation after a cached prefix (cached: the tokens the cache holds), or plain."""
    if draft is not None or prompt_lookup is not None:
        return lambda ids, cb, stats: speculative.speculative_generate(
            model, torch.tensor(ids, device=model.device), n_new, k=speculate_k, draft=draft,
            prompt_lookup=prompt_lookup, verify_step=verify_step, draft_step=decode_step, callback=cb, stats=stats,
            **kw)
    if cached is not None:
        return CachedPrefix(model, cached, n_new, decode_step=decode_step, **kw)
    return lambda ids, cb, stats: generate(model, torch.tensor(ids, device=model.device).repeat(batch_size, 1), n_new,
                                           decode_step=decode_step, callback=cb, **kw)


def main(*, prompt: str | list[str] | None = None, interactive: bool = False, num_samples: int = 5,
         max_new_tokens: int = 200, batch_size: int = 1, top_k: int | None = 200, top_p: float | None = None,
         temperature: float = 0.8, checkpoint_path: Path = DEFAULT_CHECKPOINT, compile: bool = False,
         compile_prefill: bool = False, device: str | None = None, profile: Path | None = None,
         seed: int | None = None, precision: str = "auto", max_seq_length: int | None = None,
         draft_checkpoint_path: Path | None = None, speculate_k: int = 5, prompt_lookup: int | None = None,
         prefix_file: Path | None = None, save_prefix_cache: Path | None = None,
         load_prefix_cache: Path | None = None, devices: str | None = None, quant_activations: str = "auto",
         kv_dtype: str = "auto") -> None:
    """Load the model, then generate num_samples times for each prompt (or chat); print speed and memory."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [DEFAULT_PROMPT])
    check_flags(prompts=prompts, interactive=interactive, max_new_tokens=max_new_tokens, num_samples=num_samples,
                batch_size=batch_size, speculate_k=speculate_k, prompt_lookup=prompt_lookup, temperature=temperature,
                top_k=top_k, top_p=top_p, draft_checkpoint_path=draft_checkpoint_path, prefix_file=prefix_file,
                save_prefix_cache=save_prefix_cache, load_prefix_cache=load_prefix_cache, world_size=tp.world()[1])
    stage_devices = [resolve_device(d) for d in devices.split(",")] if devices else None
    dev, transform, stages = tp.place(resolve_device(device), stage_devices)
    if seed is not None or tp.world()[1] > 1:
        torch.manual_seed(1234 if seed is None else seed)  # every rank must sample the same tokens
    ckpt = Checkpoint.open(checkpoint_path)
    precision, t0 = resolve_precision(precision, ckpt.quantization, dev), time.perf_counter()
    context = max_seq_length or (min(2048, ckpt.args.block_size) if interactive else None)
    if context is not None and tp.world()[1] == 1 and not stages:  # refuse before allocating anything
        est = Sizer.of(ckpt, precision, dev, kv_dtype).at(batch_size, min(context, ckpt.args.block_size))
        check_fits(est, available_bytes(dev), "--batch_size / --max_seq_length")
    model = load_model(ckpt, dev, precision, transform=transform, quant_activations=quant_activations,
                       kv_dtype=kv_dtype)
    tokenizer = get_tokenizer(ckpt.folder)
    rank, world_size = tp.world()
    tp.log(f"loaded {ckpt.weights} ({ckpt.format.describe()}; {precision} on {dev}, "
           f"{kv_dtype_name(model)} KV cache"
           f"{f', rank {rank} of {world_size}' if world_size > 1 else ''}) in {time.perf_counter() - t0:.2f} s")
    draft = load_draft(draft_checkpoint_path, ckpt, model, dev, precision) if draft_checkpoint_path else None
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    decode_step = compile_step(decode_one_token, dev) if compile else decode_one_token
    prefill_step = compile_step(prefill, dev, dynamic=True) if compile_prefill else prefill
    if interactive:
        context = max_seq_length or min(2048, model.config.block_size)
        model.setup_caches(1, context)
        turn = lambda ids, cached, n, cb: generate_cached(  # noqa: E731
            model, ids, cached, n, stop_ids=tokenizer.stop_ids, callback=cb, decode_step=decode_step,
            prefill_step=prefill_step, **sampling)
        return cli.chat(tokenizer, turn, max_new_tokens=max_new_tokens, context=context)
    fp = prefix_cache.fingerprint(ckpt, model) if prefix_file or load_prefix_cache else None
    saved = prefix_cache.load(load_prefix_cache, fp) if load_prefix_cache is not None else None
    prefix_text = saved["text"] if saved else ""
    if prefix_file is not None:
        prefix_text = files.read_text(prefix_file, "prefix text")
    all_ids = [tokenizer.encode(prefix_text + p) for p in prompts]
    room = speculate_k if draft is not None or prompt_lookup is not None else 0
    longest = max(len(ids) for ids in all_ids)
    n_new = fit_context(longest, max_new_tokens, max_seq_length or model.config.block_size, room)
    if n_new < max_new_tokens:
        tp.log(f"note: max_new_tokens lowered to {n_new} to fit the context")
    for m in (model, draft) if draft is not None else (model,):
        m.setup_caches(batch_size, max_seq_length or longest + n_new + room)
    for i, (d, layer_range) in enumerate(stages):
        tp.log(f"stage {i} ({d}): layers {layer_range[0]}-{layer_range[-1]}, "
               f"{tp.stage_bytes(model, layer_range) / 1e9:.3f} GB of weights and KV cache")
    cached = prefix_cache.setup(model, tokenizer, prefix_text, saved, save_prefix_cache, fp, prefill_step,
                                tp.log) if fp else None
    run = strategy(model, n_new, draft=draft, prompt_lookup=prompt_lookup, speculate_k=speculate_k, cached=cached,
                   batch_size=batch_size, verify_step=compile_step(verify, dev) if compile else verify,
                   decode_step=decode_step, prefill_step=prefill_step, stop_ids=tokenizer.stop_ids, **sampling)
    size = model_bytes_read_per_token(model)
    cli.timed_samples(run, prompts, all_ids, tokenizer, dev, num_samples=num_samples, warmup=compile,
                      batch_size=batch_size, bytes_per_token=size, profile=profile, speculate=room > 0)
    tp.log(f"model size {size / 1e9:.3f} GB{' per rank' if world_size > 1 else ''}; "
           f"peak memory {peak_memory_bytes(dev) / 1e9:.2f} GB")
    tp.finish()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate text with a fastllama checkpoint.")
    p.add_argument("--prompt", type=str, action="append", default=None,
                   help=f"text to continue; repeat for several prompts (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat using the model's chat template")
    p.add_argument("--num_samples", type=int, default=5, help="how many times to generate")
    p.add_argument("--max_new_tokens", type=int, default=200, help="most tokens to generate per sample / turn")
    p.add_argument("--batch_size", type=int, default=1, help="rows generated in parallel from the same prompt")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="model.pth or its folder")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--compile_prefill", action="store_true", help="torch.compile prefill too (dynamic shapes)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--devices", type=str, default=None,
                   help="comma-separated devices to split the layers over, run in sequence (e.g. cuda:0,cuda:1)")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace of the last sample here")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="activations dtype (auto: bf16; fp32 for int8 / int4 checkpoints on a CPU)")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="KV cache length (default: prompt + max_new_tokens; 2048 in --interactive)")
    cli.add_numerics_flags(p)
    g = p.add_argument_group("speculative decoding (batch 1)")
    g.add_argument("--draft_checkpoint_path", type=Path, default=None,
                   help="a smaller or quantized model with the same tokenizer that proposes tokens")
    g.add_argument("--speculate_k", type=int, default=5, help="tokens proposed per target pass")
    g.add_argument("--prompt_lookup", type=int, default=None, metavar="N",
                   help="propose the tokens that followed the last N-gram earlier in the text (no draft model)")
    g = p.add_argument_group("prefix caching (batch 1)")
    g.add_argument("--prefix_file", type=Path, default=None, help="text before every prompt, prefilled once")
    g.add_argument("--save_prefix_cache", type=Path, default=None, help="write the prefix's KV cache to this file")
    g.add_argument("--load_prefix_cache", type=Path, default=None, help="start from a KV cache file saved earlier")
    return p


if __name__ == "__main__":
    cli.run_cli(main, build_parser())

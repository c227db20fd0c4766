"""Generate text with a fastllama checkpoint: prefill the prompt, then decode one token at a time.

    python generate.py --compile --prompt "Hello, my name is"
    python generate.py --interactive            # multi-turn chat with the model's chat template

The decode step is a pure function of (model, token, position) so that `torch.compile` can turn it
into one fused graph (`--compile`); prefill can be compiled too (`--compile_prefill`). Other files
(eval, server, benchmark) import load_model / prefill / decode_one_token / generate from here.
References: gpt-fast generate.py, https://github.com/pytorch-labs/gpt-fast
"""
import argparse
import contextlib
import functools
import resource
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch import Tensor

from checkpoint import build_model, load_state_dict, read_config
from model import Transformer
from tokenizer import get_tokenizer, tokenizer_fingerprint

DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth")
DEFAULT_PROMPT = "Hello, my name is"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> tuple[Tensor, Tensor]:
    """Next token (B, 1) and its distribution (B, vocab) from the last position of logits (B, T, vocab)."""
    logits = logits[:, -1]  # (B, vocab)
    if temperature == 0:
        idx = logits.argmax(-1, keepdim=True)
        return idx, torch.zeros_like(logits, dtype=torch.float).scatter_(-1, idx, 1.0)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    # Gumbel-style draw: argmax(p / Exp(1)) samples from p without a host sync
    idx = torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1, keepdim=True)
    return idx, probs


# ---- the two model steps ----------------------------------------------------------------------------------

def prefill(model: Transformer, x: Tensor, input_pos: Tensor, key_mask: Tensor | None = None, **sampling) -> Tensor:
    """Run the prompt x (B, T) at positions input_pos (T,); return the first new token (B, 1)."""
    return sample(model(x, input_pos, key_mask, last_only=True), **sampling)[0]


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, key_mask: Tensor | None = None,
                     **sampling) -> tuple[Tensor, Tensor]:
    """Feed one token x (B, 1) at position input_pos (1,); return the next token (B, 1) and its probs."""
    return sample(model(x, input_pos, key_mask), **sampling)


def compile_step(fn, device: torch.device, dynamic: bool = False):
    """torch.compile fn(model, ...) for the device: CUDA graphs on GPU; frozen weights and C++ GEMM templates on CPU.

    On CPU, inductor's freezing (weights folded in as constants) is what lets max-autotune pick its
    C++ GEMM template over MKL (about 2x decode speed here), and cpp_wrapper makes the code that calls
    the kernels C++ as well (int8 decode 61 -> 74 tok/s: no Python between the ~150 kernel calls of a
    step; cold compiles take longer). `options=` does not apply these, so they are patched in around
    the call that compiles; calls that find compiled code run without them (set_stance fails a call that would
    compile, which then runs again with them). size_asserts is off: the C++ wrapper checked the size and
    stride of every kernel's output on every step (~1%), and the ops' fake implementations give them.

    Before every call, Dynamo checks ~6000 guards, nearly all of them that the model's modules did not
    change (hooks, attributes, parameter identities): ~1 ms of an 11 ms int8 step. On CPU, each model and
    KV cache gets a compiled function of its own that skips those guards and is called with nothing else:
    another model, or setup_caches (which replaces the caches and the rotary table), compiles anew. The
    guards on the other arguments (token shapes, sampling settings) stay.

    GEMMs are tuned among the C++ templates only: with ATen's kernels among the choices, autotuning's noisy
    timings sometimes picked ATen's bf16 GEMV for the output layer (3.7 ms per step against 2.5). A model
    with a GEMM no template can do (torch's int4 fallback op, for a layer the C++ kernel cannot take) is
    compiled again with ATen allowed.
    """
    if device.type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=dynamic)
    import torch._inductor.config as inductor_config
    from torch._inductor.exc import InductorError

    compiled = weakref.WeakKeyDictionary()  # model -> [weakref to its rotary table, function, GEMM backends, ran]

    def step(model: Transformer, *args, **kwargs):
        if model.max_seq_length <= 0:  # no caches yet: the model's own error says so
            return fn(model, *args, **kwargs)
        entry = compiled.get(model, [None, None, "CPP", False])
        table, f, backends, ran = entry
        if table is None or table() is not model.freqs_cis:
            f = torch.compile(fn, fullgraph=True, dynamic=dynamic, isolate_recompiles=True, options={
                **torch._inductor.list_mode_options("max-autotune-no-cudagraphs"),
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            entry = compiled[model] = [weakref.ref(model.freqs_cis), f, backends, False]
        if ran:  # most calls: compiled code for these arguments exists; run it without the settings below (~0.4 ms)
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return f(model, *args, **kwargs)
            except RuntimeError as e:
                if "fail_on_recompile" not in str(e):
                    raise
        try:
            with inductor_config.patch(freezing=True, cpp_wrapper=True, max_autotune_gemm_backends=backends,
                                       size_asserts=False, autotune_num_choices_displayed=0,
                                       max_autotune_report_choices_stats=False), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # inductor's own autotuner
                out = f(model, *args, **kwargs)
            entry[3] = True
            return out
        except InductorError as e:
            if backends != "CPP" or not no_gemm_choice(e):
                raise
            compiled[model] = [None, None, "CPP,ATEN", False]  # a GEMM the C++ template cannot do: let ATen in
            return step(model, *args, **kwargs)

    return step


def no_gemm_choice(e: BaseException | None) -> bool:
    """Whether inductor's error comes from a GEMM it found no allowed kernel for (NoValidChoicesError)."""
    from torch._inductor.select_algorithm import NoValidChoicesError

    while e is not None and not isinstance(e, NoValidChoicesError):
        e = getattr(e, "inner_exception", None) or e.__context__
    return e is not None


def left_pad(rows: list[list[int]], max_seq_length: int, device) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths as one batch: (x (B, T) left-padded with 0, key_mask (B, S))."""
    T = max(len(r) for r in rows)
    x = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=device)
    pad = torch.tensor([T - len(r) for r in rows], device=device)
    return x, torch.arange(max_seq_length, device=device)[None, :] >= pad[:, None]


def until_stop(row: list[int], stop_ids) -> list[int]:
    """The tokens of row before its first stop id."""
    return next((row[:i] for i, t in enumerate(row) if t in stop_ids), row)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, start_pos: int = 0,
             stop_ids=(), callback=None, prefill_step=prefill, decode_step=decode_one_token,
             key_mask: Tensor | None = None, **sampling) -> Tensor:
    """Generate up to max_new_tokens after prompt (B, T) or (T,); return the new tokens (B, N).

    The prompt is written into the KV cache at positions start_pos.. (earlier positions hold a cached
    prefix); generation stops early once every row has produced a stop id (rows that stopped earlier
    go on: cut them with until_stop). key_mask (B, S) masks the padding of left-padded rows (left_pad).
    callback(tokens (B, 1)) sees each new token as soon as it exists. The last returned token is not
    yet in the cache.
    """
    prompt = prompt.view(1, -1) if prompt.dim() == 1 else prompt
    B, T = prompt.shape
    assert T > 0 and max_new_tokens > 0
    assert start_pos + T + max_new_tokens - 1 <= model.max_seq_length, "setup_caches with a longer max_seq_length"
    device = prompt.device
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=prompt.dtype)
    done = torch.zeros(B, 1, dtype=torch.bool, device=device)
    input_pos = torch.arange(start_pos, start_pos + T, device=device)
    token = prefill_step(model, prompt, input_pos, key_mask, **sampling)
    out = [token]
    for i in range(max_new_tokens):
        if callback is not None:
            callback(token)
        done |= torch.isin(token, stops)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        pos = torch.tensor([start_pos + T + i], device=device)
        token, _ = decode_step(model, token.clone(), pos, key_mask, **sampling)
        out.append(token)
    return torch.cat(out, dim=1)


def generate_cached(model: Transformer, ids: list[int], cached: list[int], max_new_tokens: int, **kw):
    """Generate after ids (batch 1), reusing the KV of the longest prefix shared with `cached`.

    cached lists the tokens whose KV the cache holds now. Returns (new tokens, tokens cached after).
    """
    shared = 0
    for a, b in zip(ids[:-1], cached):  # at least one token must be run to get logits
        if a != b:
            break
        shared += 1
    device = model.norm.weight.device
    new = generate(model, torch.tensor(ids[shared:], device=device), max_new_tokens, start_pos=shared, **kw)[0]
    new = new.tolist()
    return new, ids + new[:-1]


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


def load_model(checkpoint_path, device="cpu", precision: str = "bf16", transform=None) -> Transformer:
    """The Transformer stored at checkpoint_path (a folder or its model.pth) on device, in precision.

    transform(model), when given, runs once the weights are in place and before quantized layers pick
    their kernels: tp.shard and tp.split_layers use it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    args, fmt = read_config(checkpoint_path)
    model = build_model(args, fmt)
    model.load_state_dict(load_state_dict(checkpoint_path), assign=True)
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    quantized = bool(fmt.get("quantization"))
    if quantized:
        from quantize import prepare, tie_quantized
    if args.tie_embeddings:
        if quantized:
            tie_quantized(model)
        else:
            model.output.weight = model.tok_embeddings.weight
    if not quantized and model.norm.weight.device.type == "cpu":
        from kernels import use_cpu_linear

        use_cpu_linear(model)  # float32 / bf16 linears by the C++ kernel (decode; prefill on AVX2 CPUs)
    if transform is not None:  # after the swap above, so that hooks it adds (tp's all-reduces) stay in use
        transform(model)
    if quantized:
        prepare(model)
    if model.norm.weight.device.type == "cpu":
        from kernels import use_cpu_attention, weights_in_huge_pages

        use_cpu_attention(model)  # decode attention over the visible cache positions only (C++)
        weights_in_huge_pages(model)  # decode streams every weight once per token: fewer TLB misses
    return model


def model_size_bytes(model: Transformer) -> int:
    """Bytes of weights read per decoded token: parameters and quantized weights, tied ones counted once.

    The embedding table is left out (a token reads one of its rows), unless it is also the output layer's weight.
    """
    caches = ("k_cache", "v_cache", "freqs_cis", "causal_mask")
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    tensors = {t.data_ptr(): t for n, t in named if not n.startswith("tok_embeddings.") and not n.endswith(caches)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the CUDA allocator's on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.is_file():  # VmHWM is this process's own peak; ru_maxrss also counts the parent's before exec
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TextStream:
    """Prints the text of a growing token list as it grows, holding back incomplete UTF-8."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def __call__(self, token: Tensor) -> None:
        if int(token[0, 0]) in self.tokenizer.stop_ids:
            return
        self.ids.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


# ---- command line -----------------------------------------------------------------------------------------

def _context_budget(model: Transformer, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens clipped to the context; ValueError when the prompt alone does not fit."""
    block = model.config.block_size
    if prompt_len >= block:
        raise ValueError(f"the prompt has {prompt_len} tokens but the model's context is {block}; shorten the prompt")
    if prompt_len + max_new_tokens > block:
        max_new_tokens = block - prompt_len
        print(f"note: max_new_tokens lowered to {max_new_tokens} to fit the context of {block}", file=sys.stderr)
    return max_new_tokens


def chat(model, tokenizer, *, max_new_tokens, max_seq_length, sampling, decode_step, prefill_step):
    """Multi-turn chat on stdin/stdout; earlier turns stay in the KV cache and are not re-read."""
    model.setup_caches(1, max_seq_length)
    device = model.norm.weight.device
    messages, cached = [], []
    print(f"chat with the model; an empty line or Ctrl-D ends it (context: {max_seq_length} tokens)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        if len(ids) >= max_seq_length and len(messages) > 1:
            print(f"note: the conversation filled the context of {max_seq_length} tokens; starting a new one "
                  "(raise --max_seq_length for longer chats)", file=sys.stderr)
            messages, cached = messages[-1:], []
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        budget = min(max_new_tokens, max_seq_length - len(ids))
        if budget < 1:
            print(f"error: this message alone is {len(ids)} tokens, more than the context of {max_seq_length}; "
                  "send a shorter one or raise --max_seq_length", file=sys.stderr)
            messages.pop()
            continue
        print("model> ", end="", flush=True)
        t0 = time.perf_counter()
        new, cached = generate_cached(model, ids, cached, budget, stop_ids=tokenizer.stop_ids,
                                      callback=TextStream(tokenizer), decode_step=decode_step,
                                      prefill_step=prefill_step, **sampling)
        dt = time.perf_counter() - t0
        reply = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
        messages.append({"role": "assistant", "content": reply})
        print(f"\n[{len(new)} tokens in {dt:.2f} s, {len(cached)} tokens in cache]")


def main(*, prompt: str | list[str] | None = None, interactive: bool = False, num_samples: int = 5,
         max_new_tokens: int = 200, batch_size: int = 1, top_k: int | None = 200, top_p: float | None = None,
         temperature: float = 0.8, checkpoint_path: Path = DEFAULT_CHECKPOINT, compile: bool = False,
         compile_prefill: bool = False, device: str | None = None, profile: Path | None = None,
         seed: int | None = None, precision: str = "bf16", max_seq_length: int | None = None,
         draft_checkpoint_path: Path | None = None, speculate_k: int = 5, prompt_lookup: int | None = None,
         prefix_file: Path | None = None, save_prefix_cache: Path | None = None,
         load_prefix_cache: Path | None = None, devices: str | None = None) -> None:
    """Load the model, then generate num_samples times for each prompt (or chat); print speed and memory."""
    import prefix_cache  # these two import generate's steps themselves
    import speculative
    import tp

    rank, world_size = tp.world()
    log = functools.partial(tp.rank0_print, file=sys.stderr)

    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [DEFAULT_PROMPT])
    if not interactive and not all(prompts):
        raise ValueError("empty prompt; pass --prompt TEXT")
    if min(max_new_tokens, num_samples, batch_size, speculate_k) < 1 or (prompt_lookup is not None and prompt_lookup < 1):
        raise ValueError("--max_new_tokens, --num_samples, --batch_size, --speculate_k and --prompt_lookup must be at least 1")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need --temperature >= 0, --top_k >= 1 and 0 < --top_p <= 1")
    speculate = draft_checkpoint_path is not None or prompt_lookup is not None
    use_prefix = prefix_file is not None or load_prefix_cache is not None
    if draft_checkpoint_path is not None and prompt_lookup is not None:
        raise ValueError("choose one way to speculate: --draft_checkpoint_path or --prompt_lookup")
    if save_prefix_cache is not None and prefix_file is None:
        raise ValueError("--save_prefix_cache needs the prefix text: add --prefix_file F")
    if (speculate or use_prefix) and (batch_size != 1 or interactive):
        raise ValueError("speculation and prefix caches work on one sequence: use --batch_size 1, not --interactive")
    if speculate and use_prefix:
        raise ValueError("speculation and a prefix cache cannot be combined (yet); use one of them")
    if devices is not None and world_size > 1:
        raise ValueError("--devices splits layers within one process; with torchrun leave it out")
    stage_devices = [resolve_device(d) for d in devices.split(",")] if devices else None
    dev = stage_devices[0] if stage_devices else tp.init(resolve_device(device))
    if world_size > 1 and seed is None:
        seed = 1234  # every rank must sample the same tokens
    if seed is not None:
        torch.manual_seed(seed)
    t0 = time.perf_counter()
    stages = []
    transform = (lambda m: stages.extend(tp.split_layers(m, stage_devices))) if stage_devices else (
        tp.shard if world_size > 1 else None)
    model = load_model(checkpoint_path, dev, precision, transform=transform)
    tokenizer = get_tokenizer(Path(checkpoint_path))
    log(f"loaded {checkpoint_path} ({precision}, {dev}{f', rank {rank} of {world_size}' if world_size > 1 else ''}) "
        f"in {time.perf_counter() - t0:.2f} s")
    draft = None
    if draft_checkpoint_path is not None:
        draft = load_model(draft_checkpoint_path, dev, precision)
        if (tokenizer_fingerprint(draft_checkpoint_path) != tokenizer_fingerprint(checkpoint_path)
                or draft.config.vocab_size != model.config.vocab_size):
            raise ValueError(f"the draft {draft_checkpoint_path} has a different tokenizer than the target "
                             f"{checkpoint_path}; speculation needs the same one")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    decode_step = compile_step(decode_one_token, dev) if compile else decode_one_token
    prefill_step = compile_step(prefill, dev, dynamic=True) if compile_prefill else prefill
    if interactive:
        seq = max_seq_length or min(2048, model.config.block_size)
        return chat(model, tokenizer, max_new_tokens=max_new_tokens, max_seq_length=seq, sampling=sampling,
                    decode_step=decode_step, prefill_step=prefill_step)

    cache_fp = prefix_cache.fingerprint(checkpoint_path, model) if use_prefix else None
    saved = prefix_cache.load(load_prefix_cache, cache_fp) if load_prefix_cache is not None else None
    prefix_text = prefix_file.read_text() if prefix_file is not None else saved["text"] if saved else ""
    all_ids = [tokenizer.encode(prefix_text + p) for p in prompts]
    room = speculate_k if speculate else 0  # the target also scores k guesses past the last token
    longest = max(len(ids) for ids in all_ids)
    max_new_tokens = _context_budget(model, longest + room, max_new_tokens)
    if max_seq_length is not None and max_seq_length < longest + max_new_tokens + room:
        raise ValueError(f"--max_seq_length {max_seq_length} is shorter than the longest prompt ({longest} tokens) "
                         f"plus --max_new_tokens ({max_new_tokens}); raise it or leave it unset")
    seq_len = max_seq_length or longest + max_new_tokens + room
    for m in (model, draft) if draft is not None else (model,):
        m.setup_caches(batch_size, seq_len)
    for i, (d, layers) in enumerate(stages):
        log(f"stage {i} ({d}): layers {layers[0]}-{layers[-1]}, {tp.stage_bytes(model, layers) / 1e9:.3f} GB "
            "of weights and KV cache")
    cached = _setup_prefix(model, tokenizer, prefix_text, saved, save_prefix_cache, cache_fp, prefill_step) if use_prefix else []
    spec = dict(k=speculate_k, draft=draft, prompt_lookup=prompt_lookup, prefill_step=prefill_step,
                verify_step=compile_step(speculative.verify, dev) if compile else speculative.verify,
                draft_step=decode_step)

    def run(ids: list[int], on_token, stats) -> Tensor:
        nonlocal cached
        kw = dict(stop_ids=tokenizer.stop_ids, callback=on_token, **sampling)
        if speculate:
            return speculative.speculative_generate(model, torch.tensor(ids, device=dev), max_new_tokens,
                                                    stats=stats, **spec, **kw)
        if use_prefix:
            new, cached = generate_cached(model, ids, cached, max_new_tokens, decode_step=decode_step,
                                          prefill_step=prefill_step, **kw)
            return torch.tensor([new])
        x = torch.tensor(ids, device=dev).repeat(batch_size, 1)  # (B, T)
        return generate(model, x, max_new_tokens, decode_step=decode_step, prefill_step=prefill_step, **kw)

    size = model_size_bytes(model)
    for j, (text, ids) in enumerate(zip(prompts, all_ids)):
        for i in ([-1] if compile and j == 0 else []) + list(range(num_samples)):  # run -1 compiles
            stream = TextStream(tokenizer) if batch_size == 1 and i >= 0 and rank == 0 else None
            first = []

            def on_token(tok, stream=stream, first=first):
                if not first:
                    first.append(time.perf_counter())
                if stream is not None:
                    stream(tok)

            prof = torch.profiler.profile() if profile is not None and i == num_samples - 1 else contextlib.nullcontext()
            if stream is not None:
                print(text, end="", flush=True)
            stats = speculative.Stats()
            t0 = time.perf_counter()
            with prof:
                out = run(ids, on_token, stats)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t1 = time.perf_counter()
            if i < 0:
                log(f"compile time: {t1 - t0:.1f} s (first run, not counted)")
                continue
            if stream is not None:
                print(flush=True)
            else:
                for row in out.tolist():
                    tp.rank0_print(text + tokenizer.decode(row), "\n" + "-" * 40)
            n = out.size(1)
            ttft, decode_s = first[0] - t0, t1 - first[0]
            tps = (n - 1) / decode_s if n > 1 else float("nan")
            log(f"[sample {i}] {n} tokens x {batch_size}; time to first token {ttft * 1000:.0f} ms; "
                f"decode {tps * batch_size:.1f} tok/s; bandwidth {size * tps / 1e9:.2f} GB/s")
            if speculate:
                log(f"[sample {i}] speculation: {stats.summary()}")
            if isinstance(prof, torch.profiler.profile) and rank == 0:
                prof.export_chrome_trace(str(profile))
                log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
                log(f"profile trace written to {profile}")
    log(f"model size {size / 1e9:.3f} GB{' per rank' if world_size > 1 else ''}; "
        f"peak memory {peak_memory_bytes(dev) / 1e9:.2f} GB")


def _setup_prefix(model, tokenizer, text: str, saved: dict | None, save_path: Path | None, fp: dict,
                  prefill_step) -> list[int]:
    """Put the prefix's KV into the cache (from a saved file, else by prefilling it); the tokens it holds."""
    import prefix_cache

    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    if saved is not None and (not text or saved["tokens"] == ids):
        cached = prefix_cache.restore(model, saved)
        print(f"prefix: {len(cached)} tokens loaded from the cache file in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        return cached
    device = model.norm.weight.device
    prefill_step(model, torch.tensor([ids], device=device), torch.arange(len(ids), device=device))
    print(f"prefix: {len(ids)} tokens prefilled in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if save_path is not None:
        prefix_cache.save(save_path, model, ids, text, fp)
        print(f"prefix cache written to {save_path}", file=sys.stderr)
    return ids


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
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16", help="weights and activations dtype")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="KV cache length (default: prompt + max_new_tokens; 2048 in --interactive)")
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


def run_cli(main_fn, parser: argparse.ArgumentParser):
    """Call main_fn with the parsed flags; a user's mistake (ValueError, FileNotFoundError) exits with one line."""
    import tp

    try:
        return main_fn(**vars(parser.parse_args()))
    except (ValueError, FileNotFoundError) as e:
        tp.rank0_print(f"error: {e}", file=sys.stderr)  # every rank meets the same error; one line is enough
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main, build_parser())

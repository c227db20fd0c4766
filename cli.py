"""What the commands share at the terminal: one clear line for a user's mistake (run_cli), text streamed as it is
generated (TextStream), timed samples with their speed (timed_samples) and the interactive chat loop (chat).

The helpers that need the engine take its functions as arguments (chat's `turn`, timed_samples' `run`), so that
this file imports nothing above the tokenizer. Output goes through tp: text on rank 0's stdout, notes on stderr.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import cuda
import speculative
import tp
from checkpoint import KV_DTYPES
from model import fit_context
from tokenizer import Detokenizer


def add_numerics_flags(p: argparse.ArgumentParser) -> None:
    """--quant_activations and --kv_dtype, as every command that loads a model reads them (kernels.Cpu.activations
    and checkpoint.resolve_kv_dtype resolve them)."""
    p.add_argument("--quant_activations", choices=["auto", "int16", "int8"], default="auto",
                   help="how int8 / int4 layers round activations on the CPU: int16 (exact to ~1e-5), int8 "
                        "(llama.cpp's Q8, faster; perplexity +0.2-0.6%%), auto: int8 for int4 checkpoints where the "
                        "CPU has AVX-512 VNNI")
    p.add_argument("--kv_dtype", choices=list(KV_DTYPES), default="auto",
                   help="how the KV cache stores keys and values: fp32, bf16, fp16, or int8 with a scale per 32 "
                        "values (a quarter of fp32's memory, perplexity +0.1%%); auto: int8 for int8 / int4 "
                        "checkpoints on an AVX2 CPU, else the activations' dtype (exact)")


def run_cli(main_fn: Callable, parser: argparse.ArgumentParser, args: list[str] | None = None):
    """Call main_fn with the parsed flags; a user's mistake (ValueError, FileNotFoundError) exits with one line."""
    try:
        return main_fn(**vars(parser.parse_args(args)))
    except (ValueError, FileNotFoundError) as e:
        tp.log(f"error: {e}")  # every rank meets the same error; one line is enough
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: files being written are left as they were (files.written)
        tp.log("interrupted")
        sys.exit(130)


class TextStream:
    """A generate callback that prints batch row 0's text as it grows, up to its first stop token (a GPU's decode
    loop may run a few tokens past it: generate.py)."""

    def __init__(self, tokenizer, out=None):
        self.text, self.stop_ids, self.out = Detokenizer(tokenizer), tokenizer.stop_ids, out or sys.stdout
        self.stopped = False

    def __call__(self, token: Tensor) -> None:
        t = int(token[0, 0])
        self.stopped = self.stopped or t in self.stop_ids
        if not self.stopped:
            self.out.write(self.text.push(t))
            self.out.flush()


class Watch:
    """A timed run's callback: stamps the first token's time and streams each token when given a stream."""

    def __init__(self, stream: TextStream | None = None, device: torch.device = torch.device("cpu")):
        self.stream, self.first, self.device = stream, None, device

    def __call__(self, token: Tensor) -> None:
        if self.first is None:
            cuda.synchronize(self.device)  # the first token exists once the device has computed it
            self.first = time.perf_counter()
        if self.stream is not None:
            self.stream(token)


def timed_samples(run: Callable, prompts: list[str], all_ids: list[list[int]], tokenizer, device: torch.device, *,
                  num_samples: int, warmup: bool, batch_size: int, bytes_per_token: int, profile: Path | None,
                  speculate: bool) -> None:
    """Call run(ids, callback, stats) num_samples times per prompt (first once untimed when warmup: it compiles);
    stream (batch 1) or print the text; log time to first token, decode speed, bandwidth and speculation stats."""
    for j, (text, ids) in enumerate(zip(prompts, all_ids)):
        for i in ([-1] if warmup and j == 0 else []) + list(range(num_samples)):
            stream = TextStream(tokenizer) if batch_size == 1 and i >= 0 and tp.world()[0] == 0 else None
            watch, stats = Watch(stream, device), speculative.Stats()
            profiling = profile is not None and i == num_samples - 1
            if stream is not None:
                print(text, end="", flush=True)
            cuda.synchronize(device)  # nothing queued before the run (loading, the last sample) is timed with it
            t0 = time.perf_counter()
            with torch.profiler.profile() if profiling else contextlib.nullcontext() as prof:
                out = run(ids, watch, stats)
            cuda.synchronize(device)
            t1 = time.perf_counter()
            if i < 0:
                tp.log(f"compile time: {t1 - t0:.1f} s (first run, not counted)")
                continue
            if stream is not None:
                print(flush=True)
            else:
                for row in out.tolist():
                    tp.rank0_print(text + tokenizer.decode(row), "\n" + "-" * 40)
            n = out.size(1)
            tps = (n - 1) / (t1 - watch.first) if n > 1 else float("nan")
            tp.log(f"[sample {i}] {n} tokens x {batch_size}; time to first token {(watch.first - t0) * 1000:.0f} ms; "
                   f"decode {tps * batch_size:.1f} tok/s; bandwidth {bytes_per_token * tps / 1e9:.2f} GB/s")
            if speculate:
                tp.log(f"[sample {i}] speculation: {stats.summary()}")
            if profiling and tp.world()[0] == 0:
                prof.export_chrome_trace(str(profile))
                tp.log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
                tp.log(f"profile trace written to {profile}")


def chat_turn(tokenizer, messages: list[dict], max_new_tokens: int, context: int) -> tuple[list[int], int]:
    """(token ids, new-token budget) of the conversation's next turn. When the whole conversation no longer fits,
    only its last message stays in `messages` (a new conversation); ValueError when that alone does not fit."""
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    try:
        return ids, fit_context(len(ids), max_new_tokens, context)
    except ValueError:
        if len(messages) == 1:
            raise
    tp.log(f"note: the conversation filled the context of {context} tokens; starting a new one "
           "(raise --max_seq_length for longer chats)")
    del messages[:-1]
    return chat_turn(tokenizer, messages, max_new_tokens, context)


def chat(tokenizer, turn: Callable, *, max_new_tokens: int, context: int) -> None:
    """Multi-turn chat on stdin/stdout. turn(ids, cached, budget, callback) -> (new tokens, tokens cached after)
    answers after the conversation so far, reusing the KV the cache already holds (generate.generate_cached)."""
    messages, cached = [], []
    print(f"chat with the model; an empty line or Ctrl-D ends it (context: {context} tokens)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        n = len(messages)
        try:
            ids, budget = chat_turn(tokenizer, messages, max_new_tokens, context)
        except ValueError as e:
            tp.log(f"error: {e}")
            messages.pop()
            continue
        if len(messages) < n:  # a new conversation: nothing in the cache is of use
            cached = []
        print("model> ", end="", flush=True)
        t0 = time.perf_counter()
        new, cached = turn(ids, cached, budget, TextStream(tokenizer))
        reply = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
        messages.append({"role": "assistant", "content": reply})
        print(f"\n[{len(new)} tokens in {time.perf_counter() - t0:.2f} s, {len(cached)} tokens in cache]")

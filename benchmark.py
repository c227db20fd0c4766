"""Measure decoding speed: fastllama compiled and eager, against transformers' generate on the same weights.

    python benchmark.py --precisions fp32,bf16 --compare transformers

For each precision it runs greedy generation of --max_new_tokens tokens after a --prompt_tokens prompt,
--runs times, and reports medians: time to first token, decode tokens/s (after the first token) and
memory bandwidth achieved (bytes of weights x tokens/s). The transformers model is built from our
checkpoint (scripts/convert_hf_checkpoint.to_hf_state_dict), so both sides run the same weights.
Prints a markdown table and writes JSON with --json.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from checkpoint import load_state_dict, read_config
from generate import (DEFAULT_CHECKPOINT, PRECISIONS, compile_step, decode_one_token, generate, load_model,
                      model_size_bytes, resolve_device, run_cli)
from tokenizer import get_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from convert_hf_checkpoint import to_hf_config, to_hf_state_dict  # noqa: E402

TEXT = ("The history of computing is a story of people who wanted to calculate faster than they could by hand. "
        "From the abacus to mechanical calculators, from punched cards to transistors, each step made machines "
        "smaller, cheaper and more capable. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n tokens of English text."""
    ids = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def timed_generate(run, n_new: int) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) of run(callback), which must produce n_new tokens."""
    marks = []
    t0 = time.perf_counter()
    run(lambda _tok: marks.append(time.perf_counter()))
    t1 = time.perf_counter()
    assert len(marks) == n_new, f"expected {n_new} tokens, got {len(marks)}"
    return marks[0] - t0, (n_new - 1) / (t1 - marks[0])


def bench_ours(checkpoint, device, precision, ids, n_new, runs, compiled) -> dict:
    model = load_model(checkpoint, device, precision)
    model.setup_caches(1, len(ids) + n_new)
    step = compile_step(decode_one_token, device) if compiled else decode_one_token
    x = torch.tensor([ids], device=device)

    def run(cb):
        generate(model, x, n_new, temperature=0.0, decode_step=step, callback=cb)

    t0 = time.perf_counter()
    run(lambda _: None)  # warm-up; compiles when compiled
    warm = time.perf_counter() - t0
    results = [timed_generate(run, n_new) for _ in range(runs)]
    size = model_size_bytes(model)
    return summarize(results, size, compile_s=warm if compiled else None)


def bench_transformers(checkpoint, device, precision, ids, n_new, runs) -> dict:
    import transformers

    args, _ = read_config(checkpoint)
    cfg = to_hf_config(args)
    config = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=PRECISIONS[precision])
    sd = to_hf_state_dict(load_state_dict(checkpoint), args)
    if args.tie_embeddings:
        del sd["lm_head.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model = model.to(device).eval()
    x = torch.tensor([ids], device=device)

    class Callback(transformers.generation.streamers.BaseStreamer):
        def __init__(self, cb):
            self.cb, self.first = cb, True

        def put(self, value):
            if self.first:  # the first put is the prompt itself
                self.first = False
            else:
                self.cb(value)

        def end(self):
            pass

    def run(cb):
        with torch.no_grad():
            model.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, streamer=Callback(cb),
                           pad_token_id=0)

    run(lambda _: None)
    results = [timed_generate(run, n_new) for _ in range(runs)]
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return summarize(results, size, compile_s=None)


def summarize(results, size_bytes, compile_s) -> dict:
    ttft = statistics.median(r[0] for r in results)
    tps = statistics.median(r[1] for r in results)
    return {"ttft_ms": ttft * 1000, "decode_tok_s": tps, "bandwidth_gb_s": size_bytes * tps / 1e9,
            "weights_gb": size_bytes / 1e9, "compile_s": compile_s, "runs": len(results)}


def main(*, checkpoint_path: Path = DEFAULT_CHECKPOINT, device: str | None = None, precisions: str = "fp32,bf16",
         compare: str | None = None, prompt_tokens: int = 32, max_new_tokens: int = 128, runs: int = 3,
         json_path: Path | None = None) -> list[dict]:
    """Benchmark each precision; print a markdown table; return (and optionally save) the rows."""
    dev = resolve_device(device)
    names = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise ValueError(f"unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
    if compare not in (None, "transformers"):
        raise ValueError(f"--compare {compare!r} is not supported; supported: transformers")
    ids = prompt_ids(get_tokenizer(checkpoint_path), prompt_tokens)
    torch.manual_seed(0)
    rows = []
    for precision in names:
        systems = [("fastllama --compile", lambda: bench_ours(checkpoint_path, dev, precision, ids, max_new_tokens, runs, True)),
                   ("fastllama eager", lambda: bench_ours(checkpoint_path, dev, precision, ids, max_new_tokens, runs, False))]
        if compare == "transformers":
            systems.append(("transformers generate",
                            lambda: bench_transformers(checkpoint_path, dev, precision, ids, max_new_tokens, runs)))
        for system, fn in systems:
            print(f"running {system} {precision} ...", file=sys.stderr, flush=True)
            rows.append({"system": system, "precision": precision, "device": str(dev),
                         "threads": torch.get_num_threads(), **fn()})
    print_table(rows, prompt_tokens, max_new_tokens)
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def print_table(rows, prompt_tokens, max_new_tokens) -> None:
    print(f"\nprompt {prompt_tokens} tokens, {max_new_tokens} new tokens, batch 1, greedy; medians\n")
    print("| precision | system | decode tok/s | vs compiled | time to first token (ms) | bandwidth (GB/s) | compile (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["precision"] == r["precision"] and x["system"] == "fastllama --compile")
        compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
        print(f"| {r['precision']} | {r['system']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f} "
              f"| {r['ttft_ms']:.0f} | {r['bandwidth_gb_s']:.1f} | {compile_s} |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark decoding speed of a fastllama checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="model.pth or its folder")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precisions", type=str, default="fp32,bf16", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--compare", choices=["transformers"], default=None, help="also run this system on the same weights")
    p.add_argument("--prompt_tokens", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens generated per run")
    p.add_argument("--runs", type=int, default=3, help="timed runs per system (after one warm-up)")
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the rows as JSON here")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())

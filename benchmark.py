"""Measure fastllama's speed at each precision, side by side with transformers and llama.cpp on the same weights.

    python benchmark.py --precisions fp32,bf16,int8,int4 --compare transformers,llama.cpp

For each precision and system: prefill tokens/s of a --prompt_tokens prompt, time to first token,
decode tokens/s at batch 1 and at each --batch_size (all rows' tokens, and how many times batch 1's), startup
(a new process to its first token, warm caches), the weight bandwidth that decode speed implies (bytes
of weights read per token, by memory.bytes_read_per_token for every system, x tokens/s) next to the
machine's own copy bandwidth measured in the same run, peak memory and compile time; medians of --runs
runs after a warm-up. Every row runs in its own process, so peak memory is that row's alone. The systems
of one precision are loaded side by side and their timed runs alternate (A B, B A, ...): this machine's
speed drifts by a fifth within minutes, and alternating puts that drift on both sides of a ratio
instead of into it.

Precisions: fp32 and bf16 run the float checkpoint; int8 and int4 (group 32) run quantize.py's
checkpoints beside it (made on first use), in the activation precision --precision auto gives them
(checkpoint.resolve_precision).
transformers runs the float precisions from the same weights (convert_hf_checkpoint.to_hf_state_dict).
llama.cpp (through llama-cpp-python, an optional dependency: `pip install llama-cpp-python`) runs GGUF
files made from the same checkpoint: F32 / BF16 written by scripts/convert_gguf.export_gguf, Q8_0 and
Q4_1 quantized from the F32 file by llama.cpp itself (embedding and output kept Q8_0, as our int4).
Prints a markdown table; --json writes the rows.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import cuda
import layers
import memory_bench
import serve_bench
from bench_files import LLAMA_CPP_TYPES, QUANTIZED, ROOT, activations_of, checkpoint_for, llama_cpp_gguf, save_json
from checkpoint import PRECISIONS, Checkpoint, kv_dtype_name
from cli import add_numerics_flags, run_cli
from generate import (
    DEFAULT_CHECKPOINT,
    compile_step,
    decode_one_token,
    generate,
    load_model,
    resolve_device,
)
from memory import bytes_read_per_token, converter, copy_bandwidth, model_bytes_read_per_token, peak_memory_bytes
from tokenizer import get_tokenizer

BENCH_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
SYSTEMS = ("transformers", "llama.cpp")
PRECISION_LABELS = {"int4": "int4 g32"}  # as the table prints them
TEXT = ("The history of computing is a story of people who wanted to calculate faster than they could by hand. "
        "From the abacus to mechanical calculators, from punched cards to transistors, each step made machines "
        "smaller, cheaper and more capable. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n tokens of English text."""
    ids = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def timed_generate(run, n_new: int, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(time to first token s, decode tokens/s after it) of run(callback), which must call back n_new times. On a
    GPU each stamp waits for the work before it: at the start, at the first token and at the end."""
    marks = []

    def mark(_tok):
        if not marks:
            cuda.synchronize(device)
        marks.append(time.perf_counter())

    cuda.synchronize(device)
    t0 = time.perf_counter()
    run(mark)
    cuda.synchronize(device)
    t1 = time.perf_counter()
    assert len(marks) == n_new, f"expected {n_new} tokens, got {len(marks)}"
    return marks[0] - t0, (n_new - 1) / (t1 - marks[0])


@dataclass
class Runner:
    """A system loaded in its worker process: make_run(b) returns run(callback), which generates the row's
    tokens for batch b and calls back once per token; info() gives the row's other columns at the end."""
    make_run: Callable
    batch_sizes: tuple
    info: Callable[[], dict]


# ---- the systems; each returns the Runner of one row ------------------------------------------------------

def bench_fastllama(checkpoint, device, precision, ids, n_new, batch_sizes, compiled, numerics: dict | None = None
                    ) -> Runner:
    """numerics: load_model's quant_activations and kv_dtype (default: auto)."""
    ckpt = Checkpoint.open(checkpoint_for(checkpoint, precision))
    activations = activations_of(precision, ckpt, device)
    model = load_model(ckpt, device, activations, **(numerics or {}))
    step = compile_step(decode_one_token, device) if compiled else decode_one_token

    def make_run(b):
        x = torch.tensor([ids] * b, device=device)
        model.setup_caches(b, len(ids) + n_new)
        return lambda cb: generate(model, x, n_new, temperature=0.0, decode_step=step, callback=cb)

    return Runner(make_run, (1, *batch_sizes), lambda: {
        "weights_file": ckpt.weights.name, "activations": activations,
        "kv_dtype": kv_dtype_name(model),
        "quant_activations": layers.activations(model),
        "weights_gb": model_bytes_read_per_token(model) / 1e9,
        "peak_memory_gb": peak_memory_bytes(device) / 1e9})


def bench_transformers(checkpoint, device, precision, ids, n_new, batch_sizes) -> Runner:
    import transformers
    hf = converter("convert_hf_checkpoint")

    if precision in QUANTIZED:
        raise ValueError("transformers runs the float precisions only")
    ckpt = Checkpoint.open(checkpoint)
    config = transformers.AutoConfig.for_model(**hf.to_hf_config(ckpt.args))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=PRECISIONS[precision])
    sd = hf.to_hf_state_dict(ckpt.state_dict(), ckpt.args)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model = model.to(device).eval()

    class Streamer(transformers.generation.streamers.BaseStreamer):
        def __init__(self, cb):
            self.cb, self.first = cb, True

        def put(self, value):
            if self.first:  # the first put is the prompt itself
                self.first = False
            else:
                self.cb(value)

        def end(self):
            pass

    def make_run(b):
        x = torch.tensor([ids] * b, device=device)

        @torch.no_grad()
        def run(cb):
            model.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, streamer=Streamer(cb),
                           pad_token_id=0)
        return run

    sizes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    weights_gb = bytes_read_per_token(sizes, "model.embed_tokens.", config.tie_word_embeddings) / 1e9
    return Runner(make_run, (1, *batch_sizes), lambda: {"weights_gb": weights_gb,
                                                      "peak_memory_gb": peak_memory_bytes(device) / 1e9})


def bench_llama_cpp(checkpoint, device, precision, ids, n_new, batch_sizes) -> Runner:
    import llama_cpp

    if device.type != "cpu":
        raise ValueError("the llama.cpp comparison runs on the CPU build of llama-cpp-python")
    path = llama_cpp_gguf(checkpoint, precision)
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + n_new + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def run(cb):
        llm.reset()
        for i, tok in enumerate(llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)):
            cb(tok)
            if i + 1 == n_new:
                break

    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    weights_gb = bytes_read_per_token(sizes, "token_embd.", "output.weight" not in sizes) / 1e9
    return Runner(lambda _b: run, (1,), lambda: {"weights_file": path.name, "weights_gb": weights_gb,
                                                  "peak_memory_gb": peak_memory_bytes(device) / 1e9})


def parse_batch_sizes(spec: str | int) -> list[int]:
    """--batch_size: one size or a comma-separated sweep, each 2 or more (batch 1 is always measured)."""
    try:
        sizes = sorted({int(b) for b in str(spec).split(",") if b.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 2:
        raise ValueError(f"--batch_size {spec}: give sizes of 2 or more, comma-separated (batch 1 is always measured)")
    return sizes


LLAMA_CPP_STARTUP = ("import sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), "
                     "verbose=False); next(llm.generate(llm.tokenize(b'hi'), top_k=1, temp=0.0))")


def startup_command(system: str, checkpoint: Path, precision: str, device: torch.device,
                    numerics: dict | None = None) -> list[str] | None:
    """The command whose run time is a system's startup: a new process, its weights loaded, one token of a short
    prompt; None for transformers (not timed)."""
    if system == "llama.cpp":
        return [sys.executable, "-c", LLAMA_CPP_STARTUP, str(llama_cpp_gguf(checkpoint, precision)),
                str(torch.get_num_threads())]
    if not system.startswith("fastllama"):
        return None
    ckpt = Checkpoint.open(checkpoint_for(checkpoint, precision))
    return [sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(ckpt.weights), "--prompt", "hi",
            "--max_new_tokens", "1", "--num_samples", "1", "--device", str(device),
            "--precision", activations_of(precision, ckpt, device), *flags(numerics or {})] + (
                ["--compile"] if "compile" in system else [])


def startup_seconds(command: list[str], runs: int) -> float:
    """Median wall time of `runs` runs of command, after one that warms the caches (files, compiled code)."""
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])} ... failed: {done.stderr.strip().splitlines()[-1:]}")
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_worker(spec: dict) -> None:
    """The worker process of one row: load the system that spec names, then answer the parent's commands, one
    JSON line each way: warm-up at batch b (its time), one timed run at batch b, and at the end the row's info."""
    device = resolve_device(spec["device"])
    torch.manual_seed(0)
    args = (Path(spec["checkpoint"]), device, spec["precision"], spec["ids"], spec["max_new_tokens"],
            spec["batch_sizes"])
    system = spec["system"]
    if system.startswith("fastllama"):
        runner = bench_fastllama(*args, compiled=system == "fastllama --compile", numerics=spec["numerics"])
    else:
        runner = {"transformers": bench_transformers, "llama.cpp": bench_llama_cpp}[system](*args)
    reply = lambda obj: print(REPLY + json.dumps(obj), flush=True)  # noqa: E731
    reply({"batch_sizes": runner.batch_sizes})
    run = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "warm":
            run = runner.make_run(cmd["b"])
            t0 = time.perf_counter()
            run(lambda _: None)  # compiles the decode step for this batch size when it is compiled
            reply({"s": time.perf_counter() - t0})
        elif cmd["op"] == "time":
            reply(dict(zip(("ttft", "tps"), timed_generate(run, spec["max_new_tokens"], device))))
        else:
            reply(runner.info())
            return


REPLY = "@@benchmark "  # marks the worker's answers among whatever else its libraries print


class Worker:
    """The parent's handle on one row's worker process (run_worker)."""

    def __init__(self, spec: dict):
        """Start the worker; it loads its system while the others start too (ready() waits for it)."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker_spec", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.batch_sizes = ()

    def ready(self) -> "Worker":
        self.batch_sizes = tuple(self._read()["batch_sizes"])
        return self

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"exit code {self.proc.wait()} (its stderr is above)")

    def call(self, op: str, b: int = 1) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "b": b}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure(specs: dict, runs: int, batch_sizes: list[int]) -> dict:
    """Rows for the systems of one precision (system -> worker spec): each loaded in its own worker, warmed up,
    then timed in alternating order, batch 1 first, then each of batch_sizes for the systems that run batches."""
    rows, workers = {s: {} for s in specs}, {}

    def attempt(system, fn):  # a failing system leaves its row with the error; the others go on
        try:
            return fn()
        except (OSError, RuntimeError, ValueError) as e:
            rows[system]["error"] = str(e)
            workers.pop(system, None)
            return None

    print(f"loading {', '.join(specs)} ({next(iter(specs.values()))['precision']}) ...", file=sys.stderr, flush=True)
    started = {system: Worker(spec) for system, spec in specs.items()}
    for system, worker in started.items():
        if attempt(system, worker.ready) is not None:
            workers[system] = worker
    for b in (1, *batch_sizes):
        active = [s for s, w in workers.items() if b in w.batch_sizes]
        times = {s: [] for s in active}
        for s in active:
            warm = attempt(s, lambda: workers[s].call("warm", b))
            if warm is not None and b == 1:
                rows[s]["warmup_s"] = warm["s"]
        for r in range(runs):
            for s in active if r % 2 == 0 else active[::-1]:
                if s in workers:
                    t = attempt(s, lambda: workers[s].call("time", b))
                    if t is not None:
                        times[s].append(t)
        for s in (s for s in active if s in workers):
            ttft, tps = statistics.median(t["ttft"] for t in times[s]), statistics.median(t["tps"] for t in times[s])
            if b == 1:
                rows[s].update(ttft_ms=ttft * 1e3, prefill_tok_s=len(specs[s]["ids"]) / ttft, decode_tok_s=tps,
                               decode_batch_tok_s={})
            else:
                rows[s]["decode_batch_tok_s"][str(b)] = tps * b  # all rows' tokens per second (JSON keys: str)
    for s in list(workers):
        info = attempt(s, lambda: workers[s].call("info"))
        if info is not None:
            rows[s].update(info)
            workers[s].close()
    return rows


# ---- the command ---------------------------------------------------------------------------------------

def flags(numerics: dict) -> list[str]:
    """The command-line flags of load_model's numerics (generate.py's and server.py's)."""
    return [a for k, v in numerics.items() for a in (f"--{k}", v)]


def split(spec: str) -> list[str]:
    """The names of a comma-separated flag value."""
    return [p.strip() for p in spec.split(",") if p.strip()]


def main(*, checkpoint_path: Path = DEFAULT_CHECKPOINT, device: str | None = None,
         precisions: str | None = None, compare: str | None = None, eager: bool = False,
         prompt_tokens: int = 256, max_new_tokens: int | None = None, batch_size: str | int = "4", runs: int = 5,
         startup: bool = True, json_path: Path | None = None, worker_spec: str | None = None, memory: bool = False,
         serve: bool = False, clients: str = "1,2,4,8,16", rate: float = 2.0, requests: int = 32,
         rows: int = 8, context: int = 4096, prompts: Path = serve_bench.PROMPTS, prompt_sets: str = "chat,long",
         llama_server: str | None = None, gguf: Path | None = None, quant_activations: str = "auto",
         kv_dtype: str = "auto") -> list[dict]:
    """Benchmark each precision and system; print a markdown table; return (and optionally save) the rows."""
    if worker_spec is not None:
        run_worker(json.loads(worker_spec))
        return []
    numerics = {"quant_activations": quant_activations, "kv_dtype": kv_dtype}  # fastllama's, as load_model takes them
    if serve:
        counts = [int(c) for c in clients.split(",") if c.strip()]
        if not counts or min(counts) < 1 or min(requests, rows, context) < 1 or rate < 0:
            raise ValueError("--clients needs positive counts; --requests, --rows, --context at least 1; --rate >= 0")
        n_new = 64 if max_new_tokens is None else max_new_tokens
        return serve_bench.main_serve(Path(checkpoint_path), split(precisions or "int4"), split(prompt_sets), counts,
                                      rate or None, requests, n_new, rows, context, prompts, not eager, llama_server,
                                      gguf, json_path, torch.get_num_threads(), flags(numerics))
    max_new_tokens = 128 if max_new_tokens is None else max_new_tokens
    precisions = precisions or "fp32,bf16,int8,int4"
    dev = resolve_device(device)
    names = split(precisions)
    bad = [p for p in names if p not in BENCH_PRECISIONS]
    if bad or not names:
        raise ValueError(f"unknown precision(s) {bad}; choose from {', '.join(BENCH_PRECISIONS)}")
    batch_sizes = parse_batch_sizes(batch_size)
    if memory:
        cases = memory_bench.memory_table(Path(checkpoint_path), names, [1, *batch_sizes], [2048, 8192])
        memory_bench.print_memory_table(cases)
        if json_path is not None:
            save_json(json_path, cases)
        return cases
    others = [s.strip() for s in (compare or "").split(",") if s.strip()]
    if any(s not in SYSTEMS for s in others):
        raise ValueError(f"--compare {compare!r}: choose from {', '.join(SYSTEMS)} (comma-separated)")
    if "llama.cpp" in others:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ValueError("--compare llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
    weights = Checkpoint.open(checkpoint_path).weights
    ids = prompt_ids(get_tokenizer(weights.parent), prompt_tokens)
    stream = copy_bandwidth(dev)
    print(f"memory copy bandwidth: {stream:.1f} GB/s", file=sys.stderr)
    systems = ["fastllama --compile"] + (["fastllama eager"] if eager else []) + others
    rows = []
    for precision in names:
        specs = {system: {"system": system, "precision": precision, "checkpoint": str(weights), "device": str(dev),
                          "ids": ids, "max_new_tokens": max_new_tokens, "batch_sizes": batch_sizes,
                          "numerics": numerics}
                 for system in systems if not (system == "transformers" and precision in QUANTIZED)
                 and not (system == "llama.cpp" and precision not in LLAMA_CPP_TYPES)}
        for system, row in measure(specs, runs, batch_sizes).items():
            row = {"system": system, "precision": precision, "device": str(dev), "threads": torch.get_num_threads(),
                   "batch_sizes": batch_sizes, "copy_bandwidth_gb_s": stream, **row}
            row["compile_s"] = row.get("warmup_s") if system == "fastllama --compile" else None
            command = (startup_command(system, weights, precision, dev, numerics) if startup and "error" not in row
                       else None)
            row["startup_s"] = startup_seconds(command, min(runs, 3)) if command else None
            if "decode_tok_s" in row:
                row["bandwidth_gb_s"] = row["weights_gb"] * row["decode_tok_s"]
            rows.append(row)
    print_table(rows, prompt_tokens, max_new_tokens, batch_sizes, stream)
    if json_path is not None:
        save_json(json_path, rows)
    return rows


def print_table(rows, prompt_tokens, max_new_tokens, batch_sizes, stream) -> None:
    def num(v, fmt=".1f"):
        return "-" if v is None else format(v, fmt)

    def batched(r, b):  # all rows' tokens/s at batch b, and how many times batch 1's that is
        tps = r.get("decode_batch_tok_s", {}).get(str(b))
        return "-" if tps is None else f"{tps:.1f} ({tps / r['decode_tok_s']:.1f}x)"

    threads = rows[0]["threads"] if rows else "?"
    print(f"\nprompt {prompt_tokens} tokens, {max_new_tokens} new tokens, greedy, {threads} "
          f"threads; medians; memory copy bandwidth {stream:.1f} GB/s; startup: process start to exit after one "
          "token of `generate.py --prompt hi` (llama.cpp: loading and one token through llama-cpp-python)\n")
    cols = ["precision", "system", "prefill tok/s", "first token ms", "decode tok/s",
            *(f"batch {b} tok/s" for b in batch_sizes), "GB/s", "of copy bw", "peak GB", "compile s", "startup s",
            "vs llama.cpp", "vs transformers"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if "error" in r:
            print(f"| {r['precision']} | {r['system']} | failed: {r['error']} |" + "|" * (len(cols) - 3))
            continue
        ratios = []
        for other in SYSTEMS:
            ref = next((x for x in rows if x["precision"] == r["precision"] and x["system"] == other
                        and "decode_tok_s" in x), None)
            ours = r["system"].startswith("fastllama")
            ratios.append(f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref and ours else "-")
        system = f"llama.cpp ({LLAMA_CPP_TYPES[r['precision']]})" if r["system"] == "llama.cpp" else r["system"]
        label = PRECISION_LABELS.get(r["precision"], r["precision"])
        print(f"| {label} | {system} | {num(r['prefill_tok_s'])} | {num(r['ttft_ms'], '.0f')} "
              f"| {num(r['decode_tok_s'])} | {' | '.join(batched(r, b) for b in batch_sizes)} "
              f"| {num(r['bandwidth_gb_s'])} | {r['bandwidth_gb_s'] / stream:.0%} | {num(r['peak_memory_gb'], '.2f')} "
              f"| {num(r['compile_s'], '.0f')} | {num(r.get('startup_s'))} | {ratios[1]} | {ratios[0]} |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark a fastllama checkpoint, optionally against transformers and llama.cpp.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="float model.pth or its folder")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precisions", type=str, default=None,
                   help=f"comma-separated from {', '.join(BENCH_PRECISIONS)} (int4 = group size 32; default: all); "
                        "--serve: int4 (Q4_1), int8 (Q8_0) (default: int4)")
    p.add_argument("--compare", type=str, default=None, help="comma-separated: transformers, llama.cpp")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=False,
                   help="also run fastllama without compile")
    p.add_argument("--prompt_tokens", type=int, default=256, help="prompt length in tokens (prefill)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="tokens generated per run (128; --serve: 64)")
    p.add_argument("--batch_size", type=str, default="4",
                   help="batch sizes measured besides batch 1, comma-separated (a sweep: 2,4,8,16)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per row (after one warm-up)")
    p.add_argument("--startup", action=argparse.BooleanOptionalAction, default=True,
                   help="time each system from process start to its first token (warm caches; up to 3 runs)")
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--memory", action="store_true",
                   help="instead: memory.py's estimate beside the measured peak, rows 1 and --batch_size, contexts "
                        "2048 and 8192 (CPU)")
    g = p.add_argument_group("serving (--serve): server.py and llama-server on the same weights, OpenAI chat")
    g.add_argument("--serve", action="store_true", help="instead: the serving benchmark (compiled unless --eager)")
    g.add_argument("--clients", type=str, default="1,2,4,8,16", help="closed-loop client counts")
    g.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second (0: none)")
    g.add_argument("--requests", type=int, default=32, help="requests per load shape and system")
    g.add_argument("--rows", type=int, default=8, help="our server's rows = llama-server's --parallel slots")
    g.add_argument("--context", type=int, default=4096, help="positions per row / slot")
    g.add_argument("--prompts", type=Path, default=serve_bench.PROMPTS,
                   help="the chat prompt set: chats, one JSON object per line")
    g.add_argument("--prompt_sets", type=str, default="chat,long",
                   help="chat (--prompts), long (summaries of 256-2048 tokens of data/'s texts), comma-separated")
    g.add_argument("--llama_server", type=str, default=None,
                   help="llama-server binary (default: llama-server on PATH if there; '' for none)")
    g.add_argument("--gguf", type=Path, default=None,
                   help="the GGUF llama-server runs (default: the default model's, or llama.cpp's Q4_1 of the weights)")
    add_numerics_flags(p)
    p.add_argument("--worker_spec", type=str, default=None, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())

"""What a model takes in memory: measured on a loaded model, or estimated from its config before anything loads.

    python memory.py checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --rows 8 --context 8192
    python memory.py meta-llama/Llama-2-70b-hf --precision int4 --context 4096 --rows 8 --memory 64GiB

MODEL is a checkpoint folder or weights file, a Hugging Face folder with config.json, a GGUF file, or a name from
configs.py's offline table. `Sizer` builds the model on the meta device the way the loader does (the layouts of
the device's kernels, tied tensors once, setup_caches' KV cache and tables), so its weight and KV bytes are the
loaded model's, byte for byte. The largest activation, the load's transient peak and the runtime's own baseline
are modelled, and checked against measured peaks (tests/test_memory.py; the figures are in docs/benchmarks.md).

bytes_read_per_token is the one rule behind every GB/s figure (generate.py's and benchmark.py's for each system):
a decode step reads every weight once, except the embedding table, of which a token reads one row, unless the
output layer reads that same table (tied embeddings).
"""
import argparse
import importlib
import json
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import cuda
import layers
from checkpoint import KV_DTYPES, PRECISIONS, Checkpoint, Quantization, build_model, resolve_kv_dtype, resolve_precision
from configs import KNOWN, known_config
from kernels import GEMV_MAX_ROWS
from model import ModelArgs, Transformer

KV_BUFFERS = ("k_cache", "v_cache", "k_scales", "v_scales")  # model.KVCache's (scales: int8 caches only)
CACHE_BUFFERS = (*KV_BUFFERS, "freqs_cis")
MiB = 2**20
# The runtime's own resident memory before a model's weights: Python, torch, the server's libraries and the built C++
# kernels. Measured once on a CPU (server.py's process after sizing a float model: 255 MiB; generate.py's: 237 MiB;
# docs/benchmarks.md). On CUDA it stands for the CUDA context's device memory, not measured here (no GPU): an assumed
# 512 MiB, NVIDIA's usual few hundred MiB.
BASELINE_BYTES = {"cpu": 255 * MiB, "cuda": 512 * MiB}
# torch._dynamo and what it imports (sympy, ...), measured: a process holds it once something has loaded it, such as
# --compile or sizing an int4 model (its repacking on the meta device runs Python decompositions that import it).
DYNAMO_BYTES = 76 * MiB
# weight formats by name: (the float weights' dtype as stored, the quantization); q8_0 / q4_1 are GGUF imports
WEIGHT_FORMATS = {
    "fp32": ("fp32", None), "bf16": ("bf16", None), "fp16": ("fp16", None),
    "int8": ("fp32", Quantization("int8")), "int4": ("fp32", Quantization("int4", groupsize=32)),
    "q8_0": ("fp32", Quantization("int8", int8_groupsize=32)),
    "q4_1": ("fp32", Quantization("int4", groupsize=32, int8_groupsize=32)),
}
DEFAULT_CONTEXT = 4096  # positions per row when none is given (server.py, this CLI): the model's, at most this
RULE_OF_THUMB_MODELS = ("huggyllama/llama-7b", "huggyllama/llama-13b", "huggyllama/llama-30b", "huggyllama/llama-65b",
                        "meta-llama/Llama-2-70b-hf")


# ---- measured on a loaded model ---------------------------------------------------------------------------

def bytes_read_per_token(sizes: dict[str, int], embedding: str, tied: bool) -> int:
    """Bytes of weights one decode step reads, from sizes (tensor name -> bytes, each tensor once): all of them but
    the tensors named `embedding`..., which count when the output layer reads them too (tied)."""
    return sum(n for name, n in sizes.items() if tied or not name.startswith(embedding))


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of each parameter and buffer of a model, each tensor once (tied ones under their first name); the same
    on the meta device as on a real one."""
    seen, sizes = set(), {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        key = id(t) if t.device.type == "meta" else t.data_ptr()
        if key not in seen:
            seen.add(key)
            sizes[name] = t.numel() * t.element_size()
    return sizes


def weight_sizes(model: nn.Module) -> dict[str, int]:
    """tensor_bytes of the weights: everything but the KV cache and the tables setup_caches adds."""
    return {k: n for k, n in tensor_bytes(model).items() if not k.endswith(CACHE_BUFFERS)}


def is_tied(model: Transformer) -> bool:
    """Whether the output layer reads the embedding's own table (CPU int8 kernels keep a repacked copy instead)."""
    out, emb = model.output.weight, model.tok_embeddings.weight
    return out is emb or (out.device.type != "meta" and out.data_ptr() == emb.data_ptr())


def model_bytes_read_per_token(model: Transformer) -> int:
    """bytes_read_per_token of a loaded (or meta) fastllama model: its weights, not its caches."""
    return bytes_read_per_token(weight_sizes(model), "tok_embeddings.", is_tied(model))


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


def available_bytes(device: torch.device) -> int:
    """Memory this process may fill: free device memory on CUDA; on a CPU, MemAvailable plus what the process holds
    already (its baseline is part of every estimate)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return (int(info["MemAvailable"].split()[0]) + rss) * 1024


def copy_bandwidth(device: torch.device = torch.device("cpu"), gib: float = 1.0, repeats: int = 5) -> float:
    """The device's memory bandwidth in GB/s: bytes read + written by a large tensor copy in its memory (best of
    repeats; on a GPU timed from a synchronize to a synchronize)."""
    n = int(gib * 2**30) // 4
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


# ---- estimated from a config ------------------------------------------------------------------------------

def component(name: str) -> str:
    """Which part of the model a tensor belongs to."""
    if name.startswith("tok_embeddings."):
        return "embedding"
    if name.startswith("output."):
        return "output"
    if name.endswith("norm.weight"):
        return "norms"
    return "attention" if ".attention." in name else "feed_forward"


@dataclass(frozen=True)
class Estimate:
    """Bytes a model takes at rows x context on a device. total_bytes is the peak the process's memory reaches: the
    larger of loading (the baseline and the load's transient) and running (baseline, weights, KV cache, tables,
    largest activation). needed_bytes, what must fit, leaves out the checkpoint file's pages: they are clean page
    cache, which the kernel drops when memory runs short."""
    model: str
    precision: str  # the activations' dtype
    kv_dtype: str  # the KV cache's (checkpoint.resolve_kv_dtype)
    weight_format: str
    device: str
    rows: int
    context: int
    params: int
    params_per_part: dict[str, int]
    weights: dict[str, int]  # per component: embedding, attention, feed_forward, norms, output
    kv_bytes_per_token: int  # one position of one row, every layer
    kv_cache_bytes: int
    tables: dict[str, int]  # the rotary table (the attention mask is computed from the positions at each step)
    activation_bytes: int
    baseline_bytes: int
    load_bytes: int  # the load's transient peak: the file's pages and the loaded weights
    file_bytes: int  # the checkpoint file, read through a memory map
    read_per_token_bytes: int  # weights one decode step reads (bytes_read_per_token)

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def running_bytes(self) -> int:
        return (self.baseline_bytes + self.weights_bytes + self.kv_cache_bytes + sum(self.tables.values())
                + self.activation_bytes)

    @property
    def total_bytes(self) -> int:
        return max(self.running_bytes, self.baseline_bytes + self.load_bytes)

    @property
    def needed_bytes(self) -> int:
        mapped = self.file_bytes if self.device == "cpu" else 0
        return max(self.running_bytes, self.baseline_bytes + self.load_bytes - mapped)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weights_bytes=self.weights_bytes, running_bytes=self.running_bytes, total_bytes=self.total_bytes,
                 needed_bytes=self.needed_bytes)
        return d


class Sizer:
    """One model built on the meta device as the loader would build it; `at(rows, context)` sizes it."""

    def __init__(self, args: ModelArgs, weight_format: str, precision: str = "auto", device: str = "cpu",
                 name: str = "model", file_bytes: int | None = None, groupsize: int = 32, kv_dtype: str = "auto"):
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {weight_format!r}; choose from {', '.join(WEIGHT_FORMATS)}")
        stored, q = WEIGHT_FORMATS[weight_format]
        if weight_format == "int4":
            q = Quantization("int4", groupsize=groupsize)
        self.args, self.name, self.weight_format, self.device = args, name, weight_format, torch.device(device)
        self.precision = resolve_precision(precision, q, self.device)  # float weights load in this dtype too
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.precision, q, self.device)
        self.params = {}  # per component, tied tensors once
        for key, p in build_model(args).named_parameters():
            self.params[component(key)] = self.params.get(component(key), 0) + p.numel()
        self.model = build_model(args, q)  # as stored: the file's bytes; then as loaded
        if q is None:
            self.model.to(PRECISIONS[stored])
        self.file_bytes = file_bytes if file_bytes is not None else sum(weight_sizes(self.model).values())
        self.model.to(PRECISIONS[self.precision])
        self.model.kv_dtype = KV_DTYPES[self.kv_dtype]
        if args.tie_embeddings:
            self.model.tie_weights()
        if q is not None:
            layers.prepare(self.model, self.device)  # the layouts (and so the bytes) of this device's kernels
        self.quantization, self.dynamo = q, "torch._dynamo" in sys.modules

    @classmethod
    def of(cls, ckpt: Checkpoint, precision: str, device, kv_dtype: str = "auto") -> "Sizer":
        """The Sizer of a checkpoint loaded in precision on device, as generate.load_model loads it."""
        q = ckpt.quantization
        return cls(ckpt.args, checkpoint_format(ckpt), precision, device, ckpt.folder.name,
                   ckpt.weights.stat().st_size, q.groupsize if q is not None and q.groupsize else 32, kv_dtype)

    def at(self, rows: int, context: int, chunk: int = 64) -> Estimate:
        """The estimate for a KV cache of rows x context and prefill passes of `chunk` tokens."""
        m, c, a = self.model, self.args, PRECISIONS[self.precision].itemsize
        m.max_batch_size = -1  # setup_caches keeps larger caches it has; size exactly these
        m.setup_caches(rows, context)
        sizes = tensor_bytes(m)
        weights = {}
        for name, n in sizes.items():
            if not name.endswith(CACHE_BUFFERS):
                weights[component(name)] = weights.get(component(name), 0) + n
        kv = sum(n for name, n in sizes.items() if name.endswith(KV_BUFFERS))
        tables = {"rotary": sizes["freqs_cis"]}
        W = sum(weights.values())
        return Estimate(
            model=self.name, precision=self.precision, kv_dtype=self.kv_dtype, weight_format=self.weight_format,
            device=self.device.type,
            rows=rows, context=context, params=sum(self.params.values()), params_per_part=dict(self.params),
            weights=weights, kv_bytes_per_token=kv // (rows * (context + 1)),
            kv_cache_bytes=kv, tables=tables,
            activation_bytes=activation_bytes(c, a, rows, context, chunk, self.quantization),
            baseline_bytes=BASELINE_BYTES.get(self.device.type, BASELINE_BYTES["cpu"])
            + (DYNAMO_BYTES if self.dynamo and self.device.type == "cpu" else 0),
            load_bytes=load_bytes(self.file_bytes, W, self.device), file_bytes=self.file_bytes,
            read_per_token_bytes=model_bytes_read_per_token(m))


def activation_bytes(c: ModelArgs, a: int, rows: int, context: int, chunk: int, q: Quantization | None) -> int:
    """The largest transient of one forward pass, in bytes (a: the activations' bytes per value): a prefill chunk of
    `chunk` tokens or a decode step of `rows` tokens through one block (residual stream, norm, q/k/v, attention
    output, the feed-forward's gate, up and product), with the decode step's attention scores and probabilities
    (float32 over the context) and the logits of every row (float32, and a float32 copy to sample from). A quantized
    prefill chunk (more than GEMV_MAX_ROWS tokens) also dequantizes its largest linear layer to float32."""
    per_token = (4 * c.dim + (c.n_head + 2 * c.n_kv_heads) * c.head_dim + 3 * c.intermediate_size) * a
    decode = rows * (per_token + 2 * c.n_head * (context + 1) * 4)
    prefill = chunk * per_token
    if q is not None and chunk > GEMV_MAX_ROWS:  # float32 weight, float32 nibbles / int8 values, the unpacked bytes
        prefill += max(c.intermediate_size, (c.n_head + 2 * c.n_kv_heads) * c.head_dim) * c.dim * 9
    return max(decode, prefill) + rows * c.vocab_size * (a + 4)


def load_bytes(file_bytes: int, weights: int, device: torch.device) -> int:
    """The loader's transient peak (generate.load_model). The checkpoint is memory-mapped and every page of it gets
    read: those pages count in the process's memory while any tensor still points into the file. A dtype change or
    the quantized layers' repacking makes the loaded weights beside the file; the final copy into huge pages moves
    one tensor at a time (huge_pages.weights_in_huge_pages). So: the file and the weights once. On CUDA the device
    holds the weights once (the host side is not counted)."""
    if device.type == "cuda":
        return weights
    return file_bytes + weights


# ---- the model a name stands for --------------------------------------------------------------------------

def resolve_model(model: str) -> tuple[ModelArgs, str | None, str, int | None]:
    """(ModelArgs, weight format or None, display name, file bytes or None) of a checkpoint folder or weights file,
    a Hugging Face folder with config.json, a GGUF file or a name from configs.py; ValueError when none of these."""
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_model(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model.pth").is_file():
        return converter("convert_hf_checkpoint").read_hf_config(path / "config.json"), None, path.name, None
    if path.exists():
        ckpt = Checkpoint.open(path)
        return ckpt.args, checkpoint_format(ckpt), str(path), ckpt.weights.stat().st_size
    try:
        return known_config(model), None, model, None
    except ValueError:
        raise ValueError(f"{model!r} is neither a checkpoint, a Hugging Face folder with config.json, a .gguf file nor "
                         f"a known model name ({', '.join(k.split('/')[1] for k in KNOWN)})") from None


def checkpoint_format(ckpt: Checkpoint) -> str:
    """WEIGHT_FORMATS' name for a checkpoint's weights."""
    q = ckpt.quantization
    if q is None:
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(ckpt.format.dtype, "fp32")
    if q.kind == "int8":
        return "q8_0" if q.int8_groupsize else "int8"
    return "q4_1" if q.int8_groupsize else "int4"


def converter(name: str):
    """A module of scripts/ (convert_gguf, convert_hf_checkpoint, default_model), imported when first needed: they
    are clients of the loader and live outside the importable modules. The one place scripts/ joins sys.path."""
    scripts = str(Path(__file__).resolve().parent / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(name)


def _gguf_model(path: Path) -> tuple[ModelArgs, str, str, int]:
    """A GGUF file's config and the format scripts/convert_gguf.py would import it in."""
    convert_gguf = converter("convert_gguf")
    reader, _, args = convert_gguf.read_gguf(path)
    q = convert_gguf.quantized_layout(reader)
    fmt = "fp32" if q is None else "q4_1" if q.kind == "int4" else "q8_0"
    return args, fmt, path.name, None


# ---- fitting -----------------------------------------------------------------------------------------------

def fits(est: Estimate, memory: int) -> bool:
    return est.needed_bytes <= memory


def check_fits(est: Estimate, memory: int, flags: str = "--rows / --context") -> None:
    """ValueError, one line with the numbers, when est does not fit in memory bytes."""
    if not fits(est, memory):
        raise ValueError(f"{est.rows} rows x {est.context} positions of {est.model} ({est.weight_format} checkpoint, "
                         f"{est.precision} activations) need about {gib(est.needed_bytes)} (weights "
                         f"{gib(est.weights_bytes)}, KV cache {gib(est.kv_cache_bytes)}) but {gib(memory)} is "
                         f"available; lower {flags} (python memory.py shows what fits)")


def _largest(fits_at, most: int) -> int:
    """The largest n in [0, most] with fits_at(n), for fits_at true up to some n and false beyond (bisection)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid - 1)
    return lo


def largest_context(sizer: Sizer, rows: int, memory: int, chunk: int = 64) -> int:
    """The longest context (at most the model's) whose KV cache for `rows` rows fits in memory; 0 if none."""
    return _largest(lambda n: fits(sizer.at(rows, n, chunk), memory), sizer.args.block_size)


def largest_rows(sizer: Sizer, context: int, memory: int, chunk: int = 64, most: int = 4096) -> int:
    """The most rows (at most `most`) of `context` positions that fit in memory; 0 if none."""
    return _largest(lambda n: fits(sizer.at(n, context, chunk), memory), most)


def plan(sizer: Sizer, memory: int, rows: int, context: int | None, chunk: int = 64) -> Estimate:
    """A server's rows x context: the context given, else the model's (at most DEFAULT_CONTEXT) cut to what fits;
    ValueError, with the numbers, when the setting cannot fit."""
    if context is None:
        context = min(sizer.args.block_size, DEFAULT_CONTEXT, max(largest_context(sizer, rows, memory, chunk), 2))
    est = sizer.at(rows, context, chunk)
    check_fits(est, memory)
    return est


# ---- the command line -----------------------------------------------------------------------------------------

def parse_size(text: str, per_second: bool = False) -> float:
    """Bytes (or bytes/s) from "24GiB", "512MB", "40GB/s", "1e9": 1000-based units, and 1024-based with an i."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*(/s)?\s*", text.lower())
    if m is None or (per_second and not m.group(5)) or (m.group(5) and not per_second):
        unit = "40GB/s" if per_second else "24GiB"
        raise ValueError(f"cannot read {text!r} as a {'bandwidth' if per_second else 'size'}; write it like {unit}")
    power = "kmgt".index(m.group(2)) + 1 if m.group(2) else 0
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** power


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MiB:.1f} MiB"


def print_estimate(est: Estimate, bandwidth: float | None) -> None:
    print(f"{est.model}: {est.params / 1e9:.3f} B parameters, {est.weight_format} weights, {est.precision} "
          f"activations, {est.kv_dtype} KV cache on {est.device}, {est.rows} rows x {est.context} positions")
    print("| part | bytes | |\n|---|---:|---|")
    for part, n in est.weights.items():
        own = est.params_per_part.get(part)  # a CPU int8 output layer is its own copy of a tied embedding
        print(f"| weights: {part} | {gib(n)} | {n / own:.3f} bytes per parameter |" if own else
              f"| weights: {part} | {gib(n)} | a copy in the kernel's layout |")
    print(f"| weights | {gib(est.weights_bytes)} | {est.weights_bytes / est.params:.3f} bytes per parameter |")
    print(f"| KV cache | {gib(est.kv_cache_bytes)} | {est.kv_bytes_per_token / 1024:.1f} KiB per position and row |")
    for part, n in est.tables.items():
        print(f"| {part} table | {gib(n)} | |")
    print(f"| largest activation | {gib(est.activation_bytes)} | |")
    print(f"| runtime baseline | {gib(est.baseline_bytes)} | measured once on a {est.device} |")
    print(f"| running | {gib(est.running_bytes)} | |")
    print(f"| loading (transient) | {gib(est.baseline_bytes + est.load_bytes)} | of which the file's pages "
          f"{gib(est.file_bytes)} (page cache the kernel may drop) |")
    print(f"| **peak** | **{gib(est.total_bytes)}** | resident at most |")
    print(f"| **needed** | **{gib(est.needed_bytes)}** | what must fit |")
    if bandwidth:
        empty = bandwidth / est.read_per_token_bytes
        full = bandwidth / (est.read_per_token_bytes + est.rows * est.kv_bytes_per_token * est.context)
        print(f"decode ceiling at {bandwidth / 1e9:.1f} GB/s: {empty:.1f} tokens/s per row with empty rows; {full:.1f} "
              f"steps/s ({full * est.rows:.1f} tokens/s over {est.rows} rows) with every row's context full")


def rule_of_thumb(precision: str, context: int) -> list[dict]:
    """The common rule of thumb (1.2 x parameters x bytes per parameter) beside our estimate, for the LLaMA models."""
    per_param = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "q8_0": 1, "int4": 0.5, "q4_1": 0.5}[precision]
    out = []
    for name in RULE_OF_THUMB_MODELS:
        args = known_config(name)
        est = Sizer(args, precision, name=name.split("/")[1]).at(1, min(context, args.block_size))
        thumb = 1.2 * est.params * per_param
        out.append(dict(model=est.model, params=est.params, rule_of_thumb_bytes=thumb, running_bytes=est.running_bytes,
                        weights_bytes=est.weights_bytes, kv_cache_bytes=est.kv_cache_bytes,
                        needed_bytes=est.needed_bytes))
    return out


def main(*, model: str, precision: str | None = None, groupsize: int = 32, activations: str = "auto",
         kv_dtype: str = "auto", context: int | None = None, rows: int = 1, device: str = "cpu",
         memory: str | None = None, bandwidth: str | None = None, json_out: bool = False, chunk: int = 64,
         rule_of_thumb_table: bool = False) -> None:
    args, own_format, name, file_bytes = resolve_model(model)
    fmt = precision or own_format or "bf16"
    if activations == "auto" and precision in ("fp32", "bf16", "fp16"):
        activations = precision  # float weights are loaded in the activations' dtype: --precision fp32 means both
    sizer = Sizer(args, fmt, activations, device, name, file_bytes if fmt == own_format else None, groupsize, kv_dtype)
    context = context or min(args.block_size, DEFAULT_CONTEXT)
    if rows < 1 or context < 1:
        raise ValueError("--rows and --context must be at least 1")
    est = sizer.at(rows, context, chunk)
    bw = parse_size(bandwidth, per_second=True) if bandwidth else (copy_bandwidth() * 1e9 if not json_out else None)
    out = est.to_dict() | ({"bandwidth_bytes_s": bw} if bw else {})
    if memory is not None:
        mem = parse_size(memory)
        out.update(memory_bytes=mem, fits=fits(est, mem), largest_rows=largest_rows(sizer, context, mem, chunk),
                   largest_context=largest_context(sizer, rows, mem, chunk))
    if rule_of_thumb_table:
        out["rule_of_thumb"] = rule_of_thumb(fmt, context)
    if json_out:
        print(json.dumps(out, indent=2))
        return
    print_estimate(est, bw)
    if memory is not None:
        verdict = "fits" if out["fits"] else "does NOT fit"
        print(f"in {gib(out['memory_bytes'])}: {verdict}; at most {out['largest_rows']} "
              f"rows of {context} positions, or {out['largest_context']} positions for {rows} rows")
    if rule_of_thumb_table:
        print(f"\nrule of thumb (1.2 x parameters x bytes per parameter) beside this estimate, 1 row x {context} "
              "positions (or the model's context, if shorter):")
        print("| model | params | rule of thumb | our weights | our KV cache | we need |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in out["rule_of_thumb"]:
            print(f"| {r['model']} | {r['params'] / 1e9:.1f} B | {gib(r['rule_of_thumb_bytes'])} "
                  f"| {gib(r['weights_bytes'])}"
                  f" | {gib(r['kv_cache_bytes'])} | {gib(r['needed_bytes'])} |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Will a model fit? Its memory at a precision, context and rows.")
    p.add_argument("model", help="checkpoint folder or .pth, Hugging Face folder, .gguf file, or a known name "
                                 "(e.g. meta-llama/Llama-2-70b-hf)")
    p.add_argument("--precision", choices=list(WEIGHT_FORMATS), default=None,
                   help="weight format (default: the checkpoint's own; bf16 for a config); q8_0 / q4_1: GGUF imports")
    p.add_argument("--groupsize", type=int, default=32, help="int4 group size")
    p.add_argument("--activations", choices=list(PRECISIONS), default="auto",
                   help="activations dtype, as generate.py's --precision")
    p.add_argument("--kv_dtype", choices=list(KV_DTYPES), default="auto",
                   help="KV cache dtype, as generate.py's --kv_dtype (auto: the activations')")
    p.add_argument("--context", type=int, default=None,
                   help=f"positions per row (default: the model's, at most {DEFAULT_CONTEXT})")
    p.add_argument("--rows", type=int, default=1, help="rows of the KV cache (batch size, server rows)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="whose kernels' layouts to size")
    p.add_argument("--chunk", type=int, default=64, help="prompt tokens per prefill pass")
    p.add_argument("--memory", default=None, help="memory to fit in (e.g. 24GiB): says the largest rows and context")
    p.add_argument("--bandwidth", default=None,
                   help="memory bandwidth for the decode ceiling (e.g. 40GB/s; default: measured here)")
    p.add_argument("--json", dest="json_out", action="store_true", help="print one JSON object")
    p.add_argument("--rule_of_thumb", dest="rule_of_thumb_table", action="store_true",
                   help="also show the 1.2 x params x bytes rule beside our estimate for LLaMA 7B-70B")
    return p


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main, build_parser())

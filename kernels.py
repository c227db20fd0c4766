"""CPU fast paths: the C++ ops of kernels.cpp, when each one may run (OPS, the one table), their PyTorch reference,
the kernels' weight layouts, and how a step is compiled on a CPU (compile_cpu). Weights in huge pages: huge_pages.py.

kernels.cpp (with kernels_avx512.cpp: the AVX-512 instance of the prefill GEMM's tile, kernels_vec.h) is compiled
once per source content with torch.utils.cpp_extension (in ~/.cache/torch_extensions/fastllama_kernels_<hash>,
build_directory) the first time a model is loaded on an AVX2 CPU (cpu_kernels). Its ops,
torch.ops.fastllama.<name> for each name in OPS, are opaque to torch.compile (each entry's `fake` gives their
shapes). `run(name, ...)` calls the op where its entry's `takes` says it may, else the entry's `reference`: the
same math in plain PyTorch, which also runs wherever the kernels are not built (no AVX2, no compiler,
FASTLLAMA_KERNELS=0). Design notes and measurements: docs/kernels.md.

Weight layouts (the kernels' own; layers.py converts the device-independent checkpoints to them):
  int8: w (N, K) int8, rows interleaved by 8 (int8_to_kernel), scales (N // 8, G, 8) float32:
        w_float = w * s per group of K // G inputs
  int4: w (N, K // 2) uint8, rows interleaved by 8 (int4_to_kernel), dm (N // 8, 2, G, 8) float16 = (d, m):
        w_float = q * d + m per group of K // G inputs (llama.cpp's Q4_1 arithmetic)
The int8 / int4 kernels round activations to int16 per block of 32 (error below 1/65000 of the block's largest
value, far finer than bf16); their *_q8 twins (kernels_q8.h) round them to int8 per block, as llama.cpp does
(Cpu.activations says which a model uses); quantized_kernel says which layers they take.
"""
import functools
import hashlib
import json
import os
import subprocess
import sys
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import cuda
import model

SOURCES = [Path(__file__).resolve().with_name(n)
           for n in ("kernels.cpp", "kernels_avx512.cpp", "kernels_vec.h", "kernels_q8.h")]
GEMV_MAX_ROWS = 16  # more rows than this are a prefill (GEMM); kernels.cpp gets it at build time


# ---- what this CPU offers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cpu:
    """The CPU facts the fast paths depend on; tests force each combination (monkeypatch this_cpu)."""
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...
    half_arithmetic: bool  # bf16 / fp16 multiplied natively (AVX512-BF16 or AMX); AVX2 CPUs emulate it slowly
    vnni: bool = False  # AVX-512 VNNI: int8 products summed by fours in one instruction (vpdpbusd)

    @property
    def avx2(self) -> bool:
        return self.capability in ("AVX2", "AVX512")

    @property
    def avx512_vnni(self) -> bool:
        """AVX-512 with VNNI: the int8-activation kernels' 16-row instance runs (kernels_avx512.cpp)."""
        return self.capability == "AVX512" and self.vnni

    def gemm(self, weight: torch.dtype | None) -> bool:
        """Whether kernels.cpp's GEMM takes prefill rows of a weight of this dtype (None: int8 / int4). Quantized
        weights always: panels unpacked from their layouts beat dequantizing the whole layer for MKL on every CPU
        measured. float32 always: it beats MKL's float32 GEMM on AVX2 and AVX-512 CPUs alike. bf16 only without bf16
        arithmetic: with it, MKL's bf16 GEMM beats widening the weight to float32 (docs/kernels.md has the figures)."""
        return weight != torch.bfloat16 or not self.half_arithmetic

    def activations(self, requested: str, kind: str = "int4", layer: str | None = None) -> str:
        """How a quantized layer on kernels.cpp ("int8" or "int4" weights; default: the checkpoint's kind) of a
        checkpoint of this kind (an int4 one's output layer is int8) rounds its activations: "int16" (per block of 32,
        ~1e-5 of the float result: the exact mode) or "int8" (per block of 32, llama.cpp's Q8 activations: perplexity
        +0.2% to +0.6% on the default model, docs/kernels.md). "auto": int8 for int4 layers (1.4-1.7x less time at
        4-64 rows on AVX2, 1.7x at 8 rows with AVX-512 VNNI, none lost at 1 row); for int8 layers only where the CPU
        has AVX-512 VNNI (vpdpbusd) and the checkpoint is int4 (its output layer: +10% at 16 rows). An int8
        checkpoint streams twice the bytes and gains 10-20% at 8 rows but loses as much at 1, and AVX2's int8 x int8
        products take longer than its int16 ones (the output layer at 8 rows: 4.3 against 2.4 ms)."""
        if requested not in ACTIVATIONS:
            raise ValueError(f"unknown --quant_activations {requested!r}; use one of {', '.join(ACTIVATIONS)}")
        if requested != "auto":
            return requested
        if (layer or kind) == "int4":
            return "int8"
        return "int8" if self.avx512_vnni and kind == "int4" else "int16"


ACTIVATIONS = ("auto", "int16", "int8")  # Cpu.activations' choices


@functools.cache
def machine_cpu() -> Cpu:
    """The CPU this process runs on, as found: what the kernels can execute here and the tuning measures on."""
    half = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return Cpu(torch.backends.cpu.get_cpu_capability(), half, torch.cpu._is_vnni_supported())


def this_cpu() -> Cpu:
    """The CPU the rules (Cpu.gemm, Cpu.activations, ...) decide for: machine_cpu(), which tests replace by each kind
    of CPU in turn. What the machine can execute (the widths, the tiles file) stays machine_cpu()'s, so a test forcing
    another CPU never changes what is measured or kept."""
    return machine_cpu()


# ---- the ops: one table ----------------------------------------------------------------------------------

def float_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, w, bias) in x's dtype. On a CPU without half-precision arithmetic, bf16 / fp16 inputs of more
    than GEMV_MAX_ROWS rows (prefill) are multiplied in float32: torch's half-precision GEMM is ~10x slower there.
    Few rows (decode) stay in half precision, which reads half the bytes."""
    half = x.dtype in (torch.bfloat16, torch.float16)
    if half and x.device.type == "cpu" and not gemv(x) and not this_cpu().half_arithmetic:
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, w.to(x.dtype), bias)


def int8_cast_linear(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """x (M, K) @ (w * scales).T in x's dtype with the weight kept int8 (a GPU's int8 form, cuda.py): per channel
    (scales (N,)), gpt-fast's F.linear(x, w.to(x.dtype)) * scales; per group (GGUF Q8_0, scales (N, G)), decode rows
    multiply each group in x's dtype and sum the scaled (G, M, N) products in float32, while prefill rows dequantize
    the weight for the call (the products would be G times the output, the weight is read once per row anyway)."""
    N, K = w.shape
    if scales.dim() == 1:
        return F.linear(x, w.to(x.dtype)) * scales.to(x.dtype)
    if not gemv(x):
        return float_linear(x, dequantize_int8(w, scales))
    G = scales.size(1)
    parts = torch.bmm(x.reshape(-1, G, K // G).transpose(0, 1), w.view(N, G, K // G).permute(1, 2, 0).to(x.dtype))
    return (parts.float() * scales.float().T[:, None, :]).sum(0).to(x.dtype)


def gemv(x: Tensor) -> bool:
    """Whether x (..., K) has few enough rows to be a decode step's GEMV rather than a prefill's GEMM."""
    return x.numel() <= GEMV_MAX_ROWS * x.size(-1)


def quantized_kernel(device: torch.device, kind: str, in_features: int, out_features: int,
                     groupsize: int | None = None) -> str:
    """Which kernel a quantized layer (kind "int8" or "int4") uses, and so the layout layers.py packs it in:
      "cpp"        kernels.cpp: a CPU, K % 64 == 0, N % 8 == 0, the kernels built;
      "cuda"       torch's CUDA int4 kernel, where cuda.int4_inner_k_tiles fits the layer (the inner k-tiles below);
      "cast"       int8 on a GPU: gpt-fast's F.linear(x, w.to(x.dtype)) * scales (per group: int8_cast_linear);
      "torch"      torch's CPU int4 kernel;
      "dequantize" everything else: the float weight rebuilt, then F.linear."""
    if device.type == "cpu" and in_features % 64 == 0 and out_features % 8 == 0 and cpu_kernels():
        return "cpp"
    if device.type == "cuda" and kind == "int8":
        return "cast"
    if device.type == "cuda":
        return "cuda" if int4_tiles(device, in_features, out_features, groupsize) else "dequantize"
    return "torch" if device.type == "cpu" and kind == "int4" else "dequantize"


def int4_tiles(device: torch.device, in_features: int, out_features: int, groupsize: int) -> int | None:
    """The inner k-tiles of torch's CUDA int4 kernel for a layer on device (None: it cannot run it)."""
    return cuda.int4_inner_k_tiles(in_features, out_features, groupsize, cuda.capability(device))


def _rows_here(x: Tensor, weight: torch.dtype | None = None) -> bool:
    """Whether the C++ ops take x's rows for a weight of this dtype (None: int8 / int4): decode rows always; prefill
    rows where Cpu.gemm says the C++ GEMM is the faster one."""
    return gemv(x) or this_cpu().gemm(weight)


def _dense_takes(x: Tensor, w: Tensor) -> bool:
    """dense_linear computes x @ w.T: CPU, float32 or bf16 x and w of one dtype, w (N, K) contiguous with N % 8 == 0
    and K % 32 == 0; the rows _rows_here takes."""
    return (x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
            and w.dim() == 2 and w.size(0) % 8 == 0 and w.size(1) % 32 == 0 and w.is_contiguous()
            and _rows_here(x, w.dtype))


def _attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """decode_attention's math for q (B, H, D) over k, v (B, KV, S, D), the rows of q, read in q's dtype."""
    B, H, D = q.shape
    k, v = k.to(q.dtype), v.to(q.dtype)
    return model.decode_attention(q.view(B, H, 1, D), k, v, mask.view(-1, 1, 1, k.size(2))).view(B, H, D)


def _glu(linear: Callable) -> Callable:
    return lambda x, *w: F.silu(linear(x, *w[: len(w) // 2])) * linear(x, *w[len(w) // 2:])


@dataclass(frozen=True)
class Op:
    schema: str  # torch.library schema of torch.ops.fastllama.<name>, defined here; kernels.cpp implements it
    fake: Callable  # the output's shape and dtype, for torch.compile
    reference: Callable  # the same math in PyTorch: the op's specification and its stand-in
    takes: Callable  # (the op's arguments) -> whether the C++ op may compute them
    tuned: str | None = None  # row_tile's family: the op ends with `int tile, int width`, which run() passes as
    # measured (row_tile, gemm_width)


def _rows_out(x, w, *_):
    return x.new_empty(x.size(0), w.size(0))


def _int8_reference(x, w, s):
    return float_linear(x, dequantize_int8_kernel(w, s))


def _int4_reference(x, w, dm):
    return float_linear(x, dequantize_int4_kernel(w, dm))


# The weights are already in the kernels' layouts (quantized_kernel chose "cpp"); rows decide the rest. inductor's
# cache keys a compiled graph by its ops' names and arguments, not their schemas: a graph cached before a schema
# changed is replayed against the new one and fails. So a changed schema adds an argument every call passes (a tile
# argument's default, 0, is one run() never passes: a graph without it is an older version's), or renames the op.
OPS = {
    "int8_linear": Op("(Tensor x, Tensor weight, Tensor scales, int tile=0, int width=0) -> Tensor", _rows_out,
                      _int8_reference, lambda x, w, s: _rows_here(x), "int8"),
    "int8_glu": Op("(Tensor x, Tensor w1, Tensor s1, Tensor w3, Tensor s3, int tile=0, int width=0) -> Tensor",
                   _rows_out, _glu(_int8_reference),
                   lambda x, w1, s1, w3, s3: _rows_here(x) and w1.shape == w3.shape, "int8"),
    "int4_linear": Op("(Tensor x, Tensor weight, Tensor dm, int tile=0, int width=0) -> Tensor", _rows_out,
                      _int4_reference, lambda x, w, dm: _rows_here(x), "int4"),
    "int4_linear_q8": Op("(Tensor x, Tensor weight, Tensor dm, int tile=0, int width=0) -> Tensor", _rows_out,
                         lambda x, w, dm: _int4_reference(quantize_rows_int8(x), w, dm), lambda x, w, dm: True, "q8"),
    "int8_linear_q8": Op("(Tensor x, Tensor weight, Tensor scales, int tile=0, int width=0) -> Tensor", _rows_out,
                         lambda x, w, s: _int8_reference(quantize_rows_int8(x), w, s), lambda x, w, s: True, "q8"),
    "int8_glu_q8": Op("(Tensor x, Tensor w1, Tensor s1, Tensor w3, Tensor s3, int tile=0, int width=0) -> Tensor",
                      _rows_out, lambda x, *w: _glu(_int8_reference)(quantize_rows_int8(x), *w),
                      lambda x, w1, s1, w3, s3: w1.shape == w3.shape, "q8"),
    "dense_linear": Op("(Tensor x, Tensor weight, int tile=0, int width=0) -> Tensor", _rows_out, float_linear,
                       _dense_takes, "dense"),
    "dense_glu": Op("(Tensor x, Tensor w1, Tensor w3, int tile=0, int width=0) -> Tensor", _rows_out,
                    _glu(float_linear),
                    lambda x, w1, w3: _dense_takes(x, w1) and _dense_takes(x, w3) and w1.shape == w3.shape, "dense"),
    "decode_attention": Op("(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor rows) -> Tensor",
                           lambda q, k, v, mask, rows: torch.empty_like(q),
                           lambda q, k, v, mask, rows: _attention_reference(q, k[rows], v[rows], mask),
                           lambda q, k, v, mask, rows: q.device.type == "cpu" and q.size(-1) % 8 == 0
                           and k.dtype in (torch.float32, torch.bfloat16, torch.float16)),
    "decode_attention_q8": Op("(Tensor q, Tensor k, Tensor ks, Tensor v, Tensor vs, Tensor mask, Tensor rows) "
                              "-> Tensor",
                              lambda q, *_: torch.empty_like(q),
                              lambda q, k, ks, v, vs, mask, rows: _attention_reference(
                                  q, model.dequantize_kv(k[rows], ks[rows], q.dtype),
                                  model.dequantize_kv(v[rows], vs[rows], q.dtype), mask),
                              lambda q, k, ks, v, vs, mask, rows: q.device.type == "cpu" and q.size(-1) % 8 == 0
                              and ks.size(-1) in (1, q.size(-1) // 32)),
}


def run(name: str, *args: Tensor) -> Tensor:
    """OPS[name] on args: the C++ op where its entry takes them (with the tile row_tile measured), else its PyTorch
    reference. Callers route here only once the kernels are built (cpu_kernels) and, for quantized weights, packed
    in the kernels' layout."""
    op = OPS[name]
    if not op.takes(*args):
        return op.reference(*args)
    width = q8_width() if op.tuned == "q8" else gemm_width()
    return getattr(torch.ops.fastllama, name)(*args, *((row_tile(op.tuned), width) if op.tuned else ()))


CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-falign-loops=32",
          f"-DFASTLLAMA_GEMV_MAX_ROWS={GEMV_MAX_ROWS}"]


def build_directory() -> Path:
    """Where kernels.cpp is built: a folder named by the source's content, the flags, torch's and Python's versions.
    Checkouts with the same kernels.cpp share one build; different versions never rebuild each other's (a folder
    named by the extension alone made two checkouts rebuild in turn and wait on each other's lock)."""
    from torch.utils.cpp_extension import get_default_build_root

    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES))
    key.update(" ".join([*CFLAGS, torch.__version__, sys.version]).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"fastllama_kernels_{key.hexdigest()[:16]}"


def build(folder: Path) -> None:
    """Build kernels.cpp in folder and load it, saying on stderr when it compiles. A build already there is loaded
    as it is: the folder's name is the source's content and flags (build_directory), so it cannot be stale, and
    skipping torch's build check (ninja, compiler probes) saves ~0.5 s of every start."""
    from torch.utils.cpp_extension import load

    so = folder / f"{folder.name}.so"
    if so.is_file():
        try:
            torch.ops.load_library(str(so))
            return
        except OSError:  # a build cut short: build it again
            pass
    folder.mkdir(parents=True, exist_ok=True)
    print("building fastllama's C++ kernels for this version of kernels.cpp (once, about a minute) ...",
          file=sys.stderr, flush=True)
    load(name=folder.name, sources=[str(p) for p in SOURCES if p.suffix == ".cpp"], build_directory=str(folder),
         is_python_module=False, verbose=False, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])


@functools.cache
def cpu_kernels() -> bool:
    """True when the C++ kernels are built and loaded for this CPU; builds them on first use (saying so on stderr)."""
    if os.environ.get("FASTLLAMA_KERNELS", "1") == "0" or not this_cpu().avx2:
        return False
    for name, op in OPS.items():
        torch.library.define(f"fastllama::{name}", op.schema)
        torch.library.register_fake(f"fastllama::{name}")(op.fake)
    try:
        build(build_directory())
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"warning: fastllama's C++ kernels did not build ({str(e).splitlines()[0]}); "
              "using the slower PyTorch path", file=sys.stderr)
        return False
    _tiles.update(tuned_tiles())
    return True


# ---- which row tile and GEMM width: measured once per machine and kernel build ----------------------------

TILES = (1, 2, 4)  # rows of x per pass over a weight group in the decode kernels; every tile gives the same bits
TUNE_ROWS = 8  # the decode rows the tiles are timed at (a server's default batch)
GEMM_ROWS = 64  # the prefill rows the GEMM's widths are timed at (a server's prompt piece)


def gemm_widths() -> tuple[int, ...]:
    """The vector widths (floats) of the prefill GEMM this CPU runs: AVX2's 8, and AVX-512's 16 where it has AVX-512
    F / BW / DQ / VL (torch's "AVX512" capability). Every width gives the same bits (kernels_vec.h)."""
    return (8, 16) if machine_cpu().capability == "AVX512" else (8,)


def q8_widths() -> tuple[int, ...]:
    """The vector widths (output rows) of the int8-activation kernels this CPU runs: AVX2's 8, and 16 where it has
    AVX-512 with VNNI. Every width gives the same bits (kernels_q8.h)."""
    return (8, 16) if machine_cpu().avx512_vnni else (8,)


def _tuning_args(family: str, gen: torch.Generator) -> tuple:
    """Weights of one layer of each family, large enough (2-4 MB) to come from memory as a model's do. Drawn from gen
    only: measuring must not move the global random state that a --seed set (the first run would sample otherwise)."""
    N, K = 2048, 1024
    scales = lambda: torch.rand(N, K // 32, generator=gen)  # noqa: E731
    if family == "int8":
        return int8_to_kernel(torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen), scales())
    if family == "int4":
        return int4_to_kernel(torch.randint(0, 16, (N, K), generator=gen), scales() / 16, scales())
    return (torch.randn(N, K, generator=gen).bfloat16(),)


def _fastest(choices: tuple[int, ...], call: Callable[[int], object]) -> int:
    """The choice c whose call(c) is fastest: rounds alternating between the choices (so that the machine's drift
    falls on all of them), the best of 5 of each kept."""
    import time

    times = {c: float("inf") for c in choices}
    for _ in range(5):
        for c in choices:
            start = time.perf_counter()
            call(c)
            times[c] = min(times[c], time.perf_counter() - start)
    return min(choices, key=times.get)


TUNED = {"int8", "int4", "dense", "gemm", "q8", "q8_width"}  # measure_tiles' keys


def measure_tiles() -> dict[str, int]:
    """The fastest tile of each family on this machine, each timed on TUNE_ROWS rows; the fastest GEMM width ("gemm"),
    timed on GEMM_ROWS rows of an int4 layer; the int8-activation kernels' fastest width ("q8_width", on TUNE_ROWS
    rows of an int4 layer) and tile at that width ("q8")."""
    gen, best = torch.Generator().manual_seed(0), {}
    for family, name in (("int8", "int8_linear"), ("int4", "int4_linear"), ("dense", "dense_linear")):
        args = _tuning_args(family, gen)
        x = torch.randn(TUNE_ROWS, args[0].size(1) * (2 if family == "int4" else 1), generator=gen)
        x = x.bfloat16() if family == "dense" else x
        op = getattr(torch.ops.fastllama, name)
        best[family] = _fastest(TILES, lambda t: op(x, *args, t, 8))
    args = _tuning_args("int4", gen)
    x = torch.randn(GEMM_ROWS, args[0].size(1) * 2, generator=gen)
    best["gemm"] = _fastest(gemm_widths(), lambda w: torch.ops.fastllama.int4_linear(x, *args, 1, w))
    x = x[:TUNE_ROWS]
    best["q8_width"] = _fastest(q8_widths(), lambda w: torch.ops.fastllama.int4_linear_q8(x, *args, 4, w))
    best["q8"] = _fastest(TILES, lambda t: torch.ops.fastllama.int4_linear_q8(x, *args, t, best["q8_width"]))
    return best


def _machine() -> str:
    """This CPU's model name (the tiles file may sit on a disk that several kinds of machine share)."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown'} / {machine_cpu().capability}"


@functools.cache
def tuned_tiles() -> dict[str, int]:
    """measure_tiles()'s answer for this machine, kept in tiles.json in the kernels' build folder: measured on the first
    use of a build on a machine (~0.4 s), read from the file after that."""
    path = build_directory() / "tiles.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    machine = _machine()
    if not isinstance(known.get(machine), dict) or set(known[machine]) != TUNED:
        known[machine] = measure_tiles()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
        except OSError:  # a read-only build folder: measured again next time
            tmp.unlink(missing_ok=True)
    return known[machine]


_tiles: dict[str, int] = {}  # tuned_tiles(), copied in once by cpu_kernels(): a plain dict torch.compile reads as data


def row_tile(family: str) -> int:
    """The tile the decode kernels of a family ("int8", "int4", "dense", "q8") run with on this machine
    (tuned_tiles)."""
    return _tiles.get(family, 1)


def gemm_width() -> int:
    """The vector width the prefill GEMM runs at on this machine (tuned_tiles; 8 until measured)."""
    return _tiles.get("gemm", 8)


def q8_width() -> int:
    """The vector width the int8-activation kernels run at on this machine (tuned_tiles; 8 until measured)."""
    return _tiles.get("q8_width", 8)


# ---- layouts: reference math and conversion (pure functions) --------------------------------------------

def dequantize_int8(w: Tensor, scales: Tensor) -> Tensor:
    """(N, K) float32 from int8 w and scales (N,) or (N, G)."""
    N, K = w.shape
    s = scales.float().reshape(N, -1)
    return (w.float().view(N, s.size(1), -1) * s[..., None]).view(N, K)


def quantize_rows_int8(x: Tensor) -> Tensor:
    """x (M, K) rounded as the int8-activation kernels round it, kept in x's dtype: per row and block of 32 inputs,
    d = max |x| / 127 and x ~= round(x / d) * d (llama.cpp's Q8_0 activations)."""
    M, K = x.shape
    b = x.float().view(M, K // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * torch.where(amax > 0, 127 / amax, 0))
    return (q * (amax / 127)).view(M, K).to(x.dtype)


def int8_to_kernel(w: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) int8 and scales (N,) or (N, G) -> the kernel's (w (N, K) int8, scales (N // 8, G, 8) float32).

    Rows go in groups of 8; per group, 16 bytes per pair i of inputs: w[r, 2 i] and w[r, 2 i + 1] of rows r = 0..7
    (the order kernels.cpp reads); each group's scales side by side, 8 per scale group.
    """
    N, K = w.shape
    wk = w.view(N // 8, 8, K // 2, 2).transpose(1, 2).reshape(N, K)  # (group, pair, row, 2)
    return wk, scales.float().reshape(N // 8, 8, -1).transpose(1, 2).contiguous()


def int8_from_kernel(w: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of int8_to_kernel: (w (N, K) int8, scales (N, G) float32)."""
    N, K = w.shape
    return w.view(N // 8, K // 2, 8, 2).transpose(1, 2).reshape(N, K), scales.transpose(1, 2).reshape(N, -1)


def dequantize_int8_kernel(w: Tensor, scales: Tensor) -> Tensor:
    """(N, K) float32 from the kernel layout."""
    return dequantize_int8(*int8_from_kernel(w, scales))


def int4_to_kernel(q: Tensor, d: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """q (N, K) in [0, 15], d and m (N, G) -> the kernel's (w (N, K // 2) uint8, dm (N // 8, 2, G, 8) float16).

    Rows go in groups of 8; per group and block of 32 inputs, byte 32 p + 4 r + j holds q[r, 4 p + j] (low
    nibble) and q[r, 4 (p + 4) + j] (high nibble), r the row in the group: the order kernels.cpp reads.
    """
    N, K = q.shape
    p = q.to(torch.uint8).view(N // 8, 8, K // 32, 8, 4).permute(0, 2, 3, 1, 4)  # (group, block, i, row, j)
    w = (p[:, :, :4] | p[:, :, 4:] << 4).reshape(N, K // 2)
    dm = torch.stack([d, m], dim=1).view(N // 8, 8, 2, -1).permute(0, 2, 3, 1).half().contiguous()
    return w, dm


def int4_from_kernel(w: Tensor, dm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of int4_to_kernel: (q (N, K) uint8, d (N, G), m (N, G)) in float32 for d and m."""
    N = w.size(0)
    b = w.view(N // 8, -1, 4, 8, 4)
    q = torch.cat([b & 0xF, b >> 4], dim=2).permute(0, 3, 1, 2, 4).reshape(N, -1)
    d, m = dm.permute(0, 3, 1, 2).reshape(N, 2, -1).float().unbind(1)
    return q, d, m


def dequantize_int4_kernel(w: Tensor, dm: Tensor) -> Tensor:
    """(N, K) float32 from the kernel layout: q * d + m per group."""
    q, d, m = int4_from_kernel(w, dm)
    N, K = q.shape
    return (q.float().view(N, d.size(1), -1) * d[..., None] + m[..., None]).view(N, K)


# ---- compiling a step on a CPU ----------------------------------------------------------------------------

@dataclass
class _Compiled:
    """One model's compiled step: valid while the model keeps the rotary table it was compiled with."""
    table: weakref.ref | None = None  # setup_caches replaces the caches and the rotary table
    fn: Callable | None = None
    backends: str = "CPP"  # GEMM kernels autotuning may choose from
    ran: bool = False  # compiled code exists for the arguments seen so far


def compile_cpu(fn: Callable, dynamic: bool = False) -> Callable:
    """torch.compile fn(model, ...) for a CPU: weights frozen in, C++ GEMM templates, C++ wrapper, no module guards.

    - Freezing (weights folded in as constants) is what lets max-autotune pick its C++ GEMM template over MKL, and
      cpp_wrapper makes the code between the kernel calls C++ too (no Python between the ~150 calls of a step).
      `options=` does not apply these, so they are patched in around the calls that compile; calls that find
      compiled code run without them (set_stance fails a call that would compile, which then runs again with them).
      size_asserts is off: the C++ wrapper checked every kernel output's size on every step, and the ops' fakes
      give them.
    - Before every call Dynamo checks thousands of guards, nearly all that the model's modules did not change:
      each model and KV cache gets a compiled function of its own that skips those guards (isolate_recompiles: its
      own cache of compiled code, which another model's call never finds); another model, or setup_caches,
      compiles anew. The guards on the other arguments (shapes, sampling settings) stay.
    - GEMMs are tuned among the C++ templates only (autotuning's noisy timings sometimes picked ATen's slower bf16
      GEMV); a model with a GEMM no template can do is compiled again with ATen allowed.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.exc import InductorError

    compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Compiled

    def step(m: model.Transformer, *args, **kwargs):
        if m.max_seq_length <= 0:  # no caches yet: the model's own error says so
            return fn(m, *args, **kwargs)
        entry = compiled.get(m) or _Compiled()
        if entry.table is None or entry.table() is not m.freqs_cis:
            entry = compiled[m] = _Compiled(weakref.ref(m.freqs_cis), torch.compile(
                fn, fullgraph=True, dynamic=dynamic, isolate_recompiles=True, options={
                    **torch._inductor.list_mode_options("max-autotune-no-cudagraphs"),
                    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}), entry.backends)
        if entry.ran:  # most calls: compiled code for these arguments exists; run it without the settings below
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return entry.fn(m, *args, **kwargs)
            except RuntimeError as e:
                if "fail_on_recompile" not in str(e):
                    raise
        try:
            with inductor_config.patch(freezing=True, cpp_wrapper=True, max_autotune_gemm_backends=entry.backends,
                                       size_asserts=False, autotune_num_choices_displayed=0,
                                       max_autotune_report_choices_stats=False), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # inductor's own autotuner
                out = entry.fn(m, *args, **kwargs)
            entry.ran = True
            return out
        except InductorError as e:
            if entry.backends != "CPP" or not _no_gemm_choice(e):
                raise
            compiled[m] = _Compiled(backends="CPP,ATEN")  # a GEMM the C++ template cannot do: let ATen in
            return step(m, *args, **kwargs)

    return step


def _no_gemm_choice(e: BaseException | None) -> bool:
    """Whether inductor's error comes from a GEMM it found no allowed kernel for (NoValidChoicesError)."""
    from torch._inductor.select_algorithm import NoValidChoicesError

    while e is not None and not isinstance(e, NoValidChoicesError):
        e = getattr(e, "inner_exception", None) or e.__context__
    return e is not None

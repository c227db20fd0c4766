"""The files a benchmark runs, made from one float checkpoint on first use, and the JSON it writes.

quantize.py's int8 / int4 (group 32) twins beside the float weights; llama.cpp's GGUFs of the same weights in gguf/
(F32 / BF16 written by scripts/convert_gguf.export_gguf, Q8_0 and Q4_1 quantized from the F32 file by llama.cpp
itself, through llama-cpp-python, embedding and output kept Q8_0 as in our int4). Used by benchmark.py (speed),
memory_bench.py (peak memory) and serve_bench.py (serving).
"""

import json
import sys
from pathlib import Path

import torch

import files
import quantize
from checkpoint import Checkpoint, resolve_precision
from memory import converter

ROOT = Path(__file__).resolve().parent

QUANTIZED = {"int8": ("int8", None), "int4": ("int4", 32)}  # precision -> quantize.py (mode, groupsize)
LLAMA_CPP_TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}


def is_fresh(made: Path, source: Path) -> bool:
    """True if a file derived from source exists and is newer than it (else it is made again)."""
    return made.is_file() and made.stat().st_mtime >= source.stat().st_mtime


def checkpoint_for(checkpoint: Path, precision: str) -> Path:
    """The weights file a precision runs: the float checkpoint, or its quantized twin (made if missing)."""
    weights = Checkpoint.open(checkpoint).weights
    if precision not in QUANTIZED:
        return weights
    mode, groupsize = QUANTIZED[precision]
    out = weights.parent / quantize.output_name(mode, groupsize)
    if not is_fresh(out, weights):
        print(f"quantizing {weights} to {out.name} ...", file=sys.stderr, flush=True)
        quantize.main(checkpoint_path=weights, mode=mode, groupsize=groupsize or 32, output=out)
    return out


def activations_of(precision: str, ckpt: Checkpoint, device: torch.device) -> str:
    """The activations' dtype a benchmark precision runs in: its own for fp32 / bf16 / fp16; `auto`'s for the
    quantized checkpoints (checkpoint.resolve_precision)."""
    return resolve_precision("auto" if precision in QUANTIZED else precision, ckpt.quantization, device)


def llama_cpp_gguf(checkpoint: Path, precision: str) -> Path:
    """The GGUF llama.cpp runs for a precision, made from our float checkpoint on first use (in gguf/)."""
    import llama_cpp

    if precision not in LLAMA_CPP_TYPES:
        raise ValueError(f"no llama.cpp type for {precision}; llama.cpp rows: {', '.join(LLAMA_CPP_TYPES)}")
    weights = Checkpoint.open(checkpoint).weights
    folder = weights.parent / "gguf"
    folder.mkdir(exist_ok=True)
    kind = LLAMA_CPP_TYPES[precision]
    out = folder / f"{weights.stem}-{kind}.gguf"
    if is_fresh(out, weights):
        return out
    if kind in ("F32", "BF16"):
        return converter("convert_gguf").export_gguf(weights, out, kind)
    f32 = llama_cpp_gguf(checkpoint, "fp32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[kind]
    params.output_tensor_type = params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f32} to {kind}")
    return out


def save_json(path: Path, rows: list) -> None:
    """--json's file, written whole or not at all (files.written): an interrupted run leaves the earlier one."""
    files.write_text(Path(path), json.dumps(rows, indent=2) + "\n")

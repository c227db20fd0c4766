"""What the CUDA path must honour, each rule stated once here and called everywhere else.

No GPU has run this code where it was written: each rule below was read off torch 2.13's CUDA sources (inductor's
CUDA-graph trees, aten/src/ATen/native/cuda/int4mm.cu) and gpt-fast, and is modelled on a CPU in
tests/test_cuda_contracts.py; tests/test_cuda.py (scripts/gpu_check.sh) checks them on a machine with a GPU.

- CUDA-graph replays (torch.compile with triton.cudagraphs) write a graph's outputs into the same memory on every
  replay: a step's outputs are copied out before the next call (`owned_outputs`).
- A step whose shapes change (prefill, eval's scoring: dynamic=True) runs without CUDA graphs, which would record a
  graph per length; fixed-shape steps (decode) run with them. Inductor's options are gpt-fast's (`compile_options`).
- torch's int4 kernel (_weight_int4pack_mm) multiplies bf16 activations on GPUs of compute capability 8.0 or later;
  its weights come in tiles of 8 output rows and inner_k_tiles x 16 inputs, inner_k_tiles 2, 4 or 8
  (`int4_inner_k_tiles`); a layer no tile count fits is dequantized and multiplied instead.
- torch 2.13's CUDA int8 kernel (_weight_int8pack_mm) runs one thread per output: int8 layers use gpt-fast's
  F.linear(x, w.to(x.dtype)) * scales, which inductor fuses into one kernel; GGUF Q8_0's per-group scales apply to
  each group's product (kernels.int8_cast_linear), so no float weight is rebuilt per decode step.
- Kernels run asynchronously: a time stamp is taken after `synchronize`; the decode loop reads nothing back from
  the GPU except every `STOP_CHECK_EVERY` tokens (whether every row has stopped).
"""
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

STOP_CHECK_EVERY = 8  # CUDA: tokens between the decode loop's looks at whether every row has stopped (a host sync)
INT4_GROUP_SIZES = (32, 64, 128, 256)


def compile_options(dynamic: bool) -> dict:
    """Inductor options of a CUDA step: gpt-fast's tuning; CUDA graphs for fixed shapes only."""
    return {"triton.cudagraphs": not dynamic, "coordinate_descent_tuning": True, "triton.unique_kernel_names": True}


def owned_outputs(step):
    """step, with every tensor it returns copied: the caller may keep them across calls (CUDA-graph replays reuse
    their output memory)."""
    def call(*args, **kwargs):
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, step(*args, **kwargs))
    return call


def compile_step(fn, dynamic: bool = False):
    """torch.compile a step for CUDA under the rules above."""
    return owned_outputs(torch.compile(fn, fullgraph=True, dynamic=dynamic, options=compile_options(dynamic)))


def int4_inner_k_tiles(in_features: int, out_features: int, groupsize: int, capability: tuple[int, int]) -> int | None:
    """The inner k-tile count torch's CUDA int4 kernel takes for a layer (the largest of 8, 4, 2 whose tile of
    16 x count inputs divides in_features), or None when the kernel cannot run it: out_features % 8, groupsize not
    one it has, a GPU older than compute capability 8.0."""
    if capability < (8, 0) or out_features % 8 or groupsize not in INT4_GROUP_SIZES or in_features % groupsize:
        return None
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a GPU; (0, 0) where there is none (memory.py sizing a GPU's layouts on a CPU-only
    machine: the int4 fallback keeps the same bytes)."""
    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (0, 0)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU, whose work is done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stop_check_every(device: torch.device) -> int:
    """How many tokens the decode loop runs between checks that every row has stopped: each check on a GPU waits
    for it; on a CPU it costs nothing."""
    return STOP_CHECK_EVERY if device.type == "cuda" else 1

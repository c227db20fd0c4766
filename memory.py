"""What a model takes in memory and reads per token: measured on a loaded model (and, later, estimated from a config).

bytes_read_per_token is the one rule behind every GB/s figure (generate.py's and benchmark.py's for each system):
a decode step reads every weight once, except the embedding table, of which a token reads one row, unless the
output layer reads that same table (tied embeddings).
"""
import resource
from pathlib import Path

import torch
from torch import nn

CACHE_BUFFERS = ("k_cache", "v_cache", "freqs_cis", "causal_mask")


def bytes_read_per_token(sizes: dict[str, int], embedding: str, tied: bool) -> int:
    """Bytes of weights one decode step reads, from sizes (tensor name -> bytes, each tensor once): all of them but
    the tensors named `embedding`..., which count when the output layer reads them too (tied)."""
    return sum(n for name, n in sizes.items() if tied or not name.startswith(embedding))


def model_bytes_read_per_token(model: nn.Module) -> int:
    """bytes_read_per_token of a loaded fastllama model: its parameters and quantized weights, not its caches."""
    named = [*model.named_parameters(), *model.named_buffers()]
    seen, sizes = set(), {}
    for name, t in named:
        if not name.endswith(CACHE_BUFFERS) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            sizes[name] = t.numel() * t.element_size()
    tied = model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # CPU int8 keeps its own copy
    return bytes_read_per_token(sizes, "tok_embeddings.", tied)


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

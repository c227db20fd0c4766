"""Tensor parallelism: each process torchrun starts keeps a slice of every layer; they run together.

    torchrun --nproc_per_node=2 generate.py --compile --precision fp32 --temperature 0
    torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 generate.py ...

Attention: wqkv is split by output rows along heads (each rank keeps n_head / W query heads and
n_kv_heads / W key/value heads, so every GQA group stays on one rank) and wo by input columns; the MLP:
w1, w3 by rows, w2 by columns. The row-split matrices each give a partial sum, so every block needs one
all-reduce after attention and one after the MLP. Embeddings, norms and the output layer are replicated.
int8 / int4 scales are split with their weights, on the checkpoint's device-independent layout, before
the kernels repack it. Backend: NCCL on CUDA, gloo on CPU. Rank, world size and rank-0 printing live here.
References: gpt-fast tp.py; Megatron-LM, Shoeybi et al. 2019 (arXiv:1909.08053).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank0_print(*args, **kwargs) -> None:
    """print on rank 0 only (every rank computes the same tokens)."""
    if world()[0] == 0:
        print(*args, **kwargs)


def log(*args) -> None:
    """A note for people (progress, speed, warnings) on stderr, from rank 0 only."""
    rank0_print(*args, file=sys.stderr, flush=True)


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); return this rank's device."""
    _, size = world()
    if size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def finish() -> None:
    """Leave the process group together: every rank waits for the others before gloo / NCCL are torn down (a rank
    that tears its group down while a peer still talks to it can abort that peer)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _chunk(t: Tensor, dim: int, parts: list[int] | None, rank: int, size: int) -> Tensor:
    """This rank's slice of t along dim: of each part (sizes along dim) when given, else of the whole."""
    pieces = t.split(parts, dim) if parts else [t]
    return torch.cat([p.chunk(size, dim)[rank] for p in pieces], dim).contiguous()


def _shard_linear(m: nn.Module, style: str, rank: int, size: int, parts: list[int] | None = None) -> None:
    """Keep this rank's output rows (style "col") or input columns ("row") of a float / int8 / int4 linear."""
    def keep(name: str, dim: int) -> None:
        t = getattr(m, name)
        new = _chunk(t.data, dim, parts, rank, size)
        if isinstance(t, nn.Parameter):
            setattr(m, name, nn.Parameter(new, requires_grad=False))
        else:
            setattr(m, name, new)

    if style == "col":
        keep("weight", 0)
        for name, dim in (("bias", 0), ("scales", 0), ("scales_and_zeros", 1)):
            if getattr(m, name, None) is not None:
                keep(name, dim)
        m.out_features //= size
    else:
        keep("weight", 1)  # float (N, K), int8 (N, K), packed int4 (N, K / 2): columns follow K
        if getattr(m, "scales", None) is not None and m.scales.dim() == 2:  # per-group int8 scales (N, G)
            keep("scales", 1)
        if getattr(m, "scales_and_zeros", None) is not None:  # int4 (G, N, 2)
            keep("scales_and_zeros", 0)
        m.in_features //= size


def check_divisible(config, size: int, groupsize: int | None = None) -> None:
    """ValueError naming what does not split evenly over size ranks."""
    checks = {"n_head": config.n_head, "n_kv_heads": config.n_kv_heads, "intermediate_size": config.intermediate_size}
    bad = [f"{k}={v}" for k, v in checks.items() if v % size]
    if groupsize and not bad:
        bad = [f"{k}={v} (per rank {v // size}, int4 groups of {groupsize})" for k, v in
               (("n_head * head_dim", config.n_head * config.head_dim), ("intermediate_size", config.intermediate_size))
               if (v // size) % groupsize]
    if bad:
        raise ValueError(f"tensor parallelism over {size} processes needs the model's sizes to divide evenly: "
                         f"{', '.join(bad)}; use a world size that divides them")


def shard(model: nn.Module, rank: int | None = None, size: int | None = None) -> None:
    """Cut a loaded (not yet prepared) Transformer down to this rank's slices and add the all-reduces."""
    if rank is None:
        rank, size = world()
    c = model.config
    int4 = [m for m in model.modules() if hasattr(m, "scales_and_zeros")]
    check_divisible(c, size, int4[0].groupsize if int4 else None)
    group = dist.group.WORLD
    for block in model.layers:
        attn, mlp = block.attention, block.feed_forward
        q, kv = c.n_head * c.head_dim, c.n_kv_heads * c.head_dim
        _shard_linear(attn.wqkv, "col", rank, size, parts=[q, kv, kv])
        _shard_linear(attn.wo, "row", rank, size)
        attn.n_head, attn.n_kv_heads = c.n_head // size, c.n_kv_heads // size
        for lin in (mlp.w1, mlp.w3):
            _shard_linear(lin, "col", rank, size)
        _shard_linear(mlp.w2, "row", rank, size)
        for lin in (attn.wo, mlp.w2):  # sum the partial outputs of the row-split layers
            lin.register_forward_hook(lambda _m, _i, out: funcol.all_reduce(out, "sum", group))


# ---- several devices in sequence (pipeline without overlap): a model too big for any one of them ---------

def split_layers(model: nn.Module, devices: list[torch.device]) -> list[tuple[torch.device, range]]:
    """Move contiguous runs of layers to each device (embedding on the first, norm and output on the last).

    Transformer.forward moves the activations to each layer's device; returns (device, layer range) per stage.
    Call before setup_caches, which puts each layer's KV cache beside it.
    """
    n = len(model.layers)
    if not 0 < len(devices) <= n:
        raise ValueError(f"--devices lists {len(devices)} devices for {n} layers; give between 1 and {n}")
    stages = []
    for i, dev in enumerate(devices):
        layers = range(i * n // len(devices), (i + 1) * n // len(devices))
        for j in layers:
            model.layers[j].to(dev)
        stages.append((dev, layers))
    model.tok_embeddings.to(devices[0])
    if model.output.weight is model.tok_embeddings.weight and devices[-1] != devices[0]:  # tied: a copy on each end
        model.output.weight = nn.Parameter(model.output.weight.detach().to(devices[-1]), requires_grad=False)
    model.norm.to(devices[-1])
    model.output.to(devices[-1])
    return stages


def place(device: torch.device, stage_devices: list[torch.device] | None) -> tuple[torch.device, object, list]:
    """Where a model goes: (the device token ids go to, the load transform that shards or splits it, the stages
    (device, layers) a split fills in once the transform has run). One device; torchrun's ranks, each with its
    slice of every layer (shard); or runs of layers on several devices in sequence (split_layers)."""
    if stage_devices is not None:
        if world()[1] > 1:
            raise ValueError("--devices splits layers within one process; with torchrun leave it out")
        stages = []
        return stage_devices[0], lambda model: stages.extend(split_layers(model, stage_devices)), stages
    return init(device), shard if world()[1] > 1 else None, []


def stage_bytes(model: nn.Module, layers: range) -> int:
    """Bytes of weights and KV cache held by a run of layers."""
    tensors = {}
    for j in layers:
        for t in list(model.layers[j].parameters()) + list(model.layers[j].buffers()):
            tensors[t.data_ptr()] = t.numel() * t.element_size()
    return sum(tensors.values())

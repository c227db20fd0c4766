"""Weights in huge pages (fastllama): every parameter and buffer of a CPU model copied into one anonymous mapping
that Linux may back with 2 MiB pages, one tensor at a time, handing freed memory back to the system as it goes.

A decode step streams every weight once; in 4 KiB pages each page costs a TLB miss and restarts the hardware
prefetcher (docs/kernels.md). generate.load_model calls weights_in_huge_pages for every model it keeps on the CPU.
"""
import ctypes
import ctypes.util
import functools
import mmap
from typing import Callable

import torch
from torch import nn


def huge_page_arena(nbytes: int) -> mmap.mmap:
    """An anonymous mapping of nbytes that Linux may back with 2 MiB pages (madvise MADV_HUGEPAGE where available;
    elsewhere it still works, in small pages)."""
    arena = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            arena.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return arena


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc malloc_trim; a no-op elsewhere). glibc keeps freed
    blocks under its adaptive mmap threshold (up to 32 MiB) in the heap, so the copies a load makes and drops would
    otherwise stay resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def weights_in_huge_pages(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Move every parameter and buffer of a CPU module into one huge-page arena; tied ones stay tied. With dtype,
    floating-point ones are cast to it on the way, as module.to(dtype) would, in the same one copy.

    A decode step streams every weight once. In 4 KiB pages (how the checkpoint's mmap and repacked int4
    weights come) each 4 KiB costs a TLB miss and restarts the hardware prefetcher (docs/kernels.md).
    Each copy has its own storage (torch.frombuffer), so torch.compile sees no aliasing between them. Tensors move
    one at a time and the module lets each original go once copied (its memory back to the system every 8 MiB),
    so the load holds the weights about once more than they take, not twice (memory.load_bytes).
    """
    slots: dict[int, list] = {}  # id(tensor) -> [tensor, (module, kind, name), ...]
    for m in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is not None and t.device.type == "cpu" and t.numel():
                    slots.setdefault(id(t), [t]).append((m, kind, name))
    cast = lambda t: dtype if dtype is not None and t.is_floating_point() else t.dtype  # noqa: E731
    sizes = [(e[0].numel() * cast(e[0]).itemsize + 63) // 64 * 64 for e in slots.values()]
    arena, offset, freed = huge_page_arena(sum(sizes)), 0, 0
    for key, n in zip(list(slots), sizes):
        t, *where = slots.pop(key)
        raw = torch.frombuffer(arena, dtype=torch.uint8, count=t.numel() * cast(t).itemsize, offset=offset)
        c = raw.view(cast(t)).view(t.shape).copy_(t.detach())
        c = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
        for m, kind, name in where:
            getattr(m, kind)[name] = c
        del t, raw, c, where
        offset, freed = offset + n, freed + n
        if freed >= 8 * 2**20:
            release_freed_memory()
            freed = 0
    release_freed_memory()

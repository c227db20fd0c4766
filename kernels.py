"""CPU fast paths: the C++ kernels of kernels.cpp (int8 / int4 / float32 / bf16 linear, one-token attention) and their
PyTorch reference; weights in huge pages (weights_in_huge_pages).

kernels.cpp is compiled once per source version with torch.utils.cpp_extension (cached under
~/.cache/torch_extensions) the first time a model is loaded on an AVX2 CPU; the ops it registers,
torch.ops.fastllama.int8_linear / int8_glu / int4_linear / dense_linear / dense_glu / decode_attention, are opaque
to torch.compile (fake implementations below give their shapes). Everywhere else (no AVX2, no compiler,
FASTLLAMA_KERNELS=0, large batches) the same math runs as plain PyTorch: dequantize, then F.linear.
CpuLinear: float32 / bf16 linears by dense_linear (decode GEMVs; prefill GEMMs on AVX2 CPUs); float_linear: bf16 /
fp16 prefill GEMMs in float32 elsewhere on CPUs without half-precision arithmetic.

Weight layouts (the kernels' own; quantize.py converts its device-independent checkpoints to them):
  int8: w (N, K) int8, rows interleaved by 8 (int8_to_kernel), scales (N // 8, G, 8) float32:
        w_float = w * s per group of K // G inputs
  int4: w (N, K // 2) uint8, rows interleaved by 8 (int4_to_kernel), dm (N // 8, 2, G, 8) float16 = (d, m):
        w_float = q * d + m per group of K // G inputs (llama.cpp's Q4_1 arithmetic)
The kernels round activations to int16 per block of 32 (error below 1/65000 of the block's largest
value, far finer than bf16); they need K % 64 == 0 and, for int4, N % 8 == 0.
"""
import functools
import mmap
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import model

SOURCE = Path(__file__).resolve().with_name("kernels.cpp")
GEMV_MAX_ROWS = 16  # more rows than this (prefill): dequantize once and use the float GEMM


@functools.cache
def cpu_kernels() -> bool:
    """True when the C++ kernels are built and loaded for this CPU; builds them on first use."""
    if os.environ.get("FASTLLAMA_KERNELS", "1") == "0":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from torch.utils.cpp_extension import load

    try:
        load(name="fastllama_kernels", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-falign-loops=32"], extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"warning: fastllama's C++ kernels did not build ({str(e).splitlines()[0]}); "
              "using the slower PyTorch path", file=sys.stderr)
        return False
    torch.library.register_fake("fastllama::int8_linear")(_fake_linear)
    torch.library.register_fake("fastllama::int4_linear")(_fake_linear)
    torch.library.register_fake("fastllama::int8_glu")(lambda x, w1, s1, w3, s3: x.new_empty(x.size(0), w1.size(0)))
    torch.library.register_fake("fastllama::dense_linear")(lambda x, w: x.new_empty(x.size(0), w.size(0)))
    torch.library.register_fake("fastllama::dense_glu")(lambda x, w1, w3: x.new_empty(x.size(0), w1.size(0)))
    torch.library.register_fake("fastllama::decode_attention")(lambda q, k, v, mask: torch.empty_like(q))
    return True


def _fake_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty(x.size(0), weight.size(0))


# ---- reference math and layout conversion (pure functions) ----------------------------------------------

def dequantize_int8(w: Tensor, scales: Tensor) -> Tensor:
    """(N, K) float32 from int8 w and scales (N,) or (N, G)."""
    N, K = w.shape
    s = scales.float().reshape(N, -1)
    return (w.float().view(N, s.size(1), -1) * s[..., None]).view(N, K)


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


def in_huge_pages(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of CPU tensors, side by side in one anonymous mapping that Linux may back with 2 MiB pages.

    Each copy has its own storage (torch.frombuffer), so torch.compile sees no aliasing between them. Where
    madvise(MADV_HUGEPAGE) is unavailable the copies are still correct, only in small pages.
    """
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]
    arena = mmap.mmap(-1, max(sum(sizes), 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            arena.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    out, offset = [], 0
    for t, n in zip(tensors, sizes):
        raw = torch.frombuffer(arena, dtype=torch.uint8, count=t.numel() * t.element_size(), offset=offset)
        out.append(raw.view(t.dtype).view(t.shape).copy_(t))
        offset += n
    return out


def weights_in_huge_pages(module: nn.Module) -> None:
    """Move every parameter and buffer of a CPU module into huge pages (in_huge_pages); tied ones stay tied.

    A decode step streams every weight once. In 4 KiB pages (how the checkpoint's mmap and repacked int4
    weights come) each 4 KiB costs a TLB miss and restarts the hardware prefetcher: the int4 linears of a
    step ran 5-8% faster from huge pages (interleaved A/B in one process).
    """
    slots = [(m, kind, name, t) for m in module.modules() for kind in ("_parameters", "_buffers")
             for name, t in getattr(m, kind).items() if t is not None and t.device.type == "cpu" and t.numel()]
    unique = list({id(t): t for *_, t in slots}.values())
    moved = {id(t): nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
             for t, c in zip(unique, in_huge_pages([t.detach() for t in unique]))}
    for m, kind, name, t in slots:
        getattr(m, kind)[name] = moved[id(t)]


# ---- the linear ops -------------------------------------------------------------------------------------

@functools.cache
def cpu_has_half_arithmetic() -> bool:
    """True when this CPU multiplies bf16 / fp16 natively (AVX512-BF16 or AMX); AVX2 CPUs emulate it slowly."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def float_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, w, bias) in x's dtype.

    On a CPU without half-precision arithmetic, bf16 / fp16 inputs of more than GEMV_MAX_ROWS rows (prefill)
    are multiplied in float32: torch's half-precision GEMM is ~10x slower there (bf16 prefill 61 -> 313
    tok/s on the default model). Few rows (decode) stay in half precision, which reads half the bytes.
    """
    half = x.dtype in (torch.bfloat16, torch.float16)
    if half and x.device.type == "cpu" and x.numel() > GEMV_MAX_ROWS * x.size(-1) and not cpu_has_half_arithmetic():
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, w.to(x.dtype), bias)


def dense_gemm_here() -> bool:
    """True when dense_linear / dense_glu also take many rows (prefill) on this CPU: its widest vectors are AVX2's and it
    has no half-precision arithmetic. There their GEMM beats MKL's float32 one and needs no widened copy of a bf16
    weight (README); with AVX-512, MKL's vectors are twice as wide."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2" and not cpu_has_half_arithmetic()


def dense_ok(x: Tensor, w: Tensor) -> bool:
    """True when kernels.cpp's dense_linear should compute x @ w.T: CPU, float32 or bf16 x and w of one dtype, w (N, K)
    contiguous with N % 8 == 0 and K % 32 == 0; at most GEMV_MAX_ROWS rows (decode), or dense_gemm_here()."""
    return (x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
            and w.dim() == 2 and w.size(0) % 8 == 0 and w.size(1) % 32 == 0 and w.is_contiguous()
            and (x.numel() <= GEMV_MAX_ROWS * x.size(-1) or dense_gemm_here()))


class CpuLinear(nn.Linear):
    """nn.Linear computed by kernels.cpp's dense_linear where dense_ok and kernel is set (use_cpu_linear, once the
    kernels are built), else by float_linear. The kernel reads the weight as stored (a tied embedding table too).
    Decode rows: four far-apart weight rows side by side, the 151 GEMVs of a default-model step ~10% faster than
    inductor's C++ GEMM template on the same frozen weights. Prefill rows: a GEMM on float32 panels of 16 weight rows
    (see README)."""

    kernel = False

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel and dense_ok(x, self.weight):
            y = torch.ops.fastllama.dense_linear(x.reshape(-1, self.in_features), self.weight)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return float_linear(x, self.weight, self.bias)


def cpu_glu(w1: CpuLinear, w3: CpuLinear, x: Tensor) -> Tensor:
    """FeedForward.glu for two bias-free CpuLinears: silu(w1(x)) * w3(x), by one dense_glu call where dense_linear
    would run (30 fewer calls and pointwise kernels per step on the default model; no w1 / w3 outputs in prefill)."""
    if (w1.kernel and dense_ok(x, w1.weight) and dense_ok(x, w3.weight)
            and w3.weight.shape == w1.weight.shape):
        y = torch.ops.fastllama.dense_glu(x.reshape(-1, w1.in_features), w1.weight, w3.weight)
        return y.view(*x.shape[:-1], w1.out_features)
    return F.silu(w1(x)) * w3(x)


def use_cpu_linear(transformer: nn.Module) -> None:
    """Make every nn.Linear of a float CPU transformer a CpuLinear with the same (possibly tied) parameters, and a
    gated feed-forward's w1 and w3 one cpu_glu call."""
    for parent in list(transformer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = CpuLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias
                new.kernel = cpu_kernels()
                setattr(parent, name, new)
    for m in transformer.modules():
        if isinstance(m, model.FeedForward) and cpu_kernels() and m.w1.bias is None and m.w3.bias is None:
            m.glu = functools.partial(cpu_glu, m.w1, m.w3)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """model.decode_attention (one query position) by kernels.cpp when it applies: CPU tensors, head_dim a
    multiple of 8, float32 / bf16 / fp16 cache. It visits only the positions the mask lets through; inductor's
    code for the PyTorch form reads the whole static cache (30 us vs 80 us per layer on the default model)."""
    B, H, T, D = q.shape
    if T == 1 and q.device.type == "cpu" and D % 8 == 0 and k.dtype in (torch.float32, torch.bfloat16, torch.float16):
        S = k.size(-2)
        return torch.ops.fastllama.decode_attention(q.view(B, H, D), k, v, mask.reshape(-1, S)).view(B, H, 1, D)
    return model.decode_attention(q, k, v, mask)


def use_cpu_attention(transformer: nn.Module) -> None:
    """Give every attention layer of transformer decode_attention above, when the C++ kernels are built."""
    if cpu_kernels():
        for m in transformer.modules():
            if isinstance(m, model.Attention):
                m.decode_attention = decode_attention


def int8_linear(x: Tensor, w: Tensor, scales: Tensor, use_kernel: bool) -> Tensor:
    """x (M, K) @ w_float.T in x's dtype: w and scales in the kernel layout (int8_to_kernel) when use_kernel,
    else (N, K) and (N, G)."""
    if not use_kernel:
        return float_linear(x, dequantize_int8(w, scales))
    if x.size(0) <= GEMV_MAX_ROWS:
        return torch.ops.fastllama.int8_linear(x, w, scales)
    return float_linear(x, dequantize_int8_kernel(w, scales))


def int8_glu(x: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor) -> Tensor:
    """silu(x @ w1_float.T) * (x @ w3_float.T) in x's dtype, weights and scales in the kernel layout: one C++ call
    for few rows (decode; 30 fewer calls and pointwise kernels per step on the default model), else float math."""
    if x.size(0) <= GEMV_MAX_ROWS:
        return torch.ops.fastllama.int8_glu(x, w1, s1, w3, s3)
    return F.silu(int8_linear(x, w1, s1, True)) * int8_linear(x, w3, s3, True)


def int4_linear(x: Tensor, w: Tensor, dm: Tensor, use_kernel: bool) -> Tensor:
    """x (M, K) @ dequantize_int4_kernel(w, dm).T in x's dtype."""
    if use_kernel and x.size(0) <= GEMV_MAX_ROWS:
        return torch.ops.fastllama.int4_linear(x, w, dm)
    return float_linear(x, dequantize_int4_kernel(w, dm))

"""The layers a loaded model runs in place of model.py's plain ones: float linears on the C++ kernels (CpuLinear,
cpu_glu), the int8 / int4 layers of quantized checkpoints, and the decode attention kernel.

A quantized checkpoint stores device-independent weights (the layouts below); `prepare` packs each layer into
the layout of the kernel kernels.quantized_kernel picks for its device, and kernels.run decides per call
whether the C++ op or its PyTorch reference computes it.
  int8:  w = q * s, q (N, K) int8, one scale per output channel (N,) or per group of 32 inputs (N, K // 32)
  int4:  w = (q - 8) * s + z, q in [0, 15] two nibbles per byte (N, K // 2), even column in the high nibble,
         scales_and_zeros (K // groupsize, N, 2): the layout of torch's `_weight_int4pack_mm` kernels
The embedding and the output layer of int4 checkpoints are int8 (as llama.cpp's Q4 files keep them at Q8_0).
"""
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from model import Attention, FeedForward, KVCache, cache_rows

# ---- the checkpoints' quantized layouts (pure functions) ---------------------------------------------------

dequantize_int8 = kernels.dequantize_int8  # (q, scales (N,) or (N, G)) -> float weight


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) values in [0, 15] -> (N, K // 2) uint8, even column in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.size(0), -1)


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor:
    """(N, K) float32 from q (N, K) in [0, 15] and scales_and_zeros (K // groupsize, N, 2)."""
    N, K = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, G) each
    return ((q.float().view(N, -1, groupsize) - 8) * s[..., None] + z[..., None]).reshape(N, K)


# ---- float linears and attention on the C++ kernels ------------------------------------------------------

class CpuLinear(nn.Linear):
    """nn.Linear computed by kernels.run("dense_linear") once the kernels are built (use_cpu_linear sets `kernel`),
    else by kernels.float_linear. The kernel reads the weight as stored (a tied embedding table too)."""

    kernel = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.kernel:
            return kernels.float_linear(x, self.weight, self.bias)
        y = kernels.run("dense_linear", x.reshape(-1, self.in_features), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def cpu_glu(w1: CpuLinear, w3: CpuLinear, x: Tensor) -> Tensor:
    """FeedForward.glu for two bias-free CpuLinears: silu(w1(x)) * w3(x) by one dense_glu call where it applies
    (30 fewer calls and pointwise kernels per step on the default model; no w1 / w3 outputs in prefill)."""
    y = kernels.run("dense_glu", x.reshape(-1, w1.in_features), w1.weight, w3.weight)
    return y.view(*x.shape[:-1], w1.out_features)


def use_cpu_linear(transformer: nn.Module) -> None:
    """Make every nn.Linear of a float CPU transformer a CpuLinear with the same (possibly tied) parameters, and a
    gated feed-forward's w1 and w3 one cpu_glu call when the kernels are built."""
    for parent in list(transformer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = CpuLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias
                new.kernel = kernels.cpu_kernels()
                setattr(parent, name, new)
    for m in transformer.modules():
        if isinstance(m, FeedForward) and kernels.cpu_kernels() and m.w1.bias is None and m.w3.bias is None:
            m.glu = functools.partial(cpu_glu, m.w1, m.w3)


def cpu_decode_attention(q: Tensor, cache: KVCache, mask: Tensor, row: int | Tensor) -> Tensor:
    """model.attend_cache (one query position) by kernels.cpp where it applies. It visits only the positions the mask
    lets through; inductor's code for the PyTorch form reads the whole static cache."""
    B, H, _, D = q.shape
    rows = cache_rows(row, B, q.device)
    mask = mask.reshape(-1, cache.k_cache.size(2))
    if cache.quantized:
        out = kernels.run("decode_attention_q8", q.view(B, H, D), cache.k_cache, cache.k_scales, cache.v_cache,
                          cache.v_scales, mask, rows)
    else:
        out = kernels.run("decode_attention", q.view(B, H, D), cache.k_cache, cache.v_cache, mask, rows)
    return out.view(B, H, 1, D)


def use_cpu_attention(transformer: nn.Module) -> None:
    """Give every attention layer cpu_decode_attention when the C++ kernels are built."""
    if kernels.cpu_kernels():
        for m in transformer.modules():
            if isinstance(m, Attention):
                m.decode_attention = cpu_decode_attention


def rows_alone(transformer: nn.Module) -> bool:
    """Whether a decode step computes each row by itself at any count of rows: every linear layer on kernels.cpp's
    ops (each row its own dot products, tested up to GEMV_MAX_ROWS rows). torch's GEMM, the fallback, takes one row
    as a GEMV, and may sum a row in another order at another count of rows (the engine then computes every row)."""
    for m in transformer.modules():
        if isinstance(m, (Int8Linear, Int4Linear)) and m.kernel != "cpp":
            return False
        if isinstance(m, nn.Linear) and not (isinstance(m, CpuLinear) and m.kernel and kernels.OPS["dense_linear"]
                                             .takes(m.weight.new_empty(1, m.in_features), m.weight)):
            return False
    return True


def activations(transformer: nn.Module) -> str:
    """How the model's quantized layers on kernels.cpp round activations: "int8" where they run its int8-activation
    ops, "int16" where its int16 ones or none (every other path computes in float); where the int8 and the int4
    layers differ (prepare gives them one mode, a caller may set others), each kind's, e.g. "int8 for int4 layers,
    int16 for int8 layers"."""
    modes: dict[str, set[str]] = {}
    for m in transformer.modules():
        if isinstance(m, (Int8Linear, Int4Linear)) and m.kernel == "cpp":  # the others compute in float
            kind = "int8" if isinstance(m, Int8Linear) else "int4"
            modes.setdefault(kind, set()).add("int8" if m.op.endswith("_q8") else "int16")
    every = set().union(*modes.values())
    if len(every) <= 1:
        return every.pop() if every else "int16"
    return ", ".join(f"{'/'.join(sorted(v))} for {k} layers" for k, v in sorted(modes.items()))


# ---- quantized layers ------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """y = x @ (q * s).T; scales (N,) per channel or (N, K // groupsize) per group (GGUF Q8_0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, groupsize: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        shape = (out_features,) if groupsize is None else (out_features, in_features // groupsize)
        self.register_buffer("scales", torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.kernel = None  # set by prepare() once the module is on its device
        self.op = "int8_linear"  # kernels.cpp's op: int8_linear_q8 with int8 activations (prepare)

    def prepare(self, device: torch.device | None = None, activations: str = "int16") -> None:
        """Pick the kernel of the device (default: the module's; memory.py sizes a meta module for another); for
        kernels.cpp, repack weight and scales into its layout (new tensors, so a tied embedding keeps its rows) and
        take the op of its activations ("int16" or "int8", as kernels.Cpu.activations resolved them)."""
        if self.kernel is not None:
            return
        groupsize = None if self.scales.dim() == 1 else self.in_features // self.scales.size(1)
        self.kernel = kernels.quantized_kernel(device or self.weight.device, "int8", self.in_features,
                                               self.out_features, groupsize)
        self.op = "int8_linear_q8" if activations == "int8" and self.kernel == "cpp" else "int8_linear"
        if self.kernel == "cpp":
            self.weight, self.scales = kernels.int8_to_kernel(self.weight, self.scales.view(self.out_features, -1))

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "cast":  # a GPU: gpt-fast's form (cuda.py)
            y = kernels.int8_cast_linear(x2, self.weight, self.scales)
        elif self.kernel == "cpp":
            y = kernels.run(self.op, x2, self.weight, self.scales)
        else:
            y = kernels.float_linear(x2, dequantize_int8(self.weight, self.scales.float().view(self.out_features, -1)))
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int8Embedding(nn.Module):
    """Embedding rows stored as int8 with one scale per row, or per group of a row (GGUF Q8_0)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, groupsize: int | None = None):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        shape = (num_embeddings,) if groupsize is None else (num_embeddings, embedding_dim // groupsize)
        self.register_buffer("scales", torch.empty(shape))

    def forward(self, idx: Tensor) -> Tensor:
        rows = F.embedding(idx, self.weight).to(self.scales.dtype)  # (..., D)
        s = self.scales[idx].view(*idx.shape, -1, 1)  # (..., G, 1)
        return (rows.view(*idx.shape, s.size(-2), -1) * s).view(rows.shape)


class Int4Linear(nn.Module):
    """y = x @ dequant(q).T; `weight` is repacked for the device's kernel by prepare()."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.kernel = None  # set by prepare(), which packs `weight` for it
        self.op = "int4_linear"  # kernels.cpp's op (as Int8Linear's)

    def prepare(self, device: torch.device | None = None, activations: str = "int16") -> None:
        """Repack the device-independent nibbles into the layout of the device's int4 kernel (as Int8Linear's)."""
        if self.kernel is not None:
            return
        device = device or self.weight.device
        kernel = kernels.quantized_kernel(device, "int4", self.in_features, self.out_features, self.groupsize)
        self.op = "int4_linear_q8" if activations == "int8" and kernel == "cpp" else "int4_linear"
        if kernel == "cpp":  # (d, m) = (s, z - 8 s) per group, float16 (quantize_int4 makes them exact)
            s, z = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, G) each
            self.weight, self.scales_and_zeros = kernels.int4_to_kernel(unpack_int4(self.weight), s, z - 8 * s)
        elif kernel == "cuda":  # bf16 scales, as the kernel multiplies (cuda.py)
            tiles = kernels.int4_tiles(device, self.in_features, self.out_features, self.groupsize)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), tiles)
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        elif kernel == "torch":
            q = unpack_int4(self.weight).to(torch.int32)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.kernel = kernel  # "dequantize" keeps the checkpoint's layout

    def forward(self, x: Tensor) -> Tensor:
        assert self.kernel is not None, "Int4Linear.prepare() must run after the module is on its device"
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "cpp":
            y = kernels.run(self.op, x2, self.weight, self.scales_and_zeros)
        elif self.kernel == "cuda":  # bf16 in and out whatever the activations' dtype (cuda.py)
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.groupsize,
                                                   self.scales_and_zeros).to(x.dtype)
        elif self.kernel == "torch":
            sz = self.scales_and_zeros.to(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.groupsize, sz)
        else:
            w = dequantize_int4(unpack_int4(self.weight), self.scales_and_zeros, self.groupsize)
            y = kernels.float_linear(x2, w.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of the Linear layers that int4 quantizes (all but the output layer, which stays int8)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "output"]


def swap_modules(model: nn.Module, quantization) -> None:
    """Replace float modules of a (meta) Transformer by the quantized modules of a checkpoint.Quantization."""
    for name in quantized_module_names(model) + ["output"]:
        *path, attr = name.split(".")
        parent = functools.reduce(getattr, path, model)
        lin = getattr(parent, attr)
        bias = lin.bias is not None
        if quantization.kind == "int8" or name == "output":
            new = Int8Linear(lin.in_features, lin.out_features, bias, quantization.int8_groupsize)
        else:
            new = Int4Linear(lin.in_features, lin.out_features, quantization.groupsize, bias)
        setattr(parent, attr, new)
    emb = model.tok_embeddings
    model.tok_embeddings = Int8Embedding(emb.num_embeddings, emb.embedding_dim, quantization.int8_groupsize)


def prepare(model: nn.Module, device: torch.device | None = None, activations: str = "int16") -> None:
    """Pick each quantized layer's kernel for the device it is on, or `device` (and repack its weights for it), its
    activations on kernels.cpp (--quant_activations: "auto", "int16" or "int8", resolved for each layer's kind and the
    checkpoint's, int4 if any layer is, by kernels.Cpu.activations); give a feed-forward whose w1 and w3 both use
    kernels.cpp's int8 kernel the fused int8_glu. On CPU a tied output layer gets its own copy in the kernel's layout:
    8-row groups would make every embedding lookup a gather."""
    kind = "int4" if any(isinstance(m, Int4Linear) for m in model.modules()) else "int8"
    cpu = kernels.this_cpu()
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.prepare(device, cpu.activations(activations, kind, "int4" if isinstance(m, Int4Linear) else "int8"))
    for m in model.modules():
        if not isinstance(m, FeedForward):
            continue
        w1, w3 = m.w1, m.w3
        if (isinstance(w1, Int8Linear) and isinstance(w3, Int8Linear) and w1.kernel == w3.kernel == "cpp" and
                w1.bias is None and w3.bias is None and w1.scales.shape == w3.scales.shape):
            m.glu = functools.partial(int8_glu, w1, w3)


def int8_glu(w1: Int8Linear, w3: Int8Linear, x: Tensor) -> Tensor:
    """FeedForward.glu for two int8 layers in kernels.cpp's layout."""
    op = "int8_glu_q8" if w1.op == "int8_linear_q8" else "int8_glu"
    y = kernels.run(op, x.reshape(-1, w1.in_features), w1.weight, w1.scales, w3.weight, w3.scales)
    return y.view(*x.shape[:-1], w1.out_features)

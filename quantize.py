"""Weight-only quantization of a fastllama checkpoint: int8 per channel, int4 group-wise, int4 GPTQ.

    python quantize.py --checkpoint_path checkpoints/M/model.pth --mode int8
    python quantize.py --checkpoint_path checkpoints/M/model.pth --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/M/model.pth --mode int4-gptq --groupsize 128 \
        --calibration_file data/calibration.txt          (or --calibration_tasks hellaswag,arc_easy)

int8: w = q * s, q in [-127, 127], one scale per output channel (symmetric).
int4: w = (q - 8) * s + z, q in [0, 15], one (s, z) per group of `groupsize` inputs (asymmetric; the
      layout of torch's `_weight_int4pack_mm` kernels). The checkpoint stores q as two nibbles per byte
      (device independent); packing for the kernel of the device in use happens at load (kernels.py).
      quantize_int4 keeps s and z - 8 s on float16 values so the CPU kernel's float16 copies are exact.
In int4 modes the embedding and output layer are int8 (as llama.cpp's Q4 files keep them at Q8_0):
they are a fifth of a small model's bytes and int4 there costs the most quality.
The quantized checkpoint is model_<mode>.pth beside the source, and its model_config.json entry
records mode and group size; load_model reads them from there.
References: GPTQ, https://arxiv.org/abs/2210.17323 ; gpt-fast quantize.py
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels
from model import FeedForward

MODES = ("int8", "int4", "int4-gptq")
GROUPSIZES = (32, 64, 128, 256)


# ---- primitives: pure functions ---------------------------------------------------------------------------

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: q (N, K) int8 and scales (N,) float32 with w ~= q * s."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-10) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


dequantize_int8 = kernels.dequantize_int8  # (q, scales (N,) or (N, G)) -> float weight


def int4_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric int4 scale and zero for w (N, g): w ~= (q - 8) * s + z.

    s and the minimum z - 8 s are float16 values, so the CPU kernel's float16 (d, m) = (s, z - 8 s) hold
    them exactly (GGUF Q4_1 stores the same pair)."""
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scales = ((hi - lo) / 15).clamp(min=1e-7).half().float()
    return scales, lo.half().float() + 8 * scales


def quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Group-wise int4: q (N, K) uint8 in [0, 15] and scales_and_zeros (K // groupsize, N, 2) float32."""
    N, K = w.shape
    if K % groupsize:
        raise ValueError(f"groupsize {groupsize} does not divide the layer's input size {K}; choose one of "
                         f"{[g for g in GROUPSIZES if K % g == 0]}")
    groups = w.float().reshape(N, K // groupsize, groupsize)  # (N, G, g)
    scales, zeros = int4_params(groups.reshape(-1, groupsize))
    scales, zeros = scales.view(N, -1, 1), zeros.view(N, -1, 1)  # (N, G, 1)
    q = torch.round((groups - zeros) / scales + 8).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q, torch.stack([scales[..., 0], zeros[..., 0]], dim=-1).transpose(0, 1).contiguous()


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor:
    N, K = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, G) each
    return ((q.float().view(N, -1, groupsize) - 8) * s[..., None] + z[..., None]).reshape(N, K)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) values in [0, 15] -> (N, K // 2) uint8, even column in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.size(0), -1)


# ---- modules the loader builds from a quantized checkpoint ------------------------------------------------

def kernel_for(device: torch.device, in_features: int, out_features: int) -> str:
    """Which kernel a quantized layer uses: "cpp" (kernels.cpp), "cuda" (torch's) or "torch" (dequantize)."""
    if device.type == "cuda":
        return "cuda"
    if device.type == "cpu" and in_features % 64 == 0 and out_features % 8 == 0 and kernels.cpu_kernels():
        return "cpp"
    return "torch"


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

    def prepare(self) -> None:
        """Pick the device's kernel; for kernels.cpp, repack weight and scales into its layout (new tensors, so a
        tied embedding keeps the checkpoint's rows)."""
        if self.kernel is not None:
            return
        self.kernel = kernel_for(self.weight.device, self.in_features, self.out_features)
        if self.kernel == "cuda" and self.scales.dim() == 2:
            self.kernel = "torch"  # torch's CUDA int8 kernel is per channel only
        if self.kernel == "cpp":
            self.weight, self.scales = kernels.int8_to_kernel(self.weight, self.scales.view(self.out_features, -1))

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "cuda":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(x.dtype))
        elif self.kernel == "cpp":
            y = kernels.int8_linear(x2, self.weight, self.scales, use_kernel=True)
        else:
            y = kernels.int8_linear(x2, self.weight, self.scales.float().view(self.out_features, -1), use_kernel=False)
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

    def prepare(self) -> None:
        """Repack the device-independent nibbles into the layout of this device's int4 kernel."""
        if self.kernel is not None:
            return
        q = unpack_int4(self.weight)
        kernel = kernel_for(self.weight.device, self.in_features, self.out_features)
        if kernel == "cpp":  # (d, m) = (s, z - 8 s) per group, float16 (quantize_int4 makes them exact)
            s, z = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, G) each
            self.weight, self.scales_and_zeros = kernels.int4_to_kernel(q, s, z - 8 * s)
        elif kernel == "cuda":
            self.weight = torch.ops.aten._convert_weight_to_int4pack(pack_int4(q).contiguous(), 8)
        else:
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        assert self.kernel is not None, "Int4Linear.prepare() must run after the module is on its device"
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "cpp":
            y = kernels.int4_linear(x2, self.weight, self.scales_and_zeros, use_kernel=True)
        elif self.kernel == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.groupsize, self.scales_and_zeros.to(x.dtype))
        else:
            sz = self.scales_and_zeros.to(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.groupsize, sz)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of the Linear layers that int4 quantizes (all but the output layer)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "output"]


def swap_modules(model: nn.Module, quantization: dict) -> None:
    """Replace float modules of a (meta) Transformer by the quantized modules `quantization` describes."""
    mode = quantization["mode"]
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} in the checkpoint config; known: {', '.join(MODES)}")
    g8 = quantization.get("int8_groupsize")  # None: int8 scales per channel; 32: per block (GGUF Q8_0)
    for name in quantized_module_names(model) + ["output"]:
        parent, attr = _parent(model, name)
        lin = getattr(parent, attr)
        bias = lin.bias is not None
        if mode == "int8" or name == "output":
            new = Int8Linear(lin.in_features, lin.out_features, bias, g8)
        else:
            new = Int4Linear(lin.in_features, lin.out_features, quantization["groupsize"], bias)
        setattr(parent, attr, new)
    emb = model.tok_embeddings
    model.tok_embeddings = Int8Embedding(emb.num_embeddings, emb.embedding_dim, g8)


def tie_quantized(model: nn.Module) -> None:
    """Tied embeddings: the int8 embedding and output layer share one tensor (on CPU, prepare() then gives the
    output layer a copy in the kernel's layout: 8-row groups would make every embedding lookup a strided gather)."""
    model.output.weight = model.tok_embeddings.weight
    model.output.scales = model.tok_embeddings.scales


def prepare(model: nn.Module) -> None:
    """Pick each quantized layer's kernel for the device it is on (and repack int4 weights for it); give a
    feed-forward whose w1 and w3 both use kernels.cpp's int8 kernel the fused kernels.int8_glu."""
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.prepare()
    for m in model.modules():
        if not isinstance(m, FeedForward):
            continue
        w1, w3 = m.w1, m.w3
        if (isinstance(w1, Int8Linear) and isinstance(w3, Int8Linear) and w1.kernel == w3.kernel == "cpp" and
                w1.bias is None and w3.bias is None and
                w1.weight.shape == w3.weight.shape and w1.scales.shape == w3.scales.shape):
            m.glu = functools.partial(int8_glu, w1, w3)


def int8_glu(w1: Int8Linear, w3: Int8Linear, x: Tensor) -> Tensor:
    """FeedForward.glu for two int8 layers in kernels.cpp's layout."""
    y = kernels.int8_glu(x.reshape(-1, w1.in_features), w1.weight, w1.scales, w3.weight, w3.scales)
    return y.view(*x.shape[:-1], w1.out_features)


def _parent(model: nn.Module, name: str):
    *path, attr = name.split(".")
    parent = model
    for p in path:
        parent = getattr(parent, p)
    return parent, attr


# ---- quantizing a float state dict ------------------------------------------------------------------------

def quantize_state_dict(sd: dict, linear_names: list[str], mode: str, groupsize: int | None, tied: bool,
                        gptq_weights: dict | None = None, progress=None) -> dict:
    """A quantized copy of a float state dict. gptq_weights optionally gives (q, scales_and_zeros) per layer."""
    out = {k: v for k, v in sd.items()}
    for name in linear_names:
        key = f"{name}.weight"
        w = sd[key]
        if mode == "int8":
            out[key], out[f"{name}.scales"] = quantize_int8(w)
        elif gptq_weights is not None and name in gptq_weights:
            q, sz = gptq_weights[name]
            out[key], out[f"{name}.scales_and_zeros"] = pack_int4(q), sz
        else:
            q, sz = quantize_int4(w, groupsize)
            out[key], out[f"{name}.scales_and_zeros"] = pack_int4(q), sz
        if progress is not None:
            progress.update(1)
    emb_q, emb_s = quantize_int8(sd["tok_embeddings.weight"])
    out["tok_embeddings.weight"], out["tok_embeddings.scales"] = emb_q, emb_s
    if tied:
        out["output.weight"], out["output.scales"] = emb_q, emb_s
    else:
        out["output.weight"], out["output.scales"] = quantize_int8(sd["output.weight"])
    return out


def dequantize_state_dict(qsd: dict, quantization: dict) -> dict:
    """The float twin of a quantized state dict: every quantized weight replaced by its dequantized value."""
    out = {}
    for k, v in qsd.items():
        if k.endswith((".scales", ".scales_and_zeros")):
            continue
        name = k.removesuffix(".weight")
        if f"{name}.scales" in qsd:
            out[k] = dequantize_int8(v, qsd[f"{name}.scales"])
        elif f"{name}.scales_and_zeros" in qsd:
            out[k] = dequantize_int4(unpack_int4(v), qsd[f"{name}.scales_and_zeros"], quantization["groupsize"])
        else:
            out[k] = v.float()
    return out


# ---- GPTQ ---------------------------------------------------------------------------------------------

def gptq_quantize(w: Tensor, H: Tensor, groupsize: int, blocksize: int = 128, percdamp: float = 0.01):
    """GPTQ for one weight (N, K) given the Hessian H = 2 X^T X (K, K) of its inputs.

    Columns are quantized left to right; each one's rounding error is spread over the columns not yet
    quantized, weighted by the inverse Hessian, so the layer's output error stays small. Returns
    (q (N, K) uint8 in [0, 15], scales_and_zeros (K // groupsize, N, 2)) in the layout of quantize_int4.
    """
    W = w.float().clone()
    N, K = W.shape
    if K % groupsize:
        raise ValueError(f"groupsize {groupsize} does not divide the layer's input size {K}")
    blocksize = max(blocksize, groupsize) // groupsize * groupsize  # groups never straddle blocks
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(N, K, dtype=torch.uint8)
    scales = torch.zeros(N, K // groupsize)
    zeros = torch.zeros(N, K // groupsize)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % groupsize == 0:  # group parameters from the columns as updated so far
                s, z = int4_params(W1[:, i:i + groupsize])
                scales[:, col // groupsize], zeros[:, col // groupsize] = s, z
            s, z = scales[:, col // groupsize], zeros[:, col // groupsize]
            w_col = W1[:, i]
            q = torch.round((w_col - z) / s + 8).clamp(0, 15)
            Q[:, col] = q.to(torch.uint8)
            err = (w_col - ((q - 8) * s + z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def task_texts(tasks: list[str], include_path: Path | None, limit: int) -> list[str]:
    """Up to `limit` documents (prompt and answer) of lm-eval tasks: names from lm-eval's registry (their
    data comes from the hub) or task YAML files under include_path (local data, works offline)."""
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise ValueError("--calibration_tasks needs lm-eval: pip install lm-eval") from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; local task files go in --calibration_tasks_path")

    def leaves(d):  # groups nest their tasks in dicts
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    texts = []
    for task in leaves(get_task_dict(tasks, manager)):
        split = next(s for s in ("validation", "test", "training") if getattr(task, f"has_{s}_docs")())
        for doc in getattr(task, f"{split}_docs")():
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
                target = task.doc_to_choice(doc)[target]
            texts.append(f"{task.doc_to_text(doc)}{task.config.target_delimiter}{target}")
            if len(texts) >= limit:
                return texts
    return texts


def collect_hessians(model, names: list[str], batches: list[Tensor]) -> dict:
    """H = 2/n sum x x^T of the inputs of each named Linear, over calibration token batches (1, T)."""
    H, counts, hooks = {}, {}, []

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].reshape(-1, inputs[0].size(-1)).float()  # (tokens, K)
            n = x.size(0)
            old = counts.get(name, 0)
            H[name] = H.get(name, 0) * (old / (old + n)) + (2 / (old + n)) * (x.T @ x)
            counts[name] = old + n
        return fn

    for name in names:
        mod = dict(model.named_modules())[name]
        hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for b in batches:
                model.setup_caches(1, b.size(1))
                model(b, torch.arange(b.size(1)))
    finally:
        for h in hooks:
            h.remove()
    return H


# ---- command line ---------------------------------------------------------------------------------------

def output_name(mode: str, groupsize: int | None) -> str:
    return f"model_{mode}.pth" if mode == "int8" else f"model_{mode}-g{groupsize}.pth"


def main(*, checkpoint_path: Path, mode: str, groupsize: int = 32, calibration_file: Path | None = None,
         calibration_tasks: str | None = None, calibration_tasks_path: Path | None = None,
         calibration_limit: int = 32, calibration_seq_length: int = 512, percdamp: float = 0.01,
         blocksize: int = 128, output: Path | None = None) -> Path:
    """Quantize the float checkpoint at checkpoint_path; return the written weights file."""
    from tqdm import tqdm

    from checkpoint import build_model, checkpoint_files, load_state_dict, read_config, save_checkpoint
    from generate import load_model
    from tokenizer import get_tokenizer

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode != "int8" and groupsize not in GROUPSIZES:
        raise ValueError(f"groupsize {groupsize} is not supported; choose from {GROUPSIZES}")
    if mode == "int4-gptq" and not calibration_tasks and (calibration_file is None or not Path(calibration_file).is_file()):
        raise FileNotFoundError(f"--calibration_file {calibration_file} not found; GPTQ needs a text file "
                                "(or --calibration_tasks) to calibrate on")
    weights, _ = checkpoint_files(checkpoint_path)
    args, fmt = read_config(weights)
    if fmt.get("quantization"):
        raise ValueError(f"{weights} is already quantized ({fmt['quantization']}); quantize a float checkpoint")
    sd = {k: v.float() for k, v in load_state_dict(weights).items()}
    names = quantized_module_names(build_model(args, {}))
    gs = None if mode == "int8" else groupsize
    if gs is not None:
        bad = [n for n in names if sd[f"{n}.weight"].size(1) % gs]
        if bad:
            raise ValueError(f"groupsize {gs} does not divide the input size of {bad[0]} "
                             f"({sd[bad[0] + '.weight'].size(1)}); choose a smaller one")
    gptq = None
    if mode == "int4-gptq":
        tok = get_tokenizer(weights)
        seq = min(calibration_seq_length, args.block_size)
        if calibration_tasks:  # one sequence per task document
            texts = task_texts(calibration_tasks.split(","), calibration_tasks_path, calibration_limit)
            batches = [torch.tensor([tok.encode(t)[:seq]]) for t in texts]
        else:
            ids = tok.encode(Path(calibration_file).read_text())
            batches = [torch.tensor([ids[i:i + seq]]) for i in range(0, len(ids) - 1, seq)][:calibration_limit]
        print(f"calibrating on {sum(b.numel() for b in batches)} tokens in {len(batches)} sequences", file=sys.stderr)
        model = load_model(weights, "cpu", "fp32")
        H = collect_hessians(model, names, batches)
        gptq = {}
        for name in tqdm(names, desc="GPTQ", file=sys.stderr):
            gptq[name] = gptq_quantize(sd[f"{name}.weight"], H[name], gs, blocksize, percdamp)
    with tqdm(total=len(names), desc=f"quantizing {mode}", file=sys.stderr) as bar:
        qsd = quantize_state_dict(sd, names, "int8" if mode == "int8" else "int4", gs, args.tie_embeddings, gptq, bar)
    out = Path(output) if output else weights.parent / output_name(mode, gs)
    quant = {"mode": mode, "groupsize": gs, "embedding": "int8", "output": "int8"}
    new_fmt = dict(fmt, quantization=quant, quantized_from=weights.name)
    save_checkpoint(out.parent, qsd, args, new_fmt, weights_name=out.name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Weight-only quantization of a fastllama checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="float model.pth or its folder")
    p.add_argument("--mode", choices=MODES, required=True, help="int8 per channel, int4 group-wise, int4 GPTQ")
    p.add_argument("--groupsize", type=int, choices=GROUPSIZES, default=32, help="int4 group size")
    p.add_argument("--calibration_file", type=Path, default=None, help="text file for GPTQ calibration")
    p.add_argument("--calibration_tasks", type=str, default=None,
                   help="GPTQ: calibrate on these lm-eval tasks' documents instead (comma-separated)")
    p.add_argument("--calibration_tasks_path", type=Path, default=None, help="folder of local lm-eval task YAML files")
    p.add_argument("--calibration_limit", type=int, default=32, help="most calibration sequences")
    p.add_argument("--calibration_seq_length", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening, a fraction of the mean diagonal")
    p.add_argument("--blocksize", type=int, default=128, help="GPTQ columns updated together")
    p.add_argument("--output", type=Path, default=None, help="weights file to write (default: beside the source)")
    return p


if __name__ == "__main__":
    try:
        print(f"wrote {main(**vars(build_parser().parse_args()))}")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

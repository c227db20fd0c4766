"""Weight-only quantization of a fastllama checkpoint: int8 per channel, int4 group-wise, int4 GPTQ.

    python quantize.py --checkpoint_path checkpoints/M/model.pth --mode int8
    python quantize.py --checkpoint_path checkpoints/M/model.pth --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/M/model.pth --mode int4-gptq --groupsize 128 \
        --calibration_file data/calibration.txt          (or --calibration_tasks hellaswag,arc_easy)

int8: w = q * s, q in [-127, 127], one scale per output channel (symmetric).
int4: w = (q - 8) * s + z, q in [0, 15], one (s, z) per group of `groupsize` inputs (asymmetric).
      quantize_int4 keeps s and z - 8 s on float16 values so the CPU kernel's float16 copies are exact.
The checkpoint layouts, and the layers that run them, are layers.py's. In int4 modes the embedding and output
layer are int8 (as llama.cpp's Q4 files keep them at Q8_0): they are a fifth of a small model's bytes and int4
there costs the most quality. The quantized checkpoint is model_<mode>.pth beside the source; its config file
records mode and group size, and load_model reads them from there.
References: GPTQ, https://arxiv.org/abs/2210.17323 ; gpt-fast quantize.py
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

import files
from checkpoint import QUANTIZATION_MODES as MODES
from checkpoint import Checkpoint, Quantization, build_model, save_checkpoint
from cli import run_cli
from eval import task_texts
from generate import load_model
from layers import dequantize_int4, dequantize_int8, pack_int4, quantized_module_names, unpack_int4
from tokenizer import get_tokenizer

GROUPSIZES = (32, 64, 128, 256)


# ---- primitives: pure functions ---------------------------------------------------------------------------

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: q (N, K) int8 and scales (N,) float32 with w ~= q * s."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-10) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


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


# ---- quantizing a float state dict ------------------------------------------------------------------------

def quantize_state_dict(sd: dict, linear_names: list[str], mode: str, groupsize: int | None,
                        gptq_weights: dict | None = None, progress=None) -> dict:
    """A quantized copy of a float state dict: the linear layers int8 or int4 (gptq_weights optionally gives
    (q, scales_and_zeros) per layer), the embedding and output layer int8."""
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
    for name in ("tok_embeddings", "output"):
        if f"{name}.weight" in sd:  # a tied model's output is its embedding (save_checkpoint)
            out[f"{name}.weight"], out[f"{name}.scales"] = quantize_int8(sd[f"{name}.weight"])
    return out


def dequantize_state_dict(qsd: dict, quantization: Quantization) -> dict:
    """The float twin of a quantized state dict: every quantized weight replaced by its dequantized value."""
    out = {}
    for k, v in qsd.items():
        if k.endswith((".scales", ".scales_and_zeros")):
            continue
        name = k.removesuffix(".weight")
        if f"{name}.scales" in qsd:
            out[k] = dequantize_int8(v, qsd[f"{name}.scales"])
        elif f"{name}.scales_and_zeros" in qsd:
            out[k] = dequantize_int4(unpack_int4(v), qsd[f"{name}.scales_and_zeros"], quantization.groupsize)
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

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode != "int8" and groupsize not in GROUPSIZES:
        raise ValueError(f"groupsize {groupsize} is not supported; choose from {GROUPSIZES}")
    calibration_text = calibration_file is not None and Path(calibration_file).is_file()
    if mode == "int4-gptq" and not calibration_tasks and not calibration_text:
        raise FileNotFoundError(f"--calibration_file {calibration_file} not found; GPTQ needs a text file "
                                "(or --calibration_tasks) to calibrate on")
    ckpt = Checkpoint.open(checkpoint_path)
    if ckpt.quantization is not None:
        raise ValueError(f"{ckpt.weights} is already quantized ({ckpt.quantization.mode}); quantize a float checkpoint")
    sd = {k: v.float() for k, v in ckpt.state_dict().items()}
    names = quantized_module_names(build_model(ckpt.args))
    gs = None if mode == "int8" else groupsize
    if gs is not None:
        bad = [n for n in names if sd[f"{n}.weight"].size(1) % gs]
        if bad:
            raise ValueError(f"groupsize {gs} does not divide the input size of {bad[0]} "
                             f"({sd[bad[0] + '.weight'].size(1)}); choose a smaller one")
    gptq = None
    if mode == "int4-gptq":
        tok = get_tokenizer(ckpt.folder)
        seq = min(calibration_seq_length, ckpt.args.block_size)
        if calibration_tasks:  # one sequence per task document
            texts = task_texts(calibration_tasks.split(","), calibration_tasks_path, calibration_limit)
            batches = [torch.tensor([tok.encode(t)[:seq]]) for t in texts]
        else:
            ids = tok.encode(files.read_text(calibration_file, "calibration text"))
            batches = [torch.tensor([ids[i:i + seq]]) for i in range(0, len(ids) - 1, seq)][:calibration_limit]
        print(f"calibrating on {sum(b.numel() for b in batches)} tokens in {len(batches)} sequences", file=sys.stderr)
        H = collect_hessians(load_model(ckpt, "cpu", "fp32"), names, batches)
        gptq = {}
        for name in tqdm(names, desc="GPTQ", file=sys.stderr):
            gptq[name] = gptq_quantize(sd[f"{name}.weight"], H[name], gs, blocksize, percdamp)
    with tqdm(total=len(names), desc=f"quantizing {mode}", file=sys.stderr) as bar:
        qsd = quantize_state_dict(sd, names, "int8" if mode == "int8" else "int4", gs, gptq, bar)
    out = Path(output) if output else ckpt.folder / output_name(mode, gs)
    fmt = replace(ckpt.format, quantization=Quantization(mode, gs))
    return save_checkpoint(out.parent, qsd, ckpt.args, fmt, weights_name=out.name)


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
    print(f"wrote {run_cli(main, build_parser())}")

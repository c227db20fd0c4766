"""Evaluate a fastllama checkpoint. For now: perplexity of a text file with a sliding window.

    python eval.py --perplexity data/perplexity.txt --checkpoint_path checkpoints/M/model_int8.pth

The text is tokenized once; windows of --max_seq_length tokens start every --stride tokens, and
each window scores only the tokens no earlier window scored, so every token after the first is
predicted once, with at least max_seq_length - stride tokens of context (when the text has them).
Reference: https://huggingface.co/docs/transformers/perplexity
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from generate import DEFAULT_CHECKPOINT, PRECISIONS, load_model, resolve_device, run_cli
from tokenizer import get_tokenizer


def windows(n_tokens: int, max_seq_length: int, stride: int):
    """(begin, end, first scored position) of each window over n_tokens tokens."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_seq_length, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n_tokens:
            break


@torch.no_grad()
def perplexity(model, ids: list[int], max_seq_length: int, stride: int) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of the token list ids."""
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens for a perplexity")
    if not 0 < stride <= max_seq_length:
        raise ValueError(f"--stride must be in 1..--max_seq_length ({max_seq_length}), got {stride}")
    device = model.norm.weight.device
    model.setup_caches(1, max_seq_length)
    nll, count = 0.0, 0
    for begin, end, first in windows(len(ids), max_seq_length, stride):
        x = torch.tensor([ids[begin:end]], device=device)
        logits = model(x, torch.arange(end - begin, device=device))[0].float()  # (T, vocab)
        pred = logits[first - begin - 1 : end - begin - 1]  # position t-1 predicts token t
        target = x[0, first - begin : end - begin]
        nll += F.cross_entropy(pred, target, reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count), count


def main(*, checkpoint_path: Path = DEFAULT_CHECKPOINT, perplexity_file: Path | None = None,
         max_seq_length: int | None = None, stride: int | None = None, device: str | None = None,
         precision: str = "fp32") -> float:
    """Print and return the perplexity of perplexity_file under the checkpoint."""
    if perplexity_file is None:
        raise ValueError("nothing to evaluate; pass --perplexity FILE")
    if not Path(perplexity_file).is_file():
        raise FileNotFoundError(f"--perplexity file {perplexity_file} not found")
    model = load_model(checkpoint_path, resolve_device(device), precision)
    tokenizer = get_tokenizer(checkpoint_path)
    ids = tokenizer.encode(Path(perplexity_file).read_text())
    seq = max_seq_length or min(model.config.block_size, 1024)
    if seq > model.config.block_size:
        raise ValueError(f"--max_seq_length {seq} exceeds the model's context of {model.config.block_size}")
    ppl, n = perplexity(model, ids, seq, stride or seq // 2)
    print(f"perplexity {ppl:.4f} over {n} tokens of {perplexity_file} ({checkpoint_path}, {precision}, "
          f"window {seq}, stride {stride or seq // 2})")
    return ppl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a fastllama checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="model .pth or its folder")
    p.add_argument("--perplexity", dest="perplexity_file", type=Path, default=None, help="text file to score")
    p.add_argument("--max_seq_length", type=int, default=None, help="window length (default: min(context, 1024))")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half a window)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="activations dtype")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())

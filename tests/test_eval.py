"""eval.py --perplexity against a perplexity computed with transformers on the same tiny model."""
import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
from generate import load_model
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def hf_perplexity(hf, ids, max_len, stride):
    """The recipe of transformers' perplexity guide, token-weighted: labels -100 where not scored."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(x, labels=labels).loss
        n = (labels[:, 1:] != -100).sum().item()
        nll, count, prev_end = nll + loss.item() * n, count + n, end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("max_len, stride", [(64, 32), (64, 64), (50, 17), (128, 128)])
def test_perplexity_matches_transformers(tiny_llama, max_len, stride):
    hf, folder = tiny_llama
    ids = get_tokenizer(folder).encode(inspect.getsource(ev))[:300]
    ours, n = ev.perplexity(load_model(folder, "cpu", "fp32"), ids, max_len, stride)
    theirs, n_hf = hf_perplexity(hf, ids, max_len, stride)
    assert n == n_hf
    if stride < max_len:  # overlapping windows score every token after the first
        assert n == len(ids) - 1
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_eval_cli(tiny_llama, tmp_path):
    _, folder = tiny_llama
    text = tmp_path / "t.txt"
    text.write_text(inspect.getsource(ev))
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint_path", str(folder), "--perplexity",
                        str(text), "--max_seq_length", "64", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ")
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint_path", str(folder), "--perplexity",
                        str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr

"""generate.py from the command line: tiny and real model, chat, and one-line errors for bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import generate, load_model
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, input=stdin, env=env, cwd=ROOT, timeout=900)


def greedy_text(folder, prompt, n):
    model, tok = load_model(folder, "cpu", "fp32"), get_tokenizer(folder)
    ids = tok.encode(prompt)
    model.setup_caches(1, len(ids) + n)
    new = [t for t in generate(model, torch.tensor(ids), n, temperature=0.0, stop_ids=tok.stop_ids)[0].tolist()
           if t not in tok.stop_ids]
    return tok.decode(new)


def test_cli_tiny_model_greedy(tiny_llama):
    _, folder = tiny_llama
    r = run("--checkpoint_path", folder / "model.pth", "--device", "cpu", "--precision", "fp32", "--temperature", "0",
            "--max_new_tokens", "12", "--num_samples", "2", "--prompt", "def main(args):")
    assert r.returncode == 0, r.stderr
    expected = "def main(args):" + greedy_text(folder, "def main(args):", 12)
    assert r.stdout.count(expected) == 2, (r.stdout, expected)
    assert "time to first token" in r.stderr and "tok/s" in r.stderr and "peak memory" in r.stderr


def test_cli_batch_and_sampling(tiny_llama):
    _, folder = tiny_llama
    r = run("--checkpoint_path", folder, "--device", "cpu", "--batch_size", "3", "--num_samples", "1",
            "--max_new_tokens", "8", "--top_p", "0.9", "--seed", "3", "--prompt", "import os")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("import os") == 3 and "8 tokens x 3" in r.stderr


def test_cli_compile(tiny_llama):
    _, folder = tiny_llama
    r = run("--checkpoint_path", folder, "--device", "cpu", "--precision", "fp32", "--temperature", "0",
            "--max_new_tokens", "10", "--num_samples", "1", "--compile", "--compile_prefill", "--prompt", "class A:")
    assert r.returncode == 0, r.stderr
    assert "compile time" in r.stderr
    assert ("class A:" + greedy_text(folder, "class A:", 10)) in r.stdout


def test_cli_interactive_keeps_turns_in_cache(tiny_llama):
    _, folder = tiny_llama
    r = run("--checkpoint_path", folder, "--device", "cpu", "--interactive", "--temperature", "0",
            "--max_new_tokens", "6", "--max_seq_length", "128", stdin="hello there\nand again\n\n")
    assert r.returncode == 0, r.stderr
    counts = [int(line.split(", ")[-1].split()[0]) for line in r.stdout.splitlines() if "tokens in cache" in line]
    assert len(counts) == 2 and counts[1] > counts[0] > 0, r.stdout


@pytest.mark.real_model
def test_cli_real_model(smollm2_dir):
    prompt = "The three primary colors are"
    r = run("--checkpoint_path", smollm2_dir, "--device", "cpu", "--precision", "fp32", "--temperature", "0",
            "--max_new_tokens", "20", "--num_samples", "1", "--prompt", prompt)
    assert r.returncode == 0, r.stderr
    assert (prompt + greedy_text(smollm2_dir, prompt, 20)) in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--checkpoint_path", "/nonexistent/model.pth"], "prepare.sh"),
    (["--device", "tpu"], "unknown device"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--precision", "fp8"], "invalid choice"),
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "word " * 200], "context is 128"),
    (["--max_new_tokens", "0"], "at least 1"),
    (["--max_seq_length", "4"], "shorter than the longest prompt"),
    (["--interactive", "--max_seq_length", "4096"], "exceeds the model's context of 128"),
])
def test_cli_bad_input_is_one_clear_line(tiny_llama, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _, folder = tiny_llama
    r = run("--checkpoint_path", folder, "--device", "cpu", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr.strip().splitlines()[-1]  # the last line names the problem


def test_cli_interactive_context_full_starts_over(tiny_llama):
    _, folder = tiny_llama
    long_line = "parse the arguments " * 12
    r = run("--checkpoint_path", folder, "--device", "cpu", "--interactive", "--temperature", "0",
            "--max_new_tokens", "4", "--max_seq_length", "100", stdin=f"{long_line}\n{long_line}\n{'x ' * 200}\n\n")
    assert r.returncode == 0, r.stderr
    assert "starting a new one" in r.stderr and "more than the context of 100" in r.stderr
    assert r.stdout.count("tokens in cache]") == 2

"""The commands: generate.py on the tiny and the real model, chat, one-line errors for bad input, and every
command's flags (parser defaults are main's defaults). One real process shows the streamed output; the other
cases run main in this process."""
import inspect
import io

import pytest
import torch
from helpers import assert_one_line_error, greedy_text, run, run_in_process

import benchmark
import eval as ev
import generate
import quantize
import server


def test_cli_tiny_model_greedy_streams_in_a_real_process(tiny_llama):
    _, folder = tiny_llama
    r = run("--checkpoint_path", folder / "model.pth", "--device", "cpu", "--precision", "fp32", "--temperature", "0",
            "--max_new_tokens", "12", "--num_samples", "2", "--prompt", "def main(args):")
    assert r.returncode == 0, r.stderr
    expected = "def main(args):" + greedy_text(folder, "def main(args):", 12)
    assert r.stdout.count(expected) == 2, (r.stdout, expected)
    assert "time to first token" in r.stderr and "tok/s" in r.stderr and "peak memory" in r.stderr


def test_cli_batch_and_sampling(tiny_llama, capsys):
    _, folder = tiny_llama
    code, out, err = run_in_process(capsys, generate, "--checkpoint_path", folder, "--device", "cpu", "--batch_size",
                                    "3", "--num_samples", "1", "--max_new_tokens", "8", "--top_p", "0.9", "--seed", "3",
                                    "--prompt", "import os")
    assert code == 0, err
    assert out.count("import os") == 3 and "8 tokens x 3" in err
    assert "bf16 on cpu" in err  # --precision auto for a float checkpoint


def test_cli_compile(tiny_llama, capsys, reset_dynamo):
    _, folder = tiny_llama
    code, out, err = run_in_process(capsys, generate, "--checkpoint_path", folder, "--device", "cpu", "--precision",
                                    "fp32", "--temperature", "0", "--max_new_tokens", "10", "--num_samples", "1",
                                    "--compile", "--compile_prefill", "--prompt", "class A:")
    assert code == 0, err
    assert "compile time" in err
    assert ("class A:" + greedy_text(folder, "class A:", 10)) in out


def chat(capsys, monkeypatch, folder, lines: str, *args):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run_in_process(capsys, generate, "--checkpoint_path", folder, "--device", "cpu", "--interactive",
                          "--temperature", "0", *args)


def test_cli_interactive_keeps_turns_in_cache(tiny_llama, capsys, monkeypatch):
    code, out, err = chat(capsys, monkeypatch, tiny_llama[1], "hello there\nand again\n\n", "--max_new_tokens", "6",
                          "--max_seq_length", "128")
    assert code == 0, err
    counts = [int(line.split(", ")[-1].split()[0]) for line in out.splitlines() if "tokens in cache" in line]
    assert len(counts) == 2 and counts[1] > counts[0] > 0, out


def test_cli_interactive_context_full_starts_over(tiny_llama, capsys, monkeypatch):
    long_line = "parse the arguments " * 12
    code, out, err = chat(capsys, monkeypatch, tiny_llama[1], f"{long_line}\n{long_line}\n{'x ' * 200}\n\n",
                          "--max_new_tokens", "4", "--max_seq_length", "100")
    assert code == 0, err
    assert "starting a new one" in err and "but the context holds 100" in err
    assert out.count("tokens in cache]") == 2


@pytest.mark.real_model
def test_cli_real_model(smollm2_dir, capsys):
    prompt = "The three primary colors are"
    code, out, err = run_in_process(capsys, generate, "--checkpoint_path", smollm2_dir, "--device", "cpu",
                                    "--precision", "fp32", "--temperature", "0", "--max_new_tokens", "20",
                                    "--num_samples", "1", "--prompt", prompt)
    assert code == 0, err
    assert (prompt + greedy_text(smollm2_dir, prompt, 20)) in out


@pytest.mark.parametrize("args, message", [
    (["--checkpoint_path", "/nonexistent/model.pth"], "prepare.sh"),
    (["--device", "tpu"], "unknown device"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--precision", "fp8"], "invalid choice"),
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "word " * 200], "but the context holds 128"),
    (["--max_new_tokens", "0"], "at least 1"),
    (["--max_seq_length", "4"], "but the context holds 4"),
    (["--interactive", "--max_seq_length", "4096"], "exceeds the model's context of 128"),
    (["--prompt_lookup", "2", "--batch_size", "2"], "--batch_size 1"),
    (["--save_prefix_cache", "x.pt"], "needs the prefix text: add --prefix_file F"),
])
def test_cli_bad_input_is_one_clear_line(tiny_llama, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_in_process(capsys, generate, "--checkpoint_path", tiny_llama[1], "--device", "cpu", *args)
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("module", [generate, ev, benchmark, quantize, server])
def test_parser_defaults_are_mains(module):
    """One source of defaults: every flag's parser default equals main's keyword default (required flags aside)."""
    params = inspect.signature(module.main).parameters
    parser = module.build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == set(params), set(actions) ^ set(params)
    for name, action in actions.items():
        if params[name].default is inspect.Parameter.empty:
            assert action.required, name
        else:
            assert action.default == params[name].default, name

"""benchmark.py runs end to end on a tiny model and reports every column for every system."""
import importlib.util
import json
import shutil

import pytest
import torch

import benchmark


def test_benchmark_tiny(tiny_llama, tmp_path, capsys):
    _, folder = tiny_llama
    rows = benchmark.main(checkpoint_path=folder, device="cpu", precisions="fp32", compare="transformers",
                          eager=True, prompt_tokens=8, max_new_tokens=6, batch_size=2, runs=1,
                          json_path=tmp_path / "b.json")
    assert [(r["precision"], r["system"]) for r in rows] == [
        ("fp32", "fastllama --compile"), ("fp32", "fastllama eager"), ("fp32", "transformers")]
    for r in rows:
        assert "error" not in r, r
        assert min(r["decode_tok_s"], r["decode_batch_tok_s"], r["ttft_ms"], r["prefill_tok_s"]) > 0
        assert r["bandwidth_gb_s"] > 0 and r["peak_memory_gb"] > 0 and r["copy_bandwidth_gb_s"] > 0
        assert (r["compile_s"] is not None) == (r["system"] == "fastllama --compile")
    assert len({r["weights_gb"] for r in rows}) == 1  # one rule for the bytes a token reads, whatever the system
    assert json.loads((tmp_path / "b.json").read_text()) == rows
    out = capsys.readouterr().out
    assert "| fp32 | transformers |" in out and "| fp32 | fastllama --compile |" in out


def test_benchmark_quantized_row(tiny_llama, tmp_path):
    """An int8 row: its checkpoint made beside the float one on first use (and reused after), run in the activation
    precision `auto` gives it, with fewer bytes read per token than the float model."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama[1], folder)
    path = benchmark.checkpoint_for(folder, "int8")
    assert path == folder / "model_int8.pth" and benchmark.is_fresh(path, folder / "model.pth")
    made = path.stat().st_mtime_ns
    assert benchmark.checkpoint_for(folder, "int8") == path and path.stat().st_mtime_ns == made
    ids, device = list(range(3, 11)), torch.device("cpu")
    rows = {}
    for precision in ("fp32", "int8"):
        runner = benchmark.bench_fastllama(folder, device, precision, ids, 6, 2, compiled=False)
        ticks = []
        runner.make_run(1)(ticks.append)
        rows[precision] = dict(runner.info(), tokens=len(ticks))
    assert rows["int8"]["weights_file"] == "model_int8.pth" and rows["int8"]["activations"] == "fp32"
    assert rows["int8"]["tokens"] == 6 and rows["int8"]["weights_gb"] < rows["fp32"]["weights_gb"] / 2


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is an optional benchmark dependency, not installed here")
def test_benchmark_llama_cpp(smollm2_dir, capsys):
    rows = benchmark.main(checkpoint_path=smollm2_dir, device="cpu", precisions="int4", compare="llama.cpp",
                          prompt_tokens=8, max_new_tokens=8, batch_size=2, runs=1)
    assert [r["system"] for r in rows] == ["fastllama --compile", "llama.cpp"]
    assert rows[1]["weights_file"].endswith("-Q4_1.gguf") and rows[1]["decode_tok_s"] > 0
    out = capsys.readouterr().out
    assert "| int4 g32 | fastllama --compile |" in out and "| int4 g32 | llama.cpp (Q4_1) |" in out


def test_benchmark_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="choose from"):
        benchmark.main(checkpoint_path=tiny_llama[1], device="cpu", precisions="fp64")
    with pytest.raises(ValueError, match="choose from"):
        benchmark.main(checkpoint_path=tiny_llama[1], device="cpu", compare="vllm")

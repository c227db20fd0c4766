"""benchmark.py runs end to end on a tiny model and reports every column for every system."""
import json

import pytest

import benchmark


def test_benchmark_tiny(tiny_llama, tmp_path, capsys):
    _, folder = tiny_llama
    rows = benchmark.main(checkpoint_path=folder, device="cpu", precisions="fp32,int8", compare="transformers",
                          eager=True, prompt_tokens=8, max_new_tokens=6, batch_size=2, runs=1,
                          json_path=tmp_path / "b.json")
    assert [(r["precision"], r["system"]) for r in rows] == [
        ("fp32", "fastllama --compile"), ("fp32", "fastllama eager"), ("fp32", "transformers"),
        ("int8", "fastllama --compile"), ("int8", "fastllama eager")]
    for r in rows:
        assert "error" not in r, r
        assert min(r["decode_tok_s"], r["decode_batch_tok_s"], r["ttft_ms"], r["prefill_tok_s"]) > 0
        assert r["bandwidth_gb_s"] > 0 and r["peak_memory_gb"] > 0 and r["copy_bandwidth_gb_s"] > 0
        assert (r["compile_s"] is not None) == (r["system"] == "fastllama --compile")
    assert rows[3]["weights_file"] == "model_int8.pth" and rows[3]["weights_gb"] < rows[0]["weights_gb"]
    assert json.loads((tmp_path / "b.json").read_text()) == rows
    out = capsys.readouterr().out
    assert "| fp32 | transformers |" in out and "| int8 | fastllama --compile |" in out


@pytest.mark.real_model
def test_benchmark_llama_cpp(smollm2_dir, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional benchmark dependency")
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

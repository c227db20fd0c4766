"""benchmark.py runs end to end on a tiny model and reports sane numbers for every system."""
import json

import pytest

import benchmark


def test_benchmark_tiny(tiny_llama, tmp_path, reset_dynamo, capsys):
    _, folder = tiny_llama
    rows = benchmark.main(checkpoint_path=folder, device="cpu", precisions="fp32", compare="transformers",
                          prompt_tokens=8, max_new_tokens=6, runs=1, json_path=tmp_path / "b.json")
    assert [r["system"] for r in rows] == ["fastllama --compile", "fastllama eager", "transformers generate"]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and r["bandwidth_gb_s"] > 0
    assert rows[0]["compile_s"] > 0 and rows[1]["compile_s"] is None
    assert json.loads((tmp_path / "b.json").read_text()) == rows
    assert "| fp32 | transformers generate |" in capsys.readouterr().out


def test_benchmark_bad_precision(tiny_llama):
    with pytest.raises(ValueError, match="choose from"):
        benchmark.main(checkpoint_path=tiny_llama[1], device="cpu", precisions="fp64")

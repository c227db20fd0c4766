"""memory.py: the estimate's weights and KV cache are the loaded model's, byte for byte, at every weight format and
kernel layout; its peak is within 15% of the measured peak on the default model; the CLI answers for
named configs offline; server.py and generate.py refuse a setting that cannot fit, in one line."""
import json

import pytest
import torch
from helpers import assert_one_line_error, run_in_process

import bench_files
import generate as gen
import kernels
import memory
import memory_bench
import server
from checkpoint import Checkpoint


def loaded_bytes(model) -> tuple[int, int]:
    """(weights, KV cache) bytes of a loaded model's own tensors, each storage once."""
    weights = sum(memory.weight_sizes(model).values())
    kv = sum(t.nbytes for b in model.layers for t in b.attention.kv_cache.stored())
    return weights, kv


def assert_exact(path, precision: str, rows: int = 3, context: int = 40, kv_dtype: str = "auto") -> memory.Estimate:
    ckpt = Checkpoint.open(path)
    model = gen.load_model(ckpt, "cpu", precision, kv_dtype=kv_dtype)
    model.setup_caches(rows, context)
    est = memory.Sizer.of(ckpt, precision, "cpu", kv_dtype).at(rows, context)
    assert (est.weights_bytes, est.kv_cache_bytes) == loaded_bytes(model), (path, precision)
    assert est.read_per_token_bytes == memory.model_bytes_read_per_token(model)
    assert est.tables == {"rotary": model.freqs_cis.nbytes}  # the attention mask is computed per step, not stored
    return est


@pytest.mark.parametrize("built", [True, False], ids=["kernels", "no-kernels"])
def test_tiny_model_bytes_are_exact_at_every_format(tiny_llama, tiny_quantized, built, monkeypatch):
    """fp32 / bf16 / fp16 / int8 / int4, in the C++ kernels' layouts and (forced) in torch's."""
    if built and not kernels.cpu_kernels():
        pytest.skip("the C++ kernels need AVX2 and a compiler; the torch layouts are tested")
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: built)
    for precision in ("fp32", "bf16", "fp16"):
        assert_exact(tiny_llama[1], precision)
    kv = {name: assert_exact(tiny_llama[1], "fp32", kv_dtype=name).kv_cache_bytes for name in ("fp32", "bf16", "int8")}
    head_dim = 16  # the tiny model's: one scale (4 bytes) per head and position beside 16 int8 values
    assert kv["bf16"] * 2 == kv["fp32"] and kv["int8"] * 4 == kv["fp32"] * (head_dim + 4) / head_dim
    for mode, path in tiny_quantized.items():
        est = assert_exact(path, "fp32")
        assert est.weights["feed_forward"] < est.params_per_part["feed_forward"] * (1.2 if mode == "int8" else 0.8)


@pytest.mark.real_model
def test_default_model_bytes_are_exact_at_every_format(smollm2_dir):
    folder = smollm2_dir
    for precision in ("fp32", "bf16"):
        assert_exact(folder, precision)
    for mode in ("int8", "int4"):
        est = assert_exact(bench_files.checkpoint_for(folder, mode), "fp32")  # made once beside it, as the peak test's
        if mode == "int4":  # scales and offsets counted: more than 0.5 bytes per weight
            assert 0.56 <= est.weights["attention"] / est.params_per_part["attention"] <= 0.63
    assert_exact(folder / "model_gguf.pth", "fp32")  # the GGUF's own Q4_1 blocks


@pytest.mark.real_model
def test_measured_peak_is_within_15_percent(smollm2_dir):
    """A fresh process per precision loads the default model; per rows x context it writes every page of a KV cache,
    runs a decode step over every row and one prefill chunk: the peak resident memory (the load's included, VmHWM
    started again before each case) against the estimate."""
    cases = memory_bench.memory_table(smollm2_dir, ["fp32", "bf16", "int8", "int4"], [1, 8], [2048, 8192])
    assert len(cases) == 16
    off = {(c["precision"], c["rows"], c["context"]): c["estimate_bytes"] / c["measured_bytes"] - 1 for c in cases}
    assert not {k: v for k, v in off.items() if abs(v) > 0.15}, off


def test_named_config_answers_offline(capsys):
    def answer(kv_dtype):
        code, out, err = run_in_process(capsys, memory, "meta-llama/Llama-2-70b-hf", "--precision", "int4",
                                        "--context", 4096, "--rows", 8, "--json", "--memory", "64GiB", "--kv_dtype",
                                        kv_dtype)
        assert code == 0, err
        return json.loads(out)

    r, r8 = answer("fp32"), answer("int8")
    assert 68.5e9 < r["params"] < 69.5e9
    assert 0.56 < r["weights"]["feed_forward"] / r["params_per_part"]["feed_forward"] < 0.63
    kv = 80 * 2 * 8 * 128 * 4 * 8 * 4097  # layers x (k, v) x kv heads x head_dim x fp32 x rows x (context + scratch)
    assert r["kv_cache_bytes"] == kv and r["total_bytes"] >= r["weights_bytes"] + kv
    assert r8["kv_cache_bytes"] == kv // 4 * (128 + 4 * 4) // 128  # int8 values and a float32 scale per 32
    assert r8["kv_dtype"] == "int8" and r8["largest_rows"] > r["largest_rows"]
    sizer = memory.Sizer(memory.known_config("Llama-2-70b-hf"), "int4", kv_dtype="fp32")
    mem = memory.parse_size("64GiB")
    most = r["largest_rows"]
    assert memory.fits(sizer.at(most, 4096), mem) and not memory.fits(sizer.at(most + 1, 4096), mem)
    assert memory.fits(sizer.at(8, r["largest_context"]), mem)
    assert r["largest_context"] == 4096 or not memory.fits(sizer.at(8, r["largest_context"] + 1), mem)
    code, out, _ = run_in_process(capsys, memory, "Llama-2-7b", "--bandwidth", "40GB/s", "--rule_of_thumb")
    assert code == 0 and "decode ceiling at 40.0 GB/s" in out and "rule of thumb" in out and "llama-65b" in out


def test_every_input_kind(tiny_llama, tmp_path, capsys):
    """A checkpoint folder, a Hugging Face folder with config.json (its own format: bf16 by default), bad input."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(model_type="llama", vocab_size=512, num_hidden_layers=2,
                                                    num_attention_heads=4, hidden_size=64, intermediate_size=96)))
    for model in (tiny_llama[1], hf):
        code, out, err = run_in_process(capsys, memory, model, "--json")
        assert code == 0, err
        assert json.loads(out)["weights_bytes"] > 0
    assert_one_line_error(*run_in_process(capsys, memory, "no-such-model")[::2], "known model name")
    assert_one_line_error(*run_in_process(capsys, memory, "Llama-2-7b", "--memory", "lots")[::2], "write it like")
    assert memory.parse_size("24GiB") == 24 * 2**30 and memory.parse_size("40GB/s", per_second=True) == 40e9
    with pytest.raises(ValueError):
        memory.parse_size("40GB", per_second=True)


@pytest.mark.real_model
def test_gguf_file_is_sized_as_its_import(smollm2_gguf, capsys):
    code, out, err = run_in_process(capsys, memory, smollm2_gguf, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["weight_format"] == "q4_1" and 134e6 < r["params"] < 135e6


def test_server_and_generate_refuse_what_cannot_fit(tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)
    monkeypatch.setattr(server, "available_bytes", lambda device: 2**30)
    monkeypatch.setattr(gen, "available_bytes", lambda device: 2**30)
    code, _, err = run_in_process(capsys, server, "--checkpoint_path", tiny_llama[1], "--rows", 100000,
                                  "--context", 128)
    assert_one_line_error(code, err, "lower --rows / --context")
    code, _, err = run_in_process(capsys, gen, "--checkpoint_path", tiny_llama[1], "--batch_size", 100000,
                                  "--max_seq_length", 128, "--max_new_tokens", 2)
    assert_one_line_error(code, err, "lower --batch_size / --max_seq_length")
    sizer = memory.Sizer.of(Checkpoint.open(tiny_llama[1]), "bf16", torch.device("cpu"))
    est = memory.plan(sizer, 2**30, rows=20000, context=None)  # the context is cut to what fits
    assert memory.fits(est, 2**30) and not memory.fits(sizer.at(20000, est.context + 1), 2**30)

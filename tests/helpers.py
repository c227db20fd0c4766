"""What the tests share: tiny seeded Hugging Face models, running the commands (in process, or as a real process
where streaming or torchrun is the point), greedy references and the steps speculative decoding takes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import generate as gen
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
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
    from convert_hf_checkpoint import convert_hf_checkpoint

    cls_name, extra, save = KINDS[kind]
    save = dict(save)
    config = getattr(transformers, cls_name)(**TINY, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases so that the q/k/v bias path matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    as_bin = save.pop("as_bin", False)
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
    T = idx.size(1)
    for m in (a, b):
        m.setup_caches(1, T + new_tokens + 8)
    with torch.no_grad():
        torch.testing.assert_close(a(idx, torch.arange(T)), b(idx, torch.arange(T)), rtol=tol, atol=tol)
    for m in (a, b):
        m.setup_caches(1, T + new_tokens + 8)
    assert (gen.generate(a, idx, new_tokens, temperature=0.0).tolist()
            == gen.generate(b, idx, new_tokens, temperature=0.0).tolist())


def greedy_text(folder, prompt: str, n: int) -> str:
    """The greedy continuation generate.py prints for prompt (stop tokens left out), computed in this process."""
    model, tok = gen.load_model(folder, "cpu", "fp32"), get_tokenizer(folder)
    ids = tok.encode(prompt)
    model.setup_caches(1, len(ids) + n)
    new = gen.generate(model, torch.tensor(ids), n, temperature=0.0, stop_ids=tok.stop_ids)[0].tolist()
    return tok.decode([t for t in new if t not in tok.stop_ids])


def run(*args, stdin=None, script="generate.py"):
    """A command as a separate process (for what only a real process shows: streaming, torchrun)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, input=stdin, env=env, cwd=ROOT, timeout=900)


def run_in_process(capsys, module, *args) -> tuple[int, str, str]:
    """A command's main through cli.run_cli in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.run_cli(module.main, module.build_parser(), [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    """A user's mistake: non-zero exit, no traceback, and the last line of stderr names the problem."""
    assert code != 0
    assert "Traceback" not in err, err
    assert message in err.strip().splitlines()[-1], err


def spec_steps(compiled: bool = False) -> dict:
    """The steps speculative.speculative_generate takes, eager or (verify) compiled."""
    cpu = torch.device("cpu")
    return dict(prefill_step=gen.prefill, draft_step=gen.decode_one_token,
                verify_step=gen.compile_step(gen.verify, cpu) if compiled else gen.verify)




needs_avx2 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="the C++ kernels need AVX2 (x86-64 since 2013)")

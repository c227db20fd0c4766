"""The pure functions of model.py and generate.py, and ModelArgs, each on its own."""
import pytest
import torch
from convert_hf_checkpoint import hf_to_interleaved

import kernels
from checkpoint import Quantization, resolve_kv_dtype
from generate import logits_to_probs, sample
from kernels import Cpu
from model import (
    KVCache,
    ModelArgs,
    apply_rope_scaling,
    apply_rotary_emb,
    dequantize_kv,
    precompute_freqs_cis,
    quantize_kv,
    rms_norm,
)


def test_rotary_matches_rotate_half_after_permute():
    """Adjacent-pair rotation of permuted q equals HF's rotate-half rotation of the original q, permuted."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 8
    w = torch.randn(H * D, 16)
    x = torch.randn(B, T, 16)
    freqs = precompute_freqs_cis(T, D, 10000.0)
    q_hf = (x @ w.T).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    angles = torch.atan2(freqs[..., 1], freqs[..., 0])  # (T, D/2)
    emb = torch.cat([angles, angles], -1)
    rot_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, emb.cos()[None], emb.sin()[None])
    ours = apply_rotary_emb((x @ hf_to_interleaved(w, H, D).T).view(B, T, H, D), freqs)
    expected = hf_to_interleaved(rot_hf.transpose(1, 2).reshape(B, T, H * D).transpose(0, 2), H, D).transpose(0, 2)
    torch.testing.assert_close(ours.reshape(B, T, H * D), expected)


def test_llama31_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", **scaling))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    got = apply_rope_scaling(freqs, **scaling)
    torch.testing.assert_close(got, expected.float())
    assert not torch.equal(got, freqs)  # the scaling did something


def test_int8_kv_blocks_round_each_vector_alone():
    """quantize_kv: a scale per block (max |x| / 127), values within half a step of it, a zero block exact, each
    vector's bits the same whatever else is quantized with it; KVCache stores it and reads it back dequantized."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 64) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None, None]
    x[0, 0, 0, 32:] = 0
    q, s = quantize_kv(x, 32)
    assert q.dtype == torch.int8 and s.shape == (3, 2, 5, 2) and q.abs().max() == 127
    back = dequantize_kv(q, s, torch.float32)
    assert ((back - x).abs() <= s.repeat_interleave(32, -1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[0, 0, 0, 32:], torch.zeros(32)) and s[0, 0, 0, 1] == 0
    q1, s1 = quantize_kv(x[1:2, :, 3:4], 32)
    assert torch.equal(q1, q[1:2, :, 3:4]) and torch.equal(s1, s[1:2, :, 3:4])
    cache = KVCache(2, 8, 2, 64, torch.int8, compute_dtype=torch.float32)
    k = x[:1].transpose(1, 2)[:, :3].transpose(1, 2)  # (1, 2, 3, 64): positions 0..2 of row 0 of x
    cache.update(torch.arange(3), k, k, row=1)
    got_k, got_v = cache.rows(1, 1, 3)
    assert torch.equal(got_k, dequantize_kv(*quantize_kv(k, 32), torch.float32)) and torch.equal(got_k, got_v)
    assert sum(t.nbytes for t in cache.stored()) == 2 * (2 * 2 * 8 * 64 + 2 * 2 * 8 * 2 * 4)


@pytest.mark.parametrize("cpu, quantized", [(Cpu("AVX2", False), "int8"), (Cpu("AVX512", True, True), "int8"),
                                            (Cpu("DEFAULT", False), "fp32")])
def test_kv_dtype_auto_rule(monkeypatch, cpu, quantized):
    """--kv_dtype auto: int8 for quantized checkpoints on a CPU whose kernels read it (AVX2), else the activations'
    dtype: float checkpoints and CUDA keep the exact cache. A value asked for is kept; another is one clear error."""
    monkeypatch.setattr(kernels, "this_cpu", lambda: cpu)
    q, cpu_dev = Quantization("int4", groupsize=32), torch.device("cpu")
    assert resolve_kv_dtype("auto", "fp32", q, cpu_dev) == quantized
    assert resolve_kv_dtype("auto", "bf16", None, cpu_dev) == "bf16"
    assert resolve_kv_dtype("auto", "bf16", q, torch.device("cuda")) == "bf16"
    assert resolve_kv_dtype("bf16", "fp32", q, cpu_dev) == "bf16"
    with pytest.raises(ValueError, match="unknown --kv_dtype 'q4'; choose from auto, bf16, fp16, fp32, int8"):
        resolve_kv_dtype("q4", "fp32", q, cpu_dev)


def test_rms_norm():
    x, w = torch.randn(3, 8), torch.rand(8)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected)


def test_logits_to_probs_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    torch.testing.assert_close(logits_to_probs(logits, 1.0), torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_k=2), torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    # top_p=0.7: 0.5 + 0.25 reaches it, so the two most likely stay
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_p=0.7), torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_p=0.5), torch.tensor([[1.0, 0, 0, 0]]))
    sharp = logits_to_probs(logits, 0.5)
    assert sharp[0, 0] > 0.5 and torch.isclose(sharp.sum(), torch.tensor(1.0))


def test_sample_greedy_and_distribution():
    logits = torch.log(torch.tensor([[[0.1, 0.6, 0.3]]]))  # (B=1, T=1, V=3)
    idx, probs = sample(logits, temperature=0.0)
    assert idx.item() == 1 and probs[0, 1] == 1
    torch.manual_seed(0)
    draws = torch.cat([sample(logits.expand(1000, 1, 3), temperature=1.0)[0] for _ in range(10)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.02, rtol=0)


def test_model_args_from_hf_config_and_errors():
    cfg = dict(model_type="llama", vocab_size=10, num_hidden_layers=1, num_attention_heads=4, hidden_size=32,
               intermediate_size=64, num_key_value_heads=2, rope_theta=5e5, tie_word_embeddings=True)
    a = ModelArgs.from_hf_config(cfg)
    assert (a.n_kv_heads, a.head_dim, a.rope_base, a.tie_embeddings) == (2, 8, 5e5, True)
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2"):
        ModelArgs.from_hf_config(dict(cfg, model_type="gpt2"))
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelArgs.from_dict({"dim": 8, "n_heads": 2})
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(n_head=4, n_kv_heads=3, dim=32)
    assert ModelArgs(dim=4096).intermediate_size == 11008  # the Llama-2-7B rule


PUBLISHED_PARAMETERS = {  # the parameter counts their model cards and safetensors indexes give
    "huggyllama/llama-7b": 6_738_415_616, "huggyllama/llama-13b": 13_015_864_320,
    "huggyllama/llama-30b": 32_528_943_616, "huggyllama/llama-65b": 65_285_660_672,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192, "codellama/CodeLlama-7b-hf": 6_738_546_688,
    "codellama/CodeLlama-13b-hf": 13_016_028_160, "codellama/CodeLlama-34b-hf": 33_743_970_304,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384, "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248, "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496, "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824, "HuggingFaceTB/SmolLM2-135M": 134_515_008,
    "HuggingFaceTB/SmolLM2-360M": 361_821_120, "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384,
    "Qwen/Qwen2-0.5B": 494_032_768, "Qwen/Qwen2.5-0.5B": 494_032_768, "Qwen/Qwen2-7B": 7_615_616_512,
}


def test_known_configs_have_their_published_sizes():
    """configs.py's offline table: every entry builds the model whose parameter count its publisher gives, and names
    are found by repo id or bare name, instruct / chat variants by their base model's config."""
    from configs import KNOWN, known_config
    from model import Transformer

    assert PUBLISHED_PARAMETERS.keys() == KNOWN.keys()
    for name, count in PUBLISHED_PARAMETERS.items():
        with torch.device("meta"):
            model = Transformer(known_config(name))
        assert sum(p.numel() for p in model.parameters()) == count, name
    assert known_config("SmolLM2-135M-Instruct") == known_config("HuggingFaceTB/SmolLM2-135M")
    assert known_config("meta-llama/Llama-2-7b-chat-hf") == known_config("Llama-2-7b-hf")
    with pytest.raises(ValueError, match="unknown model name 'Llama-9'; known: huggyllama/llama-7b"):
        known_config("Llama-9")

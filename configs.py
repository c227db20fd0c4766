"""The configs of well-known LLaMA-family models, offline: a name gives ModelArgs without a download.

Keys are the Hugging Face repo ids; a lookup also takes the part after the slash, in any case. The values
are the fields of each repo's config.json as ModelArgs names them; the published parameter counts they
give are tested (tests/test_model.py). Instruct and chat variants share their base model's config.
"""
from model import ModelArgs

_LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)
_LLAMA3 = dict(vocab_size=128256, rope_base=500000.0, norm_eps=1e-5)
_SMOLLM2 = dict(vocab_size=49152, tie_embeddings=True, block_size=8192)
_QWEN2 = dict(vocab_size=151936, rope_base=1e6, norm_eps=1e-6, attention_bias=True, block_size=32768)

KNOWN = {
    "huggyllama/llama-7b": dict(n_layer=32, n_head=32, dim=4096, norm_eps=1e-6),
    "huggyllama/llama-13b": dict(n_layer=40, n_head=40, dim=5120, norm_eps=1e-6),
    "huggyllama/llama-30b": dict(n_layer=60, n_head=52, dim=6656, norm_eps=1e-6),
    "huggyllama/llama-65b": dict(n_layer=80, n_head=64, dim=8192, norm_eps=1e-5),
    "meta-llama/Llama-2-7b-hf": dict(n_layer=32, n_head=32, dim=4096, block_size=4096),
    "meta-llama/Llama-2-13b-hf": dict(n_layer=40, n_head=40, dim=5120, block_size=4096),
    "meta-llama/Llama-2-70b-hf": dict(n_layer=80, n_head=64, n_kv_heads=8, dim=8192, intermediate_size=28672,
                                      block_size=4096),
    "codellama/CodeLlama-7b-hf": dict(n_layer=32, n_head=32, dim=4096, vocab_size=32016, rope_base=1e6,
                                      block_size=16384),
    "codellama/CodeLlama-13b-hf": dict(n_layer=40, n_head=40, dim=5120, vocab_size=32016, rope_base=1e6,
                                       block_size=16384),
    "codellama/CodeLlama-34b-hf": dict(n_layer=48, n_head=64, n_kv_heads=8, dim=8192, intermediate_size=22016,
                                       rope_base=1e6, block_size=16384),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(n_layer=22, n_head=32, n_kv_heads=4, dim=2048, intermediate_size=5632),
    "mistralai/Mistral-7B-v0.1": dict(n_layer=32, n_head=32, n_kv_heads=8, dim=4096, intermediate_size=14336,
                                      block_size=32768, sliding_window=4096),
    "meta-llama/Meta-Llama-3-8B": dict(n_layer=32, n_head=32, n_kv_heads=8, dim=4096, intermediate_size=14336,
                                       block_size=8192, **_LLAMA3),
    "meta-llama/Llama-3.1-8B": dict(n_layer=32, n_head=32, n_kv_heads=8, dim=4096, intermediate_size=14336,
                                    block_size=131072, rope_scaling=_LLAMA31_ROPE, **_LLAMA3),
    "meta-llama/Llama-3.1-70B": dict(n_layer=80, n_head=64, n_kv_heads=8, dim=8192, intermediate_size=28672,
                                     block_size=131072, rope_scaling=_LLAMA31_ROPE, **_LLAMA3),
    "meta-llama/Llama-3.2-1B": dict(n_layer=16, n_head=32, n_kv_heads=8, dim=2048, intermediate_size=8192,
                                    tie_embeddings=True, block_size=131072, rope_scaling=_LLAMA32_ROPE, **_LLAMA3),
    "meta-llama/Llama-3.2-3B": dict(n_layer=28, n_head=24, n_kv_heads=8, dim=3072, intermediate_size=8192,
                                    tie_embeddings=True, block_size=131072, rope_scaling=_LLAMA32_ROPE, **_LLAMA3),
    "HuggingFaceTB/SmolLM2-135M": dict(n_layer=30, n_head=9, n_kv_heads=3, dim=576, intermediate_size=1536,
                                       rope_base=100000.0, **_SMOLLM2),
    "HuggingFaceTB/SmolLM2-360M": dict(n_layer=32, n_head=15, n_kv_heads=5, dim=960, intermediate_size=2560,
                                       rope_base=100000.0, **_SMOLLM2),
    "HuggingFaceTB/SmolLM2-1.7B": dict(n_layer=24, n_head=32, n_kv_heads=32, dim=2048, intermediate_size=8192,
                                       rope_base=130000.0, **_SMOLLM2),
    "Qwen/Qwen2-0.5B": dict(n_layer=24, n_head=14, n_kv_heads=2, dim=896, intermediate_size=4864,
                            tie_embeddings=True, **_QWEN2),
    "Qwen/Qwen2.5-0.5B": dict(n_layer=24, n_head=14, n_kv_heads=2, dim=896, intermediate_size=4864,
                              tie_embeddings=True, **_QWEN2),
    "Qwen/Qwen2-7B": dict(n_layer=28, n_head=28, n_kv_heads=4, dim=3584, intermediate_size=18944,
                          **dict(_QWEN2, vocab_size=152064)),
}


def _bare(name: str) -> str:
    """A model name without organization, case and variant suffixes: "Llama-2-7b-chat-hf" -> "llama-2-7b"."""
    bare = name.lower().split("/")[-1]
    while bare.endswith(("-hf", "-instruct", "-chat")):
        bare = bare.rsplit("-", 1)[0]
    return bare


def known_config(name: str) -> ModelArgs:
    """ModelArgs of a well-known model by repo id or bare name ("meta-llama/Llama-2-7b-hf", "Llama-2-7b-chat-hf")."""
    for repo, fields in KNOWN.items():
        if _bare(repo) == _bare(name):
            return ModelArgs(**fields)
    raise ValueError(f"unknown model name {name!r}; known: {', '.join(KNOWN)}")

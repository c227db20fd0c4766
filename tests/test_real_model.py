"""SmolLM2-135M-Instruct from its GGUF: our import against transformers' own GGUF loading."""
import pytest
import torch

from generate import generate, load_model
from tokenizer import get_tokenizer

pytestmark = pytest.mark.real_model

PARAGRAPH = (
    "The Industrial Revolution, which began in Great Britain in the late eighteenth century, transformed "
    "the way goods were produced. Before it, most people worked on farms or in small workshops, making "
    "things by hand. The invention of the steam engine allowed factories to be built far from rivers, and "
    "new machines for spinning and weaving cotton multiplied the output of a single worker many times over."
)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir, "cpu", "fp32"), get_tokenizer(smollm2_dir)


def test_config_from_gguf_metadata(ours):
    model, _ = ours
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_heads, c.dim, c.intermediate_size, c.vocab_size) == (30, 9, 3, 576, 1536, 49152)
    assert c.tie_embeddings and c.rope_base == 100000.0 and c.block_size == 8192
    from dataclasses import replace

    from configs import known_config

    assert c.norm_eps == pytest.approx(1e-5)  # stored as float32 in the GGUF
    assert replace(c, norm_eps=1e-5) == known_config("HuggingFaceTB/SmolLM2-135M-Instruct")  # the offline table


def test_logits_match_transformers_gguf(ours, hf_model):
    model, tok = ours
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    assert ids.size(1) > 60
    model.setup_caches(1, ids.size(1))
    with torch.no_grad():
        got = model(ids, torch.arange(ids.size(1)))
        expected = hf_model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_greedy_text_matches_transformers(ours, hf_model):
    model, tok = ours
    prompt = tok.apply_chat_template([{"role": "user", "content": "Explain in a few sentences why the sky is blue."}])
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    n = 32
    with torch.no_grad():
        expected = hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.size(1):]
    model.setup_caches(1, ids.size(1) + n)
    got = generate(model, ids, n, temperature=0.0)[0]
    assert got.tolist() == expected.tolist()
    text = tok.decode(got.tolist())
    assert "sky" in text.lower() or "light" in text.lower(), text  # a trained model, not noise

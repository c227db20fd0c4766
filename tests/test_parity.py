"""Our model against Hugging Face transformers on tiny random models converted with our own script."""
import pytest
import torch
from helpers import KINDS, VOCAB, make_hf_model

from generate import generate, load_model


@pytest.fixture(scope="module", params=sorted(KINDS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, folder)
    return request.param, hf, load_model(folder, "cpu", "fp32"), folder


def test_converted_files(pair):
    kind, _, _, folder = pair
    assert (folder / "model.pth").is_file() and (folder / "model_config.json").is_file()
    if kind == "llama_sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    if kind == "llama_bin":
        assert not list(folder.glob("*.safetensors")) and list(folder.glob("pytorch_model*.bin"))


def test_logits_match(pair):
    kind, hf, ours, _ = pair
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 24))  # longer than the Mistral window of 8
    ours.setup_caches(2, 64)
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx, torch.arange(24))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if kind == "smollm2_tied":
        assert ours.output.weight is ours.tok_embeddings.weight


def test_greedy_tokens_match(pair):
    _, hf, ours, _ = pair
    prompt = torch.tensor([[5, 17, 42, 99, 3, 250]])
    n = 30
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, prompt.size(1):]
    ours.setup_caches(1, prompt.size(1) + n)
    got = generate(ours, prompt, n, temperature=0.0)[0]
    assert got.tolist() == expected.tolist()


def test_round_trip_to_hf(pair):
    """to_hf_state_dict undoes our conversion exactly (benchmark and eval rebuild HF models with it)."""
    from convert_hf_checkpoint import to_hf_config, to_hf_state_dict

    kind, hf, _, folder = pair
    from checkpoint import Checkpoint

    ckpt = Checkpoint.open(folder)
    args = ckpt.args
    back = to_hf_state_dict(ckpt.state_dict(), args)
    expected = {k: v for k, v in hf.state_dict().items() if not (kind == "smollm2_tied" and k == "lm_head.weight")}
    assert back.keys() >= expected.keys()
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    cfg = to_hf_config(args)
    assert cfg["num_key_value_heads"] == hf.config.num_key_value_heads
    assert cfg["tie_word_embeddings"] == hf.config.tie_word_embeddings

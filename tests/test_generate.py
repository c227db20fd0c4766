"""KV cache, batching, compiled decode and cached prefixes, on a tiny GQA model."""
import pytest
import torch

from generate import (
    compile_step,
    decode_one_token,
    generate,
    generate_cached,
    left_pad,
    load_model,
    until_stop,
)
from model import fit_context


def test_prefill_then_decode_equals_full_forward(tiny_llama):
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    model.setup_caches(1, 32)
    idx = torch.tensor([[3, 8, 1, 77, 200, 5, 9, 12]])
    with torch.no_grad():
        full = model(idx, torch.arange(8))
        model.setup_caches(1, 32)
        last = model(idx, torch.arange(8), last_only=True)  # what prefill asks for
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
        model.setup_caches(1, 32)
        part = model(idx[:, :7], torch.arange(7))
        last = model(idx[:, 7:], torch.tensor([7]))
    torch.testing.assert_close(part, full[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, full[:, 7:], rtol=1e-5, atol=1e-5)


def test_prefill_from_zero_attends_causally_and_continuations_see_only_filled_positions(tiny_llama, monkeypatch):
    """Eager prefill at positions 0..T-1 runs causal attention over the first T cache positions (no mask); a
    continuation at positions P..P+T-1 attends over the first P+T positions with the mask; both give the logits of
    masked attention (a key mask of all True keeps the mask). Parity with transformers covers the rest."""
    import model as model_module

    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((is_causal, k.size(2), None if attn_mask is None else attn_mask.size(-1)))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    idx = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    everyone = torch.ones(2, 64, dtype=torch.bool)
    with torch.no_grad():
        model.setup_caches(2, 64)
        causal = model(idx[:, :20], torch.arange(20))
        cont = model(idx[:, 20:], torch.arange(20, 30))
        assert seen[0] == (True, 20, None) and seen[-1] == (False, 30, 30)
        seen.clear()
        model.setup_caches(2, 64)
        masked = model(idx[:, :20], torch.arange(20), key_mask=everyone)
        masked_cont = model(idx[:, 20:], torch.arange(20, 30), key_mask=everyone)
        assert seen[0] == (False, 20, 20)
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cont, masked_cont, rtol=1e-5, atol=1e-5)


def test_batch_rows_equal_single_runs(tiny_llama):
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    prompts = torch.tensor([[4, 5, 6, 7, 8], [100, 3, 250, 9, 1], [7, 7, 7, 7, 7]])
    model.setup_caches(3, 30)
    batched = generate(model, prompts, 20, temperature=0.0)
    for row in range(3):
        model.setup_caches(1, 30)
        single = generate(model, prompts[row], 20, temperature=0.0)
        assert batched[row].tolist() == single[0].tolist()


def test_left_padded_rows_equal_single_runs(tiny_llama, reset_dynamo):
    """Prompts of different lengths in one batch: same logits and greedy tokens as each alone (eager, compiled)."""
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    prompts = [[4, 5, 6, 7, 8, 9, 10], [100, 3], [7, 250, 7, 1]]
    singles, last_logits = [], []
    for p in prompts:
        model.setup_caches(1, 30)
        with torch.no_grad():
            last_logits.append(model(torch.tensor([p]), torch.arange(len(p)))[0, -1])
        model.setup_caches(1, 30)
        singles.append(generate(model, torch.tensor(p), 15, temperature=0.0)[0].tolist())
    model.setup_caches(3, 30)
    x, key_mask = left_pad(prompts, 30, "cpu")
    assert x.tolist()[1] == [0] * 5 + prompts[1] and key_mask[1].tolist() == [False] * 5 + [True] * 25
    with torch.no_grad():
        logits = model(x, torch.arange(x.size(1)), key_mask)[:, -1]
    torch.testing.assert_close(logits, torch.stack(last_logits), rtol=1e-4, atol=1e-4)
    for step in (decode_one_token, compile_step(decode_one_token, torch.device("cpu"))):
        batched = generate(model, x, 15, temperature=0.0, key_mask=key_mask, decode_step=step)
        assert batched.tolist() == singles
    assert until_stop([5, 6, 2, 7, 2], {2}) == [5, 6] and until_stop([5, 6], {2}) == [5, 6]


def test_stop_ids_end_generation(tiny_llama):
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    model.setup_caches(1, 40)
    free = generate(model, torch.tensor([4, 5, 6]), 20, temperature=0.0)[0].tolist()
    stop = free[5]
    stopped = generate(model, torch.tensor([4, 5, 6]), 20, temperature=0.0, stop_ids={stop})[0].tolist()
    assert stopped == free[: free.index(stop) + 1]


def test_compiled_sampling_step_equals_eager(tiny_llama, reset_dynamo):
    """The compiled decode step that samples (temperature 1: logits_to_probs and the draw in the graph) is called once
    per new token and gives the eager step's distribution. The greedy graphs: test_cli_compile and test_kernels."""
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    step = compile_step(decode_one_token, torch.device("cpu"))
    prompt = torch.tensor([[9, 8, 7, 6, 5, 4]])
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return step(*a, **k)

    model.setup_caches(1, 40)
    torch.manual_seed(0)
    assert generate(model, prompt, 25, temperature=1.0, top_k=50, decode_step=counted).shape == (1, 25)
    assert len(calls) == 24
    with torch.no_grad():
        model.setup_caches(1, 40)
        model(prompt, torch.arange(6))
        _, p_eager = decode_one_token(model, prompt[:, -1:], torch.tensor([6]), temperature=1.0, top_k=50)
        model.setup_caches(1, 40)
        model(prompt, torch.arange(6))
        _, p_comp = step(model, prompt[:, -1:], torch.tensor([6]), temperature=1.0, top_k=50)
    torch.testing.assert_close(p_comp, p_eager, rtol=1e-4, atol=1e-5)
    assert (p_comp > 0).sum() == 50  # top-k kept 50 tokens


def test_compiled_step_follows_model_and_caches(tiny_llama, reset_dynamo):
    """One compiled step, called with two models of the same shapes and after setup_caches changes the
    caches: every call gives that model's eager answer (the step skips Dynamo's module guards, so it must
    compile anew for another model or cache instead of running a graph frozen with other weights)."""
    _, folder = tiny_llama
    a, b = load_model(folder, "cpu", "fp32"), load_model(folder, "cpu", "fp32")
    with torch.no_grad():
        for p in b.parameters():  # another model of the same shapes (norm weights too: their std is 0)
            p.copy_(torch.randn_like(p) * (p.std() if p.std() > 0 else 1.0))
    step = compile_step(decode_one_token, torch.device("cpu"))
    prompt, other = torch.tensor([[9, 8, 7, 6, 5, 4]]), torch.tensor([[300, 2, 41, 7, 77, 5]])
    # a again with caches of another length: a graph with the old rotary table and mask frozen in would be wrong
    for model, x, seq in ((a, prompt, 40), (b, prompt, 40), (a, other, 32)):
        model.setup_caches(1, seq)
        eager = generate(model, x, 12, temperature=0.0)
        model.setup_caches(1, seq + 8)  # new caches and rotary table
        model.setup_caches(1, seq)
        compiled = generate(model, x, 12, temperature=0.0, decode_step=step)
        assert compiled.tolist() == eager.tolist()
    assert generate(a, prompt, 12, temperature=0.0).tolist() != generate(b, prompt, 12, temperature=0.0).tolist()


def test_cached_prefix_gives_same_tokens(tiny_llama):
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    model.setup_caches(1, 64)
    turn1 = [5, 6, 7, 8, 9, 10]
    new1, cached = generate_cached(model, turn1, [], 8, temperature=0.0)
    assert cached == turn1 + new1[:-1]
    turn2 = turn1 + new1 + [11, 12, 13]  # the next turn starts with everything so far
    new2, cached2 = generate_cached(model, turn2, cached, 8, temperature=0.0)
    model.setup_caches(1, 64)
    fresh, _ = generate_cached(model, turn2, [], 8, temperature=0.0)  # no reuse: reads everything again
    assert new2 == fresh and cached2 == turn2 + new2[:-1]


def test_fit_context_is_the_one_rule():
    """fit_context: new tokens clipped to what the context holds after the prompt (and speculation's room); a prompt
    that does not fit at all is refused with both lengths."""
    assert fit_context(10, 5, 100) == 5 and fit_context(90, 20, 100) == 10 and fit_context(90, 20, 100, room=5) == 5
    with pytest.raises(ValueError, match="the prompt has 100 tokens but the context holds 100"):
        fit_context(100, 1, 100)
    with pytest.raises(ValueError, match="5 of them kept for speculation"):
        fit_context(95, 1, 100, room=5)

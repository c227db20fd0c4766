"""Speculative decoding (draft model and prompt lookup): exact greedy tokens, the target's distribution when
sampling."""
import shutil

import pytest
import torch
from helpers import assert_one_line_error, run_in_process, spec_steps
from scipy.stats import chisquare

import generate as gen
import speculative as sp
from generate import generate, load_model, prefill

PROMPT = torch.tensor([5, 80, 13, 200, 7, 9, 301, 44, 13, 200, 7])


def test_lookup_continues_the_latest_longest_match():
    seq = [1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2]
    assert sp.lookup(seq, 2, 3) == [4, 5, 7]  # "1 2" last seen before the end at index 4
    assert sp.lookup(seq + [3], 3, 2) == [9, 1]  # "1 2 3" only at the start
    assert sp.lookup(seq + [8], 3, 2) == []  # "8" never seen
    assert sp.lookup([4, 4], 3, 5) == [4]


def chain_samples(T, Q, k, n_out, trials, rule):
    """First n_out tokens of speculative sampling on Markov chains: target T[prev], draft Q[prev] (start: 0)."""
    rows = []
    for _ in range(trials):
        out, cur = [], 0
        while len(out) < n_out:
            guesses, qs, c = [], [], cur
            for _ in range(k):
                qs.append(Q[c])
                c = int(torch.multinomial(Q[c], 1))
                guesses.append(c)
            p = torch.stack([T[t] for t in [cur] + guesses])  # target's distribution after each token
            n, nxt = rule(p, torch.stack(qs), torch.tensor(guesses))
            out += guesses[:n] + [nxt]
            cur = out[-1]
        rows.append(out[:n_out])
    return rows


def chain_probs(T, n_out):
    """Exact law of the first n_out tokens of chain T from token 0, over sequences (first token most significant)."""
    probs = T[0]
    for _ in range(n_out - 1):
        last = torch.arange(probs.numel()) % T.size(0)  # the last token of each sequence
        probs = (probs[:, None] * T[last]).reshape(-1)
    return probs


def chi2_pvalue(obs, probs):
    """Pearson chi-square p-value of counts obs against a distribution probs (renormalized in float64)."""
    probs = probs.double()
    return chisquare(obs.double(), probs / probs.sum() * obs.sum()).pvalue


def counts(rows, V):
    idx = torch.tensor([sum(t * V ** (len(r) - 1 - i) for i, t in enumerate(r)) for r in rows])
    return torch.bincount(idx, minlength=V ** len(rows[0])).double()


def test_accept_rule_gives_the_target_distribution():
    """Joint law of the first 3 tokens (27 cells) over rejections, resampling and bonus tokens equals the target's;
    the same samples reject the draft's law, so a wrong rule (e.g. always accepting) would fail."""
    torch.manual_seed(0)
    V = 3
    T = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]], dtype=torch.float64)
    Q = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    expected = chain_probs(T, 3)
    torch.testing.assert_close(expected.sum(), torch.tensor(1.0, dtype=torch.float64))
    obs = counts(chain_samples(T, Q, 2, 3, 6000, sp.accept), V)
    assert chi2_pvalue(obs, expected) > 1e-3
    assert chi2_pvalue(obs, chain_probs(Q, 3)) < 1e-12
    always = lambda p, q, g: (g.numel(), int(torch.multinomial(p[-1], 1)))  # noqa: E731  a wrong rule
    wrong = counts(chain_samples(T, Q, 2, 3, 6000, always), V)
    assert chi2_pvalue(wrong, expected) < 1e-12


def test_accept_is_exact_at_temperature_zero():
    p = torch.eye(4)[[2, 1, 3]]  # target argmaxes 2, 1, then 3
    assert sp.accept(p, torch.eye(4)[[2, 1]], torch.tensor([2, 1])) == (2, 3)  # both right: bonus
    assert sp.accept(p, torch.eye(4)[[2, 0]], torch.tensor([2, 0])) == (1, 1)  # second wrong: the target's


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_quantized):
    """Target (fp32), its int4 twin, and a noisy copy of it (a draft that is often wrong) as drafts."""
    _, folder = tiny_llama
    int4 = tiny_quantized["int4"]
    other = load_model(folder, "cpu", "fp32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())
    return {"target": load_model(folder, "cpu", "fp32"), "int4": load_model(int4, "cpu", "fp32"), "other": other}


def run_spec(models, n, draft=None, lookup=None, k=4, compiled=False, **kw):
    target = models["target"]
    for m in (target, models.get(draft)):
        if m is not None:
            m.setup_caches(1, PROMPT.numel() + n + k)
    stats = sp.Stats()
    steps = {**spec_steps(compiled), **kw}
    out = sp.speculative_generate(target, PROMPT, n, k=k, draft=models.get(draft), prompt_lookup=lookup,
                                  stats=stats, **steps)
    return out[0].tolist(), stats


@pytest.mark.parametrize("draft, lookup", [("int4", None), ("other", None), (None, 3)])
def test_greedy_speculation_is_the_targets_greedy_output(models, draft, lookup):
    target = models["target"]
    target.setup_caches(1, 64)
    expected = generate(target, PROMPT, 40, temperature=0.0)[0].tolist()
    got, stats = run_spec(models, 40, draft, lookup, temperature=0.0)
    assert got == expected
    if draft == "other":
        assert stats.accepted < stats.proposed  # rejections happened on the way
    else:
        assert stats.rounds < 39 and stats.accepted > 0  # guesses were accepted (fewer target passes than tokens)


def test_speculation_stops_at_stop_ids_and_budget(models):
    target = models["target"]
    target.setup_caches(1, 64)
    expected = generate(target, PROMPT, 30, temperature=0.0)[0].tolist()
    stop = expected[7]
    got, _ = run_spec(models, 30, "int4", stop_ids={stop}, temperature=0.0)
    assert got == expected[:expected.index(stop) + 1]
    for n in (1, 2, 5):
        assert run_spec(models, n, None, 2, temperature=0.0)[0] == expected[:n]


@pytest.mark.parametrize("draft, lookup", [("other", None), (None, 2)])
def test_sampled_speculation_has_the_targets_distribution(models, draft, lookup):
    """The first speculated token (after a fixed first token) follows the target's top-3 distribution."""
    target, first = models["target"], 13
    target.setup_caches(1, 64)
    with torch.no_grad():
        logits = target(torch.cat([PROMPT, torch.tensor([first])])[None], torch.arange(PROMPT.numel() + 1))
    sampling = dict(temperature=1.5, top_k=3)
    p = gen.token_probs(logits[0, -1:], **sampling)[0]
    support = p.nonzero().flatten()

    def fixed_first(model, x, input_pos, **_):
        prefill(model, x, input_pos)
        return torch.tensor([[first]])

    torch.manual_seed(0)
    seconds = [run_spec(models, 2, draft, lookup, k=3, prefill_step=fixed_first, **sampling)[0][1] for _ in range(1200)]
    obs = torch.bincount(torch.tensor(seconds), minlength=p.numel()).double()
    assert obs.sum() == obs[support].sum()  # never outside the target's top 3
    assert chi2_pvalue(obs[support], p[support]) > 1e-3


def test_compiled_speculation_matches_eager(models, reset_dynamo):
    """The target's compiled verify graph (k + 1 tokens) gives the eager tokens (the draft's compiled decode graph is
    test_compiled_quantized_decode_matches_eager's)."""
    expected, _ = run_spec(models, 24, "int4", temperature=0.0)
    got, _ = run_spec(models, 24, "int4", temperature=0.0, compiled=True)
    assert got == expected


def test_cli_speculation(tiny_llama, tiny_quantized, tmp_path, capsys):
    _, folder = tiny_llama
    common = ["--checkpoint_path", folder, "--device", "cpu", "--precision", "fp32", "--temperature", "0",
              "--max_new_tokens", "16", "--num_samples", "1", "--prompt", "def main(args):"]
    plain = run_in_process(capsys, gen, *common)
    drafted = run_in_process(capsys, gen, *common, "--draft_checkpoint_path", tiny_quantized["int4"],
                             "--speculate_k", "3")
    looked = run_in_process(capsys, gen, *common, "--prompt_lookup", "2")
    for code, _, err in (plain, drafted, looked):
        assert code == 0, err
    assert plain[1] == drafted[1] == looked[1]
    assert "speculation: acceptance" in drafted[2] and "mean accepted length" in looked[2]
    code, _, err = run_in_process(capsys, gen, *common, "--draft_checkpoint_path", tiny_quantized["int4"],
                                  "--prompt_lookup", "2")
    assert_one_line_error(code, err, "choose one way to speculate")
    other = tmp_path / "other_tokenizer"
    shutil.copytree(folder, other)
    (other / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes() + b"\0")
    code, _, err = run_in_process(capsys, gen, *common, "--draft_checkpoint_path", other)
    assert_one_line_error(code, err, "different tokenizer")

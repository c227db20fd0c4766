"""Speculative decoding: a cheap proposer guesses k tokens, the target model checks all of them in one pass.

Two proposers:
  - a draft model (`generate.py --draft_checkpoint_path`, e.g. the int4 twin of the target) that samples k
    tokens one by one with its own distribution q;
  - prompt lookup (`--prompt_lookup N`): the k tokens that followed the most recent earlier occurrence of
    the last N tokens (or fewer, down to 1) in the prompt and output so far; q is one-hot.
The target scores the current token and the k guesses in one forward pass (T = k + 1, its distributions p).
Guess i is accepted with probability min(1, p_i / q_i); at the first rejection the token is drawn from
max(0, p - q) renormalized, and when all k are accepted p after the last guess gives a bonus token. The
tokens produced have exactly the target's distribution (Leviathan et al. 2023, arXiv:2211.17192; Chen et
al. 2023, arXiv:2302.01318); at temperature 0 they are the target's greedy tokens.
References: gpt-fast generate.py (speculative_decode); prompt lookup decoding,
https://github.com/apoorvumang/prompt-lookup-decoding
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def accept(p: Tensor, q: Tensor, guess: Tensor) -> tuple[int, int]:
    """The speculative sampling rule: (guesses accepted n, the token that follows them).

    p (k + 1, vocab): the target's distributions at each guess and after the last; q (k, vocab): the
    proposer's distributions the guesses (k,) were drawn from.
    """
    k = guess.numel()
    rows = torch.arange(k, device=guess.device)
    p_g, q_g = p[rows, guess], q[rows, guess]
    rejected = (torch.rand(k, device=p.device) * q_g >= p_g).nonzero()  # accept when u < p / q
    if rejected.numel() == 0:
        return k, int(torch.multinomial(p[k], 1))  # all accepted: a bonus token from the target
    n = int(rejected[0])
    residual = (p[n] - q[n]).clamp(min=0)
    return n, int(torch.multinomial(residual if residual.sum() > 0 else p[n], 1))


def lookup(seq: list[int], ngram: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of seq (at most ngram)."""
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


@dataclass
class Stats:
    rounds: int = 0  # target forward passes after prefill
    proposed: int = 0
    accepted: int = 0

    def summary(self) -> str:
        rate = self.accepted / max(self.proposed, 1)
        return (f"acceptance {rate:.0%} ({self.accepted}/{self.proposed}), mean accepted length "
                f"{self.accepted / max(self.rounds, 1):.2f}, {self.rounds} target passes")


@torch.no_grad()
def speculative_generate(model, prompt: Tensor, max_new_tokens: int, *, k: int, prefill_step: Callable,
                         verify_step: Callable, draft_step: Callable, draft=None, prompt_lookup: int | None = None,
                         stop_ids=(), callback=None, stats: Stats | None = None, **sampling) -> Tensor:
    """Generate up to max_new_tokens after prompt (T,) with k guesses per target pass; new tokens (1, N).

    The steps are generate.py's (or their compiled forms): prefill_step(model, x, input_pos, **sampling) -> the
    first token (1, 1); verify_step(model, x (1, T), input_pos, **sampling) -> the target's distributions (T, vocab);
    draft_step(draft, token (1, 1), input_pos, **sampling) -> (token, distribution). Guesses come from the draft
    model when given, else from prompt lookup of n-grams up to prompt_lookup. Caches must hold
    len(prompt) + max_new_tokens + k positions. callback(tokens (1, 1)) sees each token.
    """
    assert (draft is None) != (prompt_lookup is None), "one proposer: a draft model or prompt lookup"
    device, T = prompt.device, prompt.numel()
    assert T + max_new_tokens + k <= model.max_seq_length, "setup_caches with room for k guesses"
    stats = stats if stats is not None else Stats()
    vocab = model.config.vocab_size
    token = prefill_step(model, prompt.view(1, -1), torch.arange(T, device=device), **sampling)
    if draft is not None:  # the draft's cache gets the prompt; its logits are not needed
        draft(prompt.view(1, -1).to(draft.device), torch.arange(T, device=draft.device), last_only=True)
    seq, out = prompt.tolist() + [int(token)], [int(token)]
    pos = T  # position of `token`, not yet in the caches
    while True:
        if callback is not None:
            callback(torch.tensor([[out[-1]]]))
        if len(out) >= max_new_tokens or out[-1] in stop_ids:
            break
        if draft is not None:
            guesses, qs, t = [], [], token.view(1, 1)
            for i in range(k):
                t, q = draft_step(draft, t.clone(), torch.tensor([pos + i], device=device), **sampling)
                guesses.append(int(t))
                qs.append(q[0])
            q = torch.stack(qs)
        else:  # deterministic guesses; short ones are padded so the target pass keeps one shape (for compile)
            guesses = lookup(seq, prompt_lookup, k)
            guesses += [guesses[-1] if guesses else seq[-1]] * (k - len(guesses))
            q = F.one_hot(torch.tensor(guesses, device=device), vocab).float()
        x = torch.tensor([[out[-1]] + guesses], device=device)
        p = verify_step(model, x, torch.arange(pos, pos + k + 1, device=device), **sampling)
        n, nxt = accept(p, q.to(p.device), x[0, 1:])
        stats.rounds, stats.proposed, stats.accepted = stats.rounds + 1, stats.proposed + k, stats.accepted + n
        if draft is not None and n == k:  # the draft has not seen its last guess yet
            draft_step(draft, x[:, -1:].clone(), torch.tensor([pos + k], device=device), **sampling)
        new = guesses[:n] + [nxt]
        for i, t in enumerate(new):  # emit one at a time so stops and the budget cut exactly
            out.append(t)
            seq.append(t)
            if i < len(new) - 1:
                if callback is not None:
                    callback(torch.tensor([[t]]))
                if len(out) >= max_new_tokens or t in stop_ids:
                    return torch.tensor([out], device=device)
        pos += n + 1
        token = torch.tensor([[nxt]], device=device)
    return torch.tensor([out], device=device)

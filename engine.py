"""The serving engine: continuous batching of many requests over the rows of one static KV cache.

Each running request owns a row of the cache (a slot). One iteration of the loop (`step`): drop cancelled requests;
give every free row a waiting request, reusing the KV of the longest prefix they share; prefill the admitted prompts
in arrival order, piece by piece, until the iteration's token budget is spent, so that prompts never stall the
decoding requests for more than one budget; run one decode step over the rows that decode, and only those (one
compiled graph for any count of rows); sample each row with its own settings; hand each request its new text.
Plain Python over the model: server.py translates HTTP to these calls and back.

Exactness: a request's tokens do not depend on what else is in the batch or which row it lands in. Each row's
arithmetic is its own (the C++ kernels compute rows independently, attention cuts its chunks at fixed counts), and a
prompt is prefilled in the same pieces as `generate(..., prefill_chunk=chunk)` cuts it: at multiples of the chunk
size. Reuse takes only whole chunks that an earlier prompt's prefill computed (not decoded tokens, whose KV was
computed by other arithmetic), so a request gives the tokens it gives alone.
References: Orca, continuous batching (Yu et al. 2022); vLLM's and llama.cpp's servers.
"""
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from generate import decode_rows, prefill_pieces, sample
from layers import rows_alone
from model import Transformer
from tokenizer import Detokenizer, Tokenizer

PREFILL_BUDGET = 2048  # prompt tokens per iteration, as llama-server's --batch-size: docs/features.md says why


class QueueFull(Exception):
    """The engine holds as many requests as its rows and queue allow."""


@dataclass(frozen=True)
class Sampling:
    """How one request is sampled and when it stops."""
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # stop strings: not shown, and text that may still become one is held back
    stop_token_ids: frozenset[int] = frozenset()  # beside the tokenizer's own stop tokens
    ignore_eos: bool = False  # the tokenizer's stop tokens do not stop it
    min_tokens: int = 0  # no stop token before this many tokens
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely


@dataclass
class Output:
    """What a request gets after a step: its new text and tokens, and why it finished (None: not yet)."""
    text: str
    token_ids: list[int]
    logprobs: list[dict] = field(default_factory=list)  # per token: {"token", "logprob", "top": [(token, logprob)]}
    finish_reason: str | None = None  # "stop" or "length"


class StopText:
    """The text of a request's new tokens as it may be shown: the first stop string cuts it (and is not shown), and a
    tail that may still become a stop string is held back until it cannot."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = [s for s in stops if s], ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text to show now, whether a stop string ended it)."""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            shown, self.held = self.held[:min(found)], ""
            return shown, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        shown, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return shown, False

    def flush(self) -> str:
        shown, self.held = self.held, ""
        return shown


class Request:
    """One sequence to generate: its prompt ids, sampling, and on_output(Output) called from the engine's thread."""

    def __init__(self, prompt: list[int], sampling: Sampling, on_output: Callable[[Output], None]):
        assert prompt, "a request needs at least one prompt token"
        self.prompt, self.sampling, self.on_output = list(prompt), sampling, on_output
        self.generated: list[int] = []
        self.cached_tokens = 0  # prompt tokens whose KV was reused, not computed
        self.cancelled = False
        self.arrival, self.first_token_at, self.last_token_at = time.perf_counter(), None, None
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)

    def cancel(self) -> None:
        """Stop generating for this request: it leaves its row or the queue at the engine's next iteration."""
        self.cancelled = True


@dataclass
class Slot:
    """A row of the KV cache: the request it serves, and the tokens whose KV it holds (for reuse)."""
    request: Request | None = None
    tokens: list[int] = field(default_factory=list)  # the token of each position the row holds, in order
    exact: int = 0  # its first `exact` positions came from whole prefill chunks: reusable without changing a result
    next_token: int | None = None  # sampled, not yet in the cache (the row is decoding)
    detok: Detokenizer | None = None
    stop_text: StopText | None = None


@dataclass
class Histogram:
    """Counts of observations at or below each bound (the last: all of them), and their sum."""
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.total += value


@dataclass
class Metrics:
    """What /metrics reports: counters and histograms, updated by the engine's thread."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    finished: dict = field(default_factory=dict)  # finish reason (or "cancelled") -> count
    ttft: Histogram = field(default_factory=lambda: Histogram((.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)))
    tpot: Histogram = field(default_factory=lambda: Histogram((.005, .01, .02, .04, .08, .16, .32, .64, 1.28)))


class Engine:
    """Continuous batching over `rows` rows of `context` positions (see the module docstring). decode_step is
    generate.decode_rows or its compiled form (generate.compile_decode_rows); chunk is the prefill piece size;
    prefill_budget the prompt tokens computed per iteration (at least one piece); max_queue bounds the waiting line."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, rows: int, context: int, chunk: int = 64,
                 prefill_budget: int = PREFILL_BUDGET, decode_step: Callable = decode_rows, max_queue: int = 64):
        self.model, self.tokenizer, self.rows, self.context, self.chunk = model, tokenizer, rows, context, chunk
        self.budget = prefill_budget
        self.decode_step, self.max_queue = decode_step, max_queue
        model.setup_caches(rows, context)
        # the fewest rows a decode step computes: any count where each row is computed by itself (layers.rows_alone);
        # else all of them, one shape, since torch's GEMM may sum a row in another order at another count of rows
        self.min_rows = 1 if rows_alone(model) else rows
        self.slots = [Slot() for _ in range(rows)]
        self.waiting: deque[Request] = deque()
        self.admitting: list[int] = []  # rows whose prompts are being prefilled, piece by piece, in arrival order
        self.metrics = Metrics()
        self.lock = threading.Condition()

    # ---- called from other threads ----

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none); QueueFull when the engine would then hold more than rows + max_queue."""
        for r in requests:
            assert len(r.prompt) + r.sampling.max_tokens <= self.context, "fit_context before submitting"
        with self.lock:
            held = len(self.waiting) + sum(s.request is not None for s in self.slots)
            if held + len(requests) > self.rows + self.max_queue:
                raise QueueFull(f"{held} requests running or waiting (rows {self.rows}, queue {self.max_queue})")
            self.waiting.extend(requests)
            self.lock.notify()

    def counts(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        with self.lock:
            return sum(s.request is not None for s in self.slots), len(self.waiting)

    def run(self, stop: threading.Event) -> None:
        """The engine's loop, until stop is set: one step at a time, sleeping while there is nothing to do. A step
        that fails ends every request it holds with finish_reason "error" (and the error as text) and goes on."""
        while not stop.is_set():
            with self.lock:
                if not self.waiting and all(s.request is None for s in self.slots):
                    self.lock.wait(timeout=0.1)
                    continue
            try:
                self.step()
            except Exception as e:  # never leave a request without an answer
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        with self.lock:
            held = [s.request for s in self.slots if s.request is not None] + list(self.waiting)
            self.waiting.clear()
        for i, s in enumerate(self.slots):
            if s.request is not None:
                self._free(i, "error")
            s.tokens, s.exact = [], 0  # what the failed step left in the cache is not reusable
        for r in held:
            r.on_output(Output(message, [], finish_reason="error"))

    # ---- the loop ----

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: cancellations, admissions, prompt pieces up to the budget, one decode step of the rows
        that decode."""
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()

    def _decode(self) -> None:
        decoding = [i for i, s in enumerate(self.slots) if s.next_token is not None]
        if not decoding:
            return
        # rows short of min_rows are padded with idle ones (token 0 at the scratch position: Transformer.setup_caches)
        pad = [i for i in range(self.rows) if i not in decoding][:max(0, self.min_rows - len(decoding))]
        x = torch.tensor([[self.slots[i].next_token] for i in decoding] + [[0]] * len(pad))
        pos = torch.tensor([[len(self.slots[i].tokens)] for i in decoding] + [[self.context]] * len(pad))
        dev = self.model.device
        rows = torch.tensor(decoding + pad, device=dev)
        logits = self.decode_step(self.model, x.to(dev), pos.to(dev), rows).float().cpu()  # (B, vocab)
        for b, i in enumerate(decoding):
            s = self.slots[i]
            s.tokens.append(s.next_token)
            s.next_token = None
            self._sampled(i, logits[b])

    def _drop_cancelled(self) -> None:
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._count_finish("cancelled")
        for i, s in enumerate(self.slots):
            if s.request is not None and s.request.cancelled:
                self._free(i, "cancelled")

    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """How many leading prompt positions slot's KV can serve exactly: shared, computed by whole prefill chunks,
        cut to a chunk boundary, and leaving at least one prompt token to compute (for its logits)."""
        shared = 0
        for a, b in zip(slot.tokens[:min(slot.exact, len(prompt) - 1)], prompt):
            if a != b:
                break
            shared += 1
        return shared // self.chunk * self.chunk

    def _admit(self) -> None:
        """Every free row takes a waiting request, in arrival order; each goes to the free row that holds the
        longest reusable prefix of its prompt."""
        while True:
            with self.lock:
                free = [i for i, s in enumerate(self.slots) if s.request is None]
                if not free or not self.waiting:
                    return
                req = self.waiting.popleft()
                row = max(free, key=lambda i: self._reusable(self.slots[i], req.prompt))  # the first of the longest
                s = self.slots[row]
                s.request = req
            reuse = self._reusable(s, req.prompt)
            s.tokens, s.exact, req.cached_tokens = s.tokens[:reuse], reuse, reuse
            context = req.prompt[max(0, len(req.prompt) - 8):]  # spacing of the first new token
            s.detok, s.stop_text = Detokenizer(self.tokenizer, context), StopText(req.sampling.stop)
            self.metrics.prompt_tokens += len(req.prompt)
            self.metrics.cached_tokens += reuse
            self.admitting.append(row)

    def _prefill(self) -> None:
        """Prompt pieces of the admitted requests, oldest first, until the budget is spent (at least one piece)."""
        spent = 0
        while self.admitting:
            row = self.admitting[0]
            s = self.slots[row]
            a, b = prefill_pieces(len(s.tokens), len(s.request.prompt), self.chunk)[0]
            if spent and spent + b - a > self.budget:
                return
            spent += b - a
            self._prefill_piece(row, a, b)

    def _prefill_piece(self, row: int, a: int, b: int) -> None:
        s = self.slots[row]
        req = s.request
        dev = self.model.device
        logits = self.model(torch.tensor([req.prompt[a:b]], device=dev), torch.arange(a, b, device=dev),
                            last_only=True, cache_row=row)
        s.tokens.extend(req.prompt[a:b])
        if s.exact == a and b - a == self.chunk:  # one more whole chunk, right after whole ones
            s.exact = b
        if b == len(req.prompt):
            self.admitting.remove(row)
            self._sampled(row, logits[0, -1].float().cpu())

    def _sampled(self, row: int, logits: Tensor) -> None:
        """Pick the next token of the row's request from its logits (vocab,), hand the request its text, and either
        keep the token for the next decode step or finish."""
        s = self.slots[row]
        req, sp = s.request, s.request.sampling
        stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.tokenizer.stop_ids))
        if len(req.generated) < sp.min_tokens and stops:
            logits = logits.clone()
            logits[sorted(stops)] = float("-inf")
        token = int(sample(logits.view(1, 1, -1), sp.temperature, sp.top_k, sp.top_p, generator=req.generator)[0])
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.ttft.observe(now - req.arrival)
        else:
            self.metrics.tpot.observe(now - req.last_token_at)
        req.last_token_at = now
        req.generated.append(token)
        self.metrics.generated_tokens += 1
        out = Output("", [token], [self._logprobs(logits, token, sp.logprobs)] if sp.logprobs is not None else [])
        if token in stops:  # the stop token's own text is not shown; what was held back is
            out.text, stopped = s.stop_text.push(s.detok.flush())
            out.text, out.finish_reason = out.text + ("" if stopped else s.stop_text.flush()), "stop"
        else:
            out.text, stopped = s.stop_text.push(s.detok.push(token))
            if stopped:
                out.finish_reason = "stop"
            elif len(req.generated) >= sp.max_tokens:
                shown, stopped = s.stop_text.push(s.detok.flush())
                out.text += shown + ("" if stopped else s.stop_text.flush())
                out.finish_reason = "stop" if stopped else "length"
        req.on_output(out)
        if out.finish_reason is None:
            s.next_token = token
        else:
            self._free(row, out.finish_reason)

    def _logprobs(self, logits: Tensor, token: int, top: int) -> dict:
        lp = torch.log_softmax(logits.float(), dim=-1)
        values, ids = lp.topk(top) if top > 0 else (lp[:0], lp[:0].long())
        name = self.tokenizer.decode
        return {"token": name([token]), "token_id": token, "logprob": float(lp[token]),
                "top": [(name([int(i)]), int(i), float(v)) for v, i in zip(values, ids)]}

    def _free(self, row: int, reason: str) -> None:
        s = self.slots[row]
        with self.lock:
            s.request, s.next_token = None, None
        if row in self.admitting:  # cancelled while its prompt was being prefilled (its whole chunks stay reusable)
            self.admitting.remove(row)
        self._count_finish(reason)

    def _count_finish(self, reason: str) -> None:
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1

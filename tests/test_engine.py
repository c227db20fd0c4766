"""The batching engine without HTTP: per-row positions in the model, exact batching (hypothesis), per-request
sampling and stops, prefix reuse, cancellation and the bounded queue, on the tiny model."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
import layers
from checkpoint import Checkpoint
from engine import PREFILL_BUDGET, Engine, QueueFull, Request, Sampling, StopText
from generate import (
    compile_decode_rows,
    compile_step,
    decode_one_token,
    decode_rows,
    generate,
    load_model,
    prefill_pieces,
)
from layers import rows_alone
from tokenizer import get_tokenizer

CHUNK, ROWS, CONTEXT = 32, 4, 128


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """(engine model, reference model, tokenizer): two fp32 copies, so that the reference runs leave the engine's
    cache alone."""
    folder = tiny_llama[1]
    return load_model(folder, "cpu", "fp32"), load_model(folder, "cpu", "fp32"), get_tokenizer(folder)


MODES = {"int4-int16-kvbf16": ("int16", "bf16"), "int4-int8-kvint8": ("int8", "int8")}  # activations, KV cache


@pytest.fixture(scope="module")
def tiny_int4(tiny_quantized):
    """As tiny, for the int4 tiny model in a mode of MODES: int16 activations and a bf16 KV cache, or int8 activations
    (where the kernels are built) and an int8 KV cache; each built once."""
    path, built = tiny_quantized["int4"], {}

    def models(mode: str):
        if mode not in built:
            activations, kv = MODES[mode]
            pair = [load_model(path, "cpu", "fp32", quant_activations=activations, kv_dtype=kv) for _ in "ab"]
            built[mode] = (*pair, get_tokenizer(path.parent))
        return built[mode]
    return models


def test_prefill_pieces_cut_at_multiples_of_the_chunk():
    assert prefill_pieces(0, 40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert prefill_pieces(16, 40, 16) == [(16, 32), (32, 40)] and prefill_pieces(5, 20, 16) == [(5, 16), (16, 20)]
    assert prefill_pieces(3, 9, None) == [(3, 9)] and prefill_pieces(0, 16, 16) == [(0, 16)]


def test_stop_text_cuts_at_the_first_stop_and_holds_back_what_may_become_one():
    t = StopText(("STOP", "\n\n"))
    assert t.push("hello S") == ("hello ", False)  # "S" may be the start of "STOP"
    assert t.push("T") == ("", False)
    assert t.push("ring") == ("STring", False)  # no longer a stop
    assert t.push(" end\n") == (" end", False)
    assert t.push("\nmore") == ("", True)
    t = StopText(("ab",))
    assert t.push("xxa") == ("xx", False) and t.flush() == "a"
    assert StopText(()).push("abc") == ("abc", False)


def test_rows_at_their_own_positions_equal_each_row_alone(tiny):
    """input_pos (B, T): each row writes its own cache positions with its own rotary angles and sees only them; the
    logits of each row equal that row run alone, bit for bit (the same arithmetic whatever else is in the batch)."""
    model, alone, _ = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 70, 120)]  # 1 and 2 attention chunks
    x, pos = torch.tensor([[7], [8], [9]]), torch.tensor([[len(p)] for p in prompts])
    with torch.no_grad():
        model.setup_caches(3, 128)
        for i, p in enumerate(prompts):  # each row prefilled into its own cache row
            model(torch.tensor([p]), torch.arange(len(p)), cache_row=i)
        batched = decode_rows(model, x, pos)
        for i, p in enumerate(prompts):
            alone.setup_caches(1, 128)
            alone(torch.tensor([p]), torch.arange(len(p)))
            single = decode_rows(alone, x[i:i + 1], torch.tensor([len(p)]).view(1, 1))
            assert torch.equal(batched[i], single[0]), i


def run_engine(engine: Engine, arrivals: list[tuple[int, Request]], limit: int = 2000) -> None:
    """Step the engine, submitting each request at its step, until every request has finished."""
    for _ in range(limit):
        engine.submit([req for step, req in arrivals if step == 0])
        arrivals = [(step - 1, req) for step, req in arrivals if step > 0]
        engine.step()
        if not arrivals and engine.counts() == (0, 0):
            return
    raise AssertionError(f"the engine did not finish: {engine.counts()} running / waiting, {len(arrivals)} to come")


def greedy_alone(alone, prompt: list[int], n: int, step=None) -> list[int]:
    alone.setup_caches(1, CONTEXT)
    kw = {} if step is None else {"decode_step": step}
    return generate(alone, torch.tensor(prompt), n, temperature=0.0, prefill_chunk=CHUNK, **kw)[0].tolist()


PREFIXES = [[], list(range(3, 3 + 40)), list(range(100, 100 + 70))]  # shared beginnings: prefix reuse happens


@st.composite
def workloads(draw):
    """(prefill budget, [(arrival step, prompt, tokens to generate)]): one piece per iteration, a few, or every
    waiting prompt whole (the default)."""
    budget = draw(st.sampled_from([CHUNK, 3 * CHUNK, PREFILL_BUDGET]))
    n = draw(st.integers(2, 8))
    out = []
    for _ in range(n):
        prefix = draw(st.sampled_from(PREFIXES))
        tail = draw(st.lists(st.integers(3, 500), min_size=1, max_size=30))
        out.append((draw(st.integers(0, 40)), prefix + tail, draw(st.integers(1, 12))))
    return budget, out


@pytest.fixture
def logits_seen(monkeypatch) -> dict:
    """Every request's logits as the engine samples from them, by request: what bit-for-bit claims compare."""
    seen, sampled = {}, Engine._sampled

    def spy(self, row, logits):
        seen.setdefault(self.slots[row].request, []).append(logits.clone())
        return sampled(self, row, logits)

    monkeypatch.setattr(Engine, "_sampled", spy)
    return seen


def same_bits(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["fp32", *MODES])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_batching_is_exact(request, reset_dynamo, logits_seen, compiled, kind):
    """Requests arriving at random steps, with random prompts (some sharing a prefix) and lengths, through ROWS rows:
    each gets, at temperature 0, the tokens generate() gives it alone with the same prefill pieces, and its logits
    are bit for bit those it gets alone in an engine with nothing else and nothing cached (the same arithmetic
    whatever else is in the batch or was computed before it), eager and compiled; for the fp32 tiny model (fp32 KV
    cache) and for the int4 one in MODES: int16 activations with a bf16 KV cache, int8 activations (kernels_q8.h's ops
    at every count of rows) with an int8 one."""
    fp32 = kind == "fp32"
    model, alone, tok = request.getfixturevalue("tiny") if fp32 else request.getfixturevalue("tiny_int4")(kind)
    kv = model.kv_dtype or model.dtype  # the KV cache's, as setup_caches makes it
    if kind == "fp32":  # every layer on kernels.cpp where they are built: a lone row is decoded alone
        assert rows_alone(model) == kernels.cpu_kernels() and kv == torch.float32
    else:  # w2's 96 inputs are no multiple of 64: torch computes it, and every step computes all rows
        int8 = kv == torch.int8
        assert kv == (torch.int8 if MODES[kind][1] == "int8" else torch.bfloat16) and not rows_alone(model)
        assert layers.activations(model) == ("int8" if int8 and kernels.cpu_kernels() else "int16")
    step = compile_decode_rows(torch.device("cpu"), ROWS) if compiled else decode_rows
    ref_step = compile_step(decode_one_token, torch.device("cpu")) if compiled else None
    expected = {}

    def alone_in_engine(prompt, n):
        req = Request(prompt, Sampling(max_tokens=n, temperature=0.0, ignore_eos=True), lambda o: None)
        run_engine(Engine(model, tok, rows=ROWS, context=CONTEXT, chunk=CHUNK, decode_step=step), [(0, req)])
        return greedy_alone(alone, prompt, n, ref_step), logits_seen.pop(req)

    @settings(max_examples=15 if compiled else 40, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True)
    @given(workloads())
    def check(budget_and_work):
        budget, work = budget_and_work
        engine = Engine(model, tok, rows=ROWS, context=CONTEXT, chunk=CHUNK, prefill_budget=budget, decode_step=step,
                        max_queue=16)
        reqs = []
        for arrival, prompt, n in work:
            outs = []
            req = Request(prompt, Sampling(max_tokens=n, temperature=0.0, ignore_eos=True), outs.append)
            reqs.append((arrival, req, outs))
        run_engine(engine, [(arrival, req) for arrival, req, _ in reqs])
        for _, req, outs in reqs:
            key = (tuple(req.prompt), req.sampling.max_tokens)
            if key not in expected:
                expected[key] = alone_in_engine(*key)
            tokens, logits = expected[key]
            assert req.generated == tokens, (req.prompt, req.cached_tokens)
            assert same_bits(logits_seen.pop(req), logits), (req.prompt, req.cached_tokens)
            assert [o.finish_reason for o in outs] == [None] * (len(tokens) - 1) + ["length"]
        assert engine.metrics.cached_tokens == sum(req.cached_tokens for _, req, _ in reqs)
        reused.extend(req.cached_tokens for _, req, _ in reqs)

    reused = []
    check()
    assert max(reused) >= CHUNK and len(reused) > 45  # many requests, some of which reused cached chunks


def test_prefix_reuse_takes_whole_chunks_and_changes_nothing(tiny, logits_seen):
    """A request reuses the longest cached prefix of whole prefill chunks (cut to a chunk boundary, never the KV of
    decoded tokens), and its logits are bit for bit those it gets with nothing cached: a piece that started inside a
    chunk (here at 50, 5 rows: the GEMV kernel) would compute differently from the whole chunk that a fresh prefill
    computes (23 rows: the GEMM)."""
    model, _, tok = tiny

    def run(engine, prompt, n):
        req = Request(prompt, Sampling(max_tokens=n, temperature=0.0, ignore_eos=True), lambda o: None)
        run_engine(engine, [(0, req)])
        return req, logits_seen.pop(req)

    def fresh(prompt, n):
        return run(Engine(model, tok, rows=2, context=CONTEXT, chunk=CHUNK), prompt, n)

    engine = Engine(model, tok, rows=2, context=CONTEXT, chunk=CHUNK)
    system = list(range(10, 10 + 50))
    first, _ = run(engine, system + list(range(300, 320)), 4)  # 70 prompt tokens: 64 in whole chunks
    second, logits = run(engine, system + [8, 9, 7, 6, 5], 6)  # shares 50: reuses 32
    assert first.cached_tokens == 0 and second.cached_tokens == 32
    alone, logits_alone = fresh(second.prompt, 6)
    assert second.generated == alone.generated and same_bits(logits, logits_alone)
    answer = second.prompt + second.generated[:-1]  # its answer was decoded, not prefilled:
    third, logits = run(engine, answer + [4], 3)  # only the whole chunks its prompt's prefill computed are reused
    alone, logits_alone = fresh(answer + [4], 3)
    assert third.cached_tokens == 32 and third.generated == alone.generated and same_bits(logits, logits_alone)


def test_same_seed_same_text_in_any_row_and_batch(tiny):
    model, _, tok = tiny
    sampled = Sampling(max_tokens=10, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    prompt = [5, 80, 13, 200]
    results = []
    for others in (0, 1, 3):  # alone, then beside other requests (so it lands in another row)
        engine = Engine(model, tok, rows=4, context=CONTEXT, chunk=CHUNK)
        noise = [Request([9] * (i + 2), Sampling(max_tokens=12, temperature=1.0, ignore_eos=True), lambda o: None)
                 for i in range(others)]
        req = Request(prompt, sampled, lambda o: None)
        run_engine(engine, [(0, r) for r in noise] + [(1, req)])
        results.append(req.generated)
    assert results[0] == results[1] == results[2]
    other_seed = Request(prompt, Sampling(max_tokens=10, temperature=1.0, top_k=50, seed=8, ignore_eos=True),
                         lambda o: None)
    run_engine(Engine(model, tok, rows=4, context=CONTEXT, chunk=CHUNK), [(0, other_seed)])
    assert other_seed.generated != results[0]


def test_stops_min_tokens_and_logprobs(tiny):
    model, alone, tok = tiny
    prompt = [5, 80, 13, 200, 7]
    free = greedy_alone(alone, prompt, 12)
    engine = Engine(model, tok, rows=2, context=CONTEXT, chunk=CHUNK)
    outs = []
    by_id = Request(prompt, Sampling(max_tokens=12, temperature=0.0, stop_token_ids=frozenset({free[4]}),
                                     ignore_eos=True, logprobs=3), outs.append)
    run_engine(engine, [(0, by_id)])
    assert by_id.generated == free[:free.index(free[4]) + 1] and outs[-1].finish_reason == "stop"
    lp = outs[0].logprobs[0]
    assert lp["token_id"] == free[0] and len(lp["top"]) == 3 and lp["top"][0][1] == free[0]  # greedy: the top one
    assert lp["logprob"] == pytest.approx(lp["top"][0][2]) and lp["logprob"] <= 0
    late = Request(prompt, Sampling(max_tokens=12, temperature=0.0, stop_token_ids=frozenset({free[0]}),
                                    ignore_eos=True, min_tokens=3), lambda o: None)
    run_engine(engine, [(0, late)])
    assert free[0] not in late.generated[:3]  # no stop token before min_tokens
    text = tok.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    outs = []
    by_text = Request(prompt, Sampling(max_tokens=12, temperature=0.0, stop=(stop,), ignore_eos=True), outs.append)
    run_engine(engine, [(0, by_text)])
    shown = "".join(o.text for o in outs)
    assert outs[-1].finish_reason == "stop" and stop not in shown and text.startswith(shown)


def test_cancel_frees_the_row_and_the_queue_is_bounded(tiny):
    model, _, tok = tiny
    engine = Engine(model, tok, rows=1, context=CONTEXT, chunk=CHUNK, max_queue=1)
    long = Sampling(max_tokens=50, temperature=0.0, ignore_eos=True)
    running, queued = Request([5, 6], long, lambda o: None), Request([7, 8], long, lambda o: None)
    engine.submit([running, queued])
    with pytest.raises(QueueFull):
        engine.submit([Request([9], long, lambda o: None)])
    engine.step()
    assert engine.counts() == (1, 1) and len(running.generated) == 2
    running.cancel()
    engine.step()  # the cancelled request leaves at once; the queued one takes its row
    assert engine.counts() == (1, 0) and len(running.generated) == 2 and queued.generated
    assert engine.metrics.finished == {"cancelled": 1}
    queued.cancel()
    engine.step()
    assert engine.counts() == (0, 0) and engine.metrics.finished == {"cancelled": 2}


@pytest.mark.parametrize("kind, activations", [("bf16", "int16"), ("int8", "int16"), ("int4", "int16"),
                                               ("int8", "int8"), ("int4", "int8")])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_every_checkpoint_kind_batches_exactly(tiny_llama, tiny_quantized, reset_dynamo, logits_seen, kind,
                                               activations, compiled):
    """bf16, int8 and int4 checkpoints, the quantized ones with int16 and int8 activations, eager and compiled:
    requests in a batch get the logits they get alone, and the greedy tokens of generate() alone (fp32 is
    test_batching_is_exact's; GGUF-imported, the real model's)."""
    path, precision = (tiny_llama[1], "bf16") if kind == "bf16" else (tiny_quantized[kind], "fp32")
    ckpt = Checkpoint.open(path)
    model, alone = (load_model(ckpt, "cpu", precision, quant_activations=activations) for _ in "ab")
    assert layers.activations(model) == (activations if kernels.cpu_kernels() else "int16")
    tok = get_tokenizer(ckpt.folder)
    # int8 / int4: w2's 96 inputs are no multiple of 64, so torch computes it, and every step computes all rows
    alone_ok = kind == "bf16" and kernels.cpu_kernels()
    assert rows_alone(model) == alone_ok
    assert Engine(model, tok, rows=ROWS, context=CONTEXT).min_rows == (1 if alone_ok else ROWS)
    check_kind(model, alone, tok, compiled, logits_seen)


def check_kind(model, alone, tok, compiled: bool, logits_seen: dict, vocab: int = 500) -> None:
    step = compile_decode_rows(torch.device("cpu"), ROWS) if compiled else decode_rows
    ref_step = compile_step(decode_one_token, torch.device("cpu")) if compiled else None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (70, 9, 40)]
    greedy = Sampling(max_tokens=8, temperature=0.0, ignore_eos=True)
    reqs = [Request(p, greedy, lambda o: None) for p in prompts]
    run_engine(Engine(model, tok, rows=ROWS, context=CONTEXT, chunk=CHUNK, decode_step=step),
               [(i, r) for i, r in enumerate(reqs)])
    for r in reqs:
        single = Request(r.prompt, greedy, lambda o: None)
        run_engine(Engine(model, tok, rows=ROWS, context=CONTEXT, chunk=CHUNK, decode_step=step), [(0, single)])
        assert same_bits(logits_seen.pop(r), logits_seen.pop(single))
        alone.setup_caches(1, CONTEXT)
        kw = {} if ref_step is None else {"decode_step": ref_step}
        expected = generate(alone, torch.tensor(r.prompt), 8, temperature=0.0, prefill_chunk=CHUNK, **kw)
        assert r.generated == single.generated == expected[0].tolist()


@pytest.mark.real_model
@pytest.mark.parametrize("activations", ["int16", "int8"])
def test_gguf_imported_default_model_batches_exactly(smollm2_dir, logits_seen, activations):
    """The default model, every layer on the kernels (each row computed alone), with either activation rounding."""
    path = smollm2_dir / "model_gguf.pth"
    model, alone = (load_model(path, "cpu", quant_activations=activations) for _ in "ab")
    assert rows_alone(model) == kernels.cpu_kernels()
    tok = get_tokenizer(smollm2_dir)
    check_kind(model, alone, tok, False, logits_seen, vocab=49152)

"""The C++ int8 / int4 / float32 / bf16 kernels (kernels.cpp) against the straightforward PyTorch computation."""
import functools

import pytest
import torch
import torch.nn.functional as F

import kernels
import quantize as qz
from generate import compile_step, decode_one_token, generate, load_model

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def test_kernels_build_on_this_cpu():
    """On an AVX2 machine (ours and CI) the kernels must build: a silent fallback would hide a regression."""
    assert kernels.cpu_kernels() == HAS_AVX2


def close(got, ref, rel):
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=rel * ref.abs().max().item())


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("N, K", [(96, 128), (8, 64), (960, 576), (40, 1536)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_int8_kernel_matches_reference(N, K, M):
    assert kernels.cpu_kernels()  # builds and registers the ops when this test runs alone
    torch.manual_seed(N + K + M)
    x, w = torch.randn(M, K), torch.randn(N, K)
    xo = x.clone()
    xo[0, 5] = 30.0  # an outlier: its block's other inputs get coarser, the other blocks don't
    for G in sorted({1, K // 64, K // 32}):  # per channel and per group of 64 / 32
        q = torch.randint(-128, 128, (N, K), dtype=torch.int8)  # -128 too: GGUF Q8_0 blocks may hold it
        s = torch.rand(N, G) + 0.1
        wk, sk = kernels.int8_to_kernel(q, s)
        q2, s2 = kernels.int8_from_kernel(wk, sk)
        assert torch.equal(q2, q) and torch.equal(s2, s) and wk.shape == q.shape and sk.shape == (N // 8, G, 8)
        ref = x @ kernels.dequantize_int8(q, s).T
        got = torch.ops.fastllama.int8_linear(x, wk, sk)
        assert got.shape == (M, N) and got.dtype == torch.float32
        close(got, ref, 2e-4)  # int16 activations: ~1e-5 of the largest
        close(torch.ops.fastllama.int8_linear(xo, wk, sk), xo @ kernels.dequantize_int8(q, s).T, 2e-4)
        close(torch.ops.fastllama.int8_linear(x.bfloat16(), wk, sk), x.bfloat16().float() @ kernels.dequantize_int8(q, s).T, 1e-2)
        x40 = torch.randn(40, K)  # more rows than a GEMV: the kernel layout dequantized, then F.linear
        close(kernels.int8_linear(x40, wk, sk, use_kernel=True), x40 @ kernels.dequantize_int8(q, s).T, 1e-5)
    q, s = qz.quantize_int8(w)
    close(kernels.int8_linear(x, *kernels.int8_to_kernel(q, s), use_kernel=True), x @ w.T, 2e-2)  # the weights: int8 of w


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("N, K", [(96, 64), (8, 128), (1536, 576)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_int8_glu_kernel_matches_reference(N, K, M):
    """int8_glu = silu(x @ w1.T) * (x @ w3.T) with both weights dequantized, positive and negative gates alike."""
    assert kernels.cpu_kernels()
    torch.manual_seed(N + K + M)
    x = torch.randn(M, K)
    for G in sorted({1, K // 32}):
        q1, q3 = (torch.randint(-128, 128, (N, K), dtype=torch.int8) for _ in range(2))
        s1, s3 = torch.rand(N, G) * 0.02, torch.rand(N, G) * 0.02
        gate, up = x @ kernels.dequantize_int8(q1, s1).T, x @ kernels.dequantize_int8(q3, s3).T
        assert (gate < -1).any() and (gate > 1).any()
        ref = F.silu(gate) * up
        k1, k3 = kernels.int8_to_kernel(q1, s1), kernels.int8_to_kernel(q3, s3)
        got = torch.ops.fastllama.int8_glu(x, *k1, *k3)
        assert got.shape == (M, N) and got.dtype == torch.float32
        close(got, ref, 2e-4)
        half = torch.ops.fastllama.int8_glu(x.bfloat16(), *k1, *k3)
        assert half.dtype == torch.bfloat16
        xb = x.bfloat16().float()
        close(half, F.silu(xb @ kernels.dequantize_int8(q1, s1).T) * (xb @ kernels.dequantize_int8(q3, s3).T), 1e-2)
        x40 = torch.randn(40, K)  # prefill rows: float math on the dequantized weights
        ref40 = F.silu(x40 @ kernels.dequantize_int8(q1, s1).T) * (x40 @ kernels.dequantize_int8(q3, s3).T)
        close(kernels.int8_glu(x40, *k1, *k3), ref40, 1e-5)


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
def test_int8_model_feed_forward_uses_glu_and_matches_separate_layers(tiny_llama):
    """quantize.prepare gives every int8 feed-forward the fused op; logits and greedy tokens match the model with
    w1, silu, w3 called one by one."""
    _, folder = tiny_llama
    model = load_model(qz.main(checkpoint_path=folder / "model.pth", mode="int8"), "cpu", "fp32")
    ffs = [b.feed_forward for b in model.layers]
    assert all(ff.glu is not None for ff in ffs)
    idx = torch.tensor([[5, 80, 13, 200, 7]])
    outs = []
    for glu in ([ff.glu for ff in ffs], [None] * len(ffs)):
        for ff, g in zip(ffs, glu):
            ff.glu = g
        model.setup_caches(1, 32)
        with torch.no_grad():
            logits = model(idx, torch.arange(5))[0, -1]
            step = model(idx[:, -1:], torch.tensor([5]))[0, -1]  # one token: the GEMV path
        outs.append((logits, step, generate(model, idx, 10, temperature=0.0).tolist()))
    (l1, s1, t1), (l2, s2, t2) = outs
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    close(s1, s2, 2e-4)
    assert t1 == t2


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("N, K", [(96, 128), (8, 64), (960, 576), (40, 1536)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_int4_kernel_matches_reference(N, K, M):
    assert kernels.cpu_kernels()
    torch.manual_seed(N + K + M)
    x = torch.randn(M, K)
    xo = x.clone()
    xo[0, 5] = 30.0  # an outlier: its block's other inputs get coarser, the other blocks don't
    for g in [g for g in qz.GROUPSIZES if K % g == 0]:
        q = torch.randint(0, 16, (N, K))
        d, m = torch.rand(N, K // g) * 0.1, torch.randn(N, K // g)
        w, dm = kernels.int4_to_kernel(q, d, m)
        q2, d2, m2 = kernels.int4_from_kernel(w, dm)
        assert torch.equal(q2, q.to(torch.uint8)) and torch.equal(d2, d.half().float()) and torch.equal(m2, m.half().float())
        wf = kernels.dequantize_int4_kernel(w, dm)
        torch.testing.assert_close(wf, q * d.half().float().repeat_interleave(g, 1) + m.half().float().repeat_interleave(g, 1))
        got = torch.ops.fastllama.int4_linear(x, w, dm)
        assert got.shape == (M, N) and got.dtype == torch.float32
        close(got, x @ wf.T, 2e-4)  # int16 activations: ~1e-5 of the largest output
        close(torch.ops.fastllama.int4_linear(xo, w, dm), xo @ wf.T, 2e-4)
        assert torch.ops.fastllama.int4_linear(x.bfloat16(), w, dm).dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
def test_modules_pick_the_kernel_and_agree_with_the_pytorch_path():
    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(2, 5, 128)
    q, s = qz.quantize_int8(w)
    q4, sz = qz.quantize_int4(w, 32)
    for make in (lambda: qz.Int8Linear(128, 96), lambda: qz.Int4Linear(128, 96, 32)):
        fast, slow = make(), make()
        for m in (fast, slow):
            if isinstance(m, qz.Int8Linear):
                m.weight, m.scales = q, s
            else:
                m.weight, m.scales_and_zeros = qz.pack_int4(q4), sz
        fast.prepare()
        assert fast.kernel == "cpp"
        slow.kernel = "torch"  # Int8Linear's plain path: dequantize + F.linear
        if isinstance(slow, qz.Int4Linear):
            ref = F.linear(x, qz.dequantize_int4(q4, sz, 32))
        else:
            ref = slow(x)
        close(fast(x), ref, 2e-4)


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decode_matches_eager(tiny_llama, reset_dynamo, mode):
    """The custom ops inside torch.compile (fake shapes, C++ wrapper) give the eager tokens."""
    _, folder = tiny_llama
    path = qz.main(checkpoint_path=folder / "model.pth", mode=mode, groupsize=32)
    model = load_model(path, "cpu", "fp32")
    idx = torch.tensor([[5, 80, 13, 200, 7]])
    model.setup_caches(1, 32)
    eager = generate(model, idx, 10, temperature=0.0)
    model.setup_caches(1, 32)
    step = compile_step(decode_one_token, torch.device("cpu"))
    assert generate(model, idx, 10, temperature=0.0, decode_step=step).tolist() == eager.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_prefill_in_float32_matches_half_linear(dtype, monkeypatch):
    """float_linear: many-row half inputs multiplied in float32 (AVX2), few rows left to F.linear."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 128).to(dtype), torch.randn(96).to(dtype)
    monkeypatch.setattr(kernels, "cpu_has_half_arithmetic", lambda: False)
    for rows in (1, kernels.GEMV_MAX_ROWS, 40):
        x = torch.randn(rows, 128).to(dtype)
        got, plain = kernels.float_linear(x, w, b), F.linear(x, w, b)
        assert got.dtype == dtype
        if rows <= kernels.GEMV_MAX_ROWS:
            assert torch.equal(got, plain)
        else:
            assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).to(dtype))
            torch.testing.assert_close(got, plain)  # within the dtype's own rounding


def test_half_model_prefill_matches_plain_half_model(tiny_llama, monkeypatch):
    """load_model swaps bf16 Linears for CpuLinear (tied weights stay shared); its logits are as close to the
    float32 model's as the plain bf16 computation's are."""
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "bf16")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is kernels.CpuLinear for m in linears)
    if model.config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    idx = torch.randint(0, model.config.vocab_size, (2, 40))

    def logits(m):
        m.setup_caches(2, 64)
        with torch.no_grad():
            return m(idx, torch.arange(40)).float()

    ref = logits(load_model(folder, "cpu", "fp32"))
    fast = logits(model)
    monkeypatch.setattr(kernels, "cpu_has_half_arithmetic", lambda: True)  # float_linear -> plain bf16 F.linear
    plain = logits(model)
    assert not torch.equal(fast, plain)
    err_fast, err_plain = (fast - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err_fast <= 1.25 * err_plain, (err_fast, err_plain)
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= (plain.argmax(-1) == ref.argmax(-1)).float().mean() - 0.05
    seen = []  # a transform's hooks (tp.shard's all-reduces) must land on the modules that run
    hooked = load_model(folder, "cpu", "bf16", transform=lambda m: m.layers[0].attention.wo.register_forward_hook(
        lambda *_: seen.append(1)))
    hooked.setup_caches(1, 8)
    with torch.no_grad():
        hooked(torch.tensor([[1, 2]]), torch.arange(2))
    assert seen


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("N, K", [(96, 128), (8, 64), (56, 64), (960, 576), (40, 1536)])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 40, 400])
def test_dense_kernels_match_reference(N, K, M):
    """dense_linear = x @ w.T and dense_glu = silu(x @ w1.T) * (x @ w3.T) on float32 and bf16 weights as stored:
    float32 x to float32 rounding, bf16 x to the bf16 rounding of the same products (what two bf16 linears and silu
    give). M <= 16, the GEMVs: N = 8, 56, 40 have fewer than 4 groups of 8 rows, or groups left over after the
    far-apart fours. M > 16, the GEMM: 17 and 40 rows end in a partial tile (of 6 rows, of 3 for the glu), 400 rows
    are two blocks; N = 8, 56, 40 end in a half panel of 8 weight rows."""
    assert kernels.cpu_kernels()
    torch.manual_seed(N + K + M)
    x = torch.randn(M, K)
    for wdtype in (torch.float32, torch.bfloat16):
        w1, w3 = ((torch.randn(N, K) * 3 / K**0.5).to(wdtype) for _ in range(2))
        gate, up = x.double() @ w1.double().T, x.double() @ w3.double().T
        assert (gate < -0.5).any() and (gate > 0.5).any()  # both branches of the kernel's sigmoid
        for dtype in (torch.float32, torch.bfloat16) if wdtype == torch.bfloat16 else (torch.float32,):
            xd = x.to(dtype)
            y = torch.ops.fastllama.dense_linear(xd, w1)
            g = torch.ops.fastllama.dense_glu(xd, w1, w3)
            assert y.shape == g.shape == (M, N) and y.dtype == g.dtype == dtype
            tol = 1e-6 * (K / 64) ** 0.5  # float32 sums of K products: error ~ sqrt(K) float32 roundings of the largest
            if dtype == torch.float32:
                torch.testing.assert_close(y.double(), gate, rtol=0, atol=tol * gate.abs().max().item())
                ref = F.silu(gate) * up
                torch.testing.assert_close(g.double(), ref, rtol=0, atol=tol * ref.abs().max().item())
            else:
                xb = xd.double()
                gb, ub = (xb @ w.double().T for w in (w1, w3))
                # at most one bf16 rounding step apart (where a sum cancels to near 0, its float32 error)
                torch.testing.assert_close(y, gb.bfloat16(), rtol=8e-3, atol=tol * gb.abs().max().item())
                ref = F.silu(gb.bfloat16().float()) * ub.bfloat16().float()
                torch.testing.assert_close(g.float(), ref, rtol=8e-3, atol=1e-3 * ref.abs().max().item())
        xt = torch.randn(K, M).T  # a strided x gives the same as its contiguous copy
        assert torch.equal(torch.ops.fastllama.dense_linear(xt, w1), torch.ops.fastllama.dense_linear(xt.contiguous(), w1))
    with pytest.raises(RuntimeError, match="dense_linear: weight"):
        torch.ops.fastllama.dense_linear(x, w1.half())
    with pytest.raises(RuntimeError, match="dense_linear: x must be"):
        torch.ops.fastllama.dense_linear(x.bfloat16(), w1.float())
    with pytest.raises(RuntimeError, match="dense_glu: w1 and w3"):
        torch.ops.fastllama.dense_glu(x, w1, w3.float())


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("M", [2, 40])
def test_dense_kernels_keep_inf_and_nan(M):
    """An inf or a NaN in a bf16 x gives what F.linear in float32 gives, rounded to bf16: inf rows stay inf, NaN rows
    NaN, in the GEMVs (M = 2) and the GEMM (M = 40)."""
    assert kernels.cpu_kernels()
    torch.manual_seed(M)
    x, w1, w3 = torch.randn(M, 64).bfloat16(), torch.randn(16, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    x[0, 0], x[1, 1] = float("inf"), float("nan")
    y, ref = torch.ops.fastllama.dense_linear(x, w1), F.linear(x.float(), w1.float()).bfloat16()
    assert y[0].isinf().all() and y[1].isnan().all()
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=8e-3, atol=1e-5)
    assert torch.ops.fastllama.dense_glu(x, w1, w3)[1].isnan().all()


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_float_model_decodes_with_the_kernels_as_with_pytorch(tiny_llama, reset_dynamo, precision):
    """A float32 / bf16 model's decode rows run dense_linear / dense_glu, and so do its prefill rows on an AVX2 CPU
    (dense_gemm_here); logits and greedy tokens match the same model with every CpuLinear on F.linear and w1, silu, w3
    called one by one, eager and compiled."""
    _, folder = tiny_llama
    model = load_model(folder, "cpu", precision)
    linears = [m for m in model.modules() if isinstance(m, kernels.CpuLinear)]
    ffs = [b.feed_forward for b in model.layers]
    assert linears and all(m.kernel for m in linears) and all(ff.glu is not None for ff in ffs)
    idx = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))  # > 16 rows
    calls = []
    outs = []
    for on in (True, False):
        for m in linears:
            m.kernel = on
        for ff in ffs:
            ff.glu = functools.partial(kernels.cpu_glu, ff.w1, ff.w3) if on else None
        model.setup_caches(1, 32)
        with torch.no_grad(), torch.profiler.profile() as prof:
            prefill = model(idx, torch.arange(20))[0, -1].float()
        calls.append({e.key for e in prof.key_averages() if e.key.startswith("fastllama::dense")})
        with torch.no_grad(), torch.profiler.profile() as prof:
            step = model(idx[:, -1:], torch.tensor([20]))[0, -1].float()  # one row
        calls.append({e.key for e in prof.key_averages() if e.key.startswith("fastllama::dense")})
        tokens = generate(model, idx, 10, temperature=0.0).tolist()
        model.setup_caches(1, 32)
        compiled = generate(model, idx, 10, temperature=0.0, decode_step=compile_step(decode_one_token, torch.device("cpu")))
        outs.append((prefill, step, tokens, compiled.tolist()))
    both = {"fastllama::dense_linear", "fastllama::dense_glu"}
    assert calls == [both if kernels.dense_gemm_here() else set(), both, set(), set()]
    (p1, s1, t1, c1), (p2, s2, t2, c2) = outs
    tol = 1e-2 if precision == "bf16" else 1e-5  # bf16 outputs a rounding step apart at most
    close(p1, p2, tol)
    close(s1, s2, tol)
    assert t1 == t2 == c1 == c2


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_fused_glu_steps_aside_for_hooks_on_w1_and_w3(tiny_llama, precision):
    """A forward hook on w1 or w3 (a transform's, a user's) runs, and sees what it changes used, although the
    feed-forward has a fused glu (int8_glu / dense_glu) that would skip those modules."""
    _, folder = tiny_llama
    if precision == "int8":
        model, kind = load_model(qz.main(checkpoint_path=folder / "model.pth", mode="int8"), "cpu", "fp32"), "int8_glu"
    else:
        model, kind = load_model(folder, "cpu", "bf16"), "dense_glu"
    ff = model.layers[0].feed_forward
    assert ff.glu is not None
    idx = torch.tensor([[3]])

    def run():
        model.setup_caches(1, 4)
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = model(idx, torch.tensor([0]))
        return out, sum(e.count for e in prof.key_averages() if e.key == f"fastllama::{kind}")

    fused, n_fused = run()
    seen = []
    handle = ff.w3.register_forward_hook(lambda mod, args, out: seen.append(1) or out * 0)  # w3(x) -> 0
    hooked, n_hooked = run()
    handle.remove()
    assert seen == [1] and n_hooked == n_fused - 1  # layer 0 ran w1 and w3 itself; the other layers stayed fused
    assert not torch.equal(hooked, fused)  # the zeroed up projection changed the output
    again, n_again = run()  # hook removed: fused again, same output
    assert torch.equal(again, fused) and n_again == n_fused


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, KV, S, D", [(1, 9, 3, 40, 64), (3, 4, 4, 33, 128), (2, 14, 2, 17, 96), (2, 2, 1, 9, 40),
                                            (1, 9, 3, 300, 64), (3, 6, 2, 200, 64)])
def test_decode_attention_kernel_matches_reference(dtype, B, H, KV, S, D):
    """One query position over a KV cache: the C++ kernel against model.decode_attention in float32, for
    causal prefixes of different lengths per row, a sliding-window hole, left padding and a shared mask; long caches
    are split into chunks of positions (merged exactly), also when a row has fewer visible positions than chunks."""
    import model

    assert kernels.cpu_kernels()
    torch.manual_seed(S * D + B)
    q = (torch.randn(B, H, 1, D) * 3).to(dtype)  # * 3: peaked softmaxes, exp of large negative scores
    k, v = torch.randn(B, KV, S, D).to(dtype), torch.randn(B, KV, S, D).to(dtype)
    pos = torch.arange(S)
    masks = [pos <= S - 1 - torch.arange(B)[:, None],  # row b sees S - b positions
             (pos > 2) & (pos <= S - 3) & (pos % 4 != 1),  # holes, broadcast over the batch
             pos[None, :] == torch.arange(B)[:, None],  # one visible position per row
             pos[None, :] < torch.tensor([S, 1, 2][:B])[:, None]]  # one long row, the others one or two positions
    for mask in masks:
        mask4 = mask.view(-1, 1, 1, S)
        ref = model.decode_attention(q.float(), k.float(), v.float(), mask4)
        got = kernels.decode_attention(q, k, v, mask4)
        assert got.shape == q.shape and got.dtype == dtype
        tol = 2e-6 if dtype == torch.float32 else 1e-2  # float32 arithmetic throughout; the result rounded to dtype
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@pytest.mark.skipif(not HAS_AVX2, reason="the C++ kernels need AVX2")
def test_model_decodes_with_the_attention_kernel_as_with_pytorch(tiny_llama):
    """load_model gives CPU models the kernel; decode logits and greedy tokens equal the PyTorch attention's."""
    import model as M

    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    assert all(layer.attention.decode_attention is kernels.decode_attention for layer in model.layers)
    idx = torch.tensor([[5, 80, 13, 200, 7, 9]])

    def decode(attend):  # greedy: the prompt, then 12 tokens one at a time; the logits of each step
        for layer in model.layers:
            layer.attention.decode_attention = attend
        model.setup_caches(1, 40)
        with torch.no_grad():
            logits = [model(idx, torch.arange(6))[:, -1]]
            for p in range(6, 18):
                logits.append(model(logits[-1].argmax(-1, keepdim=True), torch.tensor([p]))[:, -1])
        return torch.stack(logits)

    fast, ref = decode(kernels.decode_attention), decode(M.decode_attention)
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)

"""The C++ int8 / int4 / float32 / bf16 kernels (kernels.cpp) against the straightforward PyTorch computation, the op
table that says when each runs, and every CPU-dependent branch forced on whatever CPU runs the tests."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension
from helpers import needs_avx2

import kernels
import layers
import model
import quantize as qz
from checkpoint import kv_dtype_name
from generate import compile_step, decode_one_token, generate, load_model
from kernels import Cpu

# every branch the CPU facts choose between: AVX2 without bf16 arithmetic (Zen 3: the dense GEMM takes prefill),
# AVX-512 without it (prefill in float32 by MKL), AVX-512 with it (Zen 4/5, Sapphire Rapids: plain bf16 GEMMs)
CPUS = [Cpu("AVX2", False), Cpu("AVX512", False), Cpu("AVX512", True)]


def test_kernels_build_on_this_cpu():
    """On an AVX2 machine (ours and CI) the kernels must build: a silent fallback would hide a regression."""
    assert kernels.cpu_kernels() == kernels.this_cpu().avx2


@needs_avx2
def test_op_table_schemas_fakes_and_references():
    """Every op of kernels.OPS is registered with its table schema, its fake gives the real output's shape and
    dtype, and on inputs its entry takes it agrees with the entry's reference; prefill rows go to the reference."""
    assert kernels.cpu_kernels()
    torch.manual_seed(0)
    x, w1, w3 = torch.randn(3, 128), torch.randn(16, 128), torch.randn(16, 128)
    q8 = [kernels.int8_to_kernel(torch.randint(-127, 128, (16, 128), dtype=torch.int8), torch.rand(16, 4))
          for _ in "ab"]
    q4 = kernels.int4_to_kernel(torch.randint(0, 16, (16, 128)), torch.rand(16, 4) * 0.1, torch.randn(16, 4))
    mask = torch.ones(2, 40, dtype=torch.bool)
    args = {"int8_linear": (x, *q8[0]), "int8_glu": (x, *q8[0], *q8[1]), "int4_linear": (x, *q4),
            "int4_linear_q8": (x, *q4), "int8_linear_q8": (x, *q8[0]), "int8_glu_q8": (x, *q8[0], *q8[1]),
            "dense_linear": (x, w1), "dense_glu": (x, w1, w3),
            "decode_attention": (torch.randn(2, 4, 64), torch.randn(3, 2, 40, 64), torch.randn(3, 2, 40, 64), mask,
                                 torch.tensor([2, 0])),
            "decode_attention_q8": (torch.randn(2, 4, 64), *model.quantize_kv(torch.randn(3, 2, 40, 64), 32),
                                    *model.quantize_kv(torch.randn(3, 2, 40, 64), 32), mask, torch.tensor([2, 0]))}
    assert args.keys() == kernels.OPS.keys()
    for name, op in kernels.OPS.items():
        packet = getattr(torch.ops.fastllama, name)
        assert str(packet.default._schema) == f"fastllama::{name}{op.schema}"
        assert op.takes(*args[name])
        got, ref, fake = packet(*args[name]), op.reference(*args[name]), op.fake(*args[name])
        assert got.shape == ref.shape == fake.shape and got.dtype == ref.dtype == fake.dtype
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    x40 = torch.randn(40, 128)  # prefill rows: the C++ GEMM where the CPU's gemm says, else the reference
    for cpu in CPUS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "this_cpu", lambda: cpu)
            for name in ("int8_linear", "int8_glu", "int4_linear", "dense_linear", "dense_glu"):
                rest = args[name][1:]
                assert kernels.OPS[name].takes(x40, *rest) == cpu.gemm(None if "int" in name else rest[0].dtype)
                ref = kernels.OPS[name].reference(x40, *rest)
                close(kernels.run(name, x40, *rest), ref, 1e-5)


def close(got, ref, rel):
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=rel * ref.abs().max().item())


@needs_avx2
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
        xb = x.bfloat16()
        close(torch.ops.fastllama.int8_linear(xb, wk, sk), xb.float() @ kernels.dequantize_int8(q, s).T, 1e-2)
        x40 = torch.randn(40, K)  # more rows than a GEMV: the kernel layout dequantized, then F.linear
        close(kernels.run("int8_linear", x40, wk, sk), x40 @ kernels.dequantize_int8(q, s).T, 1e-5)
    q, s = qz.quantize_int8(w)
    close(kernels.run("int8_linear", x, *kernels.int8_to_kernel(q, s)), x @ w.T, 2e-2)  # the weights: int8 of w


@needs_avx2
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
        close(kernels.run("int8_glu", x40, *k1, *k3), ref40, 1e-5)


@needs_avx2
def test_int8_model_feed_forward_uses_glu_and_matches_separate_layers(tiny_quantized):
    """layers.prepare gives every int8 feed-forward the fused op; logits and greedy tokens match the model with
    w1, silu, w3 called one by one."""
    model = load_model(tiny_quantized["int8"], "cpu", "fp32")
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


@needs_avx2
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
        dh, mh = d.half().float(), m.half().float()
        assert torch.equal(q2, q.to(torch.uint8)) and torch.equal(d2, dh) and torch.equal(m2, mh)
        wf = kernels.dequantize_int4_kernel(w, dm)
        torch.testing.assert_close(wf, q * dh.repeat_interleave(g, 1) + mh.repeat_interleave(g, 1))
        got = torch.ops.fastllama.int4_linear(x, w, dm)
        assert got.shape == (M, N) and got.dtype == torch.float32
        close(got, x @ wf.T, 2e-4)  # int16 activations: ~1e-5 of the largest output
        close(torch.ops.fastllama.int4_linear(xo, w, dm), xo @ wf.T, 2e-4)
        assert torch.ops.fastllama.int4_linear(x.bfloat16(), w, dm).dtype == torch.bfloat16


def quantized_and_dense_args(N: int, K: int, G: int) -> dict:
    """Arguments of every linear op for weights of (N, K), G scale groups per row for the quantized ones."""
    q8 = [kernels.int8_to_kernel(torch.randint(-128, 128, (N, K), dtype=torch.int8), torch.rand(N, G) + 0.1)
          for _ in "ab"]
    q4 = kernels.int4_to_kernel(torch.randint(0, 16, (N, K)), torch.rand(N, G) * 0.1, torch.randn(N, G))
    w1, w3 = (torch.randn(N, K) / K**0.5 for _ in "ab")
    return {"int8_linear": q8[0], "int8_glu": (*q8[0], *q8[1]), "int4_linear": q4,
            "int8_linear_q8": q8[0], "int8_glu_q8": (*q8[0], *q8[1]), "int4_linear_q8": q4,
            "dense_linear f32": (w1,), "dense_glu f32": (w1, w3),
            "dense_linear bf16": (w1.bfloat16(),), "dense_glu bf16": (w1.bfloat16(), w3.bfloat16())}


@needs_avx2
@pytest.mark.parametrize("N, K, G", [(96, 576, 18), (40, 128, 1), (1536, 576, 1)])
def test_decode_rows_give_each_row_what_it_gives_alone(N, K, G):
    """Every decode size M = 1..16 with every row tile (rows sharing each unpacked weight, and the tile left over):
    each row of the result is bit for bit the row computed alone, the server's promise that a request's output does
    not depend on the batch, and the tuner's that its choice changes no result; and it matches the reference.
    float32 and bf16 x."""
    assert kernels.cpu_kernels()
    torch.manual_seed(N + K)
    args = quantized_and_dense_args(N, K, G)
    for M in range(1, kernels.GEMV_MAX_ROWS + 1):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, K, dtype=dtype)
            for key, rest in args.items():
                name = key.split()[0]
                if name.startswith("dense") and dtype == torch.bfloat16 and rest[0].dtype != dtype:
                    continue  # dense ops take a bf16 x with bf16 weights only
                op = getattr(torch.ops.fastllama, name)
                alone = torch.cat([op(x[i:i + 1], *rest) for i in range(M)])
                for tile in kernels.TILES:  # every tile the tuner may pick: the same bits
                    assert torch.equal(op(x, *rest, tile), alone), (key, M, dtype, tile)
                with pytest.raises(RuntimeError, match="tile must be 1, 2 or 4"):
                    op(x, *rest, 3)
                ref = kernels.OPS[name].reference(x.float(), *rest).float()
                rel = 2e-4 if dtype == torch.float32 and rest[0].dtype != torch.bfloat16 else 1e-2
                close(alone, ref, rel)


@needs_avx2
@pytest.mark.parametrize("M", [17, 40, 400])
def test_quantized_prefill_gemm_matches_dequantized_float(M):
    """More rows than a decode step: int8 / int4 weights unpacked into the float32 GEMM's panels (both halves of a
    16-row panel, and a last half panel: N = 40), per channel and per group; float32 x to float32 rounding, bf16 x
    within a rounding step or two of the bf16 reference."""
    assert kernels.cpu_kernels()
    torch.manual_seed(M)
    for N, K, G in [(40, 576, 18), (96, 128, 1), (1536, 576, 9)]:
        args = quantized_and_dense_args(N, K, G)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, K, dtype=dtype)
            for name in ("int8_linear", "int8_glu", "int4_linear"):
                y = getattr(torch.ops.fastllama, name)(x, *args[name])
                ref = kernels.OPS[name].reference(x, *args[name])
                assert y.shape == ref.shape == (M, N) and y.dtype == ref.dtype == dtype
                close(y, ref.float(), 1e-5 if dtype == torch.float32 else 1e-2)


@needs_avx2
@pytest.mark.parametrize("width", [8, 16])
def test_gemm_widths_give_the_same_bits(width):
    """The prefill GEMM's register tile is one source over the vector width (kernels_vec.h): at AVX-512's 16 floats
    (panels of 32 weight rows) every op gives, bit for bit, what AVX2's 8 give, which the other tests check against the
    references: full and partial tiles (17, 40 rows; 12 or 6 rows per tile), two blocks (400), panels ending in 8 or
    24 rows (N = 40, 1560), float32 and bf16 outputs. Width 16 runs only where the CPU has AVX-512."""
    assert kernels.cpu_kernels()
    if width not in kernels.gemm_widths():
        pytest.skip(f"no AVX-512 here ({kernels.machine_cpu().capability}): the width-{width} GEMM is built, not run")
    for M in (17, 40, 400):
        torch.manual_seed(M)
        for N, K, G in [(40, 576, 18), (96, 128, 1), (1560, 576, 9)]:
            args = quantized_and_dense_args(N, K, G)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(M, K, dtype=dtype)
                names = ["int8_linear", "int8_glu", "int4_linear", "dense_linear bf16", "dense_glu bf16"]
                names += ["dense_linear f32", "dense_glu f32"] if dtype == torch.float32 else []  # bf16 x: bf16 w
                for name in names:
                    op = getattr(torch.ops.fastllama, name.split()[0])
                    assert torch.equal(op(x, *args[name], 1, width), op(x, *args[name], 1, 8)), (name, M, N, dtype)
    with pytest.raises(RuntimeError, match="width must be 8 or 16"):
        torch.ops.fastllama.int4_linear(torch.randn(20, 128), *quantized_and_dense_args(96, 128, 1)["int4_linear"],
                                        1, 4)


@needs_avx2
@pytest.mark.parametrize("width", [8, 16])
def test_int8_activation_kernels_every_row_count_and_width(width):
    """The int8-activation ops (kernels_q8.h, one source over the vector width): at every row count, decode (1-16) and
    prefill (17, 40, 400: int4 rows 4 at a time against two vectors of output rows, int8 rows 8 at a time), each row
    of the result is bit for bit the row alone, the same at width 16 (two row groups per vector, a layer of an odd
    count of groups ending on the 8-lane instance: N = 40) as at width 8, and equal to the reference (x rounded by
    kernels.quantize_rows_int8, then float) to float rounding. Width 16 runs only where the CPU has AVX-512 VNNI."""
    assert kernels.cpu_kernels()
    if width not in kernels.q8_widths():
        pytest.skip(f"no AVX-512 VNNI here: the width-{width} int8-activation kernels are built, not run")
    names = ("int8_linear_q8", "int8_glu_q8", "int4_linear_q8")
    for N, K, G in [(40, 576, 18), (96, 128, 1), (1560, 576, 9)]:
        torch.manual_seed(N + G)
        args = quantized_and_dense_args(N, K, G)
        for M in [*range(1, kernels.GEMV_MAX_ROWS + 1), 17, 40, 400]:
            x = torch.randn(M, K)
            for name in names:
                op = getattr(torch.ops.fastllama, name)
                y = op(x, *args[name], 4, width)
                assert torch.equal(y, op(x, *args[name], 1, 8)), (name, M, N)
                if M in (3, 16, 17, 400):
                    alone = torch.cat([op(x[i:i + 1], *args[name], 1, width) for i in range(M)])
                    assert torch.equal(y, alone), (name, M, N)
                    close(y, kernels.OPS[name].reference(x, *args[name]), 2e-5)
    with pytest.raises(RuntimeError, match="width must be 8 or 16"):
        torch.ops.fastllama.int4_linear_q8(torch.randn(2, 128), *quantized_and_dense_args(96, 128, 1)["int4_linear"],
                                           1, 4)


@needs_avx2
def test_int8_activations_round_as_the_reference_and_sum_exactly():
    """x rounded to int8 per block exactly as kernels.quantize_rows_int8 says (an int8 layer of one-hot rows gives the
    rounded x back, bit for bit: a zero block, an outlier, ties), and products exact at the int8 extremes: weights -128
    and 127 against activations -127 and 127 (vpdpbusd's unsigned operand is x + 128; AVX2's vpmaddubsw takes |w| and
    x with w's sign, and its int16 pair sums must not saturate)."""
    assert kernels.cpu_kernels()
    K = 128
    x = torch.randn(5, K)
    x[1, :32] = 0  # a zero block
    x[2, 40] = 1000.0  # an outlier: its block's other inputs round to 0
    x[3, :32] = torch.arange(32) * 0.5 - 7.75  # 127 / 7.75 * v: steps that land on ties and near them
    eye = kernels.int8_to_kernel(torch.eye(K, dtype=torch.int8), torch.ones(K, 1))
    for width in kernels.q8_widths():
        assert torch.equal(torch.ops.fastllama.int8_linear_q8(x, *eye, 1, width), kernels.quantize_rows_int8(x))
    w = torch.tensor([-128, 127], dtype=torch.int8).repeat(16, K // 2)  # (16, K)
    # rounds to itself (d = 1); the last row's pairs of products reach 128 x 127 + 127 x 127, near AVX2's int16 bound
    xs = torch.tensor([[127.0, -127.0] * (K // 2), [-127.0, -127.0] * (K // 2), [-127.0, 127.0] * (K // 2)])
    exact = (xs.double() @ w.double().T).float()
    for width in kernels.q8_widths():
        assert torch.equal(torch.ops.fastllama.int8_linear_q8(xs, *kernels.int8_to_kernel(w, torch.ones(16, 4)), 1,
                                                              width), exact)


@needs_avx2
@pytest.mark.parametrize("cpu, auto", [(Cpu("AVX512", True, True), "int8"),
                                       (Cpu("AVX2", False), "int8 for int4 layers, int16 for int8 layers")])
def test_auto_activations_per_layer_and_checkpoint_kind(tiny_quantized, monkeypatch, cpu, auto):
    """--quant_activations auto for each layer by its kind and the checkpoint's (Cpu.activations): an int4
    checkpoint's int4 layers take int8 activations, its int8 output layer too where the CPU has VNNI; an int8
    checkpoint's take the int8 rule. layers.activations describes it (and a mix of kinds, which prefix caches
    fingerprint)."""
    monkeypatch.setattr(kernels, "this_cpu", lambda: cpu)
    model = load_model(tiny_quantized["int4"], "cpu", "fp32")
    assert layers.activations(model) == auto
    attention = model.layers[0].attention
    assert model.output.op == ("int8_linear_q8" if cpu.vnni else "int8_linear")
    assert {attention.wqkv.op, attention.wo.op} == {"int4_linear_q8"}
    assert layers.activations(load_model(tiny_quantized["int8"], "cpu", "fp32")) == "int16"
    model.output.op = "int8_linear"
    assert layers.activations(model) == "int8 for int4 layers, int16 for int8 layers"


def test_a_forced_cpu_changes_the_rules_not_what_is_measured(monkeypatch):
    """Tests replace this_cpu by each kind of CPU; what the machine can execute (the widths timed) and the name its
    tiles are kept under stay the machine's, so a forced CPU never writes a tuning that misses a width."""
    widths, q8, machine = kernels.gemm_widths(), kernels.q8_widths(), kernels._machine()
    monkeypatch.setattr(kernels, "this_cpu", lambda: Cpu("AVX2", False))
    assert (kernels.gemm_widths(), kernels.q8_widths(), kernels._machine()) == (widths, q8, machine)
    assert kernels.this_cpu().activations("auto", "int8") == "int16" and kernels.this_cpu().gemm(torch.bfloat16)


@pytest.mark.parametrize("cpu, output", [(Cpu("AVX2", False), "int16"), (Cpu("AVX512", True, False), "int16"),
                                         (Cpu("AVX512", True, True), "int8"), (Cpu("DEFAULT", False, True), "int16")])
def test_activations_rule_per_cpu(cpu, output):
    """--quant_activations auto is int8 for int4 layers on every CPU; for int8 layers int8 only where the CPU has
    AVX-512 VNNI and the checkpoint is int4 (its output layer), int16 elsewhere and for int8 checkpoints; int16 / int8
    asked for are kept for both kinds; any other value is one clear error."""
    assert cpu.activations("auto", "int4") == cpu.activations("auto", "int4", "int4") == "int8"
    assert cpu.activations("auto", "int4", "int8") == output and cpu.activations("auto", "int8") == "int16"
    for kind in ("int8", "int4"):
        for layer in ("int8", "int4"):
            assert cpu.activations("int16", kind, layer) == "int16" and cpu.activations("int8", kind, layer) == "int8"
    with pytest.raises(ValueError, match="unknown --quant_activations 'int4'; use one of auto, int16, int8"):
        cpu.activations("int4")


@needs_avx2
def test_modules_pick_the_kernel_and_agree_with_the_pytorch_path():
    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(2, 5, 128)
    q, s = qz.quantize_int8(w)
    q4, sz = qz.quantize_int4(w, 32)
    for make in (lambda: layers.Int8Linear(128, 96), lambda: layers.Int4Linear(128, 96, 32)):
        fast, slow = make(), make()
        for m in (fast, slow):
            if isinstance(m, layers.Int8Linear):
                m.weight, m.scales = q, s
            else:
                m.weight, m.scales_and_zeros = layers.pack_int4(q4), sz
        fast.prepare()
        assert fast.kernel == "cpp"
        slow.kernel = "dequantize"  # Int8Linear's plain path: dequantize + F.linear
        if isinstance(slow, layers.Int4Linear):
            ref = F.linear(x, layers.dequantize_int4(q4, sz, 32))
        else:
            ref = slow(x)
        close(fast(x), ref, 2e-4)


@needs_avx2
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decode_matches_eager(tiny_quantized, reset_dynamo, mode):
    """The custom ops inside torch.compile (fake shapes, C++ wrapper) give the eager tokens."""
    model = load_model(tiny_quantized[mode], "cpu", "fp32")
    idx = torch.tensor([[5, 80, 13, 200, 7]])
    model.setup_caches(1, 32)
    eager = generate(model, idx, 10, temperature=0.0)
    model.setup_caches(1, 32)
    step = compile_step(decode_one_token, torch.device("cpu"))
    assert generate(model, idx, 10, temperature=0.0, decode_step=step).tolist() == eager.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_prefill_in_float32_matches_half_linear(dtype, monkeypatch):
    """float_linear: on a CPU without bf16 arithmetic, many-row half inputs are multiplied in float32 and few rows left
    to F.linear; with bf16 arithmetic every call is F.linear in the half dtype."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 128).to(dtype), torch.randn(96).to(dtype)
    for half_arithmetic in (False, True):
        monkeypatch.setattr(kernels, "this_cpu", lambda: Cpu("AVX512", half_arithmetic))
        for rows in (1, kernels.GEMV_MAX_ROWS, 40):
            x = torch.randn(rows, 128).to(dtype)
            got, plain = kernels.float_linear(x, w, b), F.linear(x, w, b)
            assert got.dtype == dtype
            if rows <= kernels.GEMV_MAX_ROWS or half_arithmetic:
                assert torch.equal(got, plain)
            else:
                assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).to(dtype))
                torch.testing.assert_close(got, plain)  # within the dtype's own rounding


def test_half_model_prefill_matches_plain_half_model(tiny_llama, monkeypatch):
    """load_model swaps bf16 Linears for CpuLinear (tied weights stay shared). Without the C++ kernels and with the CPU
    forced to one without bf16 arithmetic, prefill runs in float32 (float_linear), and its logits are as close to the
    float32 model's as the plain bf16 computation's (the CPU forced to one with bf16 arithmetic) are."""
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "bf16")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is layers.CpuLinear for m in linears)
    if model.config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    idx = torch.randint(0, model.config.vocab_size, (2, 40))

    gemm_dtypes, linear = set(), F.linear

    def spy(x, w, b=None):  # the dtype each prefill GEMM computes in
        gemm_dtypes.add(x.dtype)
        return linear(x, w, b)

    def logits(m, cpu):
        monkeypatch.setattr(kernels, "this_cpu", lambda: cpu)
        gemm_dtypes.clear()
        m.setup_caches(2, 64)
        with torch.no_grad(), monkeypatch.context() as p:
            p.setattr(kernels.F, "linear", spy)
            return m(idx, torch.arange(40)).float()

    ref = logits(load_model(folder, "cpu", "fp32"), Cpu("AVX512", False))
    model = load_without_kernels(folder, "bf16", monkeypatch)
    fast = logits(model, Cpu("AVX512", False))
    assert gemm_dtypes == {torch.float32}
    plain = logits(model, Cpu("AVX512", True))
    assert gemm_dtypes == {torch.bfloat16}  # (on a CPU with bf16 arithmetic the two may even agree bit for bit)
    err_fast, err_plain = (fast - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err_fast <= 1.25 * err_plain, (err_fast, err_plain)
    agree = lambda a: (a.argmax(-1) == ref.argmax(-1)).float().mean()  # noqa: E731
    assert agree(fast) >= agree(plain) - 0.05
    seen = []  # a transform's hooks (tp.shard's all-reduces) must land on the modules that run
    hooked = load_model(folder, "cpu", "bf16", transform=lambda m: m.layers[0].attention.wo.register_forward_hook(
        lambda *_: seen.append(1)))
    hooked.setup_caches(1, 8)
    with torch.no_grad():
        hooked(torch.tensor([[1, 2]]), torch.arange(2))
    assert seen


@needs_avx2
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
        dense = torch.ops.fastllama.dense_linear
        assert torch.equal(dense(xt, w1), dense(xt.contiguous(), w1))
    with pytest.raises(RuntimeError, match="dense_linear: weight"):
        torch.ops.fastllama.dense_linear(x, w1.half())
    with pytest.raises(RuntimeError, match="dense_linear: x must be"):
        torch.ops.fastllama.dense_linear(x.bfloat16(), w1.float())
    with pytest.raises(RuntimeError, match="dense_glu: w1 and w3"):
        torch.ops.fastllama.dense_glu(x, w1, w3.float())


@needs_avx2
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


def load_without_kernels(folder, precision, monkeypatch):
    """The model as a CPU without the C++ kernels loads it: every layer on its PyTorch reference."""
    with monkeypatch.context() as m:
        m.setattr(kernels, "cpu_kernels", lambda: False)
        return load_model(folder, "cpu", precision)


@needs_avx2
@pytest.mark.parametrize("cpu", CPUS, ids=lambda c: f"{c.capability}-{'bf16' if c.half_arithmetic else 'nobf16'}")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_float_model_runs_the_kernels_where_the_table_says(tiny_llama, monkeypatch, precision, cpu):
    """A float32 / bf16 model's decode rows run dense_linear / dense_glu, and so do its prefill rows where the CPU's
    dense GEMM is the faster one (forced: each CPU kind); logits and greedy tokens match the model loaded as on a CPU
    without the kernels (every layer F.linear, w1, silu, w3 one by one)."""
    _, folder = tiny_llama
    model, plain = load_model(folder, "cpu", precision), load_without_kernels(folder, precision, monkeypatch)
    assert all(m.kernel for m in model.modules() if isinstance(m, layers.CpuLinear))
    assert all(b.feed_forward.glu is not None for b in model.layers)
    assert not any(m.kernel for m in plain.modules() if isinstance(m, layers.CpuLinear))
    assert all(b.feed_forward.glu is None for b in plain.layers)
    monkeypatch.setattr(kernels, "this_cpu", lambda: cpu)
    idx = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))  # > 16 rows
    calls, outs = [], []
    for m in (model, plain):
        m.setup_caches(1, 32)
        with torch.no_grad(), torch.profiler.profile() as prof:
            prefill = m(idx, torch.arange(20))[0, -1].float()
        calls.append({e.key for e in prof.key_averages() if e.key.startswith("fastllama::dense")})
        with torch.no_grad(), torch.profiler.profile() as prof:
            step = m(idx[:, -1:], torch.tensor([20]))[0, -1].float()  # one row
        calls.append({e.key for e in prof.key_averages() if e.key.startswith("fastllama::dense")})
        outs.append((prefill, step, generate(m, idx, 10, temperature=0.0).tolist()))
    both = {"fastllama::dense_linear", "fastllama::dense_glu"}
    assert calls == [both if cpu.gemm(model.dtype) else set(), both, set(), set()]
    (p1, s1, t1), (p2, s2, t2) = outs
    tol = 1e-2 if precision == "bf16" else 1e-5  # bf16 outputs a rounding step apart at most
    close(p1, p2, tol)
    close(s1, s2, tol)
    assert t1 == t2


@needs_avx2
@pytest.mark.parametrize("precision, with_kernels", [("fp32", True), ("bf16", True), ("fp32", False)])
def test_float_model_compiled_decode_matches_eager(tiny_llama, reset_dynamo, monkeypatch, precision, with_kernels):
    """The compiled decode graph of a float model, with the C++ ops in it (fp32, bf16) or without them (inductor's own
    GEMMs, as on a CPU without the kernels), gives the eager greedy tokens."""
    _, folder = tiny_llama
    if with_kernels:
        model = load_model(folder, "cpu", precision)
    else:
        model = load_without_kernels(folder, precision, monkeypatch)
    idx = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1, 32)
    eager = generate(model, idx, 10, temperature=0.0).tolist()
    model.setup_caches(1, 32)
    step = compile_step(decode_one_token, torch.device("cpu"))
    assert generate(model, idx, 10, temperature=0.0, decode_step=step).tolist() == eager


@needs_avx2
@pytest.mark.parametrize("precision", ["int8-int16", "int8-int8", "bf16"])
def test_fused_glu_steps_aside_for_hooks_on_w1_and_w3(tiny_llama, tiny_quantized, precision):
    """A forward hook on w1 or w3 (a transform's, a user's) runs, and sees what it changes used, although the
    feed-forward has a fused glu (int8_glu / dense_glu) that would skip those modules."""
    _, folder = tiny_llama
    if precision.startswith("int8"):  # int16 or int8 activations: int8_glu or int8_glu_q8
        activations = precision.split("-")[1]
        model = load_model(tiny_quantized["int8"], "cpu", "fp32", quant_activations=activations)
        kind = "int8_glu" if activations == "int16" else "int8_glu_q8"
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


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("B, H, KV, S, D", [(1, 9, 3, 40, 64), (3, 4, 4, 33, 128), (2, 14, 2, 17, 96), (2, 2, 1, 9, 40),
                                            (1, 9, 3, 300, 64), (3, 6, 2, 200, 64)])
def test_decode_attention_kernel_matches_reference(dtype, B, H, KV, S, D):
    """One query position over a KV cache: the C++ kernel against model.decode_attention in float32, for
    causal prefixes of different lengths per row, a sliding-window hole, left padding and a shared mask; long caches
    are split into chunks of positions (merged exactly), also when a row has fewer visible positions than chunks. The
    cache is float32, bf16, fp16 (q in that dtype) or int8 with scales per block (model.KVCache's, float32 q: the
    reference reads the cache dequantized). Over a whole cache of more rows, each query row reading the row `rows`
    names, the result is the same, bit for bit."""
    assert kernels.cpu_kernels()
    torch.manual_seed(S * D + B)
    q_dtype = torch.float32 if dtype == torch.int8 else dtype
    q = (torch.randn(B, H, D) * 3).to(q_dtype)  # * 3: peaked softmaxes, exp of large negative scores
    block = model.KV_BLOCK if D % model.KV_BLOCK == 0 else D

    def cache(rows):  # a cache of `rows` rows as KVCache stores it, and as attention reads it (float32)
        k, v = torch.randn(rows, KV, S, D), torch.randn(rows, KV, S, D)
        if dtype != torch.int8:
            k, v = k.to(dtype), v.to(dtype)
            return [k, v], (k.float(), v.float())
        (kq, ks), (vq, vs) = model.quantize_kv(k, block), model.quantize_kv(v, block)
        read = (model.dequantize_kv(kq, ks, torch.float32), model.dequantize_kv(vq, vs, torch.float32))
        return [kq, ks, vq, vs], read

    op = torch.ops.fastllama.decode_attention_q8 if dtype == torch.int8 else torch.ops.fastllama.decode_attention
    stored, (k, v) = cache(B)
    pos = torch.arange(S)
    masks = [pos <= S - 1 - torch.arange(B)[:, None],  # row b sees S - b positions
             ((pos > 2) & (pos <= S - 3) & (pos % 4 != 1))[None],  # holes, broadcast over the batch
             pos[None, :] == torch.arange(B)[:, None],  # one visible position per row
             pos[None, :] < torch.tensor([S, 1, 2][:B])[:, None]]  # one long row, the others one or two positions
    for mask in masks:
        ref = model.decode_attention(q.float().view(B, H, 1, D), k, v, mask.view(-1, 1, 1, S)).view(B, H, D)
        got = op(q, *stored, mask, torch.arange(B))
        assert got.shape == q.shape and got.dtype == q_dtype
        tol = 1e-2 if q_dtype != torch.float32 else 2e-6  # float32 arithmetic throughout; the result rounded to dtype
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
        rows = torch.randperm(B + 2)[:B]  # the same rows inside a cache of B + 2, in another order
        whole, _ = cache(B + 2)
        for w, part in zip(whole, stored):
            w[rows] = part
        assert torch.equal(op(q, *whole, mask, rows), got)


@needs_avx2
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16, torch.int8])
def test_model_decodes_with_the_attention_kernel_as_with_pytorch(tiny_llama, kv_dtype):
    """load_model gives CPU models the kernel; decode logits and greedy tokens equal the PyTorch attention's, with
    a float32, bf16 or int8 KV cache."""
    import model as M

    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    model.kv_dtype = kv_dtype
    assert kv_dtype_name(model) == {None: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}[kv_dtype]
    assert all(layer.attention.decode_attention is layers.cpu_decode_attention for layer in model.layers)
    idx = torch.tensor([[5, 80, 13, 200, 7, 9]])

    def decode(attend):  # greedy: the prompt, then 12 tokens one at a time; the logits of each step
        for layer in model.layers:
            layer.attention.decode_attention = attend
        model.setup_caches(1, 40)
        assert model.layers[0].attention.kv_cache.dtype == (kv_dtype or torch.float32)
        with torch.no_grad():
            logits = [model(idx, torch.arange(6))[:, -1]]
            for p in range(6, 18):
                logits.append(model(logits[-1].argmax(-1, keepdim=True), torch.tensor([p]))[:, -1])
        return torch.stack(logits)

    fast, ref = decode(layers.cpu_decode_attention), decode(M.attend_cache)
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_build_folder_follows_the_source_and_a_first_build_says_so(tmp_path, monkeypatch, capsys):
    """kernels.cpp builds in a folder named by its content (two checkouts of one version share it, of two versions
    never rebuild each other's); a build that compiles says so on stderr; a whole .so found there is loaded without
    torch's build step, one cut short is built again."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = kernels.build_directory()
    assert first.parent == tmp_path and first.name.startswith("fastllama_kernels_")
    assert kernels.build_directory() == first
    changed = tmp_path / "kernels.cpp"
    changed.write_bytes(kernels.SOURCES[0].read_bytes() + b"\n// another version\n")
    monkeypatch.setattr(kernels, "SOURCES", [changed, *kernels.SOURCES[1:]])
    assert kernels.build_directory() not in (first, None)
    calls = []

    def fake_load(name, build_directory, **kw):  # what torch's load leaves behind: the library in its folder
        calls.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    loaded = []

    def fake_load_library(path):  # torch.ops.load_library: a library cut short (empty) does not load
        if Path(path).stat().st_size == 0:
            raise OSError(f"{path}: file too short")
        loaded.append(path)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", fake_load_library)
    capsys.readouterr()
    kernels.build(first)
    assert "building fastllama's C++ kernels" in capsys.readouterr().err and calls == [first.name]
    kernels.build(first)  # the .so there is empty: cut short, built again
    assert "building" in capsys.readouterr().err and calls == [first.name] * 2 and loaded == []
    (first / f"{first.name}.so").write_bytes(b"a built library")
    kernels.build(first)  # a whole build: loaded as it is, no build step, nothing said
    assert capsys.readouterr().err == "" and calls == [first.name] * 2 and loaded == [str(first / f"{first.name}.so")]


@needs_avx2
def test_row_tiles_are_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    """tuned_tiles measures each family's fastest tile on the first use of a build on a machine, keeps it in the build
    folder's tiles.json under the machine's name, and reads it from there afterwards; run() passes it to the ops.
    A file from another machine, or a broken one, is measured over."""
    assert kernels.cpu_kernels()
    state = torch.get_rng_state()
    measured = kernels.measure_tiles()
    assert set(measured) == kernels.TUNED and measured["gemm"] in kernels.gemm_widths()
    assert {measured[f] for f in ("int8", "int4", "dense", "q8")} <= set(kernels.TILES)
    assert measured["q8_width"] in kernels.q8_widths()
    assert torch.equal(torch.get_rng_state(), state)  # a --seed's samples are the same on the run that measures
    monkeypatch.setattr(kernels, "build_directory", lambda: tmp_path)
    (tmp_path / "tiles.json").write_text("{not json")
    calls = []
    tiles = {"int8": 4, "int4": 2, "dense": 1, "gemm": 8, "q8": 4, "q8_width": 8}
    monkeypatch.setattr(kernels, "measure_tiles", lambda: calls.append(1) or dict(tiles))
    kernels.tuned_tiles.cache_clear()
    try:
        assert kernels.tuned_tiles()["int4"] == 2 and calls == [1]
        kept = json.loads((tmp_path / "tiles.json").read_text())
        assert kept == {kernels._machine(): tiles}
        kernels.tuned_tiles.cache_clear()
        assert kernels.tuned_tiles()["int8"] == 4 and calls == [1]  # read back, not measured again
        (tmp_path / "tiles.json").write_text(json.dumps({"another CPU / AVX512": {**tiles, "dense": 2}}))
        kernels.tuned_tiles.cache_clear()
        assert kernels.tuned_tiles()["dense"] == 1 and calls == [1, 1]
        assert set(json.loads((tmp_path / "tiles.json").read_text())) == {"another CPU / AVX512", kernels._machine()}
        assert kernels._tiles.keys() == set(tiles)  # cpu_kernels() copied this machine's in
        monkeypatch.setitem(kernels._tiles, "int4", 2)
        monkeypatch.setitem(kernels._tiles, "gemm", 16)
        seen = []  # run() calls the op with the tuned tile and GEMM width
        monkeypatch.setattr(torch.ops.fastllama, "int4_linear", lambda *a: seen.append(a[-2:]) or a[0])
        kernels.run("int4_linear", torch.randn(2, 64), torch.zeros(8, 32, dtype=torch.uint8),
                    torch.zeros(1, 2, 2, 8, dtype=torch.half))
        assert seen == [(2, 16)]
        monkeypatch.setitem(kernels._tiles, "q8", 1)
        monkeypatch.setitem(kernels._tiles, "q8_width", 16)  # the int8-activation ops: their own tile and width
        monkeypatch.setattr(torch.ops.fastllama, "int4_linear_q8", lambda *a: seen.append(a[-2:]) or a[0])
        kernels.run("int4_linear_q8", torch.randn(2, 64), torch.zeros(8, 32, dtype=torch.uint8),
                    torch.zeros(1, 2, 2, 8, dtype=torch.half))
        assert seen == [(2, 16), (1, 16)]
    finally:
        kernels.tuned_tiles.cache_clear()

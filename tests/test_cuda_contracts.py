"""cuda.py's rules, modelled on a CPU: what a GPU would do differently is imitated here (CUDA-graph replays that
reuse their output memory, the int4 kernel's tile limits, a device to load onto, host syncs), and the code that runs
on a GPU is shown to honour it. tests/test_cuda.py runs the real thing on a machine with a GPU."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils._pytree import tree_map

import benchmark
import cli
import cuda
import eval as ev
import generate as gen
import kernels
import layers
import speculative as sp
import tp
from generate import generate, load_model
from tokenizer import get_tokenizer

PROMPT = torch.tensor([5, 80, 13, 200, 7, 9, 301, 44])
CUDA = torch.device("cuda")  # a device object only: nothing here runs on a GPU


def replaying(fn):
    """fn as a CUDA-graph replay returns its outputs: written into the same tensors on every call."""
    buffers = {}

    def call(*args, **kwargs):
        out, leaves = fn(*args, **kwargs), iter(range(1 << 30))

        def into_buffer(t):
            if not isinstance(t, torch.Tensor):
                return t
            i = next(leaves)
            if i not in buffers or buffers[i].shape != t.shape:
                buffers[i] = torch.empty_like(t)
            return buffers[i].copy_(t)
        return tree_map(into_buffer, out)
    return call


@pytest.fixture
def gpu_compile(monkeypatch):
    """generate.compile_step(fn, cuda device) as it runs on a GPU, with torch.compile's CUDA graphs imitated."""
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return replaying(fn)
    monkeypatch.setattr(torch, "compile", fake_compile)
    return lambda fn, dynamic=False: gen.compile_step(fn, CUDA, dynamic), seen


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load_model(tiny_llama[1], "cpu", "fp32")


def test_replaying_steps_keep_generate_speculation_and_eval_exact(model, tiny_llama, gpu_compile, monkeypatch):
    """Steps whose outputs the next call overwrites (CUDA graphs) leave every consumer's result unchanged: batched
    generation, chat's cached generation, speculative decoding (it keeps the draft's distributions) and eval."""
    compiled, seen = gpu_compile
    step = compiled(gen.decode_one_token)
    model.setup_caches(2, 48)
    x = PROMPT.repeat(2, 1)
    expected = generate(model, x, 16, temperature=0.0)
    assert torch.equal(generate(model, x, 16, temperature=0.0, decode_step=step), expected)
    # the imitation is faithful: without copying the outputs the tokens all alias the last one
    assert not torch.equal(generate(model, x, 16, temperature=0.0, decode_step=replaying(gen.decode_one_token)),
                           expected)
    new, _ = gen.generate_cached(model, PROMPT.tolist(), [], 10, temperature=0.0, decode_step=step)
    assert new == expected[0, :10].tolist()

    model.setup_caches(1, 48)
    draft = load_model(tiny_llama[1], "cpu", "fp32")
    draft.setup_caches(1, 48)
    runs = []
    for decode in (gen.decode_one_token, step):
        torch.manual_seed(3)
        runs.append(sp.speculative_generate(model, PROMPT, 20, k=3, draft=draft, prefill_step=gen.prefill,
                                            verify_step=compiled(gen.verify), draft_step=decode, temperature=1.0,
                                            top_k=20)[0].tolist())
    assert runs[0] == runs[1]

    tok = get_tokenizer(tiny_llama[1])
    req = [SimpleNamespace(args=("def main(args):", {"until": ["\n"], "max_gen_toks": 8})),
           SimpleNamespace(args=("x = 1", {"until": [], "max_gen_toks": 8}))]
    scores = [("def f(x):", " return x"), ("a", " b c")]
    results = []
    for compile_flag in (False, True):
        if compile_flag:  # eval's steps as they are compiled on a GPU
            monkeypatch.setattr(ev, "compile_step", lambda fn, device, dynamic=False: compiled(fn, dynamic))
        lm = ev.lm_eval_model(model, tok, batch_size=2, max_seq_length=64, compile=compile_flag)
        results.append((lm.generate_until(req), lm.loglikelihood([SimpleNamespace(args=s) for s in scores])))
    assert results[0][0] == results[1][0]
    assert [r[1] for r in results[0][1]] == [r[1] for r in results[1][1]]
    torch.testing.assert_close([r[0] for r in results[1][1]], [r[0] for r in results[0][1]])
    # fixed-shape steps with CUDA graphs, the dynamic-shape scoring without them; gpt-fast's tuning on both
    assert {s["options"]["triton.cudagraphs"] for s in seen if not s["dynamic"]} == {True}
    assert {s["options"]["triton.cudagraphs"] for s in seen if s["dynamic"]} == {False}
    assert all(s["options"]["coordinate_descent_tuning"] and s["fullgraph"] for s in seen)


def test_compile_options_are_ones_torch_takes(reset_dynamo):
    """torch.compile accepts cuda.compile_options as they are (an unknown option name would fail the compile)."""
    assert cuda.compile_options(True).keys() == cuda.compile_options(False).keys()
    f = torch.compile(lambda x: x * 2 + 1, fullgraph=True, options=cuda.compile_options(False))
    assert torch.equal(f(torch.arange(4.0)), torch.arange(4.0) * 2 + 1)


@pytest.mark.parametrize("K, N, groupsize, capability, tiles", [
    (576, 576, 32, (8, 0), 4),  # the default model: 576 = 4 x 16 x 9, not a multiple of 128
    (1536, 576, 32, (8, 0), 8),
    (2752, 4096, 32, (9, 0), 4),  # Llama-2-7B's w2 at 4 ranks
    (4096, 11008, 128, (8, 6), 8),
    (32, 64, 32, (8, 0), 2),
    (576, 100, 32, (8, 0), None),  # N % 8
    (576, 576, 16, (8, 0), None),  # a group size the kernel has no code for
    (4096, 4096, 128, (7, 5), None),  # before Ampere
    (48, 64, 32, (8, 0), None),  # K not a multiple of the group size
])
def test_int4_inner_k_tiles(K, N, groupsize, capability, tiles):
    assert cuda.int4_inner_k_tiles(K, N, groupsize, capability) == tiles


def test_kernel_choice_on_a_gpu(monkeypatch):
    """int8 takes gpt-fast's cast form (per channel or per group), int4 that no tile fits is dequantized, and int4
    takes torch's kernel where a tile fits."""
    monkeypatch.setattr(cuda, "capability", lambda device: (8, 0))
    assert kernels.quantized_kernel(CUDA, "int8", 576, 576) == "cast"
    assert kernels.quantized_kernel(CUDA, "int8", 576, 576, 32) == "cast"
    assert kernels.quantized_kernel(CUDA, "int4", 576, 1536, 32) == "cuda"
    assert kernels.quantized_kernel(CUDA, "int4", 576, 100, 32) == "dequantize"
    monkeypatch.setattr(cuda, "capability", lambda device: (7, 0))
    assert kernels.quantized_kernel(CUDA, "int4", 576, 1536, 32) == "dequantize"


def test_int4_layer_packs_the_tiles_the_cuda_kernel_reads(monkeypatch):
    """Int4Linear.prepare for a GPU (on the meta device, whose kernels give the CUDA ops' shapes): weight in tiles of
    8 rows x inner_k_tiles x 16 inputs, K = 576 taking 4 of them; scales in bf16, as the kernel multiplies."""
    monkeypatch.setattr(cuda, "capability", lambda device: (8, 0))
    lin = layers.Int4Linear(576, 1536, 32).to("meta")
    lin.prepare(CUDA)
    assert lin.kernel == "cuda"
    assert tuple(lin.weight.shape) == (1536 // 8, 576 // (16 * 4), 32, 4 // 2) and lin.weight.dtype == torch.int32
    assert lin.scales_and_zeros.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_gpu_fallback_forms_compute_the_layer(tiny_quantized, monkeypatch, kind):
    """The forms a GPU falls back to (int4 dequantized; int8's cast form), run here, give the CPU kernels' output."""
    model = load_model(tiny_quantized[kind], "cpu", "fp32")
    fast = model.layers[0].feed_forward.w2
    monkeypatch.setattr(kernels, "quantized_kernel", lambda *a, **k: "cast" if kind == "int8" else "dequantize")
    other = load_model(tiny_quantized[kind], "cpu", "fp32")
    slow = other.layers[0].feed_forward.w2
    assert slow.kernel != fast.kernel
    x = torch.randn(3, fast.in_features)
    torch.testing.assert_close(slow(x), fast(x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_per_group_int8_cast_form(monkeypatch, dtype, rows):
    """GGUF Q8_0 (scales per group of 32) in a GPU's cast form: decode rows (up to GEMV_MAX_ROWS) never rebuild the
    float weight, prefill rows do once per call; both give x @ (w * scales).T within x's dtype's rounding."""
    torch.manual_seed(rows)
    N, K = 48, 96
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N, K // 32) * 0.01 + 0.001
    x = torch.randn(rows, K).to(dtype)
    ref = x.float() @ kernels.dequantize_int8(w, scales).T
    rebuilt = []
    dequantize = kernels.dequantize_int8
    monkeypatch.setattr(kernels, "dequantize_int8", lambda *a: rebuilt.append(1) or dequantize(*a))
    lin = layers.Int8Linear(K, N, groupsize=32)
    lin.weight, lin.scales, lin.kernel = w, scales, "cast"
    got = lin(x)
    assert got.dtype == dtype and bool(rebuilt) == (rows > kernels.GEMV_MAX_ROWS)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_loading_moves_only_a_shard_to_the_device(tiny_llama, monkeypatch):
    """The transform (tp.shard) cuts the model while it is still on the CPU, so the device (meta here) receives one
    rank's slices: the bytes moved are the shard's, not the whole model's."""
    moved = []
    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if out.device.type == "meta" and self.device.type != "meta":
            moved.append(self.nbytes)
        return out
    full = sum(t.nbytes for t in load_model(tiny_llama[1], "cpu", "fp32").state_dict().values())
    where = []

    def shard(m):
        where.append({t.device.type for t in m.state_dict().values()})
        tp.shard(m, 0, 2)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    part = load_model(tiny_llama[1], "meta", "fp32", transform=shard)
    assert where == [{"cpu"}]
    shard_bytes = sum(t.nbytes for t in part.state_dict().values())
    assert shard_bytes < 0.8 * full and sum(moved) == shard_bytes


def test_prefix_cache_is_refused_under_torchrun():
    flags = dict(prompts=["hi"], interactive=False, max_new_tokens=4, num_samples=1, batch_size=1, speculate_k=2,
                 prompt_lookup=None, temperature=0.0, top_k=None, top_p=None, draft_checkpoint_path=None,
                 prefix_file="p.txt", save_prefix_cache=None, load_prefix_cache=None)
    gen.check_flags(**flags)
    with pytest.raises(ValueError, match="torchrun"):
        gen.check_flags(**flags, world_size=2)


def test_decode_loop_reads_back_stops_every_few_tokens_with_the_same_tokens(model, monkeypatch):
    """On a GPU the loop asks whether every row has stopped only every few tokens (each ask waits for the GPU); the
    tokens returned are those of asking after every token, and the position never leaves the device."""
    model.setup_caches(2, 64)
    x = torch.tensor([[5, 80, 13, 200], [7, 9, 301, 44]])
    free = generate(model, x, 30, temperature=0.0)
    stop = free[0, 5].item()
    stops = {stop, free[1, 9].item()}
    bools, created = [], []
    real_bool, real_tensor = torch.Tensor.__bool__, torch.tensor
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: bools.append(1) or real_bool(t))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: created.append(1) or real_tensor(*a, **k))
    results = {}
    for every in (1, cuda.STOP_CHECK_EVERY):
        monkeypatch.setattr(cuda, "stop_check_every", lambda device: every)
        bools.clear(), created.clear()
        seen = []
        results[every] = generate(model, x, 30, temperature=0.0, stop_ids=stops, callback=seen.append)
        results[every, "reads"], results[every, "tensors"] = len(bools), len(created)
        assert len(seen) >= results[every].size(1)
    assert torch.equal(results[1], results[cuda.STOP_CHECK_EVERY])
    assert results[1].size(1) < 30  # every row stopped early
    assert results[cuda.STOP_CHECK_EVERY, "reads"] < results[1, "reads"] / 2
    assert results[cuda.STOP_CHECK_EVERY, "tensors"] == results[1, "tensors"] <= 3  # none per token


def test_time_stamps_wait_for_the_gpu(monkeypatch):
    """The first-token and end stamps follow a synchronize (benchmark.timed_generate and generate.py's Watch)."""
    events = []
    monkeypatch.setattr(cuda, "synchronize", lambda device: events.append(("sync", device.type)))

    def run(callback):
        for _ in range(3):
            events.append("token")
            callback(None)
    benchmark.timed_generate(run, 3, CUDA)
    assert events == [("sync", "cuda"), "token", ("sync", "cuda"), "token", "token", ("sync", "cuda")]
    events.clear()
    watch = cli.Watch(None, CUDA)
    run(watch)
    assert events == ["token", ("sync", "cuda"), "token", "token"] and watch.first is not None

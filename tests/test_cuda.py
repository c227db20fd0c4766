"""The CUDA path on a real GPU (skipped without one; scripts/gpu_check.sh runs this file and a short benchmark).

Written against torch 2.13's documented CUDA APIs and reviewed against its sources, not run where it was written
(no GPU there). tests/test_cuda_contracts.py models each rule of cuda.py on a CPU and runs everywhere.
"""
import inspect
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_in_process

import benchmark
import eval as ev
import generate as gen
import layers
import speculative as sp
import tp
from generate import generate, load_model
from serve_bench import free_port
from tokenizer import get_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (scripts/gpu_check.sh)")

PROMPT = torch.tensor([[5, 80, 13, 200, 7, 9, 301, 44], [7, 9, 13, 5, 80, 200, 44, 301]])


@pytest.fixture
def gpu():
    torch._dynamo.reset()
    yield torch.device("cuda")
    torch._dynamo.reset()


def path_of(kind, tiny_llama, tiny_quantized):
    return tiny_llama[1] if kind == "bf16" else tiny_quantized[kind]


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_compiled_decode_equals_eager_over_three_calls(kind, tiny_llama, tiny_quantized, gpu):
    """CUDA graphs replay into the same output memory: three compiled runs of two rows give the eager tokens."""
    model = load_model(path_of(kind, tiny_llama, tiny_quantized), gpu, "bf16")
    model.setup_caches(2, 40)
    x = PROMPT.to(gpu)
    eager = generate(model, x, 24, temperature=0.0)
    step = gen.compile_step(gen.decode_one_token, gpu)
    runs = [generate(model, x, 24, temperature=0.0, decode_step=step) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    # the eager model, fed the compiled tokens, finds each of them its greedy choice up to bf16's rounding (a tiny
    # random model's near ties may part the texts, so tokens are compared one step at a time)
    with torch.no_grad():
        logits = model(torch.cat([x, runs[0][:, :-1]], 1), torch.arange(x.size(1) + 23, device=gpu)).float()
    logits = logits[:, x.size(1) - 1:]
    gap = logits.max(-1).values - logits.gather(-1, runs[0][..., None])[..., 0]
    assert gap.max() <= 0.02 * logits.abs().max(), gap
    assert torch.equal(runs[0][:, 0], eager[:, 0])


def test_compiled_speculation_equals_greedy(tiny_llama, tiny_quantized, gpu):
    target = load_model(tiny_llama[1], gpu, "fp32")
    draft = load_model(tiny_quantized["int4"], gpu, "fp32")
    for m in (target, draft):
        m.setup_caches(1, 64)
    expected = generate(target, PROMPT[0].to(gpu), 32, temperature=0.0)[0].tolist()
    got = sp.speculative_generate(target, PROMPT[0].to(gpu), 32, k=4, draft=draft, temperature=0.0,
                                  prefill_step=gen.prefill, verify_step=gen.compile_step(gen.verify, gpu),
                                  draft_step=gen.compile_step(gen.decode_one_token, gpu))[0].tolist()
    assert got == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K", [576, 2752, 4096])
def test_int4_linear_on_cuda_matches_the_reference(K, dtype, gpu):
    """torch's int4 kernel (or the dequantized fallback) against F.linear on the dequantized weight."""
    N, groupsize = 256, 32
    torch.manual_seed(0)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    sz = torch.stack([torch.rand(K // groupsize, N) * 0.02 + 0.01, torch.randn(K // groupsize, N) * 0.01], -1)
    lin = layers.Int4Linear(K, N, groupsize)
    lin.weight, lin.scales_and_zeros = layers.pack_int4(q), sz
    lin = lin.to(gpu)
    lin.prepare()
    x = torch.randn(3, K, device=gpu)
    ref = x @ layers.dequantize_int4(q, sz, groupsize).to(gpu).T
    got = lin(x.to(dtype))
    assert got.dtype == dtype and lin.kernel in ("cuda", "dequantize")
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("rows", [1, 16, 40])
@pytest.mark.parametrize("groupsize", [None, 32])
def test_int8_linear_on_cuda_matches_the_reference(groupsize, rows, gpu):
    """int8 per channel and per group (GGUF Q8_0) in the cast form, decode and prefill rows, bf16."""
    N, K = 256, 576
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N) * 0.01 + 0.001 if groupsize is None else torch.rand(N, K // groupsize) * 0.01 + 0.001
    lin = layers.Int8Linear(K, N, groupsize=groupsize)
    lin.weight, lin.scales = w, scales
    lin = lin.to(gpu)
    lin.prepare()
    x = torch.randn(rows, K, device=gpu)
    ref = x @ layers.dequantize_int8(w, scales).to(gpu).T
    got = lin(x.bfloat16())
    assert got.dtype == torch.bfloat16 and lin.kernel == "cast"
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("which", ["int4", "gguf"])
def test_checkpoints_give_the_cpus_greedy_tokens(which, tiny_quantized, smollm2_dir, gpu):
    """A checkpoint quantized on the CPU and one imported from GGUF: the CPU's greedy tokens on the GPU."""
    path = tiny_quantized["int4"] if which == "int4" else smollm2_dir
    n = 16
    ids = torch.tensor(get_tokenizer(path if path.is_dir() else path.parent).encode("The capital of France is"))
    out = {}
    for device in ("cpu", gpu):
        model = load_model(path, device, "fp32")
        model.setup_caches(1, ids.numel() + n)
        out[str(device)] = generate(model, ids.to(device), n, temperature=0.0)[0].tolist()
    assert out["cuda"] == out["cpu"]


def test_devices_split_equals_one_device(tiny_llama, gpu):
    one = load_model(tiny_llama[1], gpu, "fp32")
    split = load_model(tiny_llama[1], gpu, "fp32", transform=lambda m: tp.split_layers(m, [gpu, gpu]))
    for m in (one, split):
        m.setup_caches(2, 40)
    x = PROMPT.to(gpu)
    with torch.no_grad():
        torch.testing.assert_close(split(x, torch.arange(8, device=gpu)), one(x, torch.arange(8, device=gpu)))
    assert torch.equal(generate(split, x, 16, temperature=0.0), generate(one, x, 16, temperature=0.0))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tensor parallelism needs 2 GPUs")
def test_nccl_tensor_parallel_equals_one_gpu(tiny_llama):
    args = ["--checkpoint_path", tiny_llama[1], "--device", "cuda", "--precision", "fp32", "--temperature", "0",
            "--max_new_tokens", "12", "--num_samples", "1", "--prompt", "def main(args):"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    one = subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "generate.py"), *map(str, args), "--compile"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert two.stdout == one.stdout and two.stderr.count("time to first token") == 1


def test_benchmark_and_eval_smoke(tiny_llama, tmp_path, capsys, gpu):
    rows = benchmark.main(checkpoint_path=tiny_llama[1], device="cuda", precisions="bf16,int8,int4",
                          prompt_tokens=16, max_new_tokens=8, batch_size="2", runs=1, startup=False)
    assert [r["precision"] for r in rows] == ["bf16", "int8", "int4"]
    for r in rows:
        assert "error" not in r, r
        assert min(r["decode_tok_s"], r["prefill_tok_s"], r["copy_bandwidth_gb_s"], r["bandwidth_gb_s"]) > 0
    text = tmp_path / "t.txt"
    text.write_text(inspect.getsource(ev))
    code, out, err = run_in_process(capsys, ev, "--checkpoint_path", tiny_llama[1], "--perplexity", text,
                                    "--max_seq_length", "64", "--device", "cuda", "--compile")
    assert code == 0, err
    assert out.startswith("perplexity ")

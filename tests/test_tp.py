"""Tensor parallelism over 2 CPU processes (gloo) and layers split over several devices: same logits and tokens."""
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import ROOT, greedy_text, run_in_process

import generate as gen
import tp
from generate import generate, load_model
from serve_bench import free_port

IDX = torch.tensor([[5, 80, 13, 200, 7, 9, 301, 44]])


def reference(path, transform=None):
    """Logits of IDX and 16 greedy tokens, for the whole model or (transform=tp.shard) this rank's slices. int16
    activations (the exact mode): a rank's slice of a row-parallel layer (wo: 32 inputs) is too narrow for the
    kernels and computes in float, where the whole layer would round its input to int8 with int8 activations."""
    model = load_model(path, "cpu", "fp32", transform=transform, quant_activations="int16")
    model.setup_caches(1, 40)
    with torch.no_grad():
        logits = model(IDX, torch.arange(IDX.size(1)))
    return logits, generate(model, IDX, 16, temperature=0.0)


def _worker(rank: int, size: int, port: int, path, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tp.init(torch.device("cpu"))
    logits, tokens = reference(path, tp.shard)
    if rank == 0:
        torch.save({"logits": logits, "tokens": tokens}, out)
    tp.finish()


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_two_processes_match_one(tiny_llama, tiny_quantized, tmp_path, mode):
    _, folder = tiny_llama
    path = folder if mode == "fp32" else tiny_quantized["int8"]
    logits, tokens = reference(path)
    mp.spawn(_worker, args=(2, free_port(), path, tmp_path / "out.pt"), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["logits"], logits, rtol=1e-4, atol=1e-4)
    assert got["tokens"].tolist() == tokens.tolist()


def test_shard_keeps_gqa_groups_and_scales(tiny_quantized):
    """One rank's slices by hand: q heads 0-1 with kv head 0; int8 scales follow their rows."""
    path = tiny_quantized["int8"]
    seen = {}  # each model's layer 0 as the transform left it, before the kernels repack it

    def load(name, transform=lambda m: None):
        def keep(m):
            transform(m)
            seen[name] = {k: v for k, v in m.layers[0].attention.state_dict().items() if "cache" not in k}
        return load_model(path, "cpu", "fp32", transform=keep)

    full, part = load("full"), load("part", lambda m: tp.shard(m, 0, 2))
    a, b = full.layers[0].attention, part.layers[0].attention
    sa, sb = seen["full"], seen["part"]
    hd, c = a.head_dim, full.config
    rows = list(range(0, c.n_head // 2 * hd)) + [c.n_head * hd + i for i in range(c.n_kv_heads // 2 * hd)]
    rows += [(c.n_head + c.n_kv_heads) * hd + i for i in range(c.n_kv_heads // 2 * hd)]
    assert torch.equal(sb["wqkv.weight"], sa["wqkv.weight"][rows])
    assert torch.equal(sb["wqkv.scales"], sa["wqkv.scales"][rows])
    assert torch.equal(sb["wo.weight"], sa["wo.weight"][:, : c.n_head // 2 * hd])
    assert torch.equal(sb["wo.scales"], sa["wo.scales"])
    assert (b.n_head, b.n_kv_heads) == (c.n_head // 2, c.n_kv_heads // 2)
    assert b.wqkv.kernel == a.wqkv.kernel  # sharded before the kernels were picked


def test_world_size_must_divide_heads(tiny_llama):
    _, folder = tiny_llama
    model = load_model(folder, "cpu", "fp32")
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        tp.check_divisible(model.config, 4)
    with pytest.raises(ValueError, match="int4 groups of 32"):
        tp.check_divisible(model.config, 2, groupsize=32)  # intermediate 96 / 2 = 48 is not a multiple of 32


def test_torchrun_generate(tiny_llama):
    """torchrun --nproc_per_node=2 generate.py --compile prints the single-process greedy text, once."""
    _, folder = tiny_llama
    args = ["--checkpoint_path", folder, "--device", "cpu", "--precision", "fp32", "--temperature", "0",
            "--max_new_tokens", "12", "--num_samples", "1", "--prompt", "def main(args):"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def torchrun(n, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                               f"--master_port={free_port()}", str(ROOT / "generate.py"), *map(str, args), *extra],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)

    multi = torchrun(2, "--compile")
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout == "def main(args):" + greedy_text(folder, "def main(args):", 12) + "\n"
    assert multi.stderr.count("time to first token") == 1  # rank 0 only
    bad = torchrun(3)
    # one line from rank 0 (torchrun then adds its own summary of the failed workers)
    assert bad.returncode != 0 and bad.stderr.count("error: tensor parallelism over 3 processes") == 1
    assert "n_head=4" in bad.stderr and "ValueError" not in bad.stderr


def test_layers_split_over_devices(tiny_llama, capsys):
    _, folder = tiny_llama
    logits, tokens = reference(folder)
    model = load_model(folder, "cpu", "fp32")
    stages = tp.split_layers(model, [torch.device("cpu")] * 2)
    assert [list(r) for _, r in stages] == [[0], [1]]
    model.setup_caches(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX, torch.arange(IDX.size(1))), logits)
    assert generate(model, IDX, 16, temperature=0.0).tolist() == tokens.tolist()
    assert all(tp.stage_bytes(model, r) > 0 for _, r in stages)
    with pytest.raises(ValueError, match="between 1 and 2"):
        tp.split_layers(model, [torch.device("cpu")] * 3)
    common = ["--checkpoint_path", folder, "--precision", "fp32", "--temperature", "0", "--max_new_tokens", "8",
              "--num_samples", "1", "--prompt", "def main(args):"]
    code, out, err = run_in_process(capsys, gen, *common, "--devices", "cpu,cpu")
    assert code == 0, err
    assert out == "def main(args):" + greedy_text(folder, "def main(args):", 8) + "\n"
    assert "stage 0 (cpu): layers 0-0" in err

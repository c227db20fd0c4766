"""Quantization: primitives, kernels against their dequantized reference, checkpoints, GPTQ, errors."""
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_model, make_hf_model

import eval as ev
import huge_pages
import kernels
import layers
import quantize as qz
from checkpoint import PRECISIONS, Checkpoint, Format, save_checkpoint
from generate import generate, load_model


def test_int8_and_int4_round_trip_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    q, s = qz.quantize_int8(w)
    assert q.dtype == torch.int8 and (layers.dequantize_int8(q, s) - w).abs().le(s[:, None] / 2 + 1e-6).all()
    for g in qz.GROUPSIZES:
        q4, sz = qz.quantize_int4(w, g)
        assert q4.max() <= 15 and sz.shape == (256 // g, 48, 2)
        step = sz[..., 0].T.repeat_interleave(g, dim=1)  # (N, K) scale of each weight's group
        assert (layers.dequantize_int4(q4, sz, g) - w).abs().le(step / 2 + 1e-5).all()
        assert torch.equal(layers.unpack_int4(layers.pack_int4(q4)), q4)
    with pytest.raises(ValueError, match="does not divide"):
        qz.quantize_int4(torch.randn(4, 96), 64)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_kernels_match_dequantized_reference(dtype, tol):
    torch.manual_seed(0)
    w, x, b = torch.randn(96, 128), torch.randn(2, 5, 128), torch.randn(96)
    q, s = qz.quantize_int8(w)
    lin8 = layers.Int8Linear(128, 96, bias=True)
    lin8.weight, lin8.scales, lin8.bias = q, s.to(dtype), torch.nn.Parameter(b.to(dtype))
    ref8 = F.linear(x, layers.dequantize_int8(q, s.to(dtype)), b)
    torch.testing.assert_close(lin8(x.to(dtype)).float(), ref8, rtol=tol, atol=tol * ref8.abs().max().item())
    for g in (32, 128):
        q4, sz = qz.quantize_int4(w, g)
        lin4 = layers.Int4Linear(128, 96, g)
        lin4.weight, lin4.scales_and_zeros = layers.pack_int4(q4), sz.to(dtype)
        lin4.prepare()
        ref4 = F.linear(x, layers.dequantize_int4(q4, sz.to(dtype), g))
        torch.testing.assert_close(lin4(x.to(dtype)).float(), ref4, rtol=tol, atol=tol * ref4.abs().max().item())
    emb = layers.Int8Embedding(96, 128)
    emb.weight, emb.scales = q, s
    idx = torch.tensor([[3, 0, 95]])
    torch.testing.assert_close(emb(idx), layers.dequantize_int8(q, s)[idx])


def test_weights_in_huge_pages_keep_values_outputs_and_ties():
    """load_model on CPU copies every weight into one huge-page arena (huge_pages.weights_in_huge_pages): same values
    and outputs, new separate storages, tied tensors (int8 buffers, float Parameters) still one."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.tok_embeddings, model.output = layers.Int8Embedding(64, 128), layers.Int8Linear(128, 64)
    model.tok_embeddings.weight, model.tok_embeddings.scales = qz.quantize_int8(torch.randn(64, 128))
    model.output.weight, model.output.scales = model.tok_embeddings.weight, model.tok_embeddings.scales  # tied
    model.mid = layers.Int4Linear(128, 96, 32)
    q4, sz = qz.quantize_int4(torch.randn(96, 128), 32)
    model.mid.weight, model.mid.scales_and_zeros = layers.pack_int4(q4), sz
    model.emb, model.head = torch.nn.Embedding(64, 128), torch.nn.Linear(128, 64, bias=False)
    model.head.weight = model.emb.weight
    model.alias = layers.Int8Embedding(64, 128)
    model.alias.weight, model.alias.scales = model.tok_embeddings.weight, model.tok_embeddings.scales
    layers.prepare(model)
    if model.output.kernel == "cpp":  # the output layer got its own copy in the kernel's layout; the embedding kept
        # its rows
        q, s = kernels.int8_from_kernel(model.output.weight, model.output.scales)
        assert torch.equal(q, model.tok_embeddings.weight) and torch.equal(s[:, 0], model.tok_embeddings.scales)
    x = torch.randn(1, 128)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    outputs = [model.output(x), model.mid(x), model.head(x)]
    old_storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    huge_pages.weights_in_huge_pages(model)
    assert model.alias.weight is model.tok_embeddings.weight and model.alias.scales is model.tok_embeddings.scales
    assert model.head.weight is model.emb.weight and isinstance(model.head.weight, torch.nn.Parameter)
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    storages = [t.untyped_storage().data_ptr() for t in after.values()]
    assert not set(storages) & old_storages and all(t.data_ptr() % 64 == 0 for t in after.values())
    assert len(set(storages)) == len({id(t) for t in after.values()})  # one storage per distinct tensor
    for y, ref in zip([model.output(x), model.mid(x), model.head(x)], outputs):
        assert torch.equal(y, ref)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_load_casts_a_float_model_on_its_way_into_huge_pages(tmp_path, spm_dir, precision):
    """A float checkpoint loaded on the CPU is cast while it is copied into huge pages, not by model.to() before:
    every tensor the same bits and dtype as model.to(dtype) gives, the tied output layer still the embedding's."""
    folder = tmp_path / "m"
    make_hf_model("smollm2_tied", folder, spm_dir)
    dtype = PRECISIONS[precision]
    model = load_model(folder, "cpu", precision)
    ckpt = Checkpoint.open(folder)
    ref = ckpt.build()
    ref.load_state_dict(ckpt.state_dict(), assign=True)
    ref = ref.to(dtype=dtype)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and model.dtype == dtype
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert model.output.weight is model.tok_embeddings.weight


@pytest.fixture(params=["int8", "int4"])
def quantized(request, tiny_llama, tiny_quantized):
    return request.param, tiny_llama[1], tiny_quantized[request.param]


def test_checkpoint_says_what_it_is(quantized):
    mode, folder, path = quantized
    q = Checkpoint.open(path).quantization
    assert (q.mode, q.groupsize, q.int8_groupsize) == (mode, None if mode == "int8" else 32, None)
    assert Checkpoint.open(folder).quantization is None
    sd = Checkpoint.open(path).state_dict()
    assert sd["layers.0.attention.wqkv.weight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert sd["tok_embeddings.weight"].dtype == torch.int8


def test_quantized_model_matches_dequantized_twin(quantized, tmp_path):
    mode, folder, path = quantized
    ckpt = Checkpoint.open(path)
    twin = qz.dequantize_state_dict(ckpt.state_dict(), ckpt.quantization)
    save_checkpoint(tmp_path, twin, ckpt.args, Format("float32", "test"))
    # the exact mode (int16 activations, float32 KV cache): the float twin's arithmetic to ~1e-5
    q_model = load_model(path, "cpu", "fp32", quant_activations="int16", kv_dtype="fp32")
    f_model = load_model(tmp_path, "cpu", "fp32")
    assert_same_model(q_model, f_model, torch.tensor([[5, 80, 13, 200, 7, 9, 301, 44]]), new_tokens=24, tol=1e-4)


def test_gptq_beats_round_to_nearest_on_layer_output():
    torch.manual_seed(0)
    K, N = 128, 64
    mix = torch.randn(K, K) / K**0.5
    X = torch.randn(2048, K) @ mix + torch.randn(K) * 0.1  # correlated inputs, as in a real layer
    W = torch.randn(N, K)
    H = 2 * X.T @ X / X.size(0)
    for g in (32, 128):
        q_rtn, sz_rtn = qz.quantize_int4(W, g)
        q_gptq, sz_gptq = qz.gptq_quantize(W, H, g, blocksize=64)
        err_rtn = (X @ (layers.dequantize_int4(q_rtn, sz_rtn, g) - W).T).pow(2).mean()
        err_gptq = (X @ (layers.dequantize_int4(q_gptq, sz_gptq, g) - W).T).pow(2).mean()
        assert err_gptq < 0.8 * err_rtn, (g, err_gptq, err_rtn)


def test_gptq_checkpoint_end_to_end(tiny_llama, tiny_quantized, tmp_path):
    hf, folder = tiny_llama
    calib = tmp_path / "calib.txt"
    calib.write_text(inspect.getsource(qz))
    out = qz.main(checkpoint_path=folder, mode="int4-gptq", groupsize=32, calibration_file=calib,
                  calibration_limit=4, calibration_seq_length=64, output=tmp_path / "gptq" / "model.pth")
    rtn = tiny_quantized["int4"]  # round to nearest, group 32
    assert Checkpoint.open(out).quantization.mode == "int4-gptq"
    from tokenizer import get_tokenizer

    idx = torch.tensor([get_tokenizer(folder).encode(inspect.getsource(generate))[:48]])  # held-out text
    with torch.no_grad():
        expected = hf(idx).logits
        errors = {}
        for name, path in (("gptq", out), ("rtn", rtn)):
            model = load_model(path, "cpu", "fp32")
            model.setup_caches(1, 48)
            errors[name] = (model(idx, torch.arange(48)) - expected).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"], errors


def test_quantize_errors(tiny_llama, tiny_quantized, tmp_path):
    _, folder = tiny_llama
    with pytest.raises(ValueError, match="choose from"):
        qz.main(checkpoint_path=folder, mode="int3")
    with pytest.raises(ValueError, match="does not divide"):
        qz.main(checkpoint_path=folder, mode="int4", groupsize=128)  # the tiny model's dim is 64
    with pytest.raises(FileNotFoundError, match="calibration_file"):
        qz.main(checkpoint_path=folder, mode="int4-gptq", calibration_file=tmp_path / "none.txt")
    with pytest.raises(ValueError, match="already quantized"):
        qz.main(checkpoint_path=tiny_quantized["int8"], mode="int4")


TASK_YAML = """task: tiny_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


def test_gptq_calibrates_on_local_lm_eval_task(tiny_llama, tmp_path):
    _, folder = tiny_llama
    docs = tmp_path / "docs.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "choices": [str(i), str(2 * i)], "answer": 1} for i in range(6)]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_facts.yaml").write_text(TASK_YAML.format(docs=docs))
    texts = ev.task_texts(["tiny_facts"], tmp_path / "tasks", limit=4)
    assert texts == [f"Question: What is {i} plus {i}?\nAnswer: {2 * i}" for i in range(4)]
    out = qz.main(checkpoint_path=folder, mode="int4-gptq", groupsize=32, calibration_tasks="tiny_facts",
                  calibration_tasks_path=tmp_path / "tasks", calibration_limit=6, output=tmp_path / "g" / "model.pth")
    assert Checkpoint.open(out).quantization.mode == "int4-gptq"
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        ev.task_texts(["no_such_task"], tmp_path / "tasks", limit=4)

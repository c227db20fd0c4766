"""GGUF import: a tiny llama written as GGUF with every supported tensor type, checked against
transformers' own GGUF loader (an independent dequantizer)."""
import numpy as np
import pytest
import torch
from convert_gguf import convert_gguf
from convert_hf_checkpoint import hf_to_interleaved
from helpers import VOCAB, assert_same_model, make_hf_model

from checkpoint import Checkpoint
from generate import generate, load_model
from quantize import dequantize_state_dict
from tokenizer import get_tokenizer

PER_TENSOR = {  # a different type on each kind of tensor, so every dequantizer is exercised
    "token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "F16", "attn_output": "BF16",
    "ffn_gate": "Q4_0", "ffn_up": "Q8_0", "ffn_down": "Q4_1", "output": "F16",
}


def byte_level_vocab():
    """256 byte symbols plus merged pairs of letters: a small but valid byte-level BPE vocabulary."""
    from tokenizers.pre_tokenizers import ByteLevel

    base = sorted(ByteLevel.alphabet())
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pairs = [(a, b) for a in letters for b in letters][: VOCAB - len(base) - 2]
    tokens = base + [a + b for a, b in pairs] + ["<|endoftext|>", "<|im_end|>"]
    return tokens, [f"{a} {b}" for a, b in pairs]


def write_gguf(hf, path, types=PER_TENSOR):
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    tokens, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    sd = {k: v.float() for k, v in hf.state_dict().items()}
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    hf_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for k, v in hf_layer.items():
            names[f"model.layers.{i}.{k}.weight"] = f"blk.{i}.{v}"
    for hf_name, name in names.items():
        t = sd[hf_name]
        kind = name.split(".")[-1]
        if kind == "attn_q":
            t = hf_to_interleaved(t, H, D)
        if kind == "attn_k":
            t = hf_to_interleaved(t, KV, D)
        qtype = getattr(gguf.GGMLQuantizationType, types.get(kind, "F32"))
        data = t.numpy().astype(np.float32)
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        w.add_tensor(f"{name}.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    hf = make_hf_model("llama31_gqa", folder / "hf")
    hf.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}  # GGUF rope scaling is not imported
    write_gguf(hf, folder / "tiny.gguf")
    convert_gguf(folder / "tiny.gguf", folder / "ours")
    return folder


def test_gguf_logits_match_transformers_gguf_loader(tiny_gguf):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tiny_gguf, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours = load_model(tiny_gguf / "ours", "cpu", "fp32")
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    ours.setup_caches(1, 40)
    with torch.no_grad():
        expected = theirs(idx).logits
        got = ours(idx, torch.arange(20))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    ours.setup_caches(1, 40)
    n = 12
    expected_tokens = theirs.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, 20:]
    assert generate(ours, idx, n, temperature=0.0)[0].tolist() == expected_tokens.tolist()


Q4_FILE = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q4_1",
           "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q4_1", "output": "Q8_0"}  # as llama.cpp's Q4 files
Q8_FILE = {k: "Q8_0" for k in Q4_FILE}


@pytest.mark.parametrize("types, mode", [(Q4_FILE, "int4"), (Q8_FILE, "int8")])
def test_gguf_blocks_import_without_a_float_detour(tmp_path, types, mode):
    hf = make_hf_model("llama31_gqa", tmp_path / "hf")
    hf.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    write_gguf(hf, tmp_path / "q.gguf", types)
    convert_gguf(tmp_path / "q.gguf", tmp_path / "ours")
    quant_path, float_path = tmp_path / "ours" / "model_gguf.pth", tmp_path / "ours" / "model.pth"
    q = Checkpoint.open(quant_path).quantization
    assert q.mode == mode and q.int8_groupsize == 32
    # the int4 / int8 blocks hold exactly the numbers the gguf package's dequantizer gives (model.pth)
    twin = dequantize_state_dict(Checkpoint.open(quant_path).state_dict(), q)
    floats = Checkpoint.open(float_path).state_dict()
    assert twin.keys() == floats.keys() and all(torch.equal(twin[k], floats[k]) for k in floats)
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    assert_same_model(load_model(quant_path, "cpu", "fp32", quant_activations="int16", kv_dtype="fp32"),  # exact
                      load_model(float_path, "cpu", "fp32"), idx,
                      new_tokens=12, tol=1e-3)


def test_mixed_gguf_imports_as_float_only(tiny_gguf):
    assert (tiny_gguf / "ours" / "model.pth").is_file() and not (tiny_gguf / "ours" / "model_gguf.pth").exists()


def test_gguf_tokenizer_files(tiny_gguf):
    tok = get_tokenizer(tiny_gguf / "ours")
    ids = tok.encode("hello 42")
    assert tok.decode(ids) == "hello 42"
    assert tok.token_to_id("el") in ids and tok.encode("42") == [tok.token_to_id("4"), tok.token_to_id("2")]
    assert tok.stop_ids == {VOCAB - 1, VOCAB - 2}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\n"


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


@pytest.mark.real_model
def test_exported_gguf_reads_back_with_its_weights_and_chat_template(smollm2_dir, tmp_path):
    """export_gguf (the F32 file llama.cpp quantizes for the benchmarks) read back by convert_gguf: the same weights,
    and the same chat template, so that llama-server and our server render a chat alike; a GGUF without a template
    gives a folder whose tokenizer says it has none (a null template was once written, and chats failed)."""
    from convert_gguf import export_gguf

    gguf_file = export_gguf(smollm2_dir / "model.pth", tmp_path / "model-F32.gguf")
    folder = tmp_path / "back"
    convert_gguf(gguf_file, folder)
    ours, back = Checkpoint.open(smollm2_dir / "model.pth").state_dict(), Checkpoint.open(folder).state_dict()
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
    chat = [{"role": "user", "content": "Hi!"}]
    assert get_tokenizer(folder).apply_chat_template(chat) == get_tokenizer(smollm2_dir).apply_chat_template(chat)

    tok_json = (folder / "tokenizer.json").read_text()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text(tok_json)
    (plain / "tokenizer_config.json").write_text('{"chat_template": null}')
    with pytest.raises(ValueError, match="no chat template"):
        get_tokenizer(plain).apply_chat_template(chat)

"""Our tokenizers against transformers.AutoTokenizer on the same files."""
import json
import shutil

import pytest

from tokenizer import LLAMA2_TEMPLATE, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, get_tokenizer

TEXTS = [
    "Hello world! How are you doing today?",
    "def parse_args(self, args=None, namespace=None):\n    return 42",
    "The year 2024 had 366 days; pi is about 3.14159.",
    "two  inner spaces,\ttabs\n\nand blank lines  ",
    "émigré naïve café, 日本語, emoji 😀",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def spm_with_template(spm_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm_chat")
    shutil.copy(spm_dir / "tokenizer.model", folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "chat_template": LLAMA2_TEMPLATE,
              "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_sentencepiece_matches_autotokenizer(spm_with_template):
    from transformers import AutoTokenizer

    ours = get_tokenizer(spm_with_template)
    assert isinstance(ours, SentencePieceTokenizer)
    theirs = AutoTokenizer.from_pretrained(spm_with_template)
    # not compared: text that starts with several spaces, where transformers' sentencepiece conversion
    # drops one of them ("  a" -> "▁▁a") and sentencepiece itself, Meta's reference, keeps it ("▁▁▁a")
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    assert ours.bos_id == theirs.bos_token_id and ours.stop_ids == {theirs.eos_token_id}
    expected = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES) == expected


@pytest.mark.real_model
def test_smollm2_gguf_tokenizer_matches_autotokenizer(smollm2_gguf, smollm2_dir):
    from transformers import AutoTokenizer

    ours = get_tokenizer(smollm2_dir)
    assert isinstance(ours, HFTokenizer)
    theirs = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n", "   leading spaces"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("2024") == [ours.token_to_id(d) for d in "2024"]  # SmolLM2 splits digits
    for msgs in (MESSAGES, MESSAGES[1:]):  # with and without a system prompt (the template adds one)
        expected = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(msgs) == expected
    assert ours.stop_ids == {ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")}


def test_tiktoken_llama3_layout(tmp_path):
    """A Llama-3-style tiktoken file: ranks first, then the 256 special tokens."""
    import base64

    ranks = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello"]
    lines = [f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)]
    (tmp_path / "tokenizer.model").write_text("".join(lines))
    tok = get_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer)
    n = len(ranks)
    assert tok.bos_id == n and tok.token_to_id("<|eot_id|>") == n + 9
    assert tok.token_to_id("<|reserved_special_token_246|>") == n + 255
    ids = tok.encode("hello")
    assert ids == [n, 259] and tok.decode(ids[1:]) == "hello"
    assert {n + 1, n + 8, n + 9} <= tok.stop_ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.startswith("<|begin_of_text|><|start_header_id|>user")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.sh"):
        get_tokenizer(tmp_path)

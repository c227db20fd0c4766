"""eval.py --perplexity against a perplexity computed with transformers on the same tiny model."""
import inspect
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_in_process

import eval as ev
from generate import load_model
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def hf_perplexity(hf, ids, max_len, stride):
    """The recipe of transformers' perplexity guide, token-weighted: labels -100 where not scored."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(x, labels=labels).loss
        n = (labels[:, 1:] != -100).sum().item()
        nll, count, prev_end = nll + loss.item() * n, count + n, end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("max_len, stride", [(64, 32), (64, 64), (50, 17), (128, 128)])
def test_perplexity_matches_transformers(tiny_llama, max_len, stride):
    hf, folder = tiny_llama
    ids = get_tokenizer(folder).encode(inspect.getsource(ev))[:300]
    ours, n = ev.perplexity(load_model(folder, "cpu", "fp32"), ids, max_len, stride)
    theirs, n_hf = hf_perplexity(hf, ids, max_len, stride)
    assert n == n_hf
    if stride < max_len:  # overlapping windows score every token after the first
        assert n == len(ids) - 1
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_eval_cli(tiny_llama, tmp_path, capsys):
    _, folder = tiny_llama
    text = tmp_path / "t.txt"
    text.write_text(inspect.getsource(ev))
    code, out, err = run_in_process(capsys, ev, "--checkpoint_path", folder, "--perplexity", text,
                                    "--max_seq_length", "64", "--device", "cpu")
    assert code == 0, err
    assert out.startswith("perplexity ") and "bf16" in out  # --precision auto: bf16 for a float checkpoint
    code, _, err = run_in_process(capsys, ev, "--checkpoint_path", folder, "--perplexity", tmp_path / "missing.txt")
    assert_one_line_error(code, err, "not found")


TASKS = ROOT / "tasks"


@pytest.fixture(scope="module")
def tiny_with_hf_tokenizer(tmp_path_factory, spm_dir):
    """A tiny Llama whose sentencepiece tokenizer transformers can also load (tokenizer_config.json)."""
    import json

    from helpers import make_hf_model
    from transformers import AutoTokenizer

    tok_dir = tmp_path_factory.mktemp("spm_cfg")
    (tok_dir / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    folder = tmp_path_factory.mktemp("tiny_eval")
    hf = make_hf_model("llama31_gqa", folder, tok_dir)
    return hf, AutoTokenizer.from_pretrained(tok_dir), folder


def test_lm_eval_matches_lm_evals_own_hf_model(tiny_with_hf_tokenizer):
    """Same accuracy, log-likelihoods, rolling perplexities and greedy generations as lm-eval's `hf` model."""
    from lm_eval.models.huggingface import HFLM

    hf, hf_tok, folder = tiny_with_hf_tokenizer
    tasks = ["fastllama_facts", "fastllama_text", "fastllama_facts_gen"]
    ours = ev.lm_eval_model(load_model(folder, "cpu", "fp32"), get_tokenizer(folder), batch_size=3, max_seq_length=128)
    theirs = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=3, max_length=128)
    runs = [ev.run_tasks(lm, tasks, TASKS, limit=6, log_samples=True) for lm in (ours, theirs)]
    for task in tasks:
        a, b = (r["samples"][task] for r in runs)
        assert len(a) == len(b) == 6
        for sa, sb in zip(a, b):
            for ra, rb in zip(sa["resps"], sb["resps"]):
                if isinstance(ra[0], str):  # generations: tested below (the random model's byte tokens decode
                    assert len(ra) == len(rb)  # differently in sentencepiece and transformers)
                else:
                    torch.testing.assert_close(torch.tensor(ra[0], dtype=torch.float64),
                                               torch.tensor(rb[0], dtype=torch.float64), rtol=1e-4, atol=1e-4,
                                               msg=f"{task}: {ra} vs {rb}")
        ma, mb = (r["results"][task] for r in runs)
        for k in ma:
            if k.endswith(",none") and not k.startswith(("alias", "samples")) and "stderr" not in k:
                assert ma[k] == pytest.approx(mb[k], rel=1e-4), (task, k)


def test_eval_cli_tasks_and_errors(tiny_llama, capsys):
    _, folder = tiny_llama
    code, out, err = run_in_process(capsys, ev, "--checkpoint_path", folder, "--tasks", "fastllama_facts",
                                    "--include_path", TASKS, "--limit", "4", "--batch_size", "2", "--device", "cpu")
    assert code == 0, err
    assert "fastllama_facts" in out and "acc" in out
    code, _, err = run_in_process(capsys, ev, "--checkpoint_path", folder, "--tasks", "no_such_task",
                                  "--include_path", TASKS)
    assert_one_line_error(code, err, "unknown lm-eval task")


def test_generate_until_is_transformers_greedy_cut_at_until(tiny_with_hf_tokenizer):
    """Each request's text equals transformers' greedy generation of its context alone, also in batches of 3."""
    from types import SimpleNamespace

    hf, _, folder = tiny_with_hf_tokenizer
    tok = get_tokenizer(folder)
    model = load_model(folder, "cpu", "fp32")
    contexts = ["Question: What is the capital of France?\nAnswer:", "def main(args):", "Hi", "x = [1, 2, 3]\n"
                "for i in x:\n    print(i)"]
    requests, expected = [], []
    for context in contexts:
        ids = tok.encode(context)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        full = tok.decode(ref[:min([ref.index(t) for t in tok.stop_ids if t in ref] + [len(ref)])])
        for until in (["\n"], ["e", "a"], []):
            requests.append(SimpleNamespace(args=(context, {"until": until, "max_gen_toks": 12})))
            text = full
            for u in until:
                text = text.split(u)[0]
            expected.append(text)
    for batch_size in (1, 3):
        lm = ev.lm_eval_model(model, tok, batch_size=batch_size, max_seq_length=128)
        assert lm.generate_until(requests) == expected

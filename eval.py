"""Evaluate a fastllama checkpoint: perplexity of a text file with a sliding window, or lm-eval tasks through our
model (lm_eval_model).

    python eval.py --perplexity data/perplexity.txt --checkpoint_path checkpoints/M/model_int8.pth
    python eval.py --tasks fastllama_facts --include_path tasks

Perplexity: the text is tokenized once; windows of --max_seq_length tokens start every --stride tokens,
and each window scores only the tokens no earlier window scored, so every token after the first is
predicted once, with at least max_seq_length - stride tokens of context (when the text has them).
Reference: https://huggingface.co/docs/transformers/perplexity
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import files
from checkpoint import PRECISIONS, Checkpoint, kv_dtype_name, resolve_precision
from cli import add_numerics_flags, run_cli
from files import BadFile, first_line
from generate import (
    DEFAULT_CHECKPOINT,
    compile_step,
    decode_one_token,
    generate,
    left_pad,
    load_model,
    resolve_device,
    until_stop,
)
from tokenizer import get_tokenizer


def windows(n_tokens: int, max_seq_length: int, stride: int):
    """(begin, end, first scored position) of each window over n_tokens tokens."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_seq_length, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n_tokens:
            break


@torch.no_grad()
def perplexity(model, ids: list[int], max_seq_length: int, stride: int) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of the token list ids."""
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens for a perplexity")
    if not 0 < stride <= max_seq_length:
        raise ValueError(f"--stride must be in 1..--max_seq_length ({max_seq_length}), got {stride}")
    device = model.device
    model.setup_caches(1, max_seq_length)
    nll, count = 0.0, 0
    for begin, end, first in windows(len(ids), max_seq_length, stride):
        x = torch.tensor([ids[begin:end]], device=device)
        logits = model(x, torch.arange(end - begin, device=device))[0].float()  # (T, vocab)
        pred = logits[first - begin - 1 : end - begin - 1]  # position t-1 predicts token t
        target = x[0, first - begin : end - begin]
        nll += F.cross_entropy(pred, target, reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count), count


def logits(model, x: Tensor, input_pos: Tensor) -> Tensor:
    """The model's logits (B, T, vocab) in float32: what lm-eval's scores are computed from."""
    return model(x, input_pos).float()


def lm_eval_model(model, tokenizer, *, batch_size: int = 1, max_seq_length: int = 2048, compile: bool = False):
    """Our model as an lm-eval `LM`: loglikelihood (batched), loglikelihood_rolling and generate_until.

    Tokenization follows lm-eval's own `hf` model: the tokenizer's own BOS rule, the BOS (else EOS) token
    as the context of an empty one, rolling windows of max_seq_length tokens for perplexity tasks.
    """
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM

    device = model.device
    model.setup_caches(batch_size, max_seq_length)
    score = compile_step(logits, device, dynamic=True) if compile else logits
    decode_step = compile_step(decode_one_token, device) if compile else decode_one_token

    class FastLlamaLM(TemplateLM):
        @property
        def eot_token_id(self) -> int:
            eos = tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None
            return eos if eos is not None else min(tokenizer.stop_ids)

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_id if tokenizer.bos_id is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            """None: the tokenizer's own default (BOS when its config adds one), as lm-eval's hf model does."""
            special = True if add_special_tokens is None else add_special_tokens
            return tokenizer.encode(string, add_special_tokens=special)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            """(sum of log p(continuation | context), continuation is the greedy one) per (key, ctx, cont)."""
            results = [None] * len(requests)
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            for start in range(0, len(order), batch_size):  # longest first, rows padded at the end
                rows = order[start:start + batch_size]
                seqs = [(requests[i][1] + requests[i][2])[-(max_seq_length + 1):-1] for i in rows]
                T = max(len(q) for q in seqs)
                x = torch.tensor([q + [0] * (T - len(q)) for q in seqs], device=device)  # (B, T)
                logp = F.log_softmax(score(model, x, torch.arange(T, device=device)), dim=-1)  # (B, T, vocab)
                for b, i in enumerate(rows):
                    cont = torch.tensor(requests[i][2], device=device)
                    lp = logp[b, len(seqs[b]) - cont.numel():len(seqs[b])]  # positions predicting cont
                    results[i] = (lp.gather(-1, cont[:, None]).sum().item(), bool((lp.argmax(-1) == cont).all()))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (text,) in [r.args for r in requests]:
                windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=max_seq_length, context_len=1)]
                out.append(sum(s for s, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
            return out

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy (or sampled with do_sample), cut at the first `until` string; batch_size requests at once.

            Requests with the same generation arguments are batched, longest first, left-padded (left_pad).
            """
            out = [None] * len(requests)
            groups = {}
            for i, (_, gen_kwargs) in enumerate(r.args for r in requests):
                groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
            for rows in groups.values():
                gen_kwargs = requests[rows[0]].args[1]  # the same for every request of the group
                until = gen_kwargs.get("until") or [tokenizer.decode([self.eot_token_id])]
                until = [u for u in ([until] if isinstance(until, str) else until) if u]
                max_gen = min(gen_kwargs.get("max_gen_toks", 256), max_seq_length - 1)
                temperature = gen_kwargs.get("temperature", 0.0) if gen_kwargs.get("do_sample") else 0.0
                ids = {i: self.tok_encode(requests[i].args[0])[-(max_seq_length - max_gen):] or [self.prefix_token_id]
                       for i in rows}
                rows.sort(key=lambda i: -len(ids[i]))
                for start in range(0, len(rows), batch_size):
                    batch = rows[start:start + batch_size]
                    x, key_mask = left_pad([ids[i] for i in batch], max_seq_length, device)
                    new = generate(model, x, max_gen, stop_ids=tokenizer.stop_ids, decode_step=decode_step,
                                   key_mask=key_mask, temperature=temperature, top_k=None)
                    for i, row in zip(batch, new.tolist()):
                        text = tokenizer.decode(until_stop(row, tokenizer.stop_ids))
                        for u in until:
                            text = text.split(u)[0]
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out

    return FastLlamaLM()


def task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's TaskManager for `tasks`: task YAMLs under include_path (local data, works offline), and lm-eval's own
    registry only when a task is not among them (indexing it reads thousands of YAML files, ~13 s); ValueError
    naming the tasks neither knows."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("lm-eval tasks need lm-eval: pip install lm-eval==0.4.13") from None
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown and include_path is not None and (bad := unreadable_yamls(include_path)):
        raise BadFile(bad[0][0], f"does not parse as an lm-eval task YAML ({bad[0][1]}), so task(s) "
                      f"{', '.join(unknown)} may be missing", "fix the file")
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; check the name, or give the folder of local "
                         "task YAML files")
    return manager


def unreadable_yamls(folder: Path) -> list[tuple[Path, str]]:
    """(file, problem) of each YAML file under folder that does not parse (lm-eval skips them with a warning).
    lm-eval's own tags (!function) are accepted as they are."""
    import yaml

    class Lenient(yaml.SafeLoader):
        pass

    Lenient.add_multi_constructor("!", lambda loader, suffix, node: None)
    bad = []
    for f in sorted(Path(folder).rglob("*.yaml")):
        try:
            yaml.load(f.read_text(), Lenient)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            bad.append((f, first_line(e)))
    return bad


def task_texts(tasks: list[str], include_path: Path | None, limit: int) -> list[str]:
    """Up to `limit` documents (prompt and answer) of lm-eval tasks, as text (GPTQ calibrates on them)."""
    from lm_eval.tasks import get_task_dict

    def leaves(d):  # groups nest their tasks in dicts
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    texts = []
    for task in leaves(get_task_dict(tasks, task_manager(tasks, include_path))):
        split = next(s for s in ("validation", "test", "training") if getattr(task, f"has_{s}_docs")())
        for doc in getattr(task, f"{split}_docs")():
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
                target = task.doc_to_choice(doc)[target]
            texts.append(f"{task.doc_to_text(doc)}{task.config.target_delimiter}{target}")
            if len(texts) >= limit:
                return texts
    return texts


def run_tasks(lm, tasks: list[str], include_path: Path | None, limit: int | None, log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on an LM; local task YAMLs from include_path work offline."""
    import lm_eval

    manager = task_manager(tasks, include_path)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=log_samples)


def main(*, checkpoint_path: Path = DEFAULT_CHECKPOINT, perplexity_file: Path | None = None,
         tasks: str | None = None, include_path: Path | None = None, limit: int | None = None,
         batch_size: int = 1, compile: bool = False, max_seq_length: int | None = None, stride: int | None = None,
         device: str | None = None, precision: str = "auto", quant_activations: str = "auto",
         kv_dtype: str = "auto") -> dict:
    """Print and return the perplexity of perplexity_file and / or the lm-eval results of tasks."""
    if perplexity_file is None and not tasks:
        raise ValueError("nothing to evaluate; pass --perplexity FILE and/or --tasks NAMES")
    if perplexity_file is not None and not Path(perplexity_file).is_file():
        raise FileNotFoundError(f"--perplexity file {perplexity_file} not found")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path} is not a folder of lm-eval task YAML files")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError("--batch_size and --limit must be at least 1")
    ckpt, dev = Checkpoint.open(checkpoint_path), resolve_device(device)
    precision = resolve_precision(precision, ckpt.quantization, dev)
    model = load_model(ckpt, dev, precision, quant_activations=quant_activations, kv_dtype=kv_dtype)
    tokenizer = get_tokenizer(ckpt.folder)
    seq = max_seq_length or min(model.config.block_size, 1024 if perplexity_file else 2048)
    out = {}
    if perplexity_file is not None:
        ids = tokenizer.encode(files.read_text(perplexity_file, "perplexity text"))
        ppl, n = perplexity(model, ids, seq, stride or seq // 2)
        print(f"perplexity {ppl:.4f} over {n} tokens of {perplexity_file} ({checkpoint_path}, {precision}, "
              f"{kv_dtype_name(model)} KV cache, window {seq}, stride {stride or seq // 2})")
        out["perplexity"] = ppl
    if tasks:
        try:
            from lm_eval.utils import make_table
        except ImportError:
            raise ValueError("--tasks needs lm-eval: pip install lm-eval==0.4.13") from None
        lm = lm_eval_model(model, tokenizer, batch_size=batch_size, max_seq_length=seq, compile=compile)
        results = run_tasks(lm, [t for t in tasks.split(",") if t], include_path, limit)
        print(make_table(results))
        out["results"] = results["results"]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a fastllama checkpoint: perplexity of a text, lm-eval tasks.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="model .pth or its folder")
    p.add_argument("--perplexity", dest="perplexity_file", type=Path, default=None, help="text file to score")
    p.add_argument("--tasks", type=str, default=None, help="lm-eval task names, comma-separated")
    p.add_argument("--include_path", type=Path, default=None, help="folder of local lm-eval task YAMLs (e.g. tasks/)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--batch_size", type=int, default=1, help="sequences scored or generated together")
    p.add_argument("--compile", action="store_true", help="torch.compile scoring and decoding")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="window length (default: min(context, 1024) for --perplexity, 2048 for tasks)")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity: tokens between window starts (default: half a window)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="activations dtype (auto: bf16; fp32 for int8 / int4 checkpoints on a CPU)")
    add_numerics_flags(p)
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())

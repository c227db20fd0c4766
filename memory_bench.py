"""Peak memory, measured beside memory.py's estimate of it: `benchmark.py --memory` prints the table.

Each precision's cases run in a fresh process (this file with a JSON spec as its one argument): load the checkpoint
on the CPU, then for each (rows, context), smallest first, fill a KV cache of that size, run one decode step of every
row and one prefill chunk, and read the process's peak resident memory (VmHWM, started again before each case).
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench_files import activations_of, checkpoint_for
from checkpoint import Checkpoint
from generate import decode_rows, load_model
from huge_pages import release_freed_memory
from memory import Sizer, peak_memory_bytes

REPLY = "@@memory "  # marks a case process's answer among whatever else its libraries print


def reset_peak() -> bool:
    """Start the process's peak resident memory (VmHWM) again from what it holds now (Linux /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_cases(spec: dict) -> list[dict]:
    """In a fresh process: load spec's checkpoint and precision on the CPU; then, for each (rows, context) of spec's
    cases, smallest first: fill a KV cache of that size (every page written), run one decode step of every row at its
    last position and one prefill chunk, and free it. Each case's measured peak is the larger of the load's peak and
    that case's own (VmHWM started again before it), beside memory.py's estimate of it."""
    dev, chunk = torch.device("cpu"), spec["chunk"]
    ckpt = Checkpoint.open(checkpoint_for(Path(spec["checkpoint"]), spec["precision"]))
    precision = activations_of(spec["precision"], ckpt, dev)
    model = load_model(ckpt, dev, precision)
    load_peak, sizer, out = peak_memory_bytes(dev), Sizer.of(ckpt, precision, dev), []
    for rows, context in sorted(spec["cases"], key=lambda c: c[0] * c[1]):
        if not reset_peak() and out:
            raise RuntimeError("cannot measure several cases in one process here (no /proc/self/clear_refs)")
        model.setup_caches(rows, context)
        for block in model.layers:
            block.attention.kv_cache.k_cache.fill_(0.01)
            block.attention.kv_cache.v_cache.fill_(0.01)
        with torch.no_grad():
            decode_rows(model, torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), context - 1))
            model(torch.zeros(1, chunk, dtype=torch.long), torch.arange(chunk), last_only=True, cache_row=0)
        est = sizer.at(rows, context, chunk)
        out.append({"precision": spec["precision"], "rows": rows, "context": context, "chunk": chunk,
                    "measured_bytes": max(load_peak, peak_memory_bytes(dev)), "estimate_bytes": est.total_bytes,
                    "weights_bytes": est.weights_bytes, "kv_cache_bytes": est.kv_cache_bytes})
        for block in model.layers:  # let the cache go before the next one
            block.attention.kv_cache = None
        model.max_batch_size = model.max_seq_length = -1
        release_freed_memory()
    return out


def memory_table(checkpoint: Path, precisions: list[str], rows: list[int], contexts: list[int], chunk: int = 64,
                 parallel: int = 2) -> list[dict]:
    """memory_cases for every precision x rows x context: a fresh process per precision (`parallel` at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(spec):
        cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith(REPLY)), None)
        if line is None:
            raise RuntimeError(f"memory case {spec} failed: {out.stderr.strip().splitlines()[-1:]}")
        return json.loads(line[len(REPLY):])

    for p in precisions:  # quantized checkpoints made here, not inside a measured process
        checkpoint_for(checkpoint, p)
    specs = [{"checkpoint": str(checkpoint), "precision": p, "chunk": chunk,
              "cases": [[r, c] for r in rows for c in contexts]} for p in precisions]
    with ThreadPoolExecutor(parallel) as pool:
        return [case for cases in pool.map(one, specs) for case in cases]


def print_memory_table(cases: list[dict]) -> None:
    print("| precision | rows x context | estimated peak MiB | measured peak MiB | estimate off by |")
    print("|---|---|---:|---:|---:|")
    for c in cases:
        off = c["estimate_bytes"] / c["measured_bytes"] - 1
        print(f"| {c['precision']} | {c['rows']} x {c['context']} | {c['estimate_bytes'] / 2**20:.0f} "
              f"| {c['measured_bytes'] / 2**20:.0f} | {off:+.1%} |")


if __name__ == "__main__":
    print(REPLY + json.dumps(memory_cases(json.loads(sys.argv[1]))), flush=True)

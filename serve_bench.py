"""The serving benchmark (`benchmark.py --serve`): our server and llama.cpp's on the same int4 weights, the same load.

Every request is a streamed chat completion (`stream_options.include_usage`) of a prompt from data/prompts.jsonl,
temperature 0, a seed, a fixed max_tokens and `ignore_eos` (both servers accept it), so that every answer has the
same length on both systems. A reply records when its first token came, the gap before each later token and the
usage the server reported. Load shapes: a closed loop of N clients (each sends its next request when its answer
is complete; N = 1 is one client at a time) and Poisson arrivals at a rate. Both are bounded in requests and time.
main_serve starts both servers (server.py; llama-server where found) and runs every load shape on each.
"""
import http.client
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_files import ROOT, checkpoint_for, llama_cpp_gguf, save_json
from checkpoint import Checkpoint
from generate import DEFAULT_CHECKPOINT
from memory import converter

PROMPTS = Path(__file__).resolve().with_name("data") / "prompts.jsonl"


def load_prompts(path: Path = PROMPTS) -> list[list[dict]]:
    """The chats of a JSON-lines file, one {"messages": [...]} per line; ValueError naming the file and line."""
    chats = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{i}: expected a JSON object with \"messages\"") from None
        chats.append(messages)
    if not chats:
        raise ValueError(f"{path} has no prompts")
    return chats


@dataclass
class Reply:
    """One request as the client saw it. ok: a complete answer (a [DONE] after its usage); error: an HTTP error or a
    broken stream (a failed request); neither: no complete answer came (a dropped request)."""
    start: float
    ok: bool = False
    error: str | None = None
    first: float | None = None  # seconds from sending to the first token
    gaps: list[float] = field(default_factory=list)  # seconds between tokens after the first
    end: float | None = None  # seconds from sending to the end of the answer
    completion_tokens: int = 0
    prompt_tokens: int = 0


def chat(port: int, messages: list[dict], max_tokens: int, seed: int, timeout: float = 300.0) -> Reply:
    """One streamed chat completion from the server on 127.0.0.1:port."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "seed": seed, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    reply, t0 = Reply(time.time()), time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            reply.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return reply
        last = None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                reply.ok = reply.end is not None
                break
            chunk = json.loads(line[6:])
            now = time.perf_counter() - t0
            if chunk.get("usage"):
                reply.completion_tokens = chunk["usage"]["completion_tokens"]
                reply.prompt_tokens = chunk["usage"]["prompt_tokens"]
                reply.end = now
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices") or []):
                if last is None:
                    reply.first = now
                else:
                    reply.gaps.append(now - last)
                last = now
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        reply.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return reply


def closed_loop(port: int, prompts: list, clients: int, requests: int, max_tokens: int,
                time_limit: float = 600.0) -> tuple[list[Reply], float]:
    """`clients` threads, each sending its next request when its answer is done, `requests` in all (or until
    time_limit): (replies, wall seconds)."""
    replies, lock, counter = [], threading.Lock(), iter(range(requests))
    t0 = time.perf_counter()

    def client():
        while time.perf_counter() - t0 < time_limit:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            r = chat(port, prompts[i % len(prompts)], max_tokens, seed=i)
            with lock:
                replies.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies, time.perf_counter() - t0


def poisson(port: int, prompts: list, rate: float, requests: int, max_tokens: int, seed: int = 0,
            time_limit: float = 600.0) -> tuple[list[Reply], float]:
    """`requests` requests arriving at exponential gaps of mean 1 / rate seconds, each on its own thread."""
    gen, replies, lock, threads = random.Random(seed), [], threading.Lock(), []
    t0 = time.perf_counter()

    def send(i):
        r = chat(port, prompts[i % len(prompts)], max_tokens, seed=i)
        with lock:
            replies.append(r)

    for i in range(requests):
        if time.perf_counter() - t0 > time_limit:
            break
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
        time.sleep(gen.expovariate(rate))
    for t in threads:
        t.join()
    return replies, time.perf_counter() - t0


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if len(values) > 1 else values[0]


def summarize(replies: list[Reply], wall: float) -> dict:
    """Requests/min and output tokens/s over the load's wall time; time to first token, time per output token
    (after the first), inter-token latency and end-to-end latency at p50 / p90 / p99 in seconds; failed (an error)
    and dropped (no complete answer) requests."""
    done = [r for r in replies if r.ok]
    tokens = sum(r.completion_tokens for r in done)
    out = {"requests": len(replies), "completed": len(done), "failed": sum(r.error is not None for r in replies),
           "dropped": sum(not r.ok and r.error is None for r in replies), "wall_s": wall,
           "requests_per_min": len(done) / wall * 60, "output_tok_s": tokens / wall,
           "prompt_tokens": sum(r.prompt_tokens for r in done), "completion_tokens": tokens}
    series = {"ttft": [r.first for r in done if r.first is not None],
              "tpot": [(r.end - r.first) / (r.completion_tokens - 1) for r in done if r.completion_tokens > 1],
              "itl": [g for r in done for g in r.gaps], "e2e": [r.end for r in done]}
    for name, values in series.items():
        for p in (50, 90, 99):
            out[f"{name}_p{p}_s"] = percentile(values, p)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a child process on 127.0.0.1:port, its output in a temporary file; ready() waits for
    GET /health to answer 200; stop() ends it."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None):
        self.cmd, self.port = [str(c) for c in cmd], port
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def ready(self, timeout: float = 600.0) -> "ServerProcess":
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{Path(self.cmd[1]).name if len(self.cmd) > 1 else self.cmd[0]} exited with "
                                   f"{self.proc.returncode}: {self.output()[-400:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.cmd[0]} did not become ready within {timeout:.0f} s")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def loads(clients: list[int], rate: float | None) -> list[tuple[str, str, float]]:
    """The load shapes: (label, kind, value) for each closed-loop client count and the Poisson rate."""
    shapes = [(f"{c} client{'s' if c > 1 else ''}", "closed", c) for c in clients]
    return shapes + ([(f"Poisson {rate:g}/s", "poisson", rate)] if rate else [])


def run(servers: dict[str, int], shapes: list, prompts: list, requests: int, max_tokens: int,
        time_limit: float = 600.0) -> list[dict]:
    """Each load shape on every server (name -> port), the servers alternating which goes first from one shape to
    the next; one warm-up request per server first. Rows: {"system", "load", ...summarize()}."""
    for port in servers.values():
        chat(port, prompts[0], max_tokens, seed=0)
    rows, names = [], list(servers)
    for k, (label, kind, value) in enumerate(shapes):
        for name in names if k % 2 == 0 else names[::-1]:
            if kind == "closed":
                replies, wall = closed_loop(servers[name], prompts, int(value), requests, max_tokens, time_limit)
            else:
                replies, wall = poisson(servers[name], prompts, value, requests, max_tokens, time_limit=time_limit)
            rows.append({"system": name, "load": label, **summarize(replies, wall)})
    return rows


def print_table(rows: list[dict], max_tokens: int, requests: int) -> None:
    """One line per load, the systems side by side: requests/min, output tokens/s, time to first token p50 / p99,
    time per output token p50, end-to-end p90; failed + dropped."""
    systems = list(dict.fromkeys(r["system"] for r in rows))
    print(f"\n{requests} chat requests per load, {max_tokens} output tokens each, temperature 0; "
          f"{' / '.join(systems)}\n")
    print("| load | requests/min | output tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | E2E p90 s | failed+dropped |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(load, key, fmt, scale=1.0):
        vals = [next((r for r in rows if r["system"] == s and r["load"] == load), {}).get(key) for s in systems]
        return " / ".join("-" if v is None else format(v * scale, fmt) for v in vals)

    for load in dict.fromkeys(r["load"] for r in rows):
        bad = " / ".join(str(r["failed"] + r["dropped"]) for s in systems for r in rows
                         if r["system"] == s and r["load"] == load)
        print(f"| {load} | {cell(load, 'requests_per_min', '.0f')} | {cell(load, 'output_tok_s', '.0f')} "
              f"| {cell(load, 'ttft_p50_s', '.2f')} | {cell(load, 'ttft_p99_s', '.2f')} "
              f"| {cell(load, 'tpot_p50_s', '.0f', 1e3)} | {cell(load, 'e2e_p90_s', '.1f')} | {bad} |")


# ---- the driver: our server and llama.cpp's on the same int4 weights ------------------------------------------

def serving_files(checkpoint: Path, gguf: Path | None) -> tuple[Path, Path | None]:
    """(our int4 weights, the GGUF of the same weights for llama-server, or None). A folder made from a Q4_1 GGUF
    keeps the file's own blocks as model_gguf.pth: we serve those, llama-server the GGUF (`gguf`, or for the default
    model the cached one). Any other checkpoint serves quantize.py's int4 beside llama.cpp's Q4_1 made from its float
    weights (that needs llama-cpp-python; without it, llama-server is left out)."""
    weights = Checkpoint.open(checkpoint).weights
    own = weights.with_name("model_gguf.pth")
    if own.is_file() and (gguf is not None or weights.parent.resolve() == (ROOT / DEFAULT_CHECKPOINT).parent.resolve()):
        return own, gguf or converter("default_model").fetch_gguf()
    try:
        return checkpoint_for(weights, "int4"), gguf or llama_cpp_gguf(weights, "int4")
    except ImportError:
        return checkpoint_for(weights, "int4"), None


def main_serve(checkpoint: Path, clients: list[int], rate: float | None, requests: int, max_new_tokens: int, rows: int,
               context: int, prompts: Path, compile: bool, llama_server: str | None, gguf: Path | None,
               json_path: Path | None, threads: int) -> list:
    """Start server.py (and llama-server, where found) on the same int4 weights, run every load shape on both."""
    chats = load_prompts(prompts)
    ours, gguf = serving_files(checkpoint, gguf)
    binary = shutil.which(llama_server or "llama-server") if llama_server != "" else None
    if llama_server and binary is None:
        raise ValueError(f"--llama_server {llama_server!r} not found; build it as docs/benchmarks.md says")
    started = {}
    try:
        port = free_port()
        started["fastllama"] = ServerProcess(
            [sys.executable, ROOT / "server.py", "--checkpoint_path", ours, "--rows", rows, "--context", context,
             "--port", port] + (["--compile"] if compile else []), port)
        if binary and gguf:
            port = free_port()
            started["llama.cpp"] = ServerProcess(
                [binary, "-m", gguf, "--parallel", rows, "-c", rows * context, "-t", threads,
                 "--port", port, "--host", "127.0.0.1", "--no-webui"], port)
        for s in started.values():
            s.ready()
        shapes = loads(clients, rate)
        rows_out = run({k: s.port for k, s in started.items()}, shapes, chats, requests, max_new_tokens)
    finally:
        for s in started.values():
            s.stop()
    print_table(rows_out, max_new_tokens, requests)
    if json_path is not None:
        save_json(json_path, rows_out)
    return rows_out

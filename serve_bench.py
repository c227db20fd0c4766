"""The serving benchmark (`benchmark.py --serve`): our server and llama.cpp's on the same weights, the same load.

Every request is a streamed chat completion (`stream_options.include_usage`), temperature 0, a seed, a fixed
max_tokens and `ignore_eos` (both servers accept it), so that every answer has the same length on both systems. The
prompts come in two sets: "chat", the questions of data/prompts.jsonl (4-370 tokens), and "long", requests to
summarize 256-2048 tokens of the texts in data/ (long_prompts). A reply records when its first token came, the gap
before each later token and the usage the server reported. Load shapes: a closed loop of N clients (each sends its
next request when its answer is complete; N = 1 is one client at a time), Poisson arrivals at a rate, and one
request at a time arriving while N others decode (arrivals: its first token's time is what a new user waits while
the server is busy). All are bounded in requests and time. main_serve starts both servers (server.py; llama-server
where found) on each precision's weights and runs every load shape of every prompt set on each.
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
from typing import Callable

from bench_files import ROOT, checkpoint_for, is_fresh, llama_cpp_gguf, save_json
from checkpoint import Checkpoint
from generate import DEFAULT_CHECKPOINT
from memory import converter

PROMPTS = Path(__file__).resolve().with_name("data") / "prompts.jsonl"
TEXTS = [PROMPTS.with_name("perplexity.txt"), PROMPTS.with_name("calibration.txt")]  # long_prompts' source
PROMPT_SETS = ("chat", "long")


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


def long_prompts(folder: Path, n: int = 32, shortest: int = 256, longest: int = 2048,
                 seed: int = 0) -> list[list[dict]]:
    """n chats, each asking for a summary of a window of the data/ texts: windows of shortest..longest tokens of the
    checkpoint's tokenizer, their lengths evenly spread over the range and shuffled, starting at random places."""
    from tokenizer import get_tokenizer

    tok, gen = get_tokenizer(folder), random.Random(seed)
    ids = tok.encode("\n".join(p.read_text() for p in TEXTS), add_special_tokens=False)
    assert len(ids) > longest, "the data/ texts are shorter than the longest prompt"
    lengths = [shortest + (longest - shortest) * i // max(n - 1, 1) for i in range(n)]
    gen.shuffle(lengths)
    chats = []
    for length in lengths:
        start = gen.randrange(len(ids) - length)
        text = tok.decode(ids[start:start + length])
        chats.append([{"role": "user", "content": f"Summarize this text in a few sentences.\n\n{text}"}])
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


def chat(port: int, messages: list[dict], max_tokens: int, seed: int, timeout: float = 300.0,
         on_first: Callable[[], None] | None = None) -> Reply:
    """One streamed chat completion from the server on 127.0.0.1:port; on_first() is called at its first token."""
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
                    if on_first is not None:
                        on_first()
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


def arrivals(port: int, prompts: list, busy: int, requests: int, max_tokens: int,
             time_limit: float = 600.0) -> tuple[list[Reply], float]:
    """`requests` requests one after another (prompts[:requests]), each sent while `busy` other clients decode (closed
    loops of answers 4 x max_tokens long on the prompts after those, started first; each request waits until all of
    them have their first token): the requests' replies (not the busy clients') and the wall time."""
    stop, lock, decoding, replies = threading.Event(), threading.Lock(), set(), []
    t0 = time.perf_counter()

    def client(k):
        j = 0
        while not stop.is_set() and time.perf_counter() - t0 < time_limit:
            chat(port, prompts[requests + (k + busy * j) % (len(prompts) - requests)], 4 * max_tokens,
                 seed=1000 + k, on_first=lambda: decoding.add(k))
            j += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(busy)]
    for t in threads:
        t.start()
    try:
        for i in range(requests):
            while len(decoding) < busy and time.perf_counter() - t0 < time_limit:
                time.sleep(0.01)
            if time.perf_counter() - t0 > time_limit:
                break
            r = chat(port, prompts[i % len(prompts)], max_tokens, seed=i)
            with lock:
                replies.append(r)
    finally:
        stop.set()
        wall = time.perf_counter() - t0
        for t in threads:
            t.join()
    return replies, wall


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


def loads(clients: list[int], rate: float | None, busy: int | None = None) -> list[tuple[str, str, float]]:
    """The load shapes: (label, kind, value) for each closed-loop client count, the Poisson rate, and requests
    arriving while `busy` others decode."""
    shapes = [(f"{c} client{'s' if c > 1 else ''}", "closed", c) for c in clients]
    shapes += [(f"Poisson {rate:g}/s", "poisson", rate)] if rate else []
    return shapes + ([(f"1 arriving, {busy} decoding", "arrivals", busy)] if busy else [])


def run(servers: dict[str, int], shapes: list, prompt_sets: dict[str, list], requests: int, max_tokens: int,
        time_limit: float = 600.0) -> list[dict]:
    """Each load shape with each prompt set on every server (name -> port), the servers alternating which goes first
    from one load to the next; one warm-up request per server first. Each load takes the next prompts of its set
    (both systems the same ones), so that no prompt comes again before the set is used up: a server that caches
    earlier prompts (llama-server keeps 8 GiB of them in RAM) is measured computing them, as on distinct requests.
    Rows: {"system", "prompts", "load", ...summarize()}."""
    for port in servers.values():
        chat(port, [{"role": "user", "content": "Hello!"}], max_tokens, seed=0)
    rows, names, k = [], list(servers), 0
    for set_name, chats in prompt_sets.items():
        cursor = 0
        for label, kind, value in shapes:
            need = requests + (int(value) * 8 if kind == "arrivals" else 0)  # busy clients' answers: ~8 each at most
            prompts = [chats[(cursor + i) % len(chats)] for i in range(need)]
            cursor += need
            for name in names if k % 2 == 0 else names[::-1]:
                port = servers[name]
                if kind == "closed":
                    replies, wall = closed_loop(port, prompts, int(value), requests, max_tokens, time_limit)
                elif kind == "poisson":
                    replies, wall = poisson(port, prompts, value, requests, max_tokens, time_limit=time_limit)
                else:
                    replies, wall = arrivals(port, prompts, int(value), requests, max_tokens, time_limit)
                rows.append({"system": name, "prompts": set_name, "load": label, **summarize(replies, wall)})
            k += 1
    return rows


def print_table(rows: list[dict], max_tokens: int, requests: int) -> None:
    """One line per prompt set and load, the systems side by side: requests/min, output tokens/s, time to first token
    p50 / p99, inter-token latency p50 / p90, end-to-end p90; failed + dropped."""
    systems = list(dict.fromkeys(r["system"] for r in rows))
    print(f"\n{requests} chat requests per load, {max_tokens} output tokens each, temperature 0; "
          f"{' / '.join(systems)}\n")
    print("| prompts | load | requests/min | output tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p90 ms "
          "| E2E p90 s | failed+dropped |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cell(load, key, fmt, scale=1.0):
        vals = [next((r for r in rows if r["system"] == s and (r["prompts"], r["load"]) == load), {}).get(key)
                for s in systems]
        return " / ".join("-" if v is None else format(v * scale, fmt) for v in vals)

    for load in dict.fromkeys((r["prompts"], r["load"]) for r in rows):
        bad = " / ".join(str(r["failed"] + r["dropped"]) for s in systems for r in rows
                         if r["system"] == s and (r["prompts"], r["load"]) == load)
        print(f"| {load[0]} | {load[1]} | {cell(load, 'requests_per_min', '.0f')} "
              f"| {cell(load, 'output_tok_s', '.0f')} | {cell(load, 'ttft_p50_s', '.2f')} "
              f"| {cell(load, 'ttft_p99_s', '.2f')} | {cell(load, 'itl_p50_s', '.0f', 1e3)} "
              f"| {cell(load, 'itl_p90_s', '.0f', 1e3)} | {cell(load, 'e2e_p90_s', '.1f')} | {bad} |")


# ---- the driver: our server and llama.cpp's on the same weights ----------------------------------------------

SERVE_PRECISIONS = {"int4": "Q4_1", "int8": "Q8_0"}  # what --serve runs: GGUF blocks both servers read


def serving_files(checkpoint: Path, gguf: Path | None, precision: str = "int4") -> tuple[Path, Path | None]:
    """(our weights, the GGUF of the same weights for llama-server, or None) for a precision of SERVE_PRECISIONS.
    int4: a folder made from a Q4_1 GGUF keeps the file's own blocks as model_gguf.pth: we serve those, llama-server
    the GGUF (`gguf`, or for the default model the cached one); any other folder serves quantize.py's int4 beside
    llama.cpp's Q4_1 made from its float weights. int8: llama.cpp's Q8_0 of the float weights, which both serve (ours
    imported by the GGUF converter into gguf/<name>/). Without llama-cpp-python (which makes those GGUFs) llama-server
    is left out, and int8 cannot run."""
    weights = Checkpoint.open(checkpoint).weights
    own = weights.with_name("model_gguf.pth")
    if precision == "int4" and own.is_file() and (
            gguf is not None or weights.parent.resolve() == (ROOT / DEFAULT_CHECKPOINT).parent.resolve()):
        return own, gguf or converter("default_model").fetch_gguf()
    try:
        made = gguf or llama_cpp_gguf(weights, precision)
    except ImportError:
        if precision != "int4":
            raise ValueError(f"--serve --precisions {precision} needs llama-cpp-python (it makes the GGUF both serve)")
        return checkpoint_for(weights, "int4"), None
    if precision == "int4":
        return checkpoint_for(weights, "int4"), made
    folder = made.with_suffix("")
    if not is_fresh(folder / "model_gguf.pth", made):
        converter("convert_gguf").convert_gguf(made, folder)
    return folder / "model_gguf.pth", made


def main_serve(checkpoint: Path, precisions: list[str], prompt_sets: list[str], clients: list[int], rate: float | None,
               requests: int, max_new_tokens: int, rows: int, context: int, prompts: Path, compile: bool,
               llama_server: str | None, gguf: Path | None, json_path: Path | None, threads: int,
               server_flags: list[str] = ()) -> list:
    """For each precision, start server.py (with server_flags; llama-server, where found, with its defaults) on the
    same weights and run every load shape of every prompt set on both."""
    bad = [p for p in precisions if p not in SERVE_PRECISIONS] + [s for s in prompt_sets if s not in PROMPT_SETS]
    if bad or not precisions or not prompt_sets:
        raise ValueError(f"--serve runs precisions {', '.join(SERVE_PRECISIONS)} and prompt sets "
                         f"{', '.join(PROMPT_SETS)}; got {bad or 'none'}")
    binary = shutil.which(llama_server or "llama-server") if llama_server != "" else None
    if llama_server and binary is None:
        raise ValueError(f"--llama_server {llama_server!r} not found; build it as docs/benchmarks.md says")
    folder = Checkpoint.open(checkpoint).folder
    sets = {"chat": lambda: load_prompts(prompts), "long": lambda: long_prompts(folder, 256)}
    chats = {name: sets[name]() for name in prompt_sets}
    rows_out = []
    for precision in precisions:
        ours, weights_gguf = serving_files(checkpoint, gguf if precision == "int4" else None, precision)
        started = {}
        try:
            port = free_port()
            started["fastllama"] = ServerProcess(
                [sys.executable, ROOT / "server.py", "--checkpoint_path", ours, "--rows", rows, "--context", context,
                 "--port", port, *server_flags] + (["--compile"] if compile else []), port)
            if binary and weights_gguf:
                port = free_port()
                started["llama.cpp"] = ServerProcess(
                    [binary, "-m", weights_gguf, "--parallel", rows, "-c", rows * context, "-t", threads,
                     "--port", port, "--host", "127.0.0.1", "--no-webui"], port)
            for s in started.values():
                s.ready()
            shapes = loads(clients, rate, rows - 1 if rows > 1 else None)
            out = run({k: s.port for k, s in started.items()}, shapes, chats, requests, max_new_tokens)
            rows_out += [{"precision": precision, **r} for r in out]
        finally:
            for s in started.values():
                s.stop()
        print(f"\n{precision} ({SERVE_PRECISIONS[precision]} blocks): {ours} / {weights_gguf}")
        print_table([r for r in rows_out if r["precision"] == precision], max_new_tokens, requests)
    if json_path is not None:
        save_json(json_path, rows_out)
    return rows_out

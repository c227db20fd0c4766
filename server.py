"""An OpenAI-compatible HTTP server over the batching engine (engine.py): many clients, one model.

    python server.py --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct [--rows 8] [--compile]
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

Endpoints: POST /v1/completions and /v1/chat/completions (server-sent events with "stream": true), GET /v1/models,
GET /health (503 while loading or compiling), GET /metrics (Prometheus), POST /tokenize, POST /detokenize. The API
is protocol.py's; this file only translates HTTP to engine calls and back. Errors have OpenAI's shape: 400 for bad
input, 404 for an unknown model, 503 with Retry-After when the queue is full.
"""
import argparse
import asyncio
import json
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

import layers
import protocol as api
import tp
from checkpoint import PRECISIONS, Checkpoint, kv_dtype_name, resolve_precision
from cli import add_numerics_flags, run_cli
from engine import PREFILL_BUDGET, Engine, Metrics, Output, QueueFull, Sampling
from engine import Request as EngineRequest
from generate import (
    DEFAULT_CHECKPOINT,
    compile_decode_rows,
    decode_rows,
    load_model,
    resolve_device,
)
from kernels import GEMV_MAX_ROWS
from memory import DEFAULT_CONTEXT, Sizer, available_bytes, plan
from model import fit_context
from tokenizer import Tokenizer, get_tokenizer


class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(e: APIError) -> JSONResponse:
    body = api.ErrorResponse(error=api.ErrorBody(message=e.message, type=e.kind, param=e.param,
                                                 code=str(e.status)))
    return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


ERRORS = {code: {"model": api.ErrorResponse} for code in (400, 404, 503)}


@dataclass
class Served:
    """What the app serves once loaded: the engine and how to read its text."""
    engine: Engine
    tokenizer: Tokenizer
    name: str


# ---- HTTP <-> engine --------------------------------------------------------------------------------------

def encode_prompts(served: Served, prompt) -> list[list[int]]:
    """The token ids of each prompt of a completions request; 400 for an empty prompt or an unknown token id."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    out = [served.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    vocab = served.engine.model.config.vocab_size
    for ids in out:
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"the prompt has a token id outside the vocabulary (0..{vocab - 1})", "prompt")
    return out


def encode_chat(served: Served, messages: list[api.ChatMessage]) -> list[int]:
    """The token ids of a conversation in the model's chat template, with the assistant's turn opened."""
    try:
        text = served.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages])
    except Exception as e:  # the template's own checks (raise_exception) and Jinja errors are the request's fault
        raise APIError(400, f"the messages do not fit the model's chat template: {e}", "messages") from None
    ids = served.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError(400, "the model's chat template makes nothing of these messages", "messages")
    return ids


def sampling_for(served: Served, body, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                 choice: int) -> Sampling:
    """The engine's Sampling for one choice of a request: max_tokens clipped to the context (fit_context: 400 when
    the prompt alone does not fit), a seed of its own for each choice."""
    context = served.engine.context
    try:
        n = fit_context(prompt_len, max_tokens or context, context)
    except ValueError as e:
        raise APIError(400, str(e), "messages" if hasattr(body, "messages") else "prompt") from None
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Sampling(max_tokens=n, temperature=body.temperature, top_k=body.top_k if (body.top_k or 0) > 0 else None,
                    top_p=body.top_p if body.top_p < 1 else None,
                    seed=None if body.seed is None else body.seed + choice, stop=tuple(stops),
                    stop_token_ids=frozenset(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                    min_tokens=min(body.min_tokens, n), logprobs=logprobs)


class Choice:
    """One choice as it arrives from the engine."""

    def __init__(self, request: EngineRequest):
        self.request, self.text, self.logprobs, self.finish_reason = request, "", [], None

    def add(self, out: Output) -> None:
        self.text += out.text
        self.logprobs += out.logprobs
        self.finish_reason = out.finish_reason


def submit(served: Served, prompts: list[list[int]], samplings: list[list[Sampling]]):
    """One engine request per (prompt, choice), submitted before any response starts (so that a full queue is a
    503); returns the choices and the asyncio.Queue their outputs arrive on as (index, Output)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    choices = []
    for ids, per_prompt in zip(prompts, samplings):
        for sp in per_prompt:
            put = lambda out, i=len(choices): loop.call_soon_threadsafe(queue.put_nowait, (i, out))  # noqa: E731
            choices.append(Choice(EngineRequest(ids, sp, put)))
    try:
        served.engine.submit([c.request for c in choices])
    except QueueFull as e:
        raise APIError(503, f"the server is busy ({e}); retry later", kind="server_busy",
                       headers={"Retry-After": "1"}) from None
    return choices, queue


async def collect(http: Request, choices: list[Choice], queue: asyncio.Queue,
                  on_output: Callable | None = None) -> list[Choice]:
    """Wait until every choice has finished, calling on_output(index, Output) as outputs arrive. A client that goes
    away cancels its requests (they leave their rows at the engine's next iteration), and so does any error here."""
    try:
        left = len(choices)
        while left:
            try:
                index, out = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise APIError(499, "the client closed the request") from None
                continue
            if out.finish_reason == "error":
                raise APIError(500, f"the engine failed: {out.text}", kind="server_error")
            choices[index].add(out)
            left -= out.finish_reason is not None
            if on_output is not None:
                await on_output(index, out)
        return choices
    finally:
        for c in choices:
            if c.finish_reason is None:
                c.request.cancel()


def usage(choices: list[Choice], prompts: list[list[int]], n: int) -> api.Usage:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.request.generated) for c in choices)
    cached = sum(choices[i * n].request.cached_tokens for i in range(len(prompts)))
    return api.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=api.PromptTokensDetails(cached_tokens=cached))


def completion_logprobs(entries: list[dict], start: int = 0) -> api.CompletionLogprobs:
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return api.CompletionLogprobs(tokens=[e["token"] for e in entries], token_logprobs=[e["logprob"] for e in entries],
                                  top_logprobs=[{t: lp for t, _, lp in e["top"]} for e in entries], text_offset=offsets)


def chat_logprobs(entries: list[dict]) -> api.ChatLogprobs:
    def top(token, lp):
        return api.TopLogprob(token=token, logprob=lp, bytes=list(token.encode()))
    return api.ChatLogprobs(content=[api.TokenLogprob(**top(e["token"], e["logprob"]).model_dump(),
                                                      top_logprobs=[top(t, lp) for t, _, lp in e["top"]])
                                     for e in entries])


def sse(obj) -> str:
    """One server-sent event of a chunk, shaped as OpenAI's: no usage but in the usage chunk, a delta with only what
    it carries."""
    data = obj.model_dump(mode="json")
    if data.get("usage") is None:
        data.pop("usage", None)
    for choice in data["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(data)}\n\n"


# ---- the app ------------------------------------------------------------------------------------------------

def create_app(state: dict) -> FastAPI:
    """The FastAPI app over what state["served"] holds once the model is loaded (until then every endpoint, /health
    included, is 503). The engine runs elsewhere (main: the main thread); the app only submits to it."""
    app = FastAPI(title="fastllama", version="1")

    def ready() -> Served:
        if "served" not in state:
            raise APIError(503, "the model is loading; retry shortly", kind="server_busy", headers={"Retry-After": "1"})
        return state["served"]

    def check_model(served: Served, name: str | None) -> None:
        if name is not None and name != served.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served.name!r}", "model",
                           kind="model_not_found")

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
        return error_response(APIError(400, message, loc[0] if loc else None))

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        return error_response(APIError(e.status_code, str(e.detail), kind="invalid_request_error"))

    @app.get("/health", responses={503: {"model": api.ErrorResponse}})
    def health() -> dict:
        ready()
        return {"status": "ok"}

    @app.get("/v1/models", responses=ERRORS)
    def models() -> api.ModelList:
        served = ready()
        return api.ModelList(data=[api.ModelCard(id=served.name, created=int(time.time()),
                                                 max_model_len=served.engine.context)])

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
    def metrics() -> str:
        served = ready()
        return prometheus(served.engine.metrics, *served.engine.counts())

    @app.post("/tokenize", responses=ERRORS)
    def tokenize(body: api.TokenizePrompt | api.TokenizeChat) -> api.TokenizeResponse:
        served = ready()
        check_model(served, body.model)
        if isinstance(body, api.TokenizeChat):
            ids = encode_chat(served, body.messages)
        else:
            ids = served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return api.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=served.engine.context)

    @app.post("/detokenize", responses=ERRORS)
    def detokenize(body: api.DetokenizeRequest) -> api.DetokenizeResponse:
        served = ready()
        check_model(served, body.model)
        vocab = served.engine.model.config.vocab_size
        if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= vocab):
            raise APIError(400, f"a token id is outside the vocabulary (0..{vocab - 1})", "tokens")
        return api.DetokenizeResponse(prompt=served.tokenizer.decode(body.tokens))

    event = {"type": "object", "required": ["data"],  # each server-sent event: a chunk (JSON) or [DONE]
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
    stream_200 = {200: {"content": {"text/event-stream": {"schema": event}}}}

    @app.post("/v1/completions", responses={**ERRORS, **stream_200})
    async def completions(body: api.CompletionRequest, http: Request) -> api.CompletionResponse:
        served = ready()
        check_model(served, body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        prompts = encode_prompts(served, body.prompt)
        samplings = [[sampling_for(served, body, len(p), body.max_tokens, body.logprobs, i * body.n + j)
                      for j in range(body.n)] for i, p in enumerate(prompts)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices, queue = submit(served, prompts, samplings)
        if not body.stream:
            await collect(http, choices, queue)
            return api.CompletionResponse(id=rid, created=created, model=served.name, usage=usage(
                choices, prompts, body.n), choices=[api.CompletionChoice(
                    index=i, text=c.text, finish_reason=c.finish_reason,
                    logprobs=completion_logprobs(c.logprobs) if body.logprobs is not None else None)
                    for i, c in enumerate(choices)])
        offsets = {}

        def chunk(index: int, out: Output) -> str:
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(out.logprobs, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(e["token"]) for e in out.logprobs)
            return sse(api.CompletionResponse(id=rid, created=created, model=served.name, choices=[
                api.CompletionChoice(index=index, text=out.text, logprobs=lp, finish_reason=out.finish_reason)]))

        def last(choices) -> str:
            return sse(api.CompletionResponse(id=rid, created=created, model=served.name, choices=[],
                                              usage=usage(choices, prompts, body.n)))

        return stream(http, choices, queue, chunk, last if include_usage(body) else None)

    @app.post("/v1/chat/completions", responses={**ERRORS, **stream_200})
    async def chat(body: api.ChatCompletionRequest, http: Request) -> api.ChatCompletionResponse:
        served = ready()
        check_model(served, body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        prompts = [encode_chat(served, body.messages)]
        top = (body.top_logprobs or 0) if body.logprobs else None
        samplings = [[sampling_for(served, body, len(prompts[0]), body.max_completion_tokens or body.max_tokens, top,
                                   j) for j in range(body.n)]]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choices, queue = submit(served, prompts, samplings)
        if not body.stream:
            await collect(http, choices, queue)
            return api.ChatCompletionResponse(id=rid, created=created, model=served.name, usage=usage(
                choices, prompts, body.n), choices=[api.ChatChoice(
                    index=i, message=api.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                    logprobs=chat_logprobs(c.logprobs) if top is not None else None) for i, c in enumerate(choices)])
        started = set()

        def chunk(index: int, out: Output) -> str:
            delta = api.Delta(content=out.text)
            if index not in started:  # each choice's first chunk says who speaks
                started.add(index)
                delta.role = "assistant"
            return sse(api.ChatCompletionChunk(id=rid, created=created, model=served.name, choices=[
                api.ChatChunkChoice(index=index, delta=delta, finish_reason=out.finish_reason,
                                    logprobs=chat_logprobs(out.logprobs) if top is not None else None)]))

        def last(choices) -> str:
            return sse(api.ChatCompletionChunk(id=rid, created=created, model=served.name, choices=[],
                                               usage=usage(choices, prompts, body.n)))

        return stream(http, choices, queue, chunk, last if include_usage(body) else None)

    return app


def include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def stream(http: Request, choices: list[Choice], queue: asyncio.Queue, chunk: Callable, last: Callable | None):
    """A server-sent event stream of submitted choices: a chunk per engine output, the usage chunk when asked, then
    [DONE]. A client that goes away cancels the stream and, with it, its requests."""
    events: asyncio.Queue = asyncio.Queue()

    async def on_output(index, out):
        await events.put(chunk(index, out))

    async def produce():
        try:
            await collect(http, choices, queue, on_output)
            if last is not None:
                await events.put(last(choices))
        except Exception as e:  # after the stream started, an error can only be an event
            message = e.message if isinstance(e, APIError) else f"{type(e).__name__}: {e}"
            await events.put(f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n")
        await events.put(None)

    async def body():
        task = asyncio.ensure_future(produce())
        try:
            while (event := await events.get()) is not None:
                yield event
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): its requests leave the engine
            task.cancel()

    return StreamingResponse(body(), media_type="text/event-stream")


def prometheus(m: Metrics, running: int, waiting: int) -> str:
    """The metrics in Prometheus' text format."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP fastllama_{name} {help_}", f"# TYPE fastllama_{name} {kind}"])
        lines.extend(f"fastllama_{name}{labels} {value}" for labels, value in samples)

    metric("requests_running", "gauge", "Requests that own a row of the KV cache.", [("", running)])
    metric("requests_waiting", "gauge", "Requests waiting for a row.", [("", waiting)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", m.prompt_tokens)])
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens whose KV was reused.", [("", m.cached_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generated_tokens)])
    metric("requests_finished_total", "counter", "Requests finished, by reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(m.finished.items())])
    for name, h, help_ in (("time_to_first_token_seconds", m.ttft, "From arrival to the first token."),
                           ("time_per_output_token_seconds", m.tpot, "Between a request's tokens.")):
        cumulative, samples = 0, []
        for bound, count in zip([*map(str, h.bounds), "+Inf"], h.counts):
            cumulative += count
            samples.append((f'_bucket{{le="{bound}"}}', cumulative))
        samples += [("_sum", round(h.total, 6)), ("_count", cumulative)]
        metric(name, "histogram", help_, samples)
    return "\n".join(lines) + "\n"


# ---- the command ------------------------------------------------------------------------------------------

def load_served(ckpt: Checkpoint, device: torch.device, precision: str, rows: int, context: int, chunk: int,
                prefill_budget: int, max_queue: int, compile: bool, name: str | None, url: str,
                activations: str = "auto", kv_dtype: str = "auto") -> Served:
    """Load the model, build the engine (compiling and warming up its decode step with --compile) and say so."""
    model = load_model(ckpt, device, precision, quant_activations=activations, kv_dtype=kv_dtype)
    tokenizer = get_tokenizer(ckpt.folder)
    step = compile_decode_rows(device, rows) if compile else decode_rows
    engine = Engine(model, tokenizer, rows=rows, context=context, chunk=chunk, prefill_budget=prefill_budget,
                    decode_step=step, max_queue=max_queue)
    if compile:  # compile now, not on the first request: one row at row 0's scratch position
        t0 = time.perf_counter()
        with torch.no_grad():  # as the engine calls it
            step(model, torch.zeros(1, 1, dtype=torch.long, device=device), torch.full((1, 1), context, device=device),
                 torch.arange(1, device=device))
        tp.log(f"compiled the decode step in {time.perf_counter() - t0:.1f} s")
    if rows > GEMV_MAX_ROWS:
        tp.log(f"note: with more than {GEMV_MAX_ROWS} rows the decode step is a GEMM, not each row's GEMV: a "
               "request's tokens may then depend on what else is in the batch")
    kv = sum(t.nbytes for b in model.layers for t in b.attention.kv_cache.stored())
    name = name or ckpt.folder.name
    quantized = f", {layers.activations(model)} activations" if ckpt.quantization is not None else ""
    tp.log(f"serving {name} ({ckpt.format.describe()}; {precision} on {device}{quantized}) with {rows} rows x "
           f"{context} positions ({kv_dtype_name(model)} KV cache, {kv / 1e9:.2f} GB) at {url}/v1")
    return Served(engine, tokenizer, name)


def main(*, checkpoint_path: Path = DEFAULT_CHECKPOINT, host: str = "127.0.0.1", port: int = 8000, rows: int = 8,
         context: int | None = None, chunk: int = 64, prefill_budget: int = PREFILL_BUDGET, max_queue: int = 64,
         compile: bool = False, device: str | None = None, precision: str = "auto",
         model_name: str | None = None, quant_activations: str = "auto", kv_dtype: str = "auto") -> None:
    """Serve the checkpoint over HTTP until interrupted (Ctrl-C) or terminated (SIGTERM).

    The HTTP server runs in a thread and the engine in the main thread: OpenMP's parallel regions, which every kernel
    of a step opens, cost several times more when started from any other thread (docs/features.md)."""
    if min(rows, chunk, prefill_budget, max_queue + 1, port) < 1 or (context is not None and context < 2):
        raise ValueError("--rows, --chunk, --prefill_budget and --port must be at least 1, --max_queue at least 0, "
                         "--context at least 2")
    ckpt = Checkpoint.open(checkpoint_path)  # a missing checkpoint is one line before the server starts
    dev, url = resolve_device(device), f"http://{host}:{port}"
    # rows x context from memory.py: the context given, else the model's (at most 4096) cut to what fits; one line
    # with the numbers, before the server starts, for a setting that cannot fit
    precision = resolve_precision(precision, ckpt.quantization, dev)
    context = plan(Sizer.of(ckpt, precision, dev, kv_dtype), available_bytes(dev), rows, context, chunk).context
    state, stop = {}, threading.Event()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning"))
    http = threading.Thread(target=server.run, daemon=True, name="http")
    http.start()
    while not server.started:  # /health answers 503 while the model loads
        if not http.is_alive():
            raise ValueError(f"could not listen on {host}:{port} (is another server using the port?)")
        time.sleep(0.02)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the step at hand, then stop
    try:
        state["served"] = load_served(ckpt, dev, precision, rows, context, chunk, prefill_budget, max_queue,
                                      compile, model_name, url, quant_activations, kv_dtype)
        state["served"].engine.run(stop)
    finally:
        server.should_exit = True
        http.join(timeout=10)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a fastllama checkpoint with an OpenAI-compatible HTTP API.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="model.pth or its folder")
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--rows", type=int, default=8, help="requests decoded together: rows of the KV cache")
    p.add_argument("--context", type=int, default=None,
                   help=f"positions per row (default: the model's, at most {DEFAULT_CONTEXT}, less if the memory asks)")
    p.add_argument("--chunk", type=int, default=64,
                   help="prompt pieces: prompts are prefilled in pieces cut at multiples of this, and reused by them")
    p.add_argument("--prefill_budget", type=int, default=PREFILL_BUDGET,
                   help="most prompt tokens computed per engine iteration (at least one piece), the most a decode "
                        "step waits for; smaller: shorter but more frequent waits, later first tokens")
    p.add_argument("--max_queue", type=int, default=64, help="requests that may wait for a row; more get 503")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (at startup)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto", help="activations dtype")
    p.add_argument("--model_name", type=str, default=None, help="the name clients use (default: the folder's)")
    add_numerics_flags(p)
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())

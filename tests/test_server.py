"""server.py as a client sees it: a real server process on 127.0.0.1, the official `openai` client, overload,
cancellation, a load of concurrent clients, and schemathesis against the server's own OpenAPI schema."""
import concurrent.futures
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
import schemathesis
import torch
from helpers import ROOT, run_in_process
from hypothesis import HealthCheck, given, settings

import generate as gen
from generate import generate, load_model
from serve_bench import ServerProcess, free_port
from tokenizer import get_tokenizer

CHUNK = 16


class Server(ServerProcess):
    """A server.py process on a free port of 127.0.0.1, ready when constructed; stop() ends it."""

    def __init__(self, checkpoint, *args, timeout: float = 120):
        port = free_port()
        super().__init__([sys.executable, ROOT / "server.py", "--checkpoint_path", checkpoint, "--port", port,
                          "--device", "cpu", *args], port, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        self.url = f"http://127.0.0.1:{port}"
        self.ready(timeout)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body: dict) -> tuple[int, dict, object]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus' text format."""
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.fixture(scope="module")
def server(tiny_llama):
    s = Server(tiny_llama[1], "--rows", 4, "--context", 128, "--chunk", CHUNK, "--precision", "fp32",
               "--model_name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(tiny_llama):
    """The greedy text of a prompt alone, by generate() with the server's prefill pieces."""
    model, tok = load_model(tiny_llama[1], "cpu", "fp32"), get_tokenizer(tiny_llama[1])
    memo = {}

    def text(prompt: str, n: int) -> str:
        if (prompt, n) not in memo:
            ids = tok.encode(prompt)
            model.setup_caches(1, 128)
            new = generate(model, torch.tensor(ids), n, temperature=0.0, prefill_chunk=CHUNK)[0].tolist()
            memo[prompt, n] = tok.decode(ids + new)[len(tok.decode(ids)):]  # the text after the prompt's
        return memo[prompt, n]
    return text


def test_completions_and_chat_stream_equal_non_stream(server, expected):
    client = server.client()
    prompt = "def parse(argv):\n    parser ="
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].text == expected(prompt, 12) and full.choices[0].finish_reason == "length"
    n_prompt = post(server.url + "/tokenize", {"prompt": prompt})[1]["count"]
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (n_prompt, 12,
                                                                                               n_prompt + 12)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked
    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream[:-1]) == chat.choices[0].message.content
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chat.usage.prompt_tokens == post(server.url + "/tokenize", {"messages": messages})[1]["count"]


def test_tokenize_detokenize_models_health_metrics(server):
    status, body, _ = post(server.url + "/tokenize", {"prompt": "hello world"})
    assert status == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"] == 128
    assert post(server.url + "/detokenize", {"tokens": body["tokens"]})[1]["prompt"].endswith("hello world")
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert get(server.url + "/health")[0] == 200
    status, text = get(server.url + "/metrics")
    assert status == 200 and "fastllama_requests_running 0" in text
    assert "fastllama_time_to_first_token_seconds_bucket" in text and "fastllama_generation_tokens_total" in text


def test_stop_strings_n_seeds_and_logprobs(server, expected):
    client = server.client()
    prompt = "import os\nimport sys\n"
    free = expected(prompt, 16)
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert free.startswith(cut.choices[0].text)
    sampled = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, n=3, seed=5,
                   extra_body={"ignore_eos": True})
    a, b = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the same seed, the same texts
    assert len({c.text for c in a.choices}) > 1 and [c.index for c in a.choices] == [0, 1, 2]
    lp = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": [1, 2, 100000]}, 400, "prompt"),
    ({"prompt": "word " * 300}, 400, "prompt"),
    ({}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, reply, _ = post(server.url + "/v1/completions", body)
    assert code == status and reply["error"]["param"] == param and reply["error"]["message"], reply
    if str(body.get("prompt", "")).startswith("word"):
        assert "tokens but the context holds 128" in reply["error"]["message"]


def test_overload_answers_two_and_refuses_the_rest(tiny_llama):
    """--rows 1 --max_queue 1: ten concurrent requests, one runs and one waits; the other eight get 503 at once."""
    s = Server(tiny_llama[1], "--rows", 1, "--max_queue", 1, "--context", 128, "--precision", "fp32",
               "--model_name", "tiny")
    try:
        body = {"prompt": "hello", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda _: post(s.url + "/v1/completions", body), range(10)))
        assert sorted(code for code, _, _ in replies) == [200, 200] + [503] * 8
        assert all(h.get("Retry-After") == "1" and r["error"]["type"] == "server_busy"
                   for code, r, h in replies if code == 503)
        with pytest.raises(openai.APIStatusError):  # the client's view of a 503 (no retries)
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                for f in [pool.submit(s.client().completions.create, model="tiny", max_tokens=100,
                                      prompt="hi", extra_body={"ignore_eos": True}) for _ in range(3)]:
                    f.result()
    finally:
        s.stop()


def test_a_dropped_stream_frees_its_row(server):
    client = server.client()
    stream = client.completions.create(model="tiny", prompt="a b c", max_tokens=120, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client goes away after one chunk
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = get(server.url + "/metrics")[1]
        if "fastllama_requests_running 0" in metrics and 'reason="cancelled"' in metrics:
            break
        time.sleep(0.05)
    assert "fastllama_requests_running 0" in metrics and 'reason="cancelled"' in metrics
    generated = metric(metrics, "fastllama_generation_tokens_total")
    assert generated < 1000  # it stopped long before its 120 tokens
    again = client.completions.create(model="tiny", prompt="a b c", max_tokens=3, temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")


def test_load_of_concurrent_clients_each_gets_its_own(server, expected):
    """64 clients x 2 requests at once (bounded in time): every answer complete and its own prompt's."""
    prompts = [f"# marker {i}\nx = {i * 7}" for i in range(64)]
    client = server.client()

    def ask(i):
        outs = []
        for _ in range(2):
            r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
            outs.append((r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens))
        return outs

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(ask, range(64), timeout=300))
    assert time.monotonic() - t0 < 300
    for i, outs in enumerate(results):
        assert outs == [(expected(prompts[i], 6), "length", 6)] * 2, i


def test_openapi_schema_holds(server):
    """schemathesis against the server's own /openapi.json: no 5xx, invalid data refused with a 4xx, and every
    response's status, content type, headers and body as the schema says. (A schema-valid request may still be
    refused: a prompt longer than the context, a token id beyond the vocabulary; so that check is left out.)"""
    from schemathesis import GenerationMode, checks

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    chosen = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
              checks.response_headers_conformance, checks.response_schema_conformance, checks.negative_data_rejection]
    labels = []
    for result in schema.get_all_operations():
        op = result.ok()
        labels.append(op.label)

        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:  # schema-valid requests, and (where a body can be wrong) invalid ones

            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            @given(op.as_strategy(generation_mode=mode))
            def check(case):
                case.call_and_validate(checks=chosen)

            check()
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "GET /metrics"} <= set(labels)


@pytest.mark.real_model
def test_default_model_chat_answer_is_generate_interactives(smollm2_dir, capsys, monkeypatch):
    question = "What is the capital of France?"
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n\n"))
    code, out, err = run_in_process(capsys, gen, "--checkpoint_path", smollm2_dir, "--device", "cpu", "--interactive",
                                    "--temperature", "0", "--max_new_tokens", "40")
    assert code == 0, err
    answer = out.split("model> ")[1].split("\n[")[0]
    s = Server(smollm2_dir, "--rows", 2, "--context", 512)
    try:
        client = s.client()
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=40, temperature=0,
                                               messages=[{"role": "user", "content": question}])
    finally:
        s.stop()
    assert reply.choices[0].message.content == answer and len(answer) > 10

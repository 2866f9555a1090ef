"""The OpenAI-compatible server, started for real on a free loopback port and called with the official
openai client: completions and chat, streaming and not, 32 concurrent streaming clients, disconnects,
errors, the waiting bound, the API key and /metrics."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tiny_models import make_tiny_text_checkpoint

MODEL = "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metal_engine", "serve", "--model", str(checkpoint), "--port", str(self.port),
             "--dtype", "float32", "--served-model-name", MODEL, "--max-model-len", "2048", "--log-level", "warning",
             *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.proc.stdout.read())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_text_checkpoint(tmp_path_factory.mktemp("srv") / "tiny", "llama", seed=5)


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    [m] = client.models.list().data
    assert m.id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_stream_and_not(client):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and r.usage.completion_tokens == len(c.logprobs.tokens)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(t) <= 3 for t in c.logprobs.top_logprobs)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_with_token_ids_n_and_stop(client):
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=6, temperature=1.0, seed=4, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    full = client.completions.create(model=MODEL, prompt="The quick", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model=MODEL, prompt="The quick", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_stream_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.usage.completion_tokens == len(r.choices[0].logprobs.content) <= 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_32_concurrent_streaming_clients_match_alone(server, client):
    prompts = [f"Hello {i} world" for i in range(32)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text
             for p in prompts]

    async def one(ac, p):
        text = ""
        stream = await ac.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, stream=True)
        async for ch in stream:
            text += ch.choices[0].text if ch.choices else ""
        return text

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, p) for p in prompts))

    assert asyncio.run(all_at_once()) == alone


def wait_idle(server, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = server.metrics()
        if m["metal_engine_kv_blocks_used"] == 0 and m["metal_engine_requests_running"] == 0 \
                and m["metal_engine_requests_waiting"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"engine not idle: {server.metrics()}")


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True, "n": 16}  # 16 x 2000 tokens: seconds of work, only an abort ends it early
    aborted = server.metrics().get("metal_engine_requests_aborted_total", 0)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
        assert server.metrics()["metal_engine_kv_blocks_used"] > 0
    m = wait_idle(server, timeout=2.0)
    assert m["metal_engine_requests_aborted_total"] == aborted + 1
    # and a non-streaming client that hangs up (one sample alone would take only ~0.5 s on the tiny model, too
    # close to any client timeout: hence the 16 samples)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    m = wait_idle(server, timeout=2.0)
    assert m["metal_engine_requests_aborted_total"] == aborted + 2


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ('{"model": "tiny-chat", "prompt": ', 400, "malformed JSON"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400, "maximum context length is 2048"),
        ({"model": MODEL, "prompt": "hello " * 3000}, 400, "maximum context length is 2048"),
        ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),
        ({"model": MODEL, "prompt": [[]]}, 400, "the prompt is empty"),
        ({"model": MODEL, "prompt": [999999]}, 400, "outside the vocabulary"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5000)


def test_metrics_are_prometheus(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("metal_engine_requests_running", "metal_engine_requests_waiting", "metal_engine_kv_blocks_used",
                 "metal_engine_generation_tokens_per_second", "metal_engine_time_to_first_token_seconds_bucket",
                 "metal_engine_generation_tokens_total"):
        assert name in text


def test_waiting_bound_and_api_key(checkpoint):
    s = Server(checkpoint, "--max-waiting", "2", "--max-num-seqs", "1", "--api-key", "sekret")
    try:
        no_key = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert no_key.status_code == 401 and "API key" in no_key.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key

        async def flood():
            async with httpx.AsyncClient(timeout=60, headers={"Authorization": "Bearer sekret"}) as c:
                body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
                return await asyncio.gather(*(c.post(s.url + "/v1/completions", json=body) for _ in range(8)))

        codes = sorted(r.status_code for r in asyncio.run(flood()))
        assert 200 in codes and 503 in codes, codes
        assert all(c in (200, 503) for c in codes)
        wait_idle(s)
    finally:
        s.stop()


def test_serve_binds_loopback_by_default():
    out = subprocess.run([sys.executable, "-m", "metal_engine", "serve", "--help"], capture_output=True, text=True,
                         env={**os.environ})
    assert out.returncode == 0 and "127.0.0.1" in out.stdout


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "store": True}, "store"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"},
     "reasoning_effort"),
    ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "object"}}, "guided_json"),
])
def test_known_fields_we_cannot_honour_are_400_naming_them(server, path, body, field):
    r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert f"the field '{field}' is not supported" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == field


def test_no_op_values_and_unknown_fields_are_accepted(server):
    for extra in ({"store": False, "service_tier": "auto", "metadata": {"k": "v"}, "user": "u1"},
                  {"a_field_nobody_knows": 1}):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra})
        assert r.status_code == 200, r.text


def test_unknown_fields_are_logged_once(caplog):
    from metal_engine.entrypoints.openai.protocol import CompletionRequest, check_fields

    with caplog.at_level("WARNING", logger="metal_engine.server"):
        for _ in range(3):
            check_fields(CompletionRequest(prompt="hi", temprature=0.5))
    assert [r.getMessage() for r in caplog.records].count(
        "CompletionRequest: ignoring the unknown field 'temprature' (not an OpenAI or vLLM field this server knows)") == 1


def test_logit_bias_and_structured_outputs_through_the_server(client):
    free = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0.0)
    biased = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0.0, logprobs=1,
                                       logit_bias={"17": 100})
    assert biased.choices[0].text != free.choices[0].text
    first = biased.choices[0].logprobs.tokens[0]
    assert first == client.completions.create(model=MODEL, prompt=[17], max_tokens=1, echo=True).choices[0].text[:len(first)]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=1.0, seed=1,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert r.choices[0].text.isdigit() and len(r.choices[0].text) == 4
    with pytest.raises(openai.BadRequestError, match="invalid structured_outputs regex"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                  extra_body={"structured_outputs": {"regex": "[0-"}})


def test_chat_continue_final_message_echo_n_and_logprobs(client):
    msgs = [{"role": "user", "content": "Say something"}, {"role": "assistant", "content": "The answer is"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0.0, extra_body={
        "add_generation_prompt": False, "continue_final_message": True, "echo": True})
    assert r.choices[0].message.content.startswith("The answer is")
    # the reply continues the open message: the same tokens as completing its rendered text directly
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0.0, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
    assert r.choices[0].message.content == "The answer is" + plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=2,
                                       extra_body={"continue_final_message": True})
    r = client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=5, temperature=1.0, seed=3, n=2,
                                       logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.content) == r.usage.completion_tokens // 2 or c.finish_reason == "stop"
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)

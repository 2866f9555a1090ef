"""/v1/messages (Anthropic's Messages API) with the anthropic SDK and /v1/responses (OpenAI's Responses API)
with the openai SDK, streaming and not: text, system prompts and instructions, tool use and tool results in the
history, thinking, errors, and x-api-key. A tiny checkpoint with a hermes (Qwen) chat template and the qwen3
reasoning parser; replies are forced with structured_outputs where a random model's text would prove nothing."""

import json
import shutil

import anthropic
import jsonschema
import openai
import pytest

from test_server import MODEL, Server
from test_tool_calls import CALL_TEXT, TOOLS, WEATHER
from tiny_models import HERMES_TEMPLATE, make_tiny_text_checkpoint, with_chat_template

KEY = "sk-test"
A_TOOLS = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
            "input_schema": t["function"]["parameters"]} for t in TOOLS]
R_TOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
           for t in TOOLS]
THINK = "<think>\nLet me see.\n</think>\n\nIt is sunny."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_text_checkpoint(tmp_path_factory.mktemp("doors") / "ck", "qwen3", seed=5)
    with_chat_template(path, HERMES_TEMPLATE)
    s = Server(path, "--reasoning-parser", "qwen3", "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture()
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)  # sends x-api-key


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def force(text):
    return {"structured_outputs": {"choice": [text]}}


# ------------------------------------------------------------------------------------------- /v1/messages
def test_messages_text_and_usage(claude):
    m = claude.messages.create(model=MODEL, max_tokens=8, system="Be brief.",
                               messages=[{"role": "user", "content": "Hello"}], extra_body={"temperature": 0.0})
    assert m.type == "message" and m.role == "assistant" and m.stop_reason in ("end_turn", "max_tokens")
    assert m.content[0].type == "text" and m.usage.output_tokens > 0 and m.usage.input_tokens > 0
    forced = claude.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "Hello"}],
                                    extra_body=force("Hi there."))
    assert [b.text for b in forced.content] == ["Hi there."] and forced.stop_reason == "end_turn"


def test_messages_stream_events(claude):
    kinds, text = [], ""
    with claude.messages.stream(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "Hello"}],
                                extra_body=force("Hi there.")) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
        final = stream.get_final_message()
    assert text == "Hi there." and final.content[0].text == "Hi there."
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)


@pytest.mark.parametrize("stream", [False, True])
def test_messages_tool_use(claude, stream):
    kw = dict(model=MODEL, max_tokens=120, tools=A_TOOLS, messages=[{"role": "user", "content": "Weather?"}],
              extra_body=force(CALL_TEXT["hermes"]))
    if stream:
        with claude.messages.stream(**kw) as s:
            partial = "".join(e.delta.partial_json for e in s
                              if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
            m = s.get_final_message()
        assert json.loads(partial) == {"city": "Paris", "unit": "c"}
    else:
        m = claude.messages.create(**kw)
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris", "unit": "c"}) and use.id.startswith("toolu_")
    assert m.stop_reason == "tool_use"
    # tool_choice any: the grammar makes even a random model call a tool
    m = claude.messages.create(model=MODEL, max_tokens=120, tools=A_TOOLS,
                               tool_choice={"type": "any", "disable_parallel_tool_use": True},
                               messages=[{"role": "user", "content": "Weather?"}])
    [use] = [b for b in m.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER if use.name == "get_weather" else TOOLS[1]["function"]["parameters"])
    m = claude.messages.create(model=MODEL, max_tokens=120, tools=A_TOOLS,
                               tool_choice={"type": "tool", "name": "get_time"},
                               messages=[{"role": "user", "content": "Time?"}])
    assert [b.name for b in m.content if b.type == "tool_use"] == ["get_time"]


def test_messages_output_format_json_schema(claude):
    schema = {"enum": ["red", "green", "blue"]}  # a random model's free JSON could take whitespace forever
    m = claude.messages.create(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "A colour"}],
                               output_config={"format": {"type": "json_schema", "schema": schema}},
                               extra_body={"temperature": 0.0})
    jsonschema.validate(json.loads(m.content[0].text), schema)


def test_messages_history_with_tool_results_and_thinking(claude):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris", "unit": "c"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C, sunny"}]},
    ]
    short = claude.messages.create(model=MODEL, max_tokens=1, tools=A_TOOLS, messages=history[:1])
    full = claude.messages.create(model=MODEL, max_tokens=1, tools=A_TOOLS, messages=history)
    assert full.usage.input_tokens > short.usage.input_tokens + 10
    m = claude.messages.create(model=MODEL, max_tokens=60, messages=history[:1], extra_body=force(THINK),
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == [
        ("thinking", "Let me see."), ("text", "It is sunny.")]


def test_messages_errors_and_auth(server, claude):
    with pytest.raises(anthropic.BadRequestError, match="image"):
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    with pytest.raises(anthropic.BadRequestError, match="mcp_servers"):
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                               extra_body={"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]})
    with pytest.raises(anthropic.BadRequestError, match="effort"):
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                               output_config={"effort": "high"})
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------ /v1/responses
def test_responses_text_and_instructions(oai):
    r = oai.responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=20,
                             extra_body=force("Hi there."), store=False)
    assert r.status == "completed" and r.output_text == "Hi there." and r.usage.output_tokens > 0
    r = oai.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                             max_output_tokens=3, temperature=0.0, store=False)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_responses_stream(oai):
    kinds, text = [], ""
    for e in oai.responses.create(model=MODEL, input="Hello", max_output_tokens=60, stream=True, store=False,
                                  extra_body=force(THINK)):
        kinds.append(e.type)
        if e.type == "response.output_text.delta":
            text += e.delta
        if e.type == "response.completed":
            final = e.response
    assert text == "It is sunny." and kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == "It is sunny."
    assert "response.reasoning_text.delta" in kinds and "response.output_item.done" in kinds


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_calls_and_outputs(oai, stream):
    kw = dict(model=MODEL, input="Weather?", tools=R_TOOLS, max_output_tokens=120, store=False,
              extra_body=force(CALL_TEXT["hermes"]))
    if stream:
        events = list(oai.responses.create(stream=True, **kw))
        final = next(e.response for e in events if e.type == "response.completed")
        assert any(e.type == "response.function_call_arguments.done" for e in events)
    else:
        final = oai.responses.create(**kw)
    [fc] = [o for o in final.output if o.type == "function_call"]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris", "unit": "c"}
    # the call and its output back as input items: they reach the template
    follow = [{"role": "user", "content": "Weather?"},
              {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
              {"type": "function_call_output", "call_id": fc.call_id, "output": "21 C, sunny"}]
    short = oai.responses.create(model=MODEL, input="Weather?", tools=R_TOOLS, max_output_tokens=1, store=False)
    full = oai.responses.create(model=MODEL, input=follow, tools=R_TOOLS, max_output_tokens=1, store=False)
    assert full.usage.input_tokens > short.usage.input_tokens + 10
    r = oai.responses.create(model=MODEL, input="Time?", tools=R_TOOLS, tool_choice={"type": "function",
                             "name": "get_time"}, max_output_tokens=60, temperature=0.0, store=False)
    assert [o.name for o in r.output if o.type == "function_call"] == ["get_time"]


def test_responses_json_schema_and_refusals(oai):
    r = oai.responses.create(model=MODEL, input="A colour", max_output_tokens=40, store=False, text={"format": {
        "type": "json_schema", "name": "c", "schema": {"enum": ["red", "green"]}}})
    assert json.loads(r.output_text) in ("red", "green")
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1", store=False)
    with pytest.raises(openai.BadRequestError, match="store"):
        oai.responses.create(model=MODEL, input="Hi", store=True)
    with pytest.raises(openai.BadRequestError, match="function tools only"):
        oai.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}], store=False)

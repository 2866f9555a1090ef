"""Tool calls, reasoning and structured output through /v1/chat/completions, with the openai client, streaming
and not, on tiny checkpoints whose chat templates are those of the hermes (Qwen), Llama 3 JSON and Mistral
families. tool_choice required / named is enforced by a grammar, so even a random model calls the tools; for
"auto", the reply is forced (structured_outputs choice) to the family's call text, which the parser must find."""

import json
import shutil

import jsonschema
import openai
import pytest

from metal_engine.entrypoints.openai import tool_parsers
from metal_engine.gguf_checkpoint import default_gguf_path
from test_server import MODEL, Server
from tiny_models import HERMES_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, make_tiny_text_checkpoint, with_chat_template

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
# what each family's model writes to call get_weather(city="Paris", unit="c")
CALL_TEXT = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]',
}
TEMPLATES = {"hermes": HERMES_TEMPLATE, "llama3_json": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    return make_tiny_text_checkpoint(tmp_path_factory.mktemp("tools") / "base", "qwen3", seed=5)


@pytest.fixture(scope="module", params=list(TEMPLATES))
def family(request, base_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "ck"
    shutil.copytree(base_checkpoint, path)
    with_chat_template(path, TEMPLATES[request.param])
    server = Server(path)  # the parser comes from the chat template
    yield request.param, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


def chat(client, stream=False, **kw):
    kw.setdefault("max_tokens", 120)
    kw.setdefault("temperature", 0.0)
    r = client.chat.completions.create(model=MODEL, messages=kw.pop("messages", USER), stream=stream, **kw)
    if not stream:
        c = r.choices[0]
        calls = [(t.function.name, json.loads(t.function.arguments), t.id) for t in c.message.tool_calls or []]
        return c.message.content, calls, c.finish_reason
    content, calls, reason = "", {}, None
    for chunk in r:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:  # OpenAI's deltas: by index, the first with id and name
            e = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
            e["id"] = e["id"] or t.id
            e["name"] += (t.function.name or "") if t.function else ""
            e["arguments"] += (t.function.arguments or "") if t.function else ""
        reason = chunk.choices[0].finish_reason or reason
    return (content or None), [(e["name"], json.loads(e["arguments"]), e["id"]) for _, e in sorted(calls.items())], reason


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_calls_a_tool_with_valid_arguments(family, stream):
    """(One call: with parallel calls allowed a random model's array of calls need not end.)"""
    _, client = family
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        content, calls, reason = chat(client, stream, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                      **kw)
        assert reason == "tool_calls" and len(calls) == 1 and content is None
        name, args, call_id = calls[0]
        jsonschema.validate(args, SCHEMAS[name])
        assert call_id.startswith("call_")


def test_the_required_grammar_takes_parallel_calls():
    schema = tool_parsers.required_schema(TOOLS, parallel=True)
    two = [{"name": "get_time", "parameters": {"zone": "utc"}},
           {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}]
    jsonschema.validate(two, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(two, tool_parsers.required_schema(TOOLS, parallel=False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "parameters": {"zone": "mars"}}], schema)
    assert [c["function"]["name"] for c in tool_parsers.parse_required(json.dumps(two))] == ["get_time", "get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_calls_that_function(family, stream):
    _, client = family
    content, calls, reason = chat(client, stream, tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert reason == "tool_calls" and content is None
    [(name, args, _)] = calls
    assert name == "get_time"
    jsonschema.validate(args, TIME)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_the_familys_call_in_the_reply(family, stream):
    fmt, client = family
    forced = {"structured_outputs": {"choice": [CALL_TEXT[fmt]]}}
    content, calls, reason = chat(client, stream, tools=TOOLS, tool_choice="auto", extra_body=forced)
    assert calls and calls[0][:2] == ("get_weather", {"city": "Paris", "unit": "c"}), (content, calls)
    assert reason == "tool_calls" and not content
    # tool_choice none: the same reply is text, not parsed
    content, calls, reason = chat(client, stream, tools=TOOLS, tool_choice="none", extra_body=forced)
    assert calls == [] and content == CALL_TEXT[fmt] and reason == "stop"


def test_auto_without_a_call_is_text(family):
    _, client = family
    content, calls, reason = chat(client, tools=TOOLS, extra_body={"structured_outputs": {"choice": ["Sunny."]}})
    assert (content, calls, reason) == ("Sunny.", [], "stop")


def test_tool_calls_and_results_in_the_history_reach_the_template(family):
    _, client = family
    history = USER + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "c"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]
    short = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=2)
    full = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=2)
    # the call (its arguments rendered as JSON) and the result are in the prompt
    assert full.usage.prompt_tokens > short.usage.prompt_tokens + 10


def test_tool_request_errors(family):
    _, client = family
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        chat(client, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="not JSON"):
        chat(client, messages=USER + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{oops"}}]}])
    with pytest.raises(openai.BadRequestError, match="both constrain"):
        chat(client, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})


# ------------------------------------------------------------------------------------ reasoning and formats
@pytest.fixture(scope="module")
def thinking(base_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("think") / "ck"
    shutil.copytree(base_checkpoint, path)
    with_chat_template(path, HERMES_TEMPLATE)
    server = Server(path, "--reasoning-parser", "qwen3")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_is_reasoning_content_and_never_a_tool_call(thinking, stream):
    reply = '<think>\nmaybe <tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>\n</think>\n\nSunny.'
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=120, temperature=0.0,
              extra_body={"structured_outputs": {"choice": [reply]}})
    if stream:
        reasoning, content, calls = "", "", []
        for chunk in thinking.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                d = chunk.choices[0].delta
                reasoning += getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or ""
                content += d.content or ""
                calls += d.tool_calls or []
    else:
        m = thinking.chat.completions.create(**kw).choices[0].message
        reasoning, content, calls = m.model_extra["reasoning_content"], m.content, m.tool_calls or []
    assert reasoning == 'maybe <tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>'
    assert content == "Sunny." and calls == []


def test_chat_template_kwargs_reach_the_template(thinking):
    on = thinking.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    off = thinking.chat.completions.create(model=MODEL, messages=USER, max_tokens=1,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the empty <think></think> block


@pytest.fixture(scope="module")
def smollm2():
    """The default model: a random model's JSON, free to take whitespace, need not end; a real one's does."""
    server = Server(default_gguf_path())
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_json_object(smollm2, stream):
    ask = [{"role": "user", "content": "Reply with a JSON object with the keys city and country for the capital of "
                                       "France."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY}}
    for response_format in (fmt, {"type": "json_object"}):
        r = smollm2.chat.completions.create(model=MODEL, messages=ask, max_tokens=100, temperature=0.0,
                                            response_format=response_format, stream=stream)
        text = ("".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream
                else r.choices[0].message.content)
        value = json.loads(text)
        assert isinstance(value, dict)
        if response_format is fmt:
            jsonschema.validate(value, CITY)
            assert value["city"] == "Paris"


def test_bad_response_formats_are_400(thinking):
    with pytest.raises(openai.BadRequestError, match="invalid structured_outputs json"):
        thinking.chat.completions.create(model=MODEL, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    with pytest.raises(openai.BadRequestError, match="json_schema.schema"):
        thinking.chat.completions.create(model=MODEL, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "x"}})


def test_llm_chat_renders_tools_and_template_kwargs(base_checkpoint, tmp_path):
    from metal_engine import LLM, SamplingParams

    path = tmp_path / "ck"
    shutil.copytree(base_checkpoint, path)
    with_chat_template(path, HERMES_TEMPLATE)
    llm = LLM(str(path), dtype="float32", progress=False, max_model_len=2048)
    sp = SamplingParams(max_tokens=1)
    [plain] = llm.chat(USER, sp, use_tqdm=False)
    [with_tools] = llm.chat(USER, sp, use_tqdm=False, tools=TOOLS,
                            chat_template_kwargs={"enable_thinking": False})
    assert "<tools>" not in plain.prompt and '"name": "get_weather"' in with_tools.prompt
    assert with_tools.prompt.endswith("<think>\n\n</think>\n\n")

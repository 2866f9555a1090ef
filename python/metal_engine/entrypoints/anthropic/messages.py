"""/v1/messages: Anthropic's Messages API over the chat pipeline (what Claude Code and the anthropic SDK speak).

A request becomes a ChatRequest: `system` the system message, text blocks the content, `tool_use` blocks an
assistant's tool calls, `tool_result` blocks tool messages, `tools` (name, description, input_schema) functions,
`tool_choice` auto / any / tool / none (any and tool enforced by the grammar, as "required" and a named function),
`thinking` the reasoning parser's output as thinking blocks. The reply is a message of text, thinking and
tool_use blocks; streamed as message_start, content_block_start / _delta (text_delta, thinking_delta,
input_json_delta) / _stop, message_delta and message_stop events.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from metal_engine.entrypoints.openai.protocol import UNSUPPORTED, ChatRequest, UnsupportedField, _Body


class Block(_Body):
    type: str
    text: Optional[str] = None
    id: Optional[str] = None            # tool_use
    name: Optional[str] = None
    input: Optional[Any] = None
    tool_use_id: Optional[str] = None   # tool_result
    content: Union[str, list, None] = None
    is_error: Optional[bool] = None
    thinking: Optional[str] = None      # thinking (from an earlier reply)
    signature: Optional[str] = None
    cache_control: Optional[dict] = None  # prompt-caching hint: this server caches every prefix anyway


class Message(_Body):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class AnthropicTool(_Body):
    name: str
    description: Optional[str] = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object"})
    type: Optional[str] = None
    cache_control: Optional[dict] = None


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False


class Thinking(BaseModel):
    type: Literal["enabled", "disabled"]
    budget_tokens: Optional[int] = None


class MessagesRequest(_Body):
    model: str
    max_tokens: int
    messages: list[Message] = Field(min_length=1)
    system: Union[str, list[Block], None] = None
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[AnthropicToolChoice] = None
    thinking: Optional[Thinking] = None
    metadata: Optional[dict] = None  # user_id, for the operator's records: no effect on the output
    output_config: Optional[dict] = None  # format: {type: json_schema, schema}
    # vLLM's extras, as in its chat API
    structured_outputs: Optional[dict] = None
    seed: Optional[int] = None


# Anthropic fields we do not honour: field -> (accepted as a no-op when, why)
_MESSAGES_UNSUPPORTED = {
    "container": (lambda v: not v, "containers (code execution) are not supported"),
    "mcp_servers": (lambda v: not v, "MCP servers are not supported"),
    "service_tier": (lambda v: v in (None, "auto", "standard_only"), "service tiers are not supported"),
    "inference_geo": (lambda v: not v, "inference regions are not supported"),
    "speed": (lambda v: v in (None, "standard"), "only the standard speed is supported"),
    "diagnostics": (lambda v: not v, "diagnostics are not supported"),
    "workspace_id": (lambda v: not v, "workspaces are not supported"),
    "cache_control": (lambda v: True, ""),    # prompt caching: every prefix is cached here anyway
    "user_profile_id": (lambda v: True, ""),  # an end-user id, for the operator's records
}


def _text(content) -> str:
    if isinstance(content, str):
        return content
    out = []
    for b in content or []:
        b = b if isinstance(b, dict) else b.model_dump()
        if b.get("type") != "text":
            raise ValueError(f"{b.get('type')!r} blocks are not supported here (text only)")
        out.append(b.get("text") or "")
    return "".join(out)


def to_chat(req: MessagesRequest, reasoning: bool) -> ChatRequest:
    """The chat request an Anthropic request is; ValueError (a 400) for what cannot be expressed."""
    for name, value in (req.model_extra or {}).items():
        table = _MESSAGES_UNSUPPORTED if name in _MESSAGES_UNSUPPORTED else UNSUPPORTED
        if name in table and not table[name][0](value):
            raise UnsupportedField(name, table[name][1])
    oc = req.output_config or {}
    if oc.get("effort") is not None:
        raise UnsupportedField("output_config", "effort is not supported; thinking={'type': 'enabled'} turns on "
                                                "the model's reasoning where its template has it")
    messages = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for m in req.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        text, calls, results, thinking = [], [], [], []
        for b in m.content:
            if b.type == "text":
                text.append(b.text or "")
            elif b.type == "tool_use" and m.role == "assistant":
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input or {})}})
            elif b.type == "tool_result" and m.role == "user":
                out = _text(b.content) if b.content is not None else ""
                results.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                "content": ("Error: " + out) if b.is_error else out})
            elif b.type in ("thinking", "redacted_thinking") and m.role == "assistant":
                thinking.append(b.thinking or "")
            else:
                raise ValueError(f"{b.type!r} content blocks are not supported in {m.role} messages")
        messages.extend(results)  # tool results answer the previous assistant turn
        if text or calls or not results:
            msg = {"role": m.role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            messages.append(msg)
    kwargs: dict = {}
    if req.thinking is not None:
        if req.thinking.type == "enabled" and not reasoning:
            raise ValueError("thinking needs a model whose reasoning the server parses: start it with "
                             "--reasoning-parser")
        kwargs["enable_thinking"] = req.thinking.type == "enabled"
    tools = tool_choice = None
    parallel = True
    if req.tools:
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                    "parameters": t.input_schema}} for t in req.tools]
    if req.tool_choice is not None:
        c = req.tool_choice
        parallel = not c.disable_parallel_tool_use
        if c.type == "tool":
            if not c.name:
                raise ValueError("tool_choice of type 'tool' needs the tool's name")
            tool_choice = {"type": "function", "function": {"name": c.name}}
        else:
            tool_choice = {"auto": "auto", "any": "required", "none": "none"}[c.type]
    body = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens, "stop": req.stop_sequences,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "parallel_tool_calls": parallel}
    if tools:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    if req.structured_outputs is not None:
        body["structured_outputs"] = req.structured_outputs
    fmt = oc.get("format")
    if fmt:
        if fmt.get("type") != "json_schema" or "schema" not in fmt:
            raise ValueError("output_config.format takes {'type': 'json_schema', 'schema': {...}}")
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if req.seed is not None:
        body["seed"] = req.seed
    return ChatRequest.model_validate(body)


def _stop_reason(finish: Optional[str], calls, stop) -> str:
    if calls:
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if isinstance(stop, str) else "end_turn"


def _blocks(reasoning, content, calls) -> list:
    blocks = []
    if reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if content:
        blocks.append({"type": "text", "text": content})
    for c in calls:
        blocks.append({"type": "tool_use", "id": "toolu_" + c["id"][len("call_"):], "name": c["function"]["name"],
                       "input": json.loads(c["function"]["arguments"])})
    return blocks


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


def register(app, core):
    @app.post("/v1/messages")
    async def messages(req: MessagesRequest, raw: Request):
        try:
            chat = to_chat(req, reasoning=core.reasoning is not None)
        except UnsupportedField as e:
            raise core.APIError(400, str(e), param=e.field) from None
        except ValueError as e:
            raise core.APIError(400, str(e)) from None
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        run = await core.start_chat(chat, mid)
        message = {"id": mid, "type": "message", "role": "assistant", "model": core.served_model_name,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": len(run.ids), "output_tokens": 0}}
        if not req.stream:
            outs = await core.run_all([(run.first, run.agen)], raw)
            if outs is None:
                return Response(status_code=499)
            c = outs[0].outputs[0]
            reasoning, content, calls = run.output().final(c.text)
            calls = calls if run.parallel else calls[:1]
            return {**message, "content": _blocks(reasoning, content, calls),
                    "stop_reason": _stop_reason(c.finish_reason, calls, c.stop_reason),
                    "stop_sequence": c.stop_reason if isinstance(c.stop_reason, str) else None,
                    "usage": {"input_tokens": len(run.ids), "output_tokens": len(c.token_ids)}}

        async def events():
            yield _event("message_start", {"message": message})
            index, open_kind, ncalls = -1, None, 0

            def close():
                return _event("content_block_stop", {"index": index})

            try:
                async for kind, value in core.reply_deltas(run):
                    if kind == "done":
                        last = value
                    elif kind == "tool_call":
                        if open_kind is not None:
                            yield close()
                        index, open_kind, ncalls = index + 1, "tool_use", ncalls + 1
                        f = value["function"]
                        yield _event("content_block_start", {"index": index, "content_block": {
                            "type": "tool_use", "id": "toolu_" + value["id"][len("call_"):], "name": f["name"],
                            "input": {}}})
                        yield _event("content_block_delta", {"index": index, "delta": {
                            "type": "input_json_delta", "partial_json": f["arguments"]}})
                    else:
                        block = "thinking" if kind == "reasoning_content" else "text"
                        if open_kind != block:
                            if open_kind is not None:
                                yield close()
                            index, open_kind = index + 1, block
                            start = {"type": "thinking", "thinking": "", "signature": ""} if block == "thinking" \
                                else {"type": "text", "text": ""}
                            yield _event("content_block_start", {"index": index, "content_block": start})
                        delta = {"type": "thinking_delta", "thinking": value} if block == "thinking" \
                            else {"type": "text_delta", "text": value}
                        yield _event("content_block_delta", {"index": index, "delta": delta})
                if open_kind is not None:
                    yield close()
                c = last.outputs[0]
                yield _event("message_delta", {
                    "delta": {"stop_reason": _stop_reason(c.finish_reason, ncalls, c.stop_reason),
                              "stop_sequence": c.stop_reason if isinstance(c.stop_reason, str) else None},
                    "usage": {"output_tokens": len(c.token_ids)}})
                yield _event("message_stop", {})
            finally:
                await run.agen.aclose()  # the client left, or the reply is done: abort / free the request

        return StreamingResponse(events(), media_type="text/event-stream")

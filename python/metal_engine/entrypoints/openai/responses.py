"""/v1/responses: OpenAI's Responses API (what Codex speaks), stateless, over the chat pipeline.

`input` (a string or items: messages with input_text parts, function_call and function_call_output items,
reasoning items) and `instructions` become the chat messages; `tools` (function tools) and `tool_choice`, `text.format`
(json_object / json_schema), max_output_tokens, temperature, top_p, parallel_tool_calls pass on. The reply is
output items (reasoning, a message of output_text, function_call items); streamed as response.created,
response.output_item.added, response.content_part.added, response.output_text.delta, ..._done,
response.function_call_arguments.delta / .done, response.output_item.done and response.completed events.
Nothing is stored: previous_response_id and store=true are 400s that say so.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional, Union

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from metal_engine.entrypoints.openai.protocol import UNSUPPORTED, ChatRequest, UnsupportedField, _Body


class ResponsesRequest(_Body):
    model: Optional[str] = None
    input: Union[str, list[dict]]
    instructions: Optional[str] = None
    tools: Optional[list[dict]] = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool = True
    max_output_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    text: Optional[dict] = None
    previous_response_id: Optional[str] = None
    store: Optional[bool] = None
    reasoning: Optional[dict] = None
    include: Optional[list[str]] = None
    truncation: Optional[str] = None
    metadata: Optional[dict] = None  # the caller's tags: returned, no effect on the output
    user: Optional[str] = None
    seed: Optional[int] = None
    top_k: int = 0
    structured_outputs: Optional[dict] = None


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    out = []
    for part in content or []:
        kind = part.get("type")
        if kind not in ("input_text", "output_text", "text"):
            raise ValueError(f"content parts of type {kind!r} are not supported (text only)")
        out.append(part.get("text") or "")
    return "".join(out)


def to_chat(req: ResponsesRequest) -> ChatRequest:
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and not UNSUPPORTED[name][0](value):
            raise UnsupportedField(name, UNSUPPORTED[name][1])
    if req.previous_response_id is not None:
        raise UnsupportedField("previous_response_id", "this server keeps no responses (stateless): send the whole "
                                                        "conversation as input")
    if req.store:
        raise UnsupportedField("store", "this server keeps no responses: send store=false")
    other = [x for x in req.include or [] if x != "reasoning.encrypted_content"]
    if other:  # reasoning items carry their text as encrypted_content (nothing here is encrypted or stored)
        raise UnsupportedField("include", f"{other[0]!r} is not available (only reasoning.encrypted_content)")
    if req.truncation not in (None, "disabled"):
        raise UnsupportedField("truncation", "only truncation='disabled' (a prompt past the context is a 400)")
    if req.reasoning and req.reasoning.get("effort") not in (None,):
        raise UnsupportedField("reasoning", "reasoning effort is not supported; the model's template decides")
    messages = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for it in items:
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role", "user")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _content_text(it.get("content"))})
        elif kind == "function_call":
            call = {"id": it.get("call_id"), "type": "function",
                    "function": {"name": it["name"], "arguments": it.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it.get("output")
            messages.append({"role": "tool", "tool_call_id": it.get("call_id"),
                             "content": out if isinstance(out, str) else json.dumps(out)})
        elif kind == "reasoning":
            continue  # an earlier reply's reasoning: templates drop it from the history
        else:
            raise ValueError(f"input items of type {kind!r} are not supported")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_output_tokens,
                            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                            "parallel_tool_calls": req.parallel_tool_calls, "seed": req.seed}
    if req.tools:
        tools = []
        for t in req.tools:
            if t.get("type") != "function":
                raise ValueError(f"tools of type {t.get('type')!r} are not supported (function tools only)")
            tools.append({"type": "function", "function": {"name": t["name"], "description": t.get("description"),
                                                            "parameters": t.get("parameters")}})
        body["tools"] = tools
    if req.tool_choice is not None:
        c = req.tool_choice
        body["tool_choice"] = c if isinstance(c, str) else {"type": "function", "function": {"name": c.get("name")}}
    fmt = (req.text or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.get("name"),
                                                                           "schema": fmt.get("schema")}}
    elif fmt and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt and fmt.get("type") != "text":
        raise ValueError(f"text.format {fmt.get('type')!r} is not supported")
    if req.structured_outputs is not None:
        body["structured_outputs"] = req.structured_outputs
    return ChatRequest.model_validate(body)


def register(app, core):
    def response_object(rid, req, created, output, status, usage, incomplete=None):
        return {"id": rid, "object": "response", "created_at": created, "status": status, "model":
                core.served_model_name, "output": output, "error": None, "incomplete_details": incomplete,
                "instructions": req.instructions, "metadata": req.metadata or {}, "parallel_tool_calls":
                req.parallel_tool_calls, "temperature": req.temperature, "top_p": req.top_p,
                "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "text": req.text or
                {"format": {"type": "text"}}, "max_output_tokens": req.max_output_tokens, "usage": usage,
                "previous_response_id": None, "store": False, "truncation": "disabled"}

    def usage(run, c):
        return {"input_tokens": len(run.ids), "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(c.token_ids), "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(run.ids) + len(c.token_ids)}

    def items(reasoning, content, calls, req):
        out = []
        if reasoning:
            item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}", "summary": [],
                    "content": [{"type": "reasoning_text", "text": reasoning}]}
            if "reasoning.encrypted_content" in (req.include or []):
                item["encrypted_content"] = reasoning
            out.append(item)
        if content:
            out.append({"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": "completed",
                        "role": "assistant", "content": [{"type": "output_text", "text": content,
                                                          "annotations": []}]})
        for c in calls:
            out.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": c["id"],
                        "name": c["function"]["name"], "arguments": c["function"]["arguments"],
                        "status": "completed"})
        return out

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, raw: Request):
        try:
            chat = to_chat(req)
        except UnsupportedField as e:
            raise core.APIError(400, str(e), param=e.field) from None
        except ValueError as e:
            raise core.APIError(400, str(e)) from None
        rid = f"resp_{uuid.uuid4().hex}"
        created = int(time.time())
        run = await core.start_chat(chat, rid)

        def final_status(c):
            if c.finish_reason == "length":
                return "incomplete", {"reason": "max_output_tokens"}
            return "completed", None

        if not req.stream:
            outs = await core.run_all([(run.first, run.agen)], raw)
            if outs is None:
                return Response(status_code=499)
            c = outs[0].outputs[0]
            reasoning, content, calls = run.output().final(c.text)
            status, incomplete = final_status(c)
            return response_object(rid, req, created, items(reasoning, content, calls if run.parallel else calls[:1], req),
                                   status, usage(run, c), incomplete)

        async def events():
            seq = 0

            def ev(kind, **data):
                nonlocal seq
                seq += 1
                return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **data}, ensure_ascii=False)}\n\n"

            output: list = []
            open_item = None  # (kind, item, text so far)
            yield ev("response.created", response=response_object(rid, req, created, [], "in_progress", None))
            yield ev("response.in_progress", response=response_object(rid, req, created, [], "in_progress", None))

            def close_item():
                kind, item, text = open_item
                i = len(output)
                if kind == "message":
                    part = {"type": "output_text", "text": text, "annotations": []}
                    item = {**item, "status": "completed", "content": [part]}
                    evs = [ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                              text=text),
                           ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                              part=part)]
                else:
                    item = {**item, "content": [{"type": "reasoning_text", "text": text}]}
                    if "reasoning.encrypted_content" in (req.include or []):
                        item["encrypted_content"] = text
                    evs = [ev("response.reasoning_text.done", item_id=item["id"], output_index=i, content_index=0,
                              text=text)]
                output.append(item)
                return evs + [ev("response.output_item.done", output_index=i, item=item)]

            try:
                async for kind, value in core.reply_deltas(run):
                    if kind == "done":
                        last = value
                        continue
                    if kind == "tool_call":
                        if open_item is not None:
                            for e in close_item():
                                yield e
                            open_item = None
                        f = value["function"]
                        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": value["id"],
                                "name": f["name"], "arguments": "", "status": "in_progress"}
                        i = len(output)
                        yield ev("response.output_item.added", output_index=i, item=item)
                        yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                                 delta=f["arguments"])
                        yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                 arguments=f["arguments"])
                        item = {**item, "arguments": f["arguments"], "status": "completed"}
                        output.append(item)
                        yield ev("response.output_item.done", output_index=i, item=item)
                        continue
                    want = "reasoning" if kind == "reasoning_content" else "message"
                    if open_item is None or open_item[0] != want:
                        if open_item is not None:
                            for e in close_item():
                                yield e
                        i = len(output)
                        if want == "message":
                            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}",
                                    "status": "in_progress", "role": "assistant", "content": []}
                            yield ev("response.output_item.added", output_index=i, item=item)
                            yield ev("response.content_part.added", item_id=item["id"], output_index=i,
                                     content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                        else:
                            item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}", "summary": []}
                            yield ev("response.output_item.added", output_index=i, item=item)
                        open_item = (want, item, "")
                    w, item, text = open_item
                    open_item = (w, item, text + value)
                    name = "response.output_text.delta" if w == "message" else "response.reasoning_text.delta"
                    yield ev(name, item_id=item["id"], output_index=len(output), content_index=0, delta=value)
                if open_item is not None:
                    for e in close_item():
                        yield e
                c = last.outputs[0]
                status, incomplete = final_status(c)
                kind = "response.completed" if status == "completed" else "response.incomplete"
                yield ev(kind, response=response_object(rid, req, created, output, status, usage(run, c), incomplete))
            finally:
                await run.agen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    metal-engine serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (both with "stream": true as server-sent
events ending in [DONE]), /health, /metrics (Prometheus). Every request shares one engine loop, so
concurrent requests are batched together. Chat takes tools (tool_choice none / auto / required / a named
function; the reply's calls parsed in the chat template's format, or --tool-call-parser's), a reasoning parser
(--reasoning-parser: thinking as reasoning_content), response_format and vLLM's structured_outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import types
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from metal_engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from metal_engine.entrypoints.openai import tool_parsers
from metal_engine.entrypoints.openai.protocol import (ChatRequest, CompletionRequest, UnsupportedField, _Sampling,
                                                       check_fields)
from metal_engine.entrypoints.openai.reasoning import ReasoningParser
from metal_engine.llm_engine import LLMEngine
from metal_engine.outputs import RequestOutput
from metal_engine.sampling_params import SamplingParams, StructuredOutputsParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


# ----------------------------------------------------------------------------------------- the app
class Metrics:
    def __init__(self, engine: LLMEngine, async_engine_ref):
        r = self.registry = CollectorRegistry()
        sched, kv = engine.scheduler, engine.kv
        Gauge("metal_engine_requests_running", "Requests being generated", registry=r).set_function(
            lambda: len(sched.running))
        Gauge("metal_engine_requests_waiting", "Requests waiting to be scheduled", registry=r).set_function(
            lambda: len(sched.waiting))
        Gauge("metal_engine_kv_blocks_used", "KV-cache blocks in use", registry=r).set_function(
            lambda: kv.pool.num_blocks - kv.num_free_blocks)
        Gauge("metal_engine_kv_blocks_total", "KV-cache blocks", registry=r).set(kv.pool.num_blocks)
        Gauge("metal_engine_generation_tokens_per_second", "Generated tokens/s over the last 10 s",
              registry=r).set_function(lambda: async_engine_ref().tokens_per_second())
        self.generation_tokens = Counter("metal_engine_generation_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("metal_engine_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.finished = Counter("metal_engine_requests_finished", "Finished requests", ["finish_reason"], registry=r)
        self.aborted = Counter("metal_engine_requests_aborted", "Requests aborted (client gone)", registry=r)
        self.ttft = Histogram("metal_engine_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def on_finish(self, out: RequestOutput):
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        for c in out.outputs:
            self.finished.labels(c.finish_reason or "abort").inc()
        if out.metrics is not None and out.metrics.time_to_first_token is not None:
            self.ttft.observe(out.metrics.time_to_first_token)


def create_app(engine: LLMEngine, served_model_name: str, api_key: Optional[str] = None,
               max_waiting: int = 256, tool_call_parser: Optional[str] = None,
               reasoning_parser: Optional[str] = None):
    state: dict = {}
    if tool_call_parser is not None:
        tool_parsers.get_parser(tool_call_parser)  # an unknown name fails at start, not at the first request
    reasoning = ReasoningParser(reasoning_parser) if reasoning_parser else None
    metrics = Metrics(engine, lambda: state["engine"])
    state["engine"] = AsyncEngine(engine, max_waiting=max_waiting, on_step=metrics.generation_tokens.inc,
                                  on_finish=metrics.on_finish, on_abort=lambda _: metrics.aborted.inc())
    tok = engine.tokenizer
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state["engine"].shutdown()  # stop the step loop with the server

    app = FastAPI(title="metal_engine", version="0.1.0", lifespan=lifespan)

    def error_for(request: Request, status: int, message: str, type_: str = "invalid_request_error", param=None):
        if request.url.path.startswith("/v1/messages"):  # Anthropic's error shape
            return JSONResponse({"type": "error", "error": {"type": type_, "message": message}}, status_code=status)
        return error_response(status, message, type_, param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_for(request, e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            if err.get("type") == "json_invalid":
                return error_for(request, 400,
                                 f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_for(request, 400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "error")

    @app.get("/health")
    async def health():
        if state["engine"]._error is not None:
            return error_response(503, f"engine loop died: {state['engine']._error}", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "metal_engine", "max_model_len": engine.max_model_len}]}

    # ------------------------------------------------------------------------------------ helpers
    def check_model(name: Optional[str]):
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{served_model_name}'",
                           "not_found_error", "model")

    def structured(req: _Sampling, forced: Optional[dict]) -> Optional[StructuredOutputsParams]:
        """The request's constraint: response_format, vLLM's structured_outputs, or the tool-choice grammar."""
        given = []
        if req.response_format is not None and req.response_format.type != "text":
            rf = req.response_format
            if rf.type == "json_object":
                given.append(("response_format", {"json_object": True}))
            else:
                if rf.json_schema is None or rf.json_schema.schema_ is None:
                    raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
                given.append(("response_format", {"json": rf.json_schema.schema_}))
        if req.structured_outputs is not None:
            given.append(("structured_outputs", req.structured_outputs))
        if forced is not None:
            given.append(("tool_choice", forced))
        if len(given) > 1:
            raise APIError(400, f"{' and '.join(g for g, _ in given)} both constrain the output; give one",
                           param=given[1][0])
        if not given:
            return None
        where, so = given[0]
        try:
            return StructuredOutputsParams(**so)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param=where) from None

    def sampling(req: _Sampling, max_tokens: Optional[int], prompt_len: int, logprobs: Optional[int],
                 forced: Optional[dict] = None) -> SamplingParams:
        try:
            check_fields(req)
        except UnsupportedField as e:
            raise APIError(400, str(e), param=e.field) from None
        room = engine.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens but this model's maximum context length is "
                                f"{engine.max_model_len}", param="prompt")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {engine.max_model_len} tokens; the prompt "
                                f"has {prompt_len}, so max_tokens may be at most {room} (got {max_tokens})",
                           param="max_tokens")
        bias = None
        if req.logit_bias:
            try:
                bias = {int(k): v for k, v in req.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys are token ids", param="logit_bias") from None
        so = structured(req, forced)
        try:
            sp = SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                min_p=req.min_p, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                                seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                                ignore_eos=req.ignore_eos, max_tokens=max_tokens if max_tokens is not None else room,
                                min_tokens=req.min_tokens, logprobs=logprobs,
                                skip_special_tokens=req.skip_special_tokens,
                                include_stop_str_in_output=req.include_stop_str_in_output, structured_outputs=so,
                                logit_bias=bias, allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return sp

    def encode(text: str) -> list:
        if tok is None:
            raise APIError(400, "this model has no tokenizer: send token ids as the prompt", param="prompt")
        return tok.encode(text)

    def decode_token(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False) if tok else str(t)

    async def start(rid: str, ids: list, params: SamplingParams, cache_salt: Optional[str] = None):
        """Submits one prompt; returns (first output, the rest). Bad input raises APIError before any
        response is sent."""
        prompt = {"prompt_token_ids": ids}
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        agen = state["engine"].generate(rid, prompt, params)
        try:
            first = await agen.__anext__()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except EngineOverloaded as e:
            raise APIError(503, f"server overloaded: {e}; retry later", "server_overloaded") from None
        except EngineDead as e:
            raise APIError(503, str(e), "server_error") from None
        return first, agen

    async def run_all(starts, raw: Request):
        """Collects the final outputs of every started prompt, aborting them if the client leaves."""

        async def finish(first, agen):
            last = first
            async for out in agen:
                last = out
            return last

        task = asyncio.ensure_future(asyncio.gather(*(finish(f, a) for f, a in starts)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await raw.is_disconnected():
                    return None  # the finally below aborts the requests
        finally:
            if not task.done():
                task.cancel()  # cancelling the generators aborts their requests and frees their blocks
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    def completion_logprobs(token_ids, entries, offset: int = 0):
        if entries is None:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for t, entry in zip(token_ids, entries):
            s = decode_token(t)
            tokens.append(s)
            lps.append(entry[t].logprob)
            tops.append({decode_token(k): v.logprob for k, v in entry.items()})
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(token_ids, entries, top_n: int):
        if entries is None:
            return None
        content = []
        for t, entry in zip(token_ids, entries):
            s = decode_token(t)
            tops = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top_n]
            content.append({"token": s, "logprob": entry[t].logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": decode_token(k), "logprob": v.logprob,
                                              "bytes": list(decode_token(k).encode())} for k, v in tops]})
        return {"content": content}

    def usage(prompt_lens, outs):
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"prompt_tokens": sum(prompt_lens), "completion_tokens": completion,
                "total_tokens": sum(prompt_lens) + completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(starts, holdback: int, make_chunk, include_usage: bool, prompt_lens, final_chunk):
        """Merges the started prompts' outputs into server-sent events of deltas."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, first, agen):
            try:
                await q.put((i, first))
                async for out in agen:
                    await q.put((i, out))
            finally:
                await q.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, f, a)) for i, (f, a) in enumerate(starts)]
        sent: dict = {}
        finals: dict = {}
        try:
            live = len(tasks)
            while live:
                i, out = await q.get()
                if out is None:
                    live -= 1
                    continue
                finals[i] = out
                for c in out.outputs:
                    key = (i, c.index)
                    t0, k0 = sent.get(key, (0, 0))
                    done = c.finish_reason is not None
                    visible = len(c.text) if done else max(t0, len(c.text) - holdback)
                    if visible > t0 or len(c.token_ids) > k0 or (done and key not in sent):
                        sent[key] = (visible, len(c.token_ids))
                        yield sse(make_chunk(i, c, c.text[t0:visible], c.token_ids[k0:],
                                             None if c.logprobs is None else c.logprobs[k0:], done,
                                             c.text[:visible]))
            if final_chunk is not None:
                yield sse(final_chunk)
            if include_usage:
                yield sse({**make_chunk(None, None, "", [], None, False, ""), "choices": [],
                           "usage": usage(prompt_lens, list(finals.values()))})
            yield "data: [DONE]\n\n"
        finally:  # client gone or stream done: cancelling the pumps aborts whatever still runs
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --------------------------------------------------------------------------------- completions
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            prompts = [(p, encode(p))]
        elif p and isinstance(p[0], int):
            prompts = [(None, list(p))]
        elif p and isinstance(p[0], str):
            prompts = [(s, encode(s)) for s in p]
        elif p:
            prompts = [(None, list(x)) for x in p]
        else:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if req.logprobs is not None and req.logprobs > 20:
            raise APIError(400, "logprobs may be at most 20", param="logprobs")
        params = [sampling(req, req.max_tokens, len(ids), req.logprobs) for _, ids in prompts]
        cid = f"cmpl-{uuid.uuid4().hex}"
        starts = []
        try:
            for i, ((_, ids), sp) in enumerate(zip(prompts, params)):
                starts.append(await start(f"{cid}-{i}", ids, sp, req.cache_salt))
        except APIError:
            for _, agen in starts:
                await agen.aclose()
            raise
        n = req.n
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": served_model_name}
        echo = [(text or (tok.decode(ids) if tok else "")) if req.echo else "" for text, ids in prompts]

        if req.stream:
            echoed: set = set()

            def chunk(i, c, text, toks, lps, done, _full):
                if c is None:
                    return dict(base)
                prefix = ""
                if (i, c.index) not in echoed:  # the prompt goes first when echo is on
                    echoed.add((i, c.index))
                    prefix = echo[i]
                return {**base, "choices": [{"index": i * n + c.index, "text": prefix + text,
                                             "logprobs": completion_logprobs(toks, lps),
                                             "finish_reason": c.finish_reason if done else None}]}

            holdback = max(engine.stop_string_holdback(sp) for sp in params)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(starts, holdback, chunk, include_usage,
                                                   [len(ids) for _, ids in prompts], None),
                                     media_type="text/event-stream")

        outs = await run_all(starts, raw)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                choices.append({"index": i * n + c.index, "text": echo[i] + c.text,
                                "logprobs": completion_logprobs(c.token_ids, c.logprobs, len(echo[i])),
                                "finish_reason": c.finish_reason})
        return {**base, "choices": choices, "usage": usage([len(ids) for _, ids in prompts], outs)}

    # ---------------------------------------------------------------------------- chat completions
    def chat_messages(req: ChatRequest) -> list:
        """The request's messages as the chat template takes them: text parts joined, an assistant's tool calls
        with their arguments as objects (as Hugging Face templates expect)."""
        out = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                bad = [p.type for p in content if p.type != "text"]
                if bad:
                    raise APIError(400, f"content parts of type {bad[0]!r} are not supported (text only)",
                                   param="messages")
                content = "".join(part.text or "" for part in content)
            msg = {"role": m.role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.reasoning_content is not None:
                msg["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                calls = []
                for c in m.tool_calls:
                    try:
                        args = json.loads(c.function.arguments or "{}")
                    except ValueError:
                        raise APIError(400, f"tool call {c.function.name!r}: arguments are not JSON",
                                       param="messages") from None
                    calls.append({"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": args}})
                msg["tool_calls"] = calls
            out.append(msg)
        return out

    def tool_mode(req: ChatRequest):
        """(mode, parser, forced grammar): mode none | auto | required | named (or text without tools)."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools", param="tool_choice")
            return "text", None, None
        if choice is None:
            choice = "auto"
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        if choice == "none":
            return "text", None, None
        if choice == "required":
            return "required", None, {"json": tool_parsers.required_schema(tools, req.parallel_tool_calls),
                                      "disable_any_whitespace": True}  # the calls' JSON compact, as it is re-sent
        if choice == "auto":
            name = tool_call_parser or tool_parsers.parser_for_template(req.chat_template or tok.chat_template)
            if name is None:
                raise APIError(400, "tool_choice 'auto' needs the model's tool-call format, which its chat template "
                                    "does not show; start the server with --tool-call-parser (hermes, llama3_json, "
                                    "mistral)", param="tool_choice")
            return "auto", tool_parsers.get_parser(name), None
        named = next((t for t in tools if t["function"]["name"] == choice.function.name), None)
        if named is None:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        return "named", choice.function.name, {"json": named["function"].get("parameters") or {"type": "object"},
                                                "disable_any_whitespace": True}

    def render_chat(req: ChatRequest, messages: list) -> str:
        kwargs = dict(req.chat_template_kwargs or {})
        if req.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        if req.continue_final_message and (req.add_generation_prompt or messages[-1]["role"] != "assistant"):
            raise APIError(400, "continue_final_message needs a final assistant message and "
                                "add_generation_prompt=false", param="continue_final_message")
        try:
            text = tok.apply_chat_template(messages, req.add_generation_prompt, req.chat_template, **kwargs)
        except Exception as e:  # a template may raise on conversations it does not accept
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        if req.continue_final_message:  # the last message stays open: cut the template's end of turn
            last = messages[-1]["content"]
            i = text.rfind(last)
            if i >= 0:
                text = text[: i + len(last)]
        return text

    class ChoiceOutput:
        """One choice's reply split into reasoning, content and tool calls, whole or as stream deltas."""

        def __init__(self, mode, parser, prefix: str = ""):
            self.mode, self.parser, self.prefix = mode, parser, prefix
            self.sent_reasoning, self.sent_content, self.sent_calls = "", "", 0

        def split(self, text: str, done: bool):
            if reasoning is None:
                return None, text, 0
            return reasoning.split(text, done)

        def final(self, text: str):
            r, content, _ = self.split(text, True)
            calls = []
            if self.mode == "required" and content is not None:
                try:
                    calls, content = tool_parsers.parse_required(content), None
                except (ValueError, KeyError, TypeError):
                    pass  # cut short (max_tokens): the text as it is
            elif self.mode == "named" and content is not None:
                calls, content = [tool_parsers.call(self.parser, content)], None
            elif self.mode == "auto" and content is not None:
                content, calls = self.parser.extract(content)
            if content is not None and self.prefix:
                content = self.prefix + content
            return r or None, content, calls

        def deltas(self, text: str, done: bool) -> list:
            out = []
            r, content, _ = self.split(text, done)
            if r and len(r) > len(self.sent_reasoning) and r.startswith(self.sent_reasoning):
                out.append({"reasoning_content": r[len(self.sent_reasoning):]})
                self.sent_reasoning = r
            if content is None:
                return out
            calls = []
            if done:
                prefix, self.prefix = self.prefix, ""
                _, final_content, calls = self.final(text)
                self.prefix = prefix
                visible = final_content or ""
            elif self.mode in ("required", "named"):
                visible = ""
            elif self.mode == "auto":
                visible = content[: self.parser.content_end(content)]
                calls = self.parser.complete_calls(content)
            else:
                visible = content
            delta = visible[len(self.sent_content):] if visible.startswith(self.sent_content) else ""
            if self.prefix and (delta or done):  # echo: the last message's text opens the reply
                delta, self.prefix = self.prefix + delta, ""
            if delta:
                out.append({"content": delta})
                if visible.startswith(self.sent_content):
                    self.sent_content = visible
            for k in range(self.sent_calls, len(calls)):  # each call whole, in one delta (as OpenAI may send it)
                c = calls[k]
                out.append({"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                            "function": {"name": c["function"]["name"],
                                                         "arguments": c["function"]["arguments"]}}]})
            self.sent_calls = max(self.sent_calls, len(calls))
            return out

    class ChatRun:
        """A started chat request: its prompt ids, sampling params, first output and the rest, and how its
        replies split into reasoning, content and tool calls (ChoiceOutput)."""

        def __init__(self, **kw):
            self.__dict__.update(kw)

        def output(self) -> "ChoiceOutput":
            return ChoiceOutput(self.mode, self.parser, self.prefix)

        @property
        def holdback(self) -> int:
            return engine.stop_string_holdback(self.sp)

    async def start_chat(req: ChatRequest, request_id: str) -> ChatRun:
        """Validates, renders and submits a chat request (the OpenAI, Anthropic and Responses front doors all
        come through here); bad input raises APIError before anything is sent."""
        check_model(req.model)
        if tok is None or not (tok.chat_template or req.chat_template):
            raise APIError(400, "this model has no chat template; use /v1/completions")
        messages = chat_messages(req)
        mode, parser, forced = tool_mode(req)
        text = render_chat(req, messages)
        ids = tok.encode(text, add_special_tokens=False)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, "top_logprobs must be in 0..20", param="top_logprobs")
        top_n = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sp = sampling(req, max_tokens, len(ids), top_n if req.logprobs else None, forced)
        if mode == "auto" and not req.parallel_tool_calls and parser.name == "hermes":
            sp = sp.clone(stop=sp.stop_strings + ["</tool_call>"], include_stop_str_in_output=True)  # one call
        prefix = messages[-1]["content"] if req.echo and messages[-1]["role"] == "assistant" else ""
        first, agen = await start(request_id, ids, sp, req.cache_salt)
        return ChatRun(ids=ids, sp=sp, mode=mode, parser=parser, prefix=prefix, first=first, agen=agen,
                       top_n=top_n, parallel=req.parallel_tool_calls)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, raw: Request):
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        run = await start_chat(req, cid)
        ids, sp, mode, parser, prefix, first, agen, top_n = (run.ids, run.sp, run.mode, run.parser, run.prefix,
                                                            run.first, run.agen, run.top_n)
        base = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": served_model_name}

        def finish_reason(c, calls):
            return "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason

        def keep_first(calls):
            return calls if req.parallel_tool_calls else calls[:1]

        if req.stream:
            started: set = set()
            outputs: dict = {}

            def chunk(i, c, _text, toks, lps, done, full):
                b = {**base, "object": "chat.completion.chunk"}
                if c is None:
                    return b
                o = outputs.setdefault(c.index, ChoiceOutput(mode, parser, prefix))
                deltas = o.deltas(full, done)
                if not req.parallel_tool_calls:
                    deltas = [d for d in deltas if "tool_calls" not in d or d["tool_calls"][0]["index"] == 0]
                delta = {}
                for d in deltas:  # one chunk per event: merge text deltas, tool-call deltas each on its own
                    for k, v in d.items():
                        delta[k] = delta.get(k, "") + v if isinstance(v, str) else delta.get(k, []) + v
                if c.index not in started:
                    started.add(c.index)
                    delta = {"role": "assistant", **delta}
                    delta.setdefault("content", "")
                reason = finish_reason(c, o.sent_calls) if done else None
                return {**b, "choices": [{"index": c.index, "delta": delta,
                                          "logprobs": chat_logprobs(toks, lps, top_n),
                                          "finish_reason": reason}]}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events([(first, agen)], engine.stop_string_holdback(sp), chunk,
                                                   include_usage, [len(ids)], None),
                                     media_type="text/event-stream")

        outs = await run_all([(first, agen)], raw)
        if outs is None:
            return Response(status_code=499)
        [out] = outs
        choices = []
        for c in out.outputs:
            r, content, calls = ChoiceOutput(mode, parser, prefix).final(c.text)
            calls = keep_first(calls)
            message = {"role": "assistant", "content": content}
            if r is not None:
                message["reasoning_content"] = r
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": c.index, "message": message,
                            "logprobs": chat_logprobs(c.token_ids, c.logprobs, top_n),
                            "finish_reason": finish_reason(c, calls)})
        return {**base, "choices": choices, "usage": usage([len(ids)], outs)}

    async def reply_deltas(run: ChatRun):
        """A started request's reply as it streams, for the front doors that write their own events:
        ("reasoning_content" | "content", text), ("tool_call", the call whole; past the first only with parallel
        calls on), and last ("done", the final output). Text that may still become a stop string is held back."""
        out = run.output()
        last = run.first

        async def outputs():
            yield run.first
            async for o in run.agen:
                yield o

        async for last in outputs():
            c = last.outputs[0]
            done = c.finish_reason is not None
            visible = c.text if done else c.text[: max(0, len(c.text) - run.holdback)]
            for d in out.deltas(visible, done):
                kind = next(iter(d))
                if kind != "tool_calls":
                    yield kind, d[kind]
                elif run.parallel or d["tool_calls"][0]["index"] == 0:
                    yield "tool_call", d["tool_calls"][0]
        yield "done", last

    core = types.SimpleNamespace(start_chat=start_chat, run_all=run_all, reply_deltas=reply_deltas,
                                 served_model_name=served_model_name, APIError=APIError, tokenizer=tok,
                                 reasoning=reasoning)
    from metal_engine.entrypoints.anthropic import messages as anthropic_messages
    from metal_engine.entrypoints.openai import responses

    anthropic_messages.register(app, core)
    responses.register(app, core)
    app.state.async_engine = state["engine"]
    return ApiKeyMiddleware(app, api_key) if api_key else app


class ApiKeyMiddleware:
    """Requires 'Authorization: Bearer KEY' or 'x-api-key: KEY' on /v1/*. A plain ASGI middleware: it leaves
    the receive channel alone, so the handlers still see a client disconnect."""

    def __init__(self, app, api_key: str):
        self.app, self.expected, self.key = app, f"Bearer {api_key}".encode(), api_key.encode()
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            # OpenAI clients send a bearer token; Anthropic's send x-api-key
            if headers.get(b"authorization", b"") != self.expected and headers.get(b"x-api-key", b"") != self.key:
                resp = error_response(401, "invalid or missing API key (Authorization: Bearer ..., or x-api-key)",
                                      "authentication_error")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(engine: LLMEngine, host: str, port: int, served_model_name: str, api_key: Optional[str] = None,
          max_waiting: int = 256, log_level: str = "info", tool_call_parser: Optional[str] = None,
          reasoning_parser: Optional[str] = None):
    import uvicorn

    app = create_app(engine, served_model_name, api_key=api_key, max_waiting=max_waiting,
                     tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def default_model_name(model: Optional[str]) -> str:
    from pathlib import Path

    if model is None:
        return "SmolLM2-135M-Instruct"
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.name


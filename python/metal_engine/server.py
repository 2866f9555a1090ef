"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    metal-engine serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (both with "stream": true as server-sent
events ending in [DONE]), /health, /metrics (Prometheus). Every request shares one engine loop, so
concurrent requests are batched together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from metal_engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from metal_engine.llm_engine import LLMEngine
from metal_engine.outputs import RequestOutput
from metal_engine.sampling_params import SamplingParams


# ------------------------------------------------------------------------------------ request bodies
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # like vLLM: fields we do not know are ignored

    model: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    n: int = 1
    stop: Union[None, str, list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    skip_special_tokens: bool = True
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True


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
               max_waiting: int = 256):
    state: dict = {}
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

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        parts = []
        for err in e.errors():
            if err.get("type") == "json_invalid":
                return error_response(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response(400, "invalid request: " + "; ".join(parts))

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

    def sampling(req: _Sampling, max_tokens: Optional[int], prompt_len: int, logprobs: Optional[int]) -> SamplingParams:
        room = engine.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens but this model's maximum context length is "
                                f"{engine.max_model_len}", param="prompt")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {engine.max_model_len} tokens; the prompt "
                                f"has {prompt_len}, so max_tokens may be at most {room} (got {max_tokens})",
                           param="max_tokens")
        try:
            return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  min_p=req.min_p, presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                                  seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                                  ignore_eos=req.ignore_eos, max_tokens=max_tokens if max_tokens is not None else room,
                                  min_tokens=req.min_tokens, logprobs=logprobs,
                                  skip_special_tokens=req.skip_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def encode(text: str) -> list:
        if tok is None:
            raise APIError(400, "this model has no tokenizer: send token ids as the prompt", param="prompt")
        return tok.encode(text)

    def decode_token(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False) if tok else str(t)

    async def start(rid: str, ids: list, params: SamplingParams):
        """Submits one prompt; returns (first output, the rest). Bad input raises APIError before any
        response is sent."""
        agen = state["engine"].generate(rid, {"prompt_token_ids": ids}, params)
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
                                             None if c.logprobs is None else c.logprobs[k0:], done))
            if final_chunk is not None:
                yield sse(final_chunk)
            if include_usage:
                yield sse({**make_chunk(None, None, "", [], None, False), "choices": [],
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
                starts.append(await start(f"{cid}-{i}", ids, sp))
        except APIError:
            for _, agen in starts:
                await agen.aclose()
            raise
        n = req.n
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": served_model_name}
        echo = [(text or (tok.decode(ids) if tok else "")) if req.echo else "" for text, ids in prompts]

        if req.stream:
            echoed: set = set()

            def chunk(i, c, text, toks, lps, done):
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
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, raw: Request):
        check_model(req.model)
        if tok is None or not tok.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions")
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text or "" for part in content if part.type == "text")
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = tok.apply_chat_template(messages, req.add_generation_prompt)
        except Exception as e:  # a template may raise on conversations it does not accept
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        ids = tok.encode(text, add_special_tokens=False)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, "top_logprobs must be in 0..20", param="top_logprobs")
        top_n = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sp = sampling(req, max_tokens, len(ids), top_n if req.logprobs else None)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        first, agen = await start(cid, ids, sp)
        base = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": served_model_name}

        if req.stream:
            started: set = set()

            def chunk(i, c, text, toks, lps, done):
                b = {**base, "object": "chat.completion.chunk"}
                if c is None:
                    return b
                delta = {"content": text}
                if c.index not in started:
                    started.add(c.index)
                    delta = {"role": "assistant", "content": text}
                return {**b, "choices": [{"index": c.index, "delta": delta,
                                          "logprobs": chat_logprobs(toks, lps, top_n),
                                          "finish_reason": c.finish_reason if done else None}]}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events([(first, agen)], engine.stop_string_holdback(sp), chunk,
                                                   include_usage, [len(ids)], None),
                                     media_type="text/event-stream")

        outs = await run_all([(first, agen)], raw)
        if outs is None:
            return Response(status_code=499)
        [out] = outs
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.token_ids, c.logprobs, top_n), "finish_reason": c.finish_reason}
                   for c in out.outputs]
        return {**base, "choices": choices, "usage": usage([len(ids)], outs)}

    app.state.async_engine = state["engine"]
    return ApiKeyMiddleware(app, api_key) if api_key else app


class ApiKeyMiddleware:
    """Requires 'Authorization: Bearer KEY' on /v1/*. A plain ASGI middleware: it leaves the receive
    channel alone, so the handlers still see a client disconnect."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if auth != self.expected:
                resp = error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      "authentication_error")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(engine: LLMEngine, host: str, port: int, served_model_name: str, api_key: Optional[str] = None,
          max_waiting: int = 256, log_level: str = "info"):
    import uvicorn

    app = create_app(engine, served_model_name, api_key=api_key, max_waiting=max_waiting)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def default_model_name(model: Optional[str]) -> str:
    from pathlib import Path

    if model is None:
        return "SmolLM2-135M-Instruct"
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.name


"""AsyncEngine: one background thread steps the LLMEngine for every caller, so concurrent requests are
batched together (continuous batching). asyncio code submits requests and awaits their outputs."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from metal_engine.llm_engine import LLMEngine
from metal_engine.outputs import RequestOutput
from metal_engine.sampling_params import SamplingParams


class EngineOverloaded(Exception):
    """More requests are waiting than the server accepts (answered with 503)."""


class EngineDead(Exception):
    pass


@dataclass
class _Submit:
    request_id: str
    prompt: object
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


_FINISHED = object()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, on_step=None, on_finish=None, on_abort=None):
        """on_step(num_new_tokens), on_finish(RequestOutput) and on_abort(request_id) run on the engine
        thread (for metrics)."""
        self.engine = engine
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict = {}
        self._stop = False
        self._error: Optional[BaseException] = None
        self._pending = 0  # submitted, not yet taken by the engine thread
        self._lock = threading.Lock()
        self._on_step = on_step
        self._on_finish = on_finish
        self._on_abort = on_abort
        self._recent: list = []  # (time, new tokens) of the last 10 s of steps, for tokens/s
        self._thread = threading.Thread(target=self._run, name="metal_engine-step-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- asyncio side
    async def generate(self, request_id: str, prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yields cumulative RequestOutputs as they change. Raises ValueError for a bad request and
        EngineOverloaded when the waiting queue is full. Cancelling the consumer aborts the request."""
        if self._error is not None:
            raise EngineDead(f"the engine loop died: {self._error}")
        running, waiting = self.engine.num_unfinished()
        with self._lock:
            if waiting + self._pending >= self.max_waiting:
                raise EngineOverloaded(f"{waiting + self._pending} requests are already waiting (limit {self.max_waiting})")
            self._pending += 1
        q: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Submit(request_id, prompt, params, asyncio.get_running_loop(), q))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _FINISHED:
                    finished = True
                    return
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str):
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # --------------------------------------------------------------------------------- engine side
    def _deliver(self, sub: _Submit, item):
        try:
            sub.loop.call_soon_threadsafe(sub.outputs.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            pass

    def _drain_inbox(self):
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, tuple):
                _, rid = msg
                sub = self._streams.pop(rid, None)
                self.engine.abort_request(rid)
                if sub is not None:  # still running: its blocks go back to the pool now
                    self._deliver(sub, _FINISHED)
                    if self._on_abort:
                        self._on_abort(rid)
                continue
            with self._lock:
                self._pending -= 1
            try:
                self.engine.add_request(msg.prompt, msg.params, request_id=msg.request_id)
            except ValueError as e:
                self._deliver(msg, e)
                continue
            self._streams[msg.request_id] = msg

    def _run(self):
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                now = time.monotonic()
                new_tokens = sum(len(o.outputs) for o in outputs)  # at most one token per sample per step
                self._recent = [(t, n) for t, n in self._recent if now - t < 10.0] + [(now, new_tokens)]
                if self._on_step:
                    self._on_step(new_tokens)
                for out in outputs:
                    sub = self._streams.get(out.request_id)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
                        if self._on_finish:
                            self._on_finish(out)
                    if sub is not None:
                        self._deliver(sub, out)
        except BaseException as e:  # keep the server answering: every waiting caller gets the error
            self._error = e
            for sub in list(self._streams.values()):
                self._deliver(sub, EngineDead(f"the engine loop died: {e}"))
            self._streams.clear()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t < 10.0]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

"""Scheduler in the manner of vLLM v1: no separate prefill and decode phases. Every step hands each
request some tokens: the rest of its prompt (chunked to fit the step's token budget) or one decode
token, running requests first, then waiting ones while budget, sequence slots and KV blocks last.
When blocks run out, the newest running request is preempted: its blocks are freed and it is later
recomputed from its tokens, so nothing it produced is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from metal_engine.kv_cache_manager import KVCacheManager
from metal_engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    # (request, number of tokens to compute this step), in batch order
    scheduled: list = field(default_factory=list)
    preempted: list = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque = deque()
        self.running: list = []

    def add_request(self, request: Request):
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, victim: Request, out: SchedulerOutput):
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.metrics.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1. Running requests: the next token (or the next chunk of a prompt being prefilled).
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while True:
                if self.kv.allocate_slots(req, n) is not None:
                    out.scheduled.append((req, n))
                    budget -= n
                    i += 1
                    break
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
        # 2. Waiting requests, in order, unless this step already had to preempt. A later sample of an n > 1
        # request waits for its first sample to fill the shared prompt blocks; the requests behind it do not.
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            sib = req.first_sibling
            if sib is not None and not sib.is_finished and sib.num_computed_tokens < len(sib.prompt_token_ids):
                skipped.append(self.waiting.popleft())
                continue
            hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_hit_tokens, budget)
            if self.kv.allocate_slots(req, n, hits) is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit_tokens
            if req.metrics.first_scheduled_time is None:
                req.metrics.num_cached_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))  # back at the front, in their order
        return out

    def finish(self, req: Request):
        """Frees a finished (or aborted) request's blocks and drops it from the queues."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED

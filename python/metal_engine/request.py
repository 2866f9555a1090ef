"""Request: one sequence being generated (one sample of a prompt), as the scheduler sees it."""

from __future__ import annotations

import enum
from typing import Optional

import numpy as np

from metal_engine.outputs import RequestMetrics
from metal_engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list, params: SamplingParams, *, arrival_time: float,
                 eos_token_ids=(), max_model_len: int, cache_salt=None, parent=None, sample_index: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list = []
        self.params = params
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache_salt = cache_salt
        self.parent = parent  # the ParentRequest when n > 1
        self.sample_index = sample_index
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        budget = max_model_len - len(self.prompt_token_ids)
        self.max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
        self.generator: Optional[np.random.Generator] = (
            np.random.Generator(np.random.PCG64(params.seed)) if params.seed is not None else None
        )
        self.logprobs: Optional[list] = [] if params.logprobs is not None else None
        self.prompt_logprobs: Optional[list] = [] if params.prompt_logprobs is not None else None
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.output_counts: dict = {}  # token -> occurrences in the output (frequency/presence penalties)
        self.first_sibling: Optional["Request"] = None  # n > 1: wait for it to fill the shared prompt blocks
        self.hash_blocks = False  # prefix caching off: hash its blocks anyway (n > 1 siblings share the prompt)
        self.grammar = None  # structured outputs: this sample's StructuredOutputGrammar (its own matcher)
        self.bad_words_token_ids: list = []  # bad_words, tokenized (with and without a leading space)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list:
        return self.prompt_token_ids + self.output_token_ids

    def token(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def append_output(self, token: int):
        self.output_token_ids.append(token)
        self.output_counts[token] = self.output_counts.get(token, 0) + 1

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

"""LLMEngine: requests in, outputs out. Each step() schedules, runs one forward over the flattened
batch, samples, detokenizes and checks stop conditions. LLM (llm.py) is the offline front end."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from metal_engine.config import EngineConfig
from metal_engine.engine import Engine
from metal_engine.kv_cache_manager import KVCacheManager
from metal_engine.outputs import CompletionOutput, RequestOutput
from metal_engine.request import Request
from metal_engine.sampler import log_softmax, plain_greedy, sample_batch, top_logprobs
from metal_engine.sampling_params import SamplingParams
from metal_engine.scheduler import Scheduler
from metal_engine.tokenizer import IncrementalDetokenizer, Tokenizer

PromptType = Union[str, dict, list]


def resolve_model_path(model: Optional[str], progress: bool = True, quantization: Optional[str] = None) -> Path:
    """A checkpoint folder as is (or, with `quantization`, its quantized copy from the cache); a .gguf file or
    no model (the default) through the conversion cache."""
    from metal_engine import gguf_checkpoint, quantization as quant

    is_gguf = model is not None and Path(os.fspath(model)).suffix == ".gguf"
    if quantization == "gguf" and (model is None or is_gguf):
        quantization = None  # vLLM's name for a GGUF file's own formats
    if quantization is not None:
        quant.check_format(quantization)
    if model is None or (Path(os.fspath(model)).suffix == ".gguf" and Path(os.fspath(model)).is_file()):
        if quantization is not None:
            raise ValueError(f"quantization={quantization!r}: a GGUF file keeps its own formats; quantization= "
                             "applies to float checkpoint folders")
        if model is None:
            return gguf_checkpoint.default_checkpoint(progress=progress)
        return gguf_checkpoint.cached_checkpoint(Path(os.fspath(model)), progress=progress)
    p = Path(os.fspath(model))
    if p.is_dir():
        from metal_engine import mlx_checkpoint

        cfg = p / "config.json"
        if cfg.exists() and mlx_checkpoint.mlx_quantization(json.loads(cfg.read_text())):
            if quantization is not None:
                raise ValueError(f"{p} is already quantized (MLX); quantization= applies to float checkpoints")
            return mlx_checkpoint.mlx_converted_checkpoint(p, progress=progress)
        return quant.quantized_checkpoint(p, quantization, progress=progress) if quantization else p
    raise FileNotFoundError(f"model {str(model)!r} is neither a checkpoint folder nor a .gguf file")


@dataclass
class _Batch:
    """A submitted step: its ticket, the (request, tokens) it computes, who owns each logits row, and whether the
    device picked greedy tokens."""

    ticket: int
    scheduled: list
    row_owner: list
    greedy: bool


@dataclass
class _Sample:
    """Per-sample state the engine keeps beside the scheduler's Request."""

    request: Request
    output: CompletionOutput
    detok: Optional[IncrementalDetokenizer]
    full_text: str = ""


class _Parent:
    def __init__(self, request_id, prompt, prompt_ids, params, arrival):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrival = arrival
        self.samples: list = []
        self.prompt_logprobs = None

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)

    def snapshot(self) -> RequestOutput:
        """The request as it stands, in objects later steps do not change (the async engine hands them to
        other threads): the outputs, their token and logprob lists and the metrics are copies."""
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            outputs=[dataclasses.replace(s.output, token_ids=list(s.output.token_ids),
                                         logprobs=None if s.output.logprobs is None else list(s.output.logprobs))
                     for s in self.samples],
            finished=self.finished,
            metrics=dataclasses.replace(self.samples[0].request.metrics),
        )


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config.resolve()
        backend = config.select_backend()
        self.model_path = resolve_model_path(config.model, progress=progress, quantization=config.quantization)
        self.engine = Engine(
            self.model_path,
            dtype=config.dtype,
            activation_dtype=config.activation_dtype,
            kv_cache_dtype=config.kv_cache_dtype,
            backend=backend,
            block_size=config.block_size,
            kv_cache_memory=config.kv_cache_memory,
            num_kv_blocks=config.num_kv_blocks or 0,
            scratch_pool_mb=config.scratch_pool_mb,
            num_threads=config.num_threads,
        )
        mc = self.engine.model_config
        self.vocab_size = mc.vocab_size
        self.tokenizer: Optional[Tokenizer] = None
        tok_dir = Path(config.tokenizer) if config.tokenizer else self.model_path
        if config.tokenizer and not (tok_dir / "tokenizer.json").exists():
            raise FileNotFoundError(f"tokenizer={config.tokenizer!r} has no tokenizer.json")
        if not config.skip_tokenizer_init and (tok_dir / "tokenizer.json").exists():
            self.tokenizer = Tokenizer.from_checkpoint(tok_dir)
        self.eos_token_ids = self._eos_token_ids()  # resolved once, not per request
        bs, num_blocks = self.engine.block_size, self.engine.num_kv_blocks
        capacity = num_blocks * bs
        if config.max_model_len is None:
            self.max_model_len = min(mc.max_position_embeddings, capacity)
        else:
            self.max_model_len = config.max_model_len
            if self.max_model_len > capacity:
                raise ValueError(
                    f"max_model_len {self.max_model_len} needs {-(-self.max_model_len // bs)} KV blocks but the cache "
                    f"holds {num_blocks} ({capacity} tokens); raise kv_cache_memory or lower max_model_len"
                )
        if config.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not config.chunked_prefill:  # every prompt fits one step's token budget: never chunked
            config.max_num_batched_tokens = max(config.max_num_batched_tokens, self.max_model_len)
        # every layer sliding (one window): blocks that leave it are freed as requests go on
        self.kv = KVCacheManager(num_blocks, bs, enable_caching=config.enable_prefix_caching,
                                 sliding_window=mc.uniform_sliding_window)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        self.rng = np.random.default_rng(config.seed)
        self._structured = None  # the StructuredOutputManager, made at the first constrained request
        self.parents: dict = {}
        self._ids = itertools.count()
        # num_steps_ahead: steps submitted while the step before them was in flight (async scheduling)
        self.stats = {"num_steps": 0, "num_tokens": 0, "num_preemptions": 0, "num_steps_ahead": 0}
        # async scheduling: on where the device runs apart from the host (Metal), unless asked
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.engine.backend != "cpu")
        self._in_flight: Optional[_Batch] = None  # a step submitted ahead (async scheduling), read by the next step()

    # ----------------------------------------------------------------------------------- requests
    def _prompt_ids(self, prompt: PromptType) -> tuple[Optional[str], list]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass {'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                return prompt.get("prompt"), ids
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
        raise ValueError(
            f"a prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}"
        )

    def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Validates and enqueues a request; a bad one raises ValueError and changes nothing."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_ids(prompt)
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError("prompt_token_ids must be a list of integers") from None
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "shorten the prompt or raise max_model_len"
            )
        for name, tokens in (("stop token id", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                             ("logit_bias token id", list(params.logit_bias or ()))):
            for t in tokens or []:
                if not 0 <= t < self.vocab_size:
                    raise ValueError(f"{name} {t} is outside the vocabulary [0, {self.vocab_size})")
        cap = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            if cap is not None and (getattr(params, name) or 0) > cap:
                raise ValueError(f"{name}={getattr(params, name)} is more than this engine's max_logprobs ({cap})")
        so = params.structured_outputs
        if so is not None:
            self.structured_output_manager().grammar(so)  # compiled (and checked) once, before anything changes
        bad_words = self._bad_words_token_ids(params.bad_words) if params.bad_words else []
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.monotonic()
        parent = _Parent(request_id, text, ids, params, now)
        salt = None if self.config.enable_prefix_caching else f"req:{request_id}"
        user_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if user_salt is not None:  # vLLM's cache_salt: cached blocks are shared only between requests with it
            if not isinstance(user_salt, str) or not user_salt:
                raise ValueError("cache_salt must be a non-empty string")
            salt = salt or f"salt:{user_salt}"
        for i in range(params.n):
            p = params if params.n == 1 else params.clone(n=1, seed=None if params.seed is None else params.seed + i)
            req = Request(f"{request_id}#{i}", ids, p, arrival_time=now, eos_token_ids=self.eos_token_ids,
                          max_model_len=self.max_model_len, cache_salt=salt, parent=parent, sample_index=i)
            req.hash_blocks = params.n > 1  # with prefix caching off, only siblings share (their prompt)
            if i > 0:
                req.first_sibling = parent.samples[0].request
            if so is not None:
                req.grammar = self._structured.matcher(so)  # each sample its own matcher
            req.bad_words_token_ids = bad_words
            detok = (IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                     if self.tokenizer else None)
            out = CompletionOutput(index=i, text="", token_ids=[], cumulative_logprob=req.cumulative_logprob,
                                   logprobs=req.logprobs)
            parent.samples.append(_Sample(req, out, detok))
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.parents[request_id] = parent
        for s in parent.samples:
            self.scheduler.add_request(s.request)
        return request_id

    def structured_output_manager(self):
        if self._structured is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer (tokenizer.json); this checkpoint "
                                 "has none")
            from metal_engine.structured_output import StructuredOutputManager

            self._structured = StructuredOutputManager(self.tokenizer, self.vocab_size)
        return self._structured

    def _bad_words_token_ids(self, words) -> list:
        """Each bad word's tokens, alone and after a space (vLLM's bad_words)."""
        if self.tokenizer is None:
            raise ValueError("bad_words need the model's tokenizer (tokenizer.json); this checkpoint has none")
        out = []
        for w in words:
            for text in (w, " " + w.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def _eos_token_ids(self) -> tuple:
        """The tokenizer's end-of-sequence ids, else config.json's eos_token_id."""
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return tuple(self.tokenizer.eos_token_ids)
        try:
            e = json.loads((self.model_path / "config.json").read_text()).get("eos_token_id")
        except (OSError, ValueError):
            return ()
        return tuple(e) if isinstance(e, list) else (e,) if isinstance(e, int) else ()

    def abort_request(self, request_id: str):
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return
        for s in parent.samples:
            if not s.request.is_finished:
                self.scheduler.finish(s.request)
                s.output.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished(self) -> tuple[int, int]:
        return len(self.scheduler.running), len(self.scheduler.waiting)

    # -------------------------------------------------------------------------------------- step
    def step(self) -> list:
        """One scheduler step and forward; returns snapshots of the requests that changed.

        With async scheduling, the greedy decode step after this one is scheduled and submitted before this one is
        read back (vLLM's async scheduling): its rows take this step's tokens on the device, so the device runs step
        N + 1 while the host samples, detokenizes and checks step N. A request that step N finishes has its row of
        step N + 1 dropped, as vLLM drops the token computed past a stop."""
        batch = self._in_flight
        self._in_flight = None
        if batch is None:
            sched = self.scheduler.schedule()
            self.stats["num_preemptions"] += len(sched.preempted)
            if not sched.scheduled:
                if self.scheduler.has_unfinished():
                    raise RuntimeError("the scheduler could not place any request: the KV cache is too small")
                return []
            batch = self._submit(sched.scheduled)
        if self.async_scheduling and batch.greedy:
            self._in_flight = self._submit_next_decode(batch)
        outputs = self._finish(batch)
        nxt = self._in_flight
        if nxt is not None and all(req.is_finished for req, _ in nxt.scheduled):
            self._in_flight = None  # every request it continues has finished: nothing to wait for later
            self.engine.collect(nxt.ticket)
        return outputs

    def _submit(self, scheduled, prev_rows: Optional[dict] = None) -> "_Batch":
        """Submits a step over `scheduled` [(request, tokens)]; with `prev_rows` {request: row}, each of those
        requests' one token is the greedy token of that row of the step in flight, filled in on the device."""
        bs = self.engine.block_size
        toks, pos, slots, qsl, lens, rows, row_owner, tables, fed = [], [], [], [0], [], [], [], [], []
        now = time.monotonic()
        for req, n in scheduled:
            start = req.num_computed_tokens
            end = start + n
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            p = np.arange(start, end)
            block_ids = self.kv.block_table(req)  # int32, appended to as blocks are added
            plen = len(req.prompt_token_ids)
            if prev_rows is not None and req in prev_rows:  # its token is still on the device
                toks.append(0)
                fed.append(prev_rows[req])
            elif end <= plen:
                toks.extend(req.prompt_token_ids[start:end])
            elif start >= plen:
                toks.extend(req.output_token_ids[start - plen:end - plen])
            else:
                toks.extend(req.prompt_token_ids[start:])
                toks.extend(req.output_token_ids[:end - plen])
            if prev_rows is not None and req not in prev_rows:
                fed.extend([-1] * n)
            pos.append(p)
            slots.append(block_ids[p // bs].astype(np.int64) * bs + p % bs)
            lens.append(end)
            tables.append(block_ids)
            base = qsl[-1]
            if req.params.prompt_logprobs is not None and start < len(req.prompt_token_ids) - 1:
                last = min(end, len(req.prompt_token_ids) - 1)  # rows scoring prompt tokens start+1..last
                for i in range(start, last):
                    rows.append(base + i - start)
                    row_owner.append((req, "prompt", i))
            if end >= req.num_tokens:  # the last known token, or one still on the device: a sample row
                rows.append(base + n - 1)
                row_owner.append((req, "sample", None))
            qsl.append(base + n)
        width = max(len(t) for t in tables)
        bt = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = t
        # When every row picks a plain greedy token (no logprobs, penalties or banned tokens), the device
        # chooses it and only the token ids come back.
        greedy = bool(row_owner) and all(kind == "sample" and plain_greedy(req) for req, kind, _ in row_owner)
        ticket = self.engine.submit(np.asarray(toks, dtype=np.int32), np.concatenate(pos), qsl, lens, bt,
                                    np.concatenate(slots), np.asarray(rows, dtype=np.int32), greedy=greedy,
                                    prev_token_rows=None if prev_rows is None else np.asarray(fed, dtype=np.int32))
        self.stats["num_steps"] += 1
        self.stats["num_tokens"] += len(toks)
        for req, n in scheduled:
            req.num_computed_tokens += n
        return _Batch(ticket, list(scheduled), row_owner, greedy)

    def _submit_next_decode(self, batch: "_Batch") -> Optional["_Batch"]:
        """The greedy decode step after `batch`, submitted before `batch` is read back, when the scheduler knows
        it now: every request of `batch` sampled a plain greedy token, nothing waits to be admitted, and each
        continuing request (not one `batch` surely finishes by length) gets its KV slot without preempting.
        None otherwise: the next step() schedules as usual once `batch` is in."""
        running = self.scheduler.running
        if self.scheduler.waiting or any(req.is_finished for req in running):
            return None
        row_of, nxt = {}, []
        for r, (req, kind, _) in enumerate(batch.row_owner):
            if req.is_finished:  # finished while `batch` was in flight (an abort): nothing to continue
                continue
            if kind != "sample":
                return None
            row_of[req] = r
            if len(req.output_token_ids) + 1 >= req.max_tokens or req.num_tokens + 1 >= self.max_model_len:
                continue  # the token `batch` gives it is its last
            nxt.append((req, 1))
        if not nxt or len(row_of) != len(running):  # a running request `batch` left out would wait behind it
            return None
        for req, _ in nxt:
            if self.kv.allocate_slots(req, 1) is None:  # blocks it gained stay its own for its next step
                return None
        self.stats["num_steps_ahead"] += 1
        return self._submit(nxt, prev_rows=row_of)

    def _finish(self, batch: "_Batch") -> list:
        """Reads a submitted step back: samples (unless the device did), appends tokens, checks stops."""
        logits = self.engine.collect(batch.ticket)
        row_owner, greedy = batch.row_owner, batch.greedy
        changed = {}
        now = time.monotonic()
        sample_rows = [r for r, (_, kind, _) in enumerate(row_owner) if kind == "sample"]
        if greedy:
            picked = [(int(logits[r]), None) for r in sample_rows]
        elif sample_rows:
            reqs = [row_owner[r][0] for r in sample_rows]
            # the structured-output rows: one bitmask for all of them, filled in parallel
            constrained = [i for i, q in enumerate(reqs) if q.grammar is not None]
            masks = {}
            if constrained:
                masks = dict(zip(constrained, self._structured.allowed([reqs[i].grammar for i in constrained])))
            rows_logits = logits if len(sample_rows) == len(logits) else logits[sample_rows]
            picked = sample_batch(rows_logits, reqs, self.rng, masks)
        picks = dict(zip(sample_rows, picked)) if sample_rows else {}
        for r, (req, kind, i) in enumerate(row_owner):
            if req.is_finished:  # finished (or aborted) since this step was submitted: its row is dropped
                continue
            parent = req.parent
            if kind == "prompt":
                if req.sample_index == 0 and len(parent.prompt_logprobs) == i + 1:  # not again after preemption
                    self._record_prompt_logprob(parent, logits[r], req.prompt_token_ids[i + 1])
                continue
            token, raw = picks[r]
            self._append_token(parent.samples[req.sample_index], token, raw, now)
            changed[parent.request_id] = parent
        outputs = []
        for parent in changed.values():
            outputs.append(parent.snapshot())
            if parent.finished:
                self.parents.pop(parent.request_id, None)
        return outputs

    def _record_prompt_logprob(self, parent: _Parent, row: np.ndarray, token: int):
        lp = log_softmax(row)
        parent.prompt_logprobs.append(top_logprobs(lp, token, parent.params.prompt_logprobs, self._decode_one))

    def _decode_one(self, token: int) -> Optional[str]:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else None

    def _append_token(self, s: _Sample, token: int, raw_logprobs, now: float):
        req, out = s.request, s.output
        p = req.params
        req.append_output(token)
        if req.grammar is not None:
            req.grammar.accept(token)
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if raw_logprobs is not None:
            req.logprobs.append(top_logprobs(raw_logprobs, token, p.logprobs, self._decode_one))
            req.cumulative_logprob += float(raw_logprobs[token])
            out.cumulative_logprob = req.cumulative_logprob
        out.token_ids = req.output_token_ids
        prev_len = len(s.full_text)
        if s.detok is not None:
            s.full_text += s.detok.add([token])
        out.text = s.full_text
        # Stop conditions, in vLLM's order: EOS / stop token, stop strings, length.
        n_out = len(req.output_token_ids)
        reason = stop = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                reason = "stop"
            elif p.stop_token_ids and token in p.stop_token_ids:
                reason, stop = "stop", token
            elif p.stop_strings and s.detok is not None:
                reason, stop = self._check_stop_strings(s, prev_len)
        if reason is None and (n_out >= req.max_tokens or req.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            out.finish_reason, out.stop_reason = reason, stop
            req.finish_reason, req.stop_reason = reason, stop
            m.finished_time = now
            self.scheduler.finish(req)

    def _check_stop_strings(self, s: _Sample, prev_len: int):
        """Looks for a stop string that ends in the text this token added."""
        text = s.full_text
        for stop in s.request.params.stop_strings:
            idx = text.find(stop, max(0, prev_len - len(stop) + 1))
            if idx >= 0:
                keep = idx + len(stop) if s.request.params.include_stop_str_in_output else idx
                s.output.text = text[:keep]
                return "stop", stop
        return None, None

    def stop_string_holdback(self, params: SamplingParams) -> int:
        """Characters a stream must hold back: they could still become the start of a stop string."""
        return max((len(x) for x in params.stop_strings), default=1) - 1

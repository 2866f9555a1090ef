"""One vLLM step on our Engine: vLLM's SchedulerOutput becomes the flattened batch Engine.submit takes
(token_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping), and the logits become vLLM's
ModelRunnerOutput (sampled tokens, logprobs, prompt logprobs).

With vLLM's async scheduling (scheduler_config.async_scheduling), vLLM schedules step N+1 before step N's tokens
come back: a step whose every row is plain greedy returns an AsyncModelRunnerOutput, its tokens stay on the device,
and step N+1's rows take them there (Engine.submit's prev_token_rows) while the host has not read them. vLLM
reads step N's output (get_output) only after it has handed us step N+1, so N+1 is encoded while N runs. Steps
are collected in submission order; a step sampled on the host first collects the ones before it.

vLLM sends each request's prompt once (NewRequestData) and never the tokens it samples: the runner keeps every
request's token history itself. vLLM's block ids index our PagedKVCache directly (it holds exactly vLLM's
num_blocks blocks; block 0 is vLLM's null block and is never assigned to a request).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
from vllm.v1.outputs import AsyncModelRunnerOutput

from metal_engine.request import Request
from metal_engine.sampler import log_softmax, plain_greedy, sample_batch
from metal_engine.sampling_params import SamplingParams


def our_sampling_params(sp, vocab_size: int) -> SamplingParams:
    """vLLM's SamplingParams as ours, for sampling only (vLLM's scheduler checks stop conditions). min_tokens
    bans vLLM's all_stop_token_ids (EOS and the stop tokens), as vLLM's MinTokensLogitsProcessor does."""
    def n_logprobs(v):
        return None if v is None else (vocab_size if v == -1 else int(v))

    stops = sorted(getattr(sp, "all_stop_token_ids", None) or set(sp.stop_token_ids or ()))
    seed = None if sp.seed is None else int(sp.seed) % (1 << 64)  # vLLM takes any int64; numpy's PCG64 wants >= 0
    return SamplingParams(
        temperature=float(sp.temperature), top_p=float(sp.top_p), top_k=int(sp.top_k), min_p=float(sp.min_p),
        presence_penalty=float(sp.presence_penalty), frequency_penalty=float(sp.frequency_penalty),
        repetition_penalty=float(sp.repetition_penalty), seed=seed, min_tokens=int(sp.min_tokens or 0),
        stop_token_ids=stops or None, ignore_eos=True, max_tokens=None,
        logprobs=n_logprobs(sp.logprobs), prompt_logprobs=n_logprobs(sp.prompt_logprobs),
        logit_bias=sp.logit_bias or None, allowed_token_ids=sp.allowed_token_ids or None)


@dataclass
class CachedRequest:
    """What the runner keeps of one vLLM request between steps."""

    req: Request                 # prompt + output tokens, sampling params, seeded generator
    block_ids: list              # vLLM's block ids for it, in order
    num_computed_tokens: int = 0
    prompt_logprobs: Optional[list] = None  # per scored prompt position: (ids [k+1], logprobs [k+1], rank)
    prompt_logprobs_sent: bool = False      # sent once, when the prompt's prefill completes (not again on resume)
    pending: int = 0             # tokens sampled on the device and not read back yet (async scheduling): they
                                 # follow req's tokens; the last of them is row pending_row of step pending_ticket
    pending_ticket: int = 0
    pending_row: int = -1

    @property
    def num_tokens(self) -> int:
        return self.req.num_tokens + self.pending


def bitmask_to_bool(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """vLLM's grammar bitmask int32 [rows, ceil(vocab / 32)] (bit set = allowed) as bool [rows, vocab]."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask, dtype="<i4").view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab].astype(bool)


class ModelRunner:
    MAX_ROWS = 256  # logits rows per engine call: more (long prompt-logprob chunks) rerun the step's forward
    MAX_IN_FLIGHT = 2  # steps submitted and not collected: Engine.submit's limit (kMaxStepsInFlight)

    def __init__(self, engine, vocab_size: int, max_model_len: int, seed: int = 0, async_scheduling: bool = False):
        self.engine = engine
        self.async_scheduling = async_scheduling  # plain greedy steps return vLLM's AsyncModelRunnerOutput
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = engine.block_size
        self.requests: dict[str, CachedRequest] = {}
        self.rng = np.random.default_rng(seed)
        self._pending = None  # the forward of the step awaiting sample_tokens
        # Steps submitted and not collected, oldest first: (ticket, [(req_id, row)] whose greedy tokens the host
        # appends when it reads them, or None for a step sampled on the host). Results read early wait in _results.
        self._in_flight: deque = deque()
        self._results: dict = {}
        # what vLLM's scheduler did, as this runner saw it (tests and logs read it)
        self.stats = {"steps": 0, "tokens": 0, "preempted": 0, "resumed": 0, "prefix_hit_tokens": 0,
                      "partial_prefills": 0, "async_steps": 0, "fed_rows": 0}

    # ------------------------------------------------------------------------------------- state
    def update_states(self, so) -> None:
        self.stats["preempted"] += len(so.preempted_req_ids or ())
        self.stats["resumed"] += len(so.scheduled_cached_reqs.resumed_req_ids)
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
        for new in so.scheduled_new_reqs:
            if new.prompt_token_ids is None:
                raise ValueError(f"request {new.req_id}: prompt embeddings are not supported by metal_engine; "
                                 "send token ids or text")
            if new.sampling_params is None:
                raise ValueError(f"request {new.req_id}: pooling requests are not supported by metal_engine")
            params = our_sampling_params(new.sampling_params, self.vocab_size)
            req = Request(new.req_id, new.prompt_token_ids, params, arrival_time=0.0,
                          max_model_len=self.max_model_len)
            req.bad_words_token_ids = list(getattr(new.sampling_params, "_bad_words_token_ids", None) or [])
            self.requests[new.req_id] = CachedRequest(req, list(new.block_ids[0]), new.num_computed_tokens)
            self.stats["prefix_hit_tokens"] += new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        resumed = cached.resumed_req_ids
        for i, rid in enumerate(cached.req_ids):
            st = self.requests[rid]
            st.num_computed_tokens = cached.num_computed_tokens[i]
            new_ids = cached.new_block_ids[i]
            if rid in resumed:
                st.block_ids = list(new_ids[0])  # resumed after preemption: a new block list
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            n_out = cached.num_output_tokens[i]  # with async scheduling: including the tokens it has not seen yet
            if n_out < len(st.req.output_token_ids) + st.pending:
                self._collect_through(self._newest_ticket())  # known tokens only, then drop the discarded ones
            out = st.req.output_token_ids
            if n_out < len(out):  # tokens vLLM discarded (a failed KV load, a dropped stale output): forget them
                for t in out[n_out:]:
                    st.req.output_counts[t] -= 1
                del out[n_out:]

    # ---------------------------------------------------------------------------------- forward
    def execute(self, so) -> bool:
        """The forward of a step, submitted; its results wait for sample(). False for a step with no tokens."""
        self.update_states(so)
        if so.total_num_scheduled_tokens == 0:
            self._pending = None
            return False
        order = [n.req_id for n in so.scheduled_new_reqs] + list(so.scheduled_cached_reqs.req_ids)
        feedable = self._feedable_ticket()
        for rid in order:  # a token still on the device is taken there only from the step submitted last
            st = self.requests[rid]
            if (st.num_computed_tokens + so.num_scheduled_tokens[rid] > st.req.num_tokens
                    and (st.pending > 1 or st.pending_ticket != feedable)):
                self._collect_through(self._newest_ticket())
                break
        if len(self._in_flight) >= self.MAX_IN_FLIGHT:
            self._collect_through(self._in_flight[0][0])
        batch = self._batch(so, order)
        rows = batch["rows"]
        if len(rows) > self.MAX_ROWS:  # several engine steps below, which take no step in flight and no feed
            self._collect_through(self._newest_ticket())
            if batch["prev"] is not None:
                batch = self._batch(so, order)
        args, greedy, row_kind = batch["args"], batch["greedy"], batch["row_kind"]
        if batch["prev"] is not None:
            self.stats["fed_rows"] += int((batch["prev"] >= 0).sum())
        if len(rows) <= self.MAX_ROWS:
            res = self.engine.submit(*args, rows, greedy=greedy, prev_token_rows=batch["prev"])
            self._in_flight.append([res, None])
        else:  # rerunning the forward rewrites the same K/V to the same slots: only the logits rows differ
            res = np.concatenate([self.engine.step(*args, rows[i:i + self.MAX_ROWS], greedy=greedy)
                                  for i in range(0, len(rows), self.MAX_ROWS)])
        self.stats["steps"] += 1
        self.stats["tokens"] += len(args[0])
        self._pending = (so, order, row_kind, res, greedy)
        return True

    def _batch(self, so, order) -> dict:
        """The step's flattened inputs. A token sampled on the device by the step submitted last and not read
        back (async scheduling) is a placeholder in token_ids, its row of that step in prev [num_tokens]."""
        bs = self.block_size
        toks, pos, slots, qsl, lens, tables, prev = [], [], [], [0], [], [], []
        fed = False
        rows, row_kind = [], []  # logits rows: ("sample", req index) or ("prompt", req index, position)
        for k, rid in enumerate(order):
            st = self.requests[rid]
            n = so.num_scheduled_tokens[rid]
            req = st.req
            start, end = st.num_computed_tokens, st.num_computed_tokens + n
            if end > st.num_tokens:
                raise RuntimeError(f"request {rid}: vLLM scheduled tokens {start}..{end} but the runner knows "
                                   f"{st.num_tokens}")
            known = min(end, req.num_tokens)
            all_ids = req.prompt_token_ids if known <= len(req.prompt_token_ids) else req.all_token_ids
            p = np.arange(start, end)
            blocks = np.asarray(st.block_ids, dtype=np.int64)
            toks.extend(all_ids[start:known])
            prev.extend([-1] * (known - start))
            if end > known:  # its one token on the device (execute collected any other case)
                toks.append(0)
                prev.append(st.pending_row)
                fed = True
            pos.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            lens.append(end)
            tables.append(blocks)
            base = qsl[-1]
            plen = len(req.prompt_token_ids)
            if req.params.prompt_logprobs is not None and not st.prompt_logprobs_sent and start < plen - 1:
                if st.prompt_logprobs is None or start == 0:
                    st.prompt_logprobs = []
                for i in range(start, min(end, plen - 1)):  # the row at position i scores prompt token i + 1
                    rows.append(base + i - start)
                    row_kind.append(("prompt", k, i))
            if end == st.num_tokens:
                rows.append(base + n - 1)
                row_kind.append(("sample", k, None))
            else:
                self.stats["partial_prefills"] += 1
            qsl.append(base + n)
        width = max(len(t) for t in tables)
        bt = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = t
        reqs = [self.requests[r].req for r in order]
        greedy = (bool(row_kind) and not so.has_structured_output_requests
                  and all(kind == "sample" and plain_greedy(reqs[k]) for kind, k, _ in row_kind))
        return {"args": (np.asarray(toks, dtype=np.int32), np.concatenate(pos), qsl, lens, bt, np.concatenate(slots)),
                "rows": np.asarray(rows, dtype=np.int32), "greedy": greedy, "row_kind": row_kind,
                "prev": np.asarray(prev, dtype=np.int32) if fed else None}

    # ------------------------------------------------------------------------------ steps in flight
    def _newest_ticket(self) -> int:
        return self._in_flight[-1][0] if self._in_flight else 0

    def _feedable_ticket(self) -> int:
        """The step whose tokens the next one may take on the device: the one submitted last, if it was sampled
        there (0: none)."""
        return self._in_flight[-1][0] if self._in_flight and self._in_flight[-1][1] is not None else 0

    def _collect_through(self, ticket: int) -> None:
        """Reads back every step submitted up to `ticket`, in order; a greedy step's tokens join their requests
        (those still here: a finished request's last token is vLLM's to drop)."""
        while self._in_flight and self._in_flight[0][0] <= ticket:
            t, appends = self._in_flight.popleft()
            out = self.engine.collect(t)
            self._results[t] = out
            for rid, r in appends or ():
                st = self.requests.get(rid)
                if st is not None and st.pending > 0:
                    st.pending -= 1
                    st.req.append_output(int(out[r]))

    def _result(self, res):
        """A step's logits or greedy tokens: `res` itself for a step run at once, else its ticket's results."""
        if not isinstance(res, int):
            return res
        self._collect_through(res)
        return self._results.pop(res)

    # --------------------------------------------------------------------------------- sampling
    def sample(self, grammar_output=None):
        """Samples the pending step (the grammar's bitmask applied first) and returns vLLM's ModelRunnerOutput."""
        import torch
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsTensors, ModelRunnerOutput

        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        so, order, row_kind, res, greedy = self._pending
        self._pending = None
        sample_rows = [r for r, (kind, _, _) in enumerate(row_kind) if kind == "sample"]
        if greedy and self.async_scheduling and isinstance(res, int):
            return self._sample_on_device(res, order, row_kind, sample_rows)
        out = self._result(res)
        reqs = [self.requests[r].req for r in order]
        sampled: dict = {}  # req index -> (token, logprobs [vocab] or None)
        if greedy:
            for r in sample_rows:
                sampled[row_kind[r][1]] = (int(out[r]), None)
        elif sample_rows:
            who = [row_kind[r][1] for r in sample_rows]
            masks = {}
            if grammar_output is not None and len(grammar_output.structured_output_request_ids):
                allowed = bitmask_to_bool(grammar_output.grammar_bitmask, self.vocab_size)
                where = {rid: i for i, rid in enumerate(grammar_output.structured_output_request_ids)}
                for j, k in enumerate(who):
                    if order[k] in where:
                        masks[j] = allowed[where[order[k]]]
            logits = out if len(sample_rows) == len(out) else out[sample_rows]
            picked = sample_batch(logits, [reqs[k] for k in who], self.rng, masks)
            sampled = dict(zip(who, picked))
        sampled_ids, lp_rows = [], []
        for k, rid in enumerate(order):
            if k in sampled:
                token, lp = sampled[k]
                reqs[k].append_output(token)
                sampled_ids.append([token])
                lp_rows.append((k, token, lp))
            else:
                sampled_ids.append([])  # a partial prefill chunk: no token
        logprobs = self._logprobs_lists(reqs, lp_rows, len(order))
        prompt_lps = {}
        for r, (kind, k, i) in enumerate(row_kind):
            if kind != "prompt":
                continue
            st = self.requests[order[k]]
            target = st.req.prompt_token_ids[i + 1]
            ids, vals, rank = _top(log_softmax(out[r]), target, st.req.params.prompt_logprobs)
            st.prompt_logprobs.append((ids, vals, rank))
        for k, rid in enumerate(order):
            st = self.requests[rid]
            plen = len(st.req.prompt_token_ids)
            if (st.req.params.prompt_logprobs is not None and st.prompt_logprobs is not None
                    and len(st.prompt_logprobs) == plen - 1 and k in sampled):
                ids = torch.tensor(np.array([x[0] for x in st.prompt_logprobs], np.int64).reshape(plen - 1, -1))
                vals = torch.tensor(np.array([x[1] for x in st.prompt_logprobs], np.float32).reshape(plen - 1, -1))
                ranks = torch.tensor(np.array([x[2] for x in st.prompt_logprobs], np.int64))
                prompt_lps[rid] = LogprobsTensors(ids, vals, ranks)
                st.prompt_logprobs, st.prompt_logprobs_sent = None, True
        return ModelRunnerOutput(req_ids=list(order), req_id_to_index={r: i for i, r in enumerate(order)},
                                 sampled_token_ids=sampled_ids, logprobs=logprobs, prompt_logprobs_dict=prompt_lps)

    def _sample_on_device(self, ticket, order, row_kind, sample_rows):
        """A plain greedy step under async scheduling: its tokens stay on the device for the next step, and vLLM
        gets them when it asks (after it has handed us the next step)."""
        appends = [(order[row_kind[r][1]], r) for r in sample_rows]
        assert self._in_flight and self._in_flight[-1][0] == ticket
        self._in_flight[-1][1] = appends
        for rid, r in appends:
            st = self.requests[rid]
            st.pending += 1
            st.pending_ticket, st.pending_row = ticket, r
        self.stats["async_steps"] += 1
        return _DeviceSampledOutput(self, ticket, list(order), {row_kind[r][1]: r for r in sample_rows})

    def _logprobs_lists(self, reqs, lp_rows, num_reqs):
        """vLLM's LogprobsLists: one row per request of the step, the sampled token in column 0, then the top k
        (k = the most any request asked for)."""
        from vllm.v1.outputs import LogprobsLists

        want = [reqs[k].params.logprobs for k, _, lp in lp_rows if lp is not None]
        if not want:
            return None
        k_max = max(want)
        ids = np.zeros((num_reqs, k_max + 1), np.int64)
        vals = np.zeros((num_reqs, k_max + 1), np.float32)
        ranks = np.zeros(num_reqs, np.int64)
        for k, token, lp in lp_rows:
            if lp is None:
                continue
            i, v, rank = _top(lp, token, k_max)
            ids[k], vals[k], ranks[k] = i, v, rank
        return LogprobsLists(ids, vals, ranks)


class _DeviceSampledOutput(AsyncModelRunnerOutput):
    """vLLM's AsyncModelRunnerOutput of a greedy step whose tokens are still on the device: get_output() reads
    them back (after the steps before it) as the ModelRunnerOutput sample() would have returned."""

    def __init__(self, runner, ticket, order, row_of):
        self.runner, self.ticket, self.order, self.row_of = runner, ticket, order, row_of

    def get_output(self):
        from vllm.v1.outputs import ModelRunnerOutput

        tokens = self.runner._result(self.ticket)
        sampled = [[int(tokens[self.row_of[k]])] if k in self.row_of else [] for k in range(len(self.order))]
        return ModelRunnerOutput(req_ids=self.order, req_id_to_index={r: i for i, r in enumerate(self.order)},
                                 sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={})


def _top(logprobs: np.ndarray, token: int, k: int):
    """(ids [k+1], logprobs [k+1], rank of token): token first, then the k most likely (vLLM's gather_logprobs)."""
    top = np.argpartition(-logprobs, min(k, len(logprobs) - 1))[:k] if k > 0 else np.zeros(0, np.int64)
    top = top[np.argsort(-logprobs[top], kind="stable")]
    ids = np.concatenate([[token], top]).astype(np.int64)
    rank = int((logprobs >= logprobs[token]).sum())  # vLLM's: ties share the lower rank
    return ids, logprobs[ids].astype(np.float32), rank

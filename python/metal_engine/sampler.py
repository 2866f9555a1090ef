"""Sampling from a step's logits: the structured-output grammar's mask, allowed_token_ids, bad_words,
logit_bias, penalties, min_tokens, greedy or temperature with top-k / top-p / min-p, per-request seeded
generators, and top-n logprobs.

Definitions (as vLLM): repetition_penalty divides positive and multiplies negative logits of every
token seen in the prompt or output; frequency_penalty subtracts penalty x count and presence_penalty
subtracts penalty x [count > 0] over output tokens. Logprobs are of the model's distribution with the
grammar's mask applied (vLLM applies the bitmask to the logits before its sampler), before any other
processing. Where min_tokens (or allowed_token_ids, bad_words) and the grammar leave no token, the grammar wins.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from metal_engine.request import Request


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def apply_penalties(logits: np.ndarray, req: Request) -> np.ndarray:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = np.unique(np.fromiter(req.all_token_ids, dtype=np.int64))
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and req.output_counts:
        ids = np.fromiter(req.output_counts.keys(), dtype=np.int64)
        counts = np.fromiter(req.output_counts.values(), dtype=np.float32)
        logits[ids] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def plain_greedy(req: Request) -> bool:
    """The next token of `req` is the argmax of its raw logits: greedy, no logprobs, no penalties, no grammar,
    bias or banned tokens (min_tokens, allowed_token_ids, bad_words)."""
    p = req.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0 and len(req.output_token_ids) >= p.min_tokens and req.grammar is None
            and not p.logit_bias and p.allowed_token_ids is None and not req.bad_words_token_ids)


def banned_tokens(req: Request, vocab: int) -> list:
    """Tokens `req` may not take next: end-of-sequence and stop tokens before min_tokens, and the last token
    of each bad word whose other tokens end the output (vLLM's bad_words)."""
    p = req.params
    out = []
    if len(req.output_token_ids) < p.min_tokens:
        out += [t for t in (*([] if p.ignore_eos else req.eos_token_ids), *(p.stop_token_ids or [])) if 0 <= t < vocab]
    if req.bad_words_token_ids:
        tail = req.output_token_ids
        for word in req.bad_words_token_ids:
            k = len(word) - 1
            if k == 0 or (len(tail) >= k and tail[len(tail) - k:] == word[:-1]):
                out.append(word[-1])
    return out


def restrict(x: np.ndarray, req: Request) -> np.ndarray:
    """allowed_token_ids, logit_bias, bad words and min_tokens on a copy of the logits row."""
    p = req.params
    if p.allowed_token_ids is not None:
        keep = np.full(len(x), -np.inf, np.float32)
        ids = np.asarray(p.allowed_token_ids, np.int64)
        keep[ids] = 0.0
        x = x + keep
    if p.logit_bias:
        ids = np.fromiter(p.logit_bias.keys(), np.int64)
        x[ids] += np.fromiter(p.logit_bias.values(), np.float32)
    banned = banned_tokens(req, len(x))
    if banned:
        x[banned] = -np.inf
    return x


def sample_batch(logits: np.ndarray, reqs: list, rng: np.random.Generator, masks: Optional[dict] = None) -> list:
    """The next token of each row's request, from logits [rows, vocab] (raw; edited in place), the whole batch
    at once: the
    grammar masks (row -> bool [vocab]) first, then per row the sparse edits (allowed tokens, bias, bans,
    penalties), then greedy rows by argmax and the others tempered and handed to the native sampler (top-k,
    top-p, min-p, an inverse-CDF draw in token order: include/metal_engine/sampler.h) with one uniform draw
    each from the request's own seeded generator, else `rng`, in row order.
    Returns [(token, logprobs [vocab] or None)]."""
    R, V = logits.shape
    x = np.ascontiguousarray(logits, dtype=np.float32)  # [R, V]: edited in place (the step's own array)
    masks = masks or {}
    for r, m in masks.items():
        x[r, ~m[:V]] = -np.inf
    want_lp = [r for r, q in enumerate(reqs) if q.params.logprobs is not None]
    logprobs = dict(zip(want_lp, log_softmax(x[want_lp]))) if want_lp else {}
    for r, q in enumerate(reqs):
        p = q.params
        if p.allowed_token_ids is not None or p.logit_bias or q.bad_words_token_ids or \
                len(q.output_token_ids) < p.min_tokens:
            row = restrict(x[r].copy(), q)
            if r not in masks or np.isfinite(row).any():  # else the grammar allows only what these ban: it wins
                x[r] = row
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            apply_penalties(x[r], q)  # in place on the row
    tokens = np.zeros(R, np.int64)
    greedy = np.array([q.params.greedy for q in reqs])
    if greedy.any():
        tokens[greedy] = np.argmax(x[greedy], axis=1)
    rest = np.flatnonzero(~greedy)
    if len(rest):
        from metal_engine import _core

        ps = [reqs[r].params for r in rest]
        u = np.array([(reqs[r].generator if reqs[r].generator is not None else rng).random() for r in rest])
        xs = x if len(rest) == R else np.ascontiguousarray(x[rest])
        tokens[rest] = _core.sample_rows(xs, np.array([p.temperature for p in ps], np.float32),
                                         np.array([p.top_k for p in ps], np.int32),
                                         np.array([p.top_p for p in ps], np.float32),
                                         np.array([p.min_p for p in ps], np.float32), u)
    return [(int(tokens[r]), logprobs.get(r)) for r in range(R)]


def top_logprobs(logprobs: np.ndarray, token: int, n: int, decode) -> dict:
    """{token: Logprob} for the chosen token plus the n most likely, with ranks (1 = most likely)."""
    from metal_engine.outputs import Logprob

    out = {}
    if n > 0:
        top = np.argpartition(-logprobs, min(n, len(logprobs) - 1))[:n]
        top = top[np.argsort(-logprobs[top], kind="stable")]
        for r, t in enumerate(top, 1):
            out[int(t)] = Logprob(float(logprobs[t]), r, decode(int(t)))
    if token not in out:
        rank = int((logprobs > logprobs[token]).sum()) + 1
        out[token] = Logprob(float(logprobs[token]), rank, decode(token))
    return out

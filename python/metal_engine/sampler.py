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


def filter_logits(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Sets every token outside the top-k / top-p / min-p sets to -inf (logits already tempered)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(logits, V - top_k)[V - top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0 or min_p > 0.0:
        order = np.argsort(-logits, kind="stable")
        sorted_logits = logits[order]
        probs = np.exp(sorted_logits - sorted_logits[0])
        probs /= probs.sum()
        keep = np.ones(V, dtype=bool)
        if top_p < 1.0:
            before = np.cumsum(probs) - probs  # mass of strictly more likely tokens
            keep &= before < top_p
        if min_p > 0.0:
            keep &= probs >= min_p * probs[0]
        keep[0] = True
        drop = order[~keep]
        logits = logits.copy()
        logits[drop] = -np.inf
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


def sample_row(logits: np.ndarray, req: Request, rng: np.random.Generator,
               grammar_mask: Optional[np.ndarray] = None) -> tuple[int, Optional[np.ndarray]]:
    """Picks the next token of `req` from its raw logits [vocab]; grammar_mask (bool [vocab]) the tokens its
    structured-output grammar allows. Returns (token, logprobs or None)."""
    p = req.params
    x = logits.astype(np.float32, copy=True)
    if grammar_mask is not None:
        x[~grammar_mask[: len(x)]] = -np.inf
    raw_logprobs = log_softmax(x) if p.logprobs is not None else None
    restricted = restrict(x.copy(), req)
    if grammar_mask is not None and not np.isfinite(restricted).any():
        restricted = x  # the grammar allows only what min_tokens / bad_words / allowed_token_ids ban: it wins
    x = apply_penalties(restricted, req)
    if p.greedy:
        return int(np.argmax(x)), raw_logprobs
    x = x / np.float32(p.temperature)
    x = filter_logits(x, p.top_k, p.top_p, p.min_p)
    probs = np.exp(x.astype(np.float64) - np.max(x))
    probs /= probs.sum()
    gen = req.generator if req.generator is not None else rng
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, gen.random() * cdf[-1], side="right"))
    token = min(token, len(probs) - 1)
    while token > 0 and probs[token] == 0.0:  # never land on a filtered token through rounding at the boundary
        token -= 1
    return token, raw_logprobs


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

"""Sampling: seeded runs repeat exactly whatever else is in the batch; top-k / top-p / min-p never emit a
token outside their set; penalties change logits as their definitions say."""

import numpy as np
import pytest

from metal_engine import LLM, SamplingParams
from metal_engine.request import Request
from metal_engine import _core
from metal_engine.sampler import apply_penalties

VOCAB = 211


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", block_size=4, num_kv_blocks=256,
               max_model_len=128, progress=False)


PROMPT = {"prompt_token_ids": [3, 14, 15, 92, 65, 35]}


def test_seeded_runs_repeat_whatever_the_batch(llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [i, i + 1, i + 2]} for i in range(7)]
    mixed = llm.generate(others[:3] + [PROMPT] + others[3:],
                         [SamplingParams(temperature=0.8, max_tokens=9)] * 3 + [sp]
                         + [SamplingParams(temperature=1.0, seed=5, max_tokens=30)] * 4, use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    again = llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    other_seed = llm.generate([PROMPT], sp.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def full_distributions(out):
    """Per generated position: (sampled token, raw probabilities over the whole vocabulary)."""
    res = []
    for tok, pos in zip(out.token_ids, out.logprobs):
        p = np.zeros(VOCAB)
        for t, lp in pos.items():
            p[t] = np.exp(lp.logprob)
        res.append((tok, p))
    return res


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k_stays_in_its_set(llm, top_k):
    sp = SamplingParams(temperature=1.0, top_k=top_k, seed=7, max_tokens=40, ignore_eos=True, logprobs=VOCAB, n=3)
    for c in llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs:
        for tok, p in full_distributions(c):
            assert (p > p[tok]).sum() < top_k


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_top_p_stays_in_its_set(llm, top_p):
    sp = SamplingParams(temperature=1.0, top_p=top_p, seed=8, max_tokens=40, ignore_eos=True, logprobs=VOCAB, n=3)
    for c in llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs:
        for tok, p in full_distributions(c):
            assert p[p > p[tok]].sum() < top_p + 1e-6  # the mass strictly above it is below top_p


@pytest.mark.parametrize("min_p", [0.1, 0.5])
def test_min_p_stays_in_its_set(llm, min_p):
    sp = SamplingParams(temperature=1.0, min_p=min_p, seed=9, max_tokens=40, ignore_eos=True, logprobs=VOCAB, n=3)
    for c in llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs:
        for tok, p in full_distributions(c):
            assert p[tok] >= min_p * p.max() - 1e-9


def filter_logits(logits, top_k, top_p, min_p, draws=4096):
    """One row's tempered logits with the tokens the native sampler never picks at -inf: what it picks over
    `draws` evenly spaced uniform draws (every kept token of these tests has probability > 1 / draws)."""
    x = np.ascontiguousarray(np.broadcast_to(logits.astype(np.float32), (draws, len(logits))))
    u = (np.arange(draws) + 0.5) / draws
    picked = _core.sample_rows(x, np.ones(draws, np.float32), np.full(draws, top_k, np.int32),
                               np.full(draws, top_p, np.float32), np.full(draws, min_p, np.float32), u)
    out = np.full(len(logits), -np.inf, np.float32)
    out[picked] = logits[picked]
    return out


def test_filters_directly():
    x = np.array([0.0, 3.0, 1.0, 2.0, -1.0], np.float32)
    assert np.isfinite(filter_logits(x, 2, 1.0, 0.0)).tolist() == [False, True, False, True, False]
    p = np.exp(x) / np.exp(x).sum()  # [0.032, 0.636, 0.086, 0.234, 0.012]
    assert np.isfinite(filter_logits(x, 0, 0.7, 0.0)).tolist() == [False, True, False, True, False]
    assert np.isfinite(filter_logits(x, 0, 0.5, 0.0)).tolist() == [False, True, False, False, False]
    keep = p >= 0.1 * p.max()
    assert np.isfinite(filter_logits(x, 0, 1.0, 0.1)).tolist() == keep.tolist()


def filtered_probs(x, temperature, top_k, top_p, min_p):
    """float64 probabilities of vLLM's definitions: softmax(x / T) restricted to top-k, then top-p (a token
    kept while the mass strictly before it, ties in token order, is below top_p), then min-p."""
    n = len(x)
    p = np.exp((x.astype(np.float64) - x.max()) / temperature)
    p /= p.sum()
    keep = np.ones(n, bool)
    if top_k:
        keep &= x >= np.sort(x)[-top_k]
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if top_p < 1:
        order = np.argsort(-np.where(keep, q, -1), kind="stable")
        before = np.cumsum(q[order]) - q[order]
        cut = np.zeros(n, bool)
        cut[order[before < top_p]] = True
        keep &= cut
    if min_p:
        keep &= p >= min_p * p.max()
    return np.where(keep, p, 0) / np.where(keep, p, 0).sum()


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.05),
                                               (5, 0.9, 0.02), (0, 0.999, 0.0)])
def test_native_sampler_draws_the_filtered_distribution(top_k, top_p, min_p):
    """Evenly spaced draws through the inverse CDF: each token is picked draws x its probability times (within
    one)."""
    rng = np.random.default_rng(top_k + int(top_p * 100))
    x = (rng.standard_normal(300) * 2).astype(np.float32)
    x[7] = x[9] = x.max() + 0.5  # a tie at the top: both kept, in token order
    x[20:30] = x[31]  # ties inside the nucleus
    draws = 20000
    got = np.bincount(_core.sample_rows(np.ascontiguousarray(np.broadcast_to(x, (draws, 300))),
                                        np.full(draws, 0.7, np.float32), np.full(draws, top_k, np.int32),
                                        np.full(draws, top_p, np.float32), np.full(draws, min_p, np.float32),
                                        (np.arange(draws) + 0.5) / draws), minlength=300)
    want = filtered_probs(x, 0.7, top_k, top_p, min_p) * draws
    assert np.abs(got - want).max() <= 1.0 + 1e-6, np.abs(got - want).max()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (40, 0.95), (0, 0.5)])
def test_native_sampler_on_a_flat_full_vocabulary(top_k, top_p):
    """49152 flat logits: a nucleus of thousands of tokens across many probability buckets; each draw picks
    exactly the token the reference inverse CDF gives (draws too near a CDF step are left out)."""
    rng = np.random.default_rng(top_k)
    x = (rng.standard_normal(49152) * 1.5).astype(np.float32)
    x[100:140] = x[200]  # ties
    q = filtered_probs(x, 0.8, top_k, top_p, 0.0)
    assert (q > 0).sum() > (20 if top_k else 1000)
    cdf = np.cumsum(q)
    u = rng.random(256)
    want = np.searchsorted(cdf, u, side="right")
    clear = np.min(np.abs(cdf[None, :] - u[:, None]), axis=1) > 1e-6
    got = _core.sample_rows(np.ascontiguousarray(np.broadcast_to(x, (256, 49152))), np.full(256, 0.8, np.float32),
                            np.full(256, top_k, np.int32), np.full(256, top_p, np.float32), np.zeros(256, np.float32), u)
    assert clear.sum() > 200
    assert (got[clear] == want[clear]).all()


def test_native_sampler_takes_a_batch_with_its_own_settings_per_row():
    x = np.array([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [-np.inf, -np.inf, -np.inf]], np.float32)
    t = np.ones(3, np.float32)
    out = _core.sample_rows(x, t, np.array([1, 0, 0], np.int32), np.array([1.0, 1.0, 1.0], np.float32),
                            np.zeros(3, np.float32), np.array([0.999, 0.9999999, 0.5]))
    assert out.tolist() == [1, 2, 0]  # top-1; the last draw reaches the last token; no finite logit: token 0
    with pytest.raises(ValueError, match="one value per row"):
        _core.sample_rows(x, t, np.zeros(2, np.int32), np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3))
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        _core.sample_rows(x, np.zeros(3, np.float32), np.zeros(3, np.int32), np.ones(3, np.float32),
                          np.zeros(3, np.float32), np.zeros(3))


def make_request(prompt, output, **params):
    r = Request("r", prompt, SamplingParams(**params), arrival_time=0.0, max_model_len=100)
    for t in output:
        r.append_output(t)
    return r


def test_repetition_penalty_definition():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.5], np.float32)
    r = make_request([0, 1], [1, 3], repetition_penalty=2.0)
    out = apply_penalties(logits.copy(), r)
    # seen tokens 0, 1, 3 (prompt and output): positive / 2, negative * 2; others unchanged
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -2.0, 0.5])


def test_frequency_and_presence_penalty_definition():
    logits = np.zeros(5, np.float32)
    r = make_request([4, 4, 4], [1, 1, 1, 2], frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits.copy(), r)
    # output counts: token 1 x3, token 2 x1; prompt tokens are not penalised by these two
    np.testing.assert_allclose(out, [0.0, -(0.5 * 3 + 0.25), -(0.5 * 1 + 0.25), 0.0, 0.0])


def test_penalties_change_generation(llm):
    base = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain = llm.generate([PROMPT], base, use_tqdm=False)[0].outputs[0].token_ids
    penalised = llm.generate([PROMPT], base.clone(frequency_penalty=2.0), use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(penalised)) > len(set(plain))  # the greedy loop is broken up

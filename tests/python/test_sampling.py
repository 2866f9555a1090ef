"""Sampling: seeded runs repeat exactly whatever else is in the batch; top-k / top-p / min-p never emit a
token outside their set; penalties change logits as their definitions say."""

import numpy as np
import pytest

from metal_engine import LLM, SamplingParams
from metal_engine.request import Request
from metal_engine.sampler import apply_penalties, filter_logits

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


def test_filters_directly():
    x = np.array([0.0, 3.0, 1.0, 2.0, -1.0], np.float32)
    assert np.isfinite(filter_logits(x, 2, 1.0, 0.0)).tolist() == [False, True, False, True, False]
    p = np.exp(x) / np.exp(x).sum()  # [0.032, 0.636, 0.086, 0.234, 0.012]
    assert np.isfinite(filter_logits(x, 0, 0.7, 0.0)).tolist() == [False, True, False, True, False]
    assert np.isfinite(filter_logits(x, 0, 0.5, 0.0)).tolist() == [False, True, False, False, False]
    keep = p >= 0.1 * p.max()
    assert np.isfinite(filter_logits(x, 0, 1.0, 0.1)).tolist() == keep.tolist()


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

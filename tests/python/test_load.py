"""Load: 200 requests with random prompt lengths and max_tokens on a tiny model, a KV pool too small to
hold them all at once, prefix caching on: every request finishes and each greedy output equals that
request run alone."""

import numpy as np
import pytest

from metal_engine import LLM, SamplingParams


@pytest.mark.parametrize("arch,num_blocks", [("llama", 60), ("mistral", 24)])
def test_200_requests_match_each_alone(tiny_checkpoints, arch, num_blocks):
    """Llama keeps every block; Mistral (sliding window 5) frees those leaving its window and hands them to
    other requests, so its pool is smaller for the same pressure (and its prefix hits rarer: the earliest
    blocks of a prefix are the first freed)."""
    path = str(tiny_checkpoints[arch])
    rng = np.random.default_rng(123)
    bases = [rng.integers(0, 211, 12).tolist() for _ in range(5)]  # shared prefixes for cache hits
    prompts, params = [], []
    for i in range(200):
        tail = rng.integers(0, 211, rng.integers(1, 30)).tolist()
        ids = (bases[i % 5] + tail) if i % 3 else tail
        prompts.append({"prompt_token_ids": ids})
        params.append(SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 24)), ignore_eos=True))
    common = dict(dtype="float32", block_size=4, max_model_len=80, progress=False)
    llm = LLM(path, num_kv_blocks=num_blocks, max_num_seqs=32, max_num_batched_tokens=96, enable_prefix_caching=True,
              **common)  # a handful of requests at a time
    outs = llm.generate(prompts, params, use_tqdm=False)
    eng = llm.llm_engine
    assert all(o.finished for o in outs)
    assert eng.stats["num_preemptions"] > 0
    if arch == "llama":
        assert sum(o.metrics.num_cached_tokens for o in outs) > 0
    assert eng.kv.num_free_blocks == num_blocks and not eng.kv.req_to_blocks

    alone = LLM(path, num_kv_blocks=64, enable_prefix_caching=False, **common)
    for p, sp, o in zip(prompts, params, outs):
        ref = alone.generate([p], sp, use_tqdm=False)[0].outputs[0]
        assert o.outputs[0].token_ids == ref.token_ids
        assert len(ref.token_ids) == sp.max_tokens and o.outputs[0].finish_reason == "length"

"""Scheduler and block accounting: chunked prefill, preemption and prefix-cache hits change nothing in
the outputs, and after any workload every block is free again."""

import numpy as np
import pytest

from metal_engine import LLM, SamplingParams
from metal_engine.kv_cache_manager import KVCacheManager

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def tiny_llm(path, **kw):
    args = dict(dtype="float32", block_size=4, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=256,
                max_model_len=128, progress=False)
    args.update(kw)
    return LLM(str(path), **args)


def prompts(n, seed=0, lo=1, hi=40, prefix=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 211, rng.integers(lo, hi)).tolist()
        out.append({"prompt_token_ids": (prefix or []) + ids})
    return out


def texts(outs):
    return [o.outputs[0].token_ids for o in outs]


def assert_all_blocks_free(llm):
    kv = llm.llm_engine.kv
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not kv.req_to_blocks
    assert not llm.llm_engine.scheduler.has_unfinished()


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """Each request alone, whole prompt in one step, plenty of blocks, no prefix caching."""
    llm = tiny_llm(tiny_checkpoints["llama"], enable_prefix_caching=False)
    ps = prompts(12, seed=1)
    return ps, [texts(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in ps]


def test_batched_equals_alone(tiny_checkpoints, reference):
    ps, ref = reference
    llm = tiny_llm(tiny_checkpoints["llama"])
    assert texts(llm.generate(ps, GREEDY, use_tqdm=False)) == ref
    assert_all_blocks_free(llm)


def test_chunked_prefill_changes_nothing(tiny_checkpoints, reference):
    ps, ref = reference
    llm = tiny_llm(tiny_checkpoints["llama"], max_num_batched_tokens=7)  # prompts up to 40 tokens
    assert texts(llm.generate(ps, GREEDY, use_tqdm=False)) == ref
    assert llm.llm_engine.stats["num_steps"] > 12
    assert_all_blocks_free(llm)


def test_preemption_changes_nothing(tiny_checkpoints, reference):
    ps, ref = reference
    llm = tiny_llm(tiny_checkpoints["llama"], num_kv_blocks=16, max_model_len=60)  # 64 slots for 12 sequences
    assert texts(llm.generate(ps, GREEDY, use_tqdm=False)) == ref
    assert llm.llm_engine.stats["num_preemptions"] > 0
    assert_all_blocks_free(llm)


def test_prefix_hits_change_nothing(tiny_checkpoints):
    shared = list(range(5, 5 + 23))  # 5 full blocks of 4 and a partial one
    ps = prompts(6, seed=2, prefix=shared)
    off = tiny_llm(tiny_checkpoints["qwen2"], enable_prefix_caching=False)
    ref = texts(off.generate(ps, GREEDY, use_tqdm=False))
    on = tiny_llm(tiny_checkpoints["qwen2"], enable_prefix_caching=True, max_num_seqs=1)  # one at a time: hits
    outs = on.generate(ps, GREEDY, use_tqdm=False)
    assert texts(outs) == ref
    assert [o.metrics.num_cached_tokens for o in outs][1:] == [20] * 5
    assert_all_blocks_free(on)
    # a second round finds the blocks still cached (freed, not evicted)
    again = on.generate(ps[:1], GREEDY, use_tqdm=False)
    assert texts(again) == ref[:1] and again[0].metrics.num_cached_tokens >= 20
    assert_all_blocks_free(on)


def test_block_pool_evicts_least_recently_used_first():
    class R:
        def __init__(self, rid, toks):
            self.request_id, self._t, self.num_computed_tokens = rid, toks, 0
            self.cache_salt = None

            class P:
                prompt_logprobs = None

            self.params = P()

        @property
        def num_tokens(self):
            return len(self._t)

        def token(self, i):
            return self._t[i]

    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = R("a", [1, 2, 3, 4, 9]), R("b", [5, 6, 7, 8, 9])
    assert kv.allocate_slots(a, 5) is not None and kv.num_free_blocks == 1
    assert kv.allocate_slots(b, 5) is None and kv.num_free_blocks == 1  # does not fit: nothing changes
    kv.free(a)
    assert kv.num_free_blocks == 4
    a2 = R("a2", [1, 2, 3, 4, 7])
    hits, n = kv.get_computed_blocks(a2)
    assert n == 4
    kv.allocate_slots(a2, 1, hits)
    assert kv.block_ids(a2)[:2] == [h.block_id for h in hits]
    kv.free(a2)
    # b takes 3 blocks: the free queue hands out the never-cached and least recently used first,
    # so the cached prefix [1,2] survives longest
    kv.allocate_slots(b, 5)
    assert kv.get_computed_blocks(R("c", [1, 2, 0]))[1] == 2


def test_prefix_cache_keys_are_sha256_of_the_whole_prefix_and_salt():
    """A block's key is a SHA-256 chain over every token before it and the request's cache salt (vLLM after
    CVE-2025-25183): the same block after another prefix, or under another salt, is another key."""
    import hashlib

    from metal_engine.kv_cache_manager import block_hash

    h1 = block_hash(None, [1, 2], None)
    assert len(h1) == 32 and h1 == hashlib.sha256(b"\0" * 32 + (0).to_bytes(8, "little") +
                                                  np.array([1, 2], np.int64).tobytes()).digest()
    assert block_hash(h1, [3, 4], None) != block_hash(block_hash(None, [1, 5], None), [3, 4], None)
    assert block_hash(None, [1, 2], "user-a") != block_hash(None, [1, 2], "user-b") != h1
    assert block_hash(None, [1, 2], "ab") != block_hash(None, [1, 2], "a")  # the salt is length-prefixed


def test_cache_salt_keeps_cached_prefixes_apart(tmp_path):
    """vLLM's cache_salt (in the prompt): a second request with the first's salt reuses its cached blocks; one
    with another salt, or none, does not."""
    from metal_engine import LLM, SamplingParams
    from tiny_models import make_tiny_text_checkpoint

    llm = LLM(str(make_tiny_text_checkpoint(tmp_path / "ck", "llama", seed=2)), dtype="float32", block_size=4,
              progress=False)
    ids = list(range(3, 40))
    sp = SamplingParams(max_tokens=2, temperature=0.0)

    def cached(salt=None):
        prompt = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
        [out] = llm.generate([prompt], sp, use_tqdm=False)
        return out.metrics.num_cached_tokens

    assert cached("alice") == 0
    assert cached("alice") >= 32
    assert cached("bob") == 0
    assert cached() == 0
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate([{"prompt_token_ids": ids, "cache_salt": ""}], sp, use_tqdm=False)


def test_a_waiting_sample_of_n_does_not_stall_the_queue_behind_it(tiny_checkpoints):
    """n=2: the second sample waits for the first to fill the shared prompt blocks, but the request queued
    behind it is scheduled in the same first step (vLLM does not hold the queue for it)."""
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", max_num_batched_tokens=64, progress=False)
    eng = llm.llm_engine
    eng.add_request({"prompt_token_ids": list(range(3, 43))}, SamplingParams(n=2, max_tokens=3, temperature=0.0),
                    request_id="pair")
    eng.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, temperature=0.0), request_id="b")
    eng.step()
    pair, b = eng.parents["pair"], eng.parents["b"]
    assert b.samples[0].request.metrics.first_scheduled_time is not None  # behind the waiting sample, yet run
    assert pair.samples[1].request.metrics.first_scheduled_time is None   # waits for the shared prompt
    while eng.has_unfinished_requests():
        eng.step()


def test_outputs_are_snapshots_later_steps_do_not_change(tiny_checkpoints):
    """What step() returns belongs to the caller (the async engine hands it to other threads)."""
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", progress=False)
    eng = llm.llm_engine
    eng.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=6, temperature=0.0, logprobs=1))
    [first] = eng.step()
    tokens, logprobs, metrics = list(first.outputs[0].token_ids), len(first.outputs[0].logprobs), first.metrics
    last_token_time = metrics.last_token_time
    while eng.has_unfinished_requests():
        out = eng.step()
    assert len(out[0].outputs[0].token_ids) == 6
    assert first.outputs[0].token_ids == tokens and len(first.outputs[0].logprobs) == logprobs == 1
    assert first.metrics.last_token_time == last_token_time and not first.finished


def _run_steps(llm, ps, params, check=None):
    """Generates ps with llm's engine step by step (check(engine) after each step); token ids per prompt."""
    eng = llm.llm_engine
    ids = [eng.add_request(p, params) for p in ps]
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        if check:
            check(eng)
    return [done[i] for i in ids]


def test_sliding_window_blocks_are_freed_as_requests_go_on(tiny_checkpoints):
    """Mistral (every layer slides, window 5): a decoding request holds only the blocks its window reaches
    (vLLM's SlidingWindowManager), the freed blocks serve other requests, and the
    tokens equal those of the same requests run one at a time with every block kept."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ps = prompts(6, seed=4, lo=14, hi=22)
    keep = tiny_llm(tiny_checkpoints["mistral"])
    keep.llm_engine.kv.sliding_window = 0  # every block kept
    want = [texts(keep.generate([p], params, use_tqdm=False))[0] for p in ps]

    small = tiny_llm(tiny_checkpoints["mistral"], num_kv_blocks=24, max_model_len=64)
    kv = small.llm_engine.kv
    assert kv.sliding_window == 5
    held = []

    def check(eng):
        for r in eng.scheduler.running:
            if r.num_computed_tokens > len(r.prompt_token_ids):  # decoded (blocks leave as a step is scheduled):
                held.append(kv.num_held_blocks(r))                # the last token's window, 5 positions, spans
                assert held[-1] <= 2, (r.request_id, r.num_computed_tokens, kv.block_ids(r))  # 2 blocks of 4
                assert len(kv.block_ids(r)) == -(-r.num_computed_tokens // 4)
                held_ids = {b.block_id for b in kv.req_to_blocks[r.request_id] if b is not None}
                assert set(kv.block_table(r).tolist()) <= held_ids  # freed entries name a block it holds
                assert kv.block_table(r).tolist() == kv.block_ids(r)

    assert _run_steps(small, ps, params, check) == want
    assert held and max(held) == 2
    assert small.llm_engine.stats["num_preemptions"] == 0  # 6 x 50 tokens in 24 blocks of 4, none preempted
    assert_all_blocks_free(small)

    full = tiny_llm(tiny_checkpoints["mistral"], num_kv_blocks=24, max_model_len=64)
    full.llm_engine.kv.sliding_window = 0
    assert _run_steps(full, ps, params) == want
    assert full.llm_engine.stats["num_preemptions"] > 0  # what keeping every block costs in that pool


def test_models_with_a_full_attention_layer_keep_every_block(tiny_checkpoints):
    """Gemma 3 slides on five of six layers: the full-attention layer reads the whole context, so nothing is
    freed (one block table serves every layer)."""
    llm = tiny_llm(tiny_checkpoints["gemma3"])
    assert llm.llm_engine.kv.sliding_window == 0
    assert tiny_llm(tiny_checkpoints["llama"]).llm_engine.kv.sliding_window == 0


class _Req:
    """The little of a Request the KV manager reads."""

    def __init__(self, rid, tokens, hash_blocks=False):
        from metal_engine.sampling_params import SamplingParams

        self.request_id, self._t, self.num_computed_tokens = rid, list(tokens), 0
        self.params, self.cache_salt, self.hash_blocks = SamplingParams(), None, hash_blocks

    @property
    def num_tokens(self):
        return len(self._t)

    def token(self, i):
        return self._t[i]


def _count_hashes(monkeypatch):
    import metal_engine.kv_cache_manager as kvm

    calls = []
    real = kvm.block_hash
    monkeypatch.setattr(kvm, "block_hash", lambda *a: calls.append(1) or real(*a))
    return calls


def test_block_hashing_is_incremental_and_off_without_prefix_caching(monkeypatch):
    """A decoding request hashes each block once, when it fills (vLLM's num_cached_block), not its whole
    context every step; with prefix caching off nothing is hashed unless the request shares its prompt with
    sibling samples (n > 1)."""
    from metal_engine.kv_cache_manager import KVCacheManager

    calls = _count_hashes(monkeypatch)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    r = _Req("a", range(40))
    kv.allocate_slots(r, 40)
    r.num_computed_tokens = 40
    assert len(calls) == 10
    for step in range(20):  # decode: one token a step
        r._t.append(100 + step)
        kv.allocate_slots(r, 1)
        r.num_computed_tokens += 1
    assert len(calls) == 15  # the 5 blocks filled while decoding, each once
    assert list(kv.block_table(r)) == kv.block_ids(r) and kv.block_table(r).dtype.name == "int32"

    off = KVCacheManager(num_blocks=64, block_size=4, enable_caching=False)
    calls.clear()
    r2 = _Req("b", range(40))
    off.allocate_slots(r2, 40)
    assert calls == [] and off.get_computed_blocks(_Req("c", range(40))) == ([], 0)
    assert all(b.block_hash is None for b in off.req_to_blocks["b"])
    sib = _Req("d#0", range(40), hash_blocks=True)  # an n > 1 sample: its prompt blocks are shared
    off.allocate_slots(sib, 40)
    assert len(calls) == 10 and off.get_computed_blocks(_Req("d#1", range(41), hash_blocks=True))[1] == 40


def test_block_table_row_grows_in_place():
    from metal_engine.kv_cache_manager import BlockTableRow

    row = BlockTableRow()
    ids = []
    for k in range(1, 30, 3):  # grows past its first capacity several times
        new = list(range(len(ids), len(ids) + k))
        row.extend(new)
        ids += new
        assert row.ids.tolist() == ids


def _evict_until_gone(kv, block_hash):
    """Takes free blocks from the head of the LRU queue until `block_hash`'s block is evicted, then frees them."""
    taken = []
    while kv.pool.get_cached_block(block_hash) is not None:
        taken += kv.pool.get_new_blocks(1)
    kv.pool.free_blocks(taken)


def test_sliding_window_prefix_hits_need_only_the_window(tiny_checkpoints):
    """A prefix's earliest blocks are the first a sliding-window request frees, and so the first evicted; a later
    request with the same prefix still hits the blocks its first computed token's window reaches (vLLM's
    SlidingWindowManager searches from the right), and its tokens equal those of the request run alone. Without
    a window the hit chain runs from block 0 to the first evicted one."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prefix = list(range(10, 50))  # 40 tokens: 10 blocks of 4
    a, b = {"prompt_token_ids": prefix + [3]}, {"prompt_token_ids": prefix + [7, 8]}
    hashes = None
    for arch, want in (("mistral", 40), ("llama", 4)):  # Llama's chain from block 0 stops at the evicted block 1
        llm = tiny_llm(tiny_checkpoints[arch], num_kv_blocks=24, max_model_len=64)
        kv = llm.llm_engine.kv
        llm.generate([a], params, use_tqdm=False)
        hashes = kv._block_hashes(_Req("x", prefix), 40)
        _evict_until_gone(kv, hashes[1])  # the prefix's first two blocks
        if arch == "mistral":  # freed first, as the window left them: the window's last blocks stay cached
            assert kv.pool.get_cached_block(hashes[9]) is not None
        [out] = llm.generate([b], params, use_tqdm=False)
        assert out.metrics.num_cached_tokens == want, arch
        alone = tiny_llm(tiny_checkpoints[arch], enable_prefix_caching=False)
        assert out.outputs[0].token_ids == alone.generate([b], params, use_tqdm=False)[0].outputs[0].token_ids
        assert_all_blocks_free(llm)

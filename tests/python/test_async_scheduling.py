"""Two steps in flight (#13): Engine.submit / collect with a step's tokens taken on the device from the greedy tokens
of the step before it (StepInput.prev_token_rows), and LLMEngine's async scheduling, which submits the next greedy
decode step before reading the current one back. Each must give exactly the tokens of one step at a time, on the
cpu backend and on metal-sim (where a host read of a buffer a step in flight binds is refused)."""

import numpy as np
import pytest

from metal_engine import LLM, SamplingParams, _core
from metal_engine.engine import Engine
from metal_engine.llm_engine import LLMEngine
from metal_engine.config import EngineConfig
from tiny_models import make_tiny_checkpoint

BACKENDS = ["cpu"] + [b for b in ("metal-sim",) if b in _core.available_backends()]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("async") / "llama", "llama")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):  # a sliding window: blocks freed as requests go on
    return make_tiny_checkpoint(tmp_path_factory.mktemp("async") / "mistral", "mistral")


def one_seq(tokens, start, blocks, bs=4):
    """A step over tokens[start:] of one sequence whose blocks are `blocks`."""
    n = len(tokens)
    pos = np.arange(start, n, dtype=np.int32)
    slots = np.array([blocks[p // bs] * bs + p % bs for p in pos], dtype=np.int64)
    return (np.asarray(tokens[start:], np.int32), pos, np.array([0, n - start], np.int32), np.array([n], np.int32),
            np.array([blocks], np.int32), slots, np.array([n - start - 1], np.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_submitted_steps_feed_their_tokens_on_the_device(llama, backend):
    prompt, steps, blocks = [3, 17, 5, 9, 11], 9, [7, 2, 9, 4]
    ref = Engine(llama, dtype="float32", backend=backend, block_size=4, num_kv_blocks=16)
    toks = list(prompt)
    for i in range(steps):  # one step at a time: the host reads each token and passes it on
        toks.append(int(ref.step(*one_seq(toks, len(prompt) + i - 1 if i else 0, blocks), greedy=True)[0]))
    want = toks[len(prompt):]

    eng = Engine(llama, dtype="float32", backend=backend, block_size=4, num_kv_blocks=16)
    ticket = eng.submit(*one_seq(prompt, 0, blocks), greedy=True)
    got, n = [], len(prompt)
    for i in range(steps):
        nxt = None
        if i + 1 < steps:  # the next token's step, submitted before this one is read: its token is a placeholder
            placeholder = list(range(n + 1))
            nxt = eng.submit(*one_seq(placeholder, n, blocks), greedy=True, prev_token_rows=[0])
            assert eng.steps_in_flight == 2
        got.append(int(eng.collect(ticket)[0]))
        ticket, n = nxt, n + 1
    assert eng.steps_in_flight == 0
    assert got == want


def two_seqs(a, a_start, b, b_start, bs=4):
    """A step over a[a_start:] (blocks 1-4) and b[b_start:] (blocks 5-10): two sequences, logits rows at their ends."""
    ta, pa = a[a_start:], np.arange(a_start, len(a))
    tb, pb = b[b_start:], np.arange(b_start, len(b))
    blocks = [[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10]]
    slots = [blocks[0][p // bs] * bs + p % bs for p in pa] + [blocks[1][p // bs] * bs + p % bs for p in pb]
    n = len(ta)
    return (np.asarray(ta + tb, np.int32), np.concatenate([pa, pb]).astype(np.int32),
            np.array([0, n, n + len(tb)], np.int32), np.array([len(a), len(b)], np.int32),
            np.array(blocks, np.int32), np.array(slots, np.int64), np.array([n - 1, n + len(tb) - 1], np.int32))


@pytest.mark.parametrize("rope", [None, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}],
                         ids=["default-rope", "per-step-rope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fed_step_beside_a_prefill_chunk(tmp_path, backend, rope):
    """A fed decode row beside another sequence's prefill chunk: the step uploads more than its inputs (an
    attention group's rebased query_start_loc; a per-step RoPE table), and all of it precedes the device-side feed
    (metal-sim refuses a host write to a buffer a dispatch already binds)."""
    path = make_tiny_checkpoint(tmp_path / "m", "llama", max_position_embeddings=16,
                                **({"rope_parameters": rope} if rope else {}))
    a, b = [3, 17, 5, 9, 11], [1 + (7 * j) % 200 for j in range(20)]
    ref = Engine(path, dtype="float32", backend=backend, block_size=4, num_kv_blocks=16)
    t0 = ref.step(*two_seqs(a, 0, b[:11], 0), greedy=True)
    a1 = a + [int(t0[0])]
    t1 = ref.step(*two_seqs(a1, 5, b, 11), greedy=True)

    eng = Engine(path, dtype="float32", backend=backend, block_size=4, num_kv_blocks=16)
    k0 = eng.submit(*two_seqs(a, 0, b[:11], 0), greedy=True)
    rows = np.full(1 + 9, -1, np.int32)
    rows[0] = 0  # a's new token: row 0 of the step before
    k1 = eng.submit(*two_seqs(a + [0], 5, b, 11), greedy=True, prev_token_rows=rows)
    assert list(eng.collect(k0)) == list(t0)
    assert list(eng.collect(k1)) == list(t1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_in_flight_are_checked(llama, backend):
    eng = Engine(llama, dtype="float32", backend=backend, block_size=4, num_kv_blocks=16)
    a = eng.submit(*one_seq([1, 2, 3], 0, [0]), greedy=False)
    with pytest.raises(ValueError, match="not a greedy"):  # logits steps keep no tokens for the next
        eng.submit(*one_seq([1, 2, 3, 0], 3, [0]), greedy=True, prev_token_rows=[0])
    b = eng.submit(*one_seq([5, 6], 0, [1]), greedy=True)
    with pytest.raises(RuntimeError, match="at most 2 in flight"):
        eng.submit(*one_seq([5, 6], 0, [2]), greedy=True)
    with pytest.raises(RuntimeError, match="collect them first"):
        eng.step(*one_seq([5, 6], 0, [2]))
    with pytest.raises(ValueError, match="order they were submitted"):
        eng.collect(b)
    logits = eng.collect(a)
    assert logits.shape == (1, eng.model_config.vocab_size)
    with pytest.raises(ValueError, match="previous step returned 1 greedy tokens"):
        eng.submit(*one_seq([5, 6, 0], 2, [1]), greedy=True, prev_token_rows=[1])
    with pytest.raises(ValueError, match="prev_token_rows has 2 entries for 1 tokens"):
        eng.submit(*one_seq([5, 6, 0], 2, [1]), greedy=True, prev_token_rows=[0, 0])
    assert eng.collect(b).shape == (1,)
    with pytest.raises(ValueError, match="not in flight"):
        eng.collect(b)
    # the engine is still usable, one step at a time
    assert eng.step(*one_seq([1, 2, 3], 0, [0])).shape == (1, eng.model_config.vocab_size)


def generate(path, backend, async_scheduling, prompts, params, **kw):
    llm = LLM(str(path), dtype="float32", backend=backend, block_size=4, async_scheduling=async_scheduling,
              progress=False, **{"num_kv_blocks": 64, **kw})
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs], llm.llm_engine.stats, outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", ["plain", "few_seqs", "small_pool", "mixed"])
def test_async_scheduling_gives_the_same_tokens(llama, backend, setting):
    prompts = [{"prompt_token_ids": [(7 * i + j) % 50 + 1 for j in range(2 + 3 * i)]} for i in range(6)]
    ref, _, _ = generate(llama, backend, False, prompts, [SamplingParams(temperature=0, max_tokens=12)] * 6)
    # stop tokens from the greedy text itself: requests end where the host finds the stop, a step after the
    # device has already computed the next token (dropped)
    stops = [ref[i][0][4 + i % 3] for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 2 * i, stop_token_ids=[stops[i]] if i % 2 else None)
              for i in range(6)]
    kw = {}
    if setting == "few_seqs":  # requests wait for a sequence slot: steps alternate between ahead and admitted
        kw = {"max_num_seqs": 2}
    elif setting == "small_pool":  # preemption: a step is scheduled ahead only when its blocks are there
        kw = {"num_kv_blocks": 12}
    elif setting == "mixed":  # sampled rows (seeded) and n > 1 beside greedy ones: those steps are not ahead
        params[1] = SamplingParams(temperature=0.8, seed=5, max_tokens=3)  # short: greedy steps follow
        params[4] = SamplingParams(temperature=0, n=2, max_tokens=7)
    want, s_sync, _ = generate(llama, backend, False, prompts, params, **kw)
    got, s_async, _ = generate(llama, backend, True, prompts, params, **kw)
    assert got == want
    assert s_sync["num_steps_ahead"] == 0
    assert s_async["num_steps_ahead"] > 0
    if setting == "small_pool":
        assert s_async["num_preemptions"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_scheduling_with_prefix_caching_and_sliding_windows(llama, mistral, backend):
    shared = [(5 * j) % 60 + 1 for j in range(13)]
    prompts = [{"prompt_token_ids": shared + [i + 1]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=10)
    for path in (llama, mistral):
        llm_sync = LLM(str(path), dtype="float32", backend=backend, block_size=4, num_kv_blocks=64,
                       async_scheduling=False, progress=False)
        llm_async = LLM(str(path), dtype="float32", backend=backend, block_size=4, num_kv_blocks=64,
                        async_scheduling=True, progress=False)
        for llm in (llm_sync, llm_async):
            first = llm.generate(prompts[:1], params, use_tqdm=False)
            # the prompt plus what it generated, again: blocks that filled while decoding (one of them with a
            # token that was still on the device when its slot was allocated) are cached hits as well
            again = {"prompt_token_ids": shared + [1] + list(first[0].outputs[0].token_ids) + [2]}
            llm.results = first + llm.generate([again] + prompts[1:], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in llm_async.results] == \
            [list(o.outputs[0].token_ids) for o in llm_sync.results]
        assert [o.metrics.num_cached_tokens for o in llm_async.results] == \
            [o.metrics.num_cached_tokens for o in llm_sync.results]
        assert llm_async.results[1].metrics.num_cached_tokens >= 20
        assert llm_async.llm_engine.stats["num_steps_ahead"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_abort_while_a_step_is_in_flight(llama, backend):
    def run(async_scheduling):
        eng = LLMEngine(EngineConfig(model=str(llama), dtype="float32", backend=backend, block_size=4,
                                     num_kv_blocks=64, async_scheduling=async_scheduling), progress=False)
        p = SamplingParams(temperature=0, max_tokens=10)
        eng.add_request({"prompt_token_ids": [4, 8, 15]}, p, request_id="a")
        eng.add_request({"prompt_token_ids": [16, 23, 42]}, p, request_id="b")
        outs = {}
        for i in range(30):
            if i == 3:
                eng.abort_request("a")  # with async scheduling, a step continuing "a" is in flight
            for o in eng.step():
                outs[o.request_id] = list(o.outputs[0].token_ids)
            if not eng.has_unfinished_requests():
                break
        return outs, eng

    (want, _), (got, eng) = run(False), run(True)
    assert got == want and len(got["b"]) == 10 and len(got["a"]) == 3
    assert eng.engine.steps_in_flight == 0  # nothing left running once every request is done
    assert eng.stats["num_steps_ahead"] > 0


def test_async_scheduling_defaults_on_where_the_device_runs_apart(llama):
    assert LLM(str(llama), dtype="float32", backend="cpu", progress=False).llm_engine.async_scheduling is False
    if "metal-sim" in BACKENDS:
        assert LLM(str(llama), dtype="float32", backend="metal-sim", progress=False).llm_engine.async_scheduling
    with pytest.raises(ValueError, match="async_scheduling must be"):
        LLM(str(llama), dtype="float32", async_scheduling="yes", progress=False)

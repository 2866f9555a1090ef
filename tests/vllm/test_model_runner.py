"""The ModelRunner on vLLM's own SchedulerOutput and GrammarOutput objects, one step at a time: a step with no
tokens, finished requests forgotten, discarded output tokens, the grammar bitmask's bit order."""

import numpy as np
import pytest
from vllm import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, GrammarOutput, NewRequestData, SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

from metal_engine.engine import Engine
from metal_engine.vllm.model_runner import ModelRunner, bitmask_to_bool


def sched(new=(), cached=None, num=None, finished=(), structured=False):
    cached = cached or CachedRequestData(req_ids=[], resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
                                         new_block_ids=[], num_computed_tokens=[], num_output_tokens=[])
    num = num or {}
    return SchedulerOutput(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached, num_scheduled_tokens=num,
                           total_num_scheduled_tokens=sum(num.values()), scheduled_spec_decode_tokens={},
                           scheduled_encoder_inputs={}, num_common_prefix_blocks=[0],
                           finished_req_ids=set(finished), free_encoder_mm_hashes=[],
                           has_structured_output_requests=structured)


def new_req(rid, prompt, blocks, sp):
    return NewRequestData(req_id=rid, prompt_token_ids=prompt, mm_features=[], sampling_params=sp,
                          pooling_params=None, block_ids=(blocks,), num_computed_tokens=0, lora_request=None)


@pytest.fixture(scope="module")
def runner(tiny_dir):
    eng = Engine(tiny_dir / "llama", dtype="float32", num_kv_blocks=16, block_size=16)
    return ModelRunner(eng, vocab_size=211, max_model_len=256)


def test_bitmask_bit_order():
    rng = np.random.default_rng(0)
    allowed = rng.random((3, 70)) < 0.3
    words = np.zeros((3, 3), np.int64)
    for r, t in zip(*np.nonzero(allowed)):
        words[r, t // 32] |= 1 << (t % 32)
    bitmask = words.astype(np.uint32).view(np.int32)
    assert (bitmask_to_bool(bitmask, 70) == allowed).all()


def test_steps_empty_finished_discarded_and_masked(runner):
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    assert not runner.execute(sched()) and runner.sample() is EMPTY_MODEL_RUNNER_OUTPUT
    # a 20-token prompt in two chunks: no token for the first, one for the second
    prompt = list(range(5, 25))
    assert runner.execute(sched(new=[new_req("a", prompt, [1, 2], greedy)], num={"a": 12}))
    o = runner.sample()
    assert o.req_ids == ["a"] and o.sampled_token_ids == [[]]
    cached = CachedRequestData(req_ids=["a"], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
                               new_block_ids=[None], num_computed_tokens=[12], num_output_tokens=[0])
    runner.execute(sched(cached=cached, num={"a": 8}))
    first = runner.sample().sampled_token_ids[0][0]
    assert runner.requests["a"].req.output_token_ids == [first]
    # vLLM discarded that token (num_output_tokens 0): the runner forgets it and recomputes the same one
    cached = CachedRequestData(req_ids=["a"], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
                               new_block_ids=[None], num_computed_tokens=[19], num_output_tokens=[0])
    runner.execute(sched(cached=cached, num={"a": 1}))
    assert runner.sample().sampled_token_ids == [[first]]
    # the grammar bitmask: only token 7 allowed for a structured request
    cached = CachedRequestData(req_ids=["a"], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
                               new_block_ids=[None], num_computed_tokens=[20], num_output_tokens=[1])
    runner.execute(sched(cached=cached, num={"a": 1}, structured=True))
    words = np.zeros((1, 7), np.uint32)
    words[0, 0] = 1 << 7
    o = runner.sample(GrammarOutput(structured_output_request_ids=["a"], grammar_bitmask=words.view(np.int32)))
    assert o.sampled_token_ids == [[7]]
    # finished: forgotten, even in a step with no tokens
    assert not runner.execute(sched(finished=["a"]))
    assert "a" not in runner.requests


def cached_data(rid, computed, n_out):
    return CachedRequestData(req_ids=[rid], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
                             new_block_ids=[None], num_computed_tokens=[computed], num_output_tokens=[n_out])


def test_async_steps_in_vllm_order(tiny_dir):
    """vLLM's async scheduling order, step by step: step 2 is scheduled before step 1's token is read (its input a
    placeholder, fed on the device), vLLM reads step 1's AsyncModelRunnerOutput after handing us step 2; a
    sampled step collects the ones before it; a token vLLM discarded is dropped when it arrives. Tokens equal a
    synchronous runner's."""
    from vllm.v1.outputs import AsyncModelRunnerOutput

    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompt = list(range(5, 25))

    def make(async_scheduling):
        eng = Engine(tiny_dir / "llama", dtype="float32", num_kv_blocks=16, block_size=16)
        return ModelRunner(eng, vocab_size=211, max_model_len=256, async_scheduling=async_scheduling)

    ref = make(False)
    ref.execute(sched(new=[new_req("a", prompt, [1, 2], greedy)], num={"a": 20}))
    want = [ref.sample().sampled_token_ids[0][0]]
    for i in range(3):  # positions 20, 21, 22
        ref.execute(sched(cached=cached_data("a", 20 + i, i + 1), num={"a": 1}))
        want.append(ref.sample().sampled_token_ids[0][0])

    run = make(True)
    run.execute(sched(new=[new_req("a", prompt, [1, 2], greedy)], num={"a": 20}))
    out1 = run.sample()
    assert isinstance(out1, AsyncModelRunnerOutput) and run.requests["a"].pending == 1
    run.execute(sched(cached=cached_data("a", 20, 1), num={"a": 1}))  # its input: step 1's token, on the device
    assert run.stats["fed_rows"] == 1 and run.engine.steps_in_flight in (1, 2)
    out2 = run.sample()
    assert out1.get_output().sampled_token_ids == [[want[0]]]
    assert out2.get_output().sampled_token_ids == [[want[1]]]
    assert run.requests["a"].req.output_token_ids == want[:2] and run.requests["a"].pending == 0
    # step 3 on the device; vLLM then discards its token (num_output_tokens 2, position 21 again): dropped when
    # it arrives, and step 4 computes it again
    run.execute(sched(cached=cached_data("a", 21, 2), num={"a": 1}))
    out3 = run.sample()
    run.execute(sched(cached=cached_data("a", 21, 2), num={"a": 1}))
    assert run.requests["a"].req.output_token_ids == want[:2] and run.requests["a"].pending == 0
    out4 = run.sample()
    assert out3.get_output().sampled_token_ids == [[want[2]]]
    assert out4.get_output().sampled_token_ids == [[want[2]]]
    # a sampled step (logprobs: host sampling) after a device step collects that one first
    run.execute(sched(cached=cached_data("a", 22, 3), num={"a": 1}))
    out5 = run.sample()
    assert isinstance(out5, AsyncModelRunnerOutput)
    lp = new_req("b", prompt[:7], [3], SamplingParams(temperature=0.0, max_tokens=2, logprobs=2))
    run.execute(sched(new=[lp], cached=cached_data("a", 23, 4), num={"b": 7, "a": 1}))
    out6 = run.sample()
    assert not isinstance(out6, AsyncModelRunnerOutput) and out6.logprobs is not None
    assert run.engine.steps_in_flight == 0
    assert out5.get_output().sampled_token_ids == [[want[3]]]
    assert run.requests["a"].req.output_token_ids[:4] == want

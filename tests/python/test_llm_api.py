"""The vLLM-shaped API on a tiny model: outputs, stop conditions, logprobs, n > 1, streaming, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from metal_engine import LLM, SamplingParams

VOCAB = 211
P1 = {"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11]}
P2 = {"prompt_token_ids": [100, 3, 50]}


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(str(tiny_checkpoints["qwen2"]), dtype="float32", block_size=4, num_kv_blocks=128,
               max_model_len=100, progress=False)


@pytest.fixture(scope="module")
def hf(tiny_checkpoints):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], dtype=torch.float32).eval()


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def test_output_shape(llm):
    [out] = llm.generate(P1, greedy(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert out.prompt_token_ids == P1["prompt_token_ids"] and out.prompt is None and out.finished
    c = out.outputs[0]
    assert c.index == 0 and len(c.token_ids) == 5 and c.finish_reason == "length"
    assert c.text == "" and c.logprobs is None  # no tokenizer in this checkpoint
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time


def test_greedy_matches_transformers_generate(llm, hf):
    [out] = llm.generate(P1, greedy(max_tokens=10, ignore_eos=True), use_tqdm=False)
    ref = hf.generate(torch.tensor([P1["prompt_token_ids"]]), max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert out.outputs[0].token_ids == ref[0, 7:].tolist()


def test_stop_token_ids_and_min_tokens(llm):
    [free] = llm.generate(P1, greedy(max_tokens=12, ignore_eos=True), use_tqdm=False)
    toks = free.outputs[0].token_ids
    stop = toks[3]
    first = toks.index(stop)
    [out] = llm.generate(P1, greedy(max_tokens=12, stop_token_ids=[stop]), use_tqdm=False)
    c = out.outputs[0]
    assert c.token_ids == toks[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop
    # min_tokens forbids the stop token until enough tokens exist
    [late] = llm.generate(P1, greedy(max_tokens=12, stop_token_ids=[stop], min_tokens=first + 2), use_tqdm=False)
    assert stop not in late.outputs[0].token_ids[: first + 2]


def test_eos_ends_unless_ignored(llm, tiny_checkpoints, tmp_path):
    [free] = llm.generate(P2, greedy(max_tokens=8, ignore_eos=True), use_tqdm=False)
    eos = free.outputs[0].token_ids[2]
    shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with_eos = LLM(str(tmp_path / "ck"), dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=100,
                   progress=False)
    [out] = with_eos.generate(P2, greedy(max_tokens=8), use_tqdm=False)
    c = out.outputs[0]
    assert c.token_ids == free.outputs[0].token_ids[: c.token_ids.index(eos) + 1] and c.finish_reason == "stop"
    [ign] = with_eos.generate(P2, greedy(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert ign.outputs[0].token_ids == free.outputs[0].token_ids


def test_logprobs_are_the_models(llm, hf):
    [out] = llm.generate(P1, greedy(max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2), use_tqdm=False)
    c = out.outputs[0]
    tokens = P1["prompt_token_ids"] + c.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([tokens])).logits[0].double(), -1).numpy()
    assert len(c.logprobs) == 4
    for i, (tok, pos) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[6 + i]
        assert pos[tok].rank == 1  # greedy picks the most likely
        top3 = np.argsort(-row)[:3].tolist()
        assert list(pos)[:3] == top3
        for t, lp in pos.items():
            assert abs(lp.logprob - row[t]) < 1e-4
    assert abs(c.cumulative_logprob - sum(pos[t].logprob for t, pos in zip(c.token_ids, c.logprobs))) < 1e-6
    pl = out.prompt_logprobs
    assert pl[0] is None and len(pl) == 7
    for i in range(1, 7):
        t = tokens[i]
        assert abs(pl[i][t].logprob - ref[i - 1][t]) < 1e-4
        assert pl[i][t].rank == int((ref[i - 1] > ref[i - 1][t]).sum()) + 1


def test_n_samples_share_the_prompt_blocks(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["qwen2"]), dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=100,
              enable_prefix_caching=False, progress=False)
    prompt = {"prompt_token_ids": list(range(1, 19))}  # 4 full blocks + 2 tokens
    [out] = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True),
                         use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    eng = llm.llm_engine
    assert eng.kv.num_free_blocks == 64
    # samples 1..3 reused sample 0's 4 full prompt blocks instead of computing them
    assert eng.stats["num_tokens"] < 4 * 18
    # the per-sample seeds make the whole thing reproducible
    [again] = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_stream_yields_the_same_tokens(llm):
    sp = greedy(max_tokens=9, ignore_eos=True)
    [full] = llm.generate(P2, sp, use_tqdm=False)
    deltas = list(llm.stream(P2, sp))
    assert sum((d.token_ids for d in deltas), []) == full.outputs[0].token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert not any(d.finished for d in deltas[:-1])


def test_abandoned_stream_frees_its_blocks(llm):
    gen = llm.stream(P1, greedy(max_tokens=50, ignore_eos=True))
    next(gen)
    gen.close()
    eng = llm.llm_engine
    assert eng.kv.num_free_blocks == eng.kv.pool.num_blocks and not eng.scheduler.has_unfinished()


@pytest.mark.parametrize(
    "prompt,params,msg",
    [
        ({"prompt_token_ids": []}, None, "the prompt is empty"),
        ({"prompt_token_ids": list(range(100))}, None, "the prompt has 100 tokens but max_model_len is 100"),
        ({"prompt_token_ids": [1, 211]}, None, r"prompt token id 211 is outside the vocabulary \[0, 211\)"),
        ({"prompt_token_ids": [1, -1]}, None, "prompt token id -1"),
        ("a string", None, "no tokenizer.json"),
        (42, None, "a prompt is a string or a dict"),
        (P1, dict(stop_token_ids=[999]), "stop token id 999 is outside the vocabulary"),
    ],
)
def test_bad_request_is_refused_without_disturbing_others(llm, prompt, params, msg):
    eng = llm.llm_engine
    good = [eng.add_request(P1, greedy(max_tokens=6, ignore_eos=True)),
            eng.add_request(P2, greedy(max_tokens=6, ignore_eos=True))]
    eng.step()  # the good ones are running
    with pytest.raises(ValueError, match=msg):
        eng.add_request(prompt, SamplingParams(**params) if params else None)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    ref = llm.generate([P1, P2], greedy(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [done[g] for g in good] == [r.outputs[0].token_ids for r in ref]


def test_generate_names_the_bad_prompt_and_keeps_nothing(llm):
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        llm.generate([P1, {"prompt_token_ids": []}, P2], use_tqdm=False)
    assert not llm.llm_engine.scheduler.has_unfinished()


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-5), "top_k must be"),
        (dict(min_p=2.0), "min_p must be in"),
        (dict(n=0), "n must be an integer >= 1"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=3.0), "presence_penalty must be in"),
        (dict(logprobs=-1), "logprobs must be"),
        (dict(stop=[""]), "stop must be"),
    ],
)
def test_invalid_sampling_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_vllm_engine_argument_names(tmp_path):
    """vLLM scripts pass EngineArgs' names: those with a meaning here take it, the no-ops are accepted, the
    rest are errors naming them; a name neither has is a TypeError, as in vLLM."""
    from tiny_models import make_tiny_text_checkpoint

    path = make_tiny_text_checkpoint(tmp_path / "ck", "llama", seed=3)
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    (tok_only / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    llm = LLM(model=str(path), dtype="float32", num_gpu_blocks_override=48, enforce_eager=True,
              tensor_parallel_size=1, trust_remote_code=True, seed=0, tokenizer=str(tok_only),
              enable_chunked_prefill=False, max_num_batched_tokens=16, max_model_len=128, disable_log_stats=True)
    assert llm.llm_engine.engine.num_kv_blocks == 48
    assert llm.llm_engine.config.max_num_batched_tokens >= 128  # no chunking: a whole prompt fits a step
    [out] = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text
    full = LLM(model=str(path), dtype="float32", progress=False).llm_engine.config.kv_cache_memory
    half = LLM(model=str(path), dtype="float32", gpu_memory_utilization=0.5, kv_cache_memory_bytes=full,
               progress=False).llm_engine.config.kv_cache_memory
    assert half == full // 2
    capped = LLM(model=str(path), dtype="float32", max_logprobs=2, progress=False)
    with pytest.raises(ValueError, match="logprobs=3 is more than this engine's max_logprobs"):
        capped.generate(["Hello"], SamplingParams(max_tokens=2, logprobs=3), use_tqdm=False)
    assert capped.generate(["Hello"], SamplingParams(max_tokens=2, logprobs=2), use_tqdm=False)
    ids_only = LLM(model=str(path), dtype="float32", skip_tokenizer_init=True, progress=False)
    assert ids_only.get_tokenizer() is None
    for kw, msg in [({"tensor_parallel_size": 2}, "tensor_parallel_size=2 is not supported"),
                    ({"quantization": "awq"}, "quantization='awq'"),
                    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in"),
                    ({"enable_lora": True}, "LoRA"),
                    ({"revision": "v2"}, "no model hub")]:
        with pytest.raises(ValueError, match=msg):
            LLM(model=str(path), dtype="float32", progress=False, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_knob'"):
        LLM(model=str(path), not_a_knob=1)

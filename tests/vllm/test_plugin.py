"""vLLM on metal_engine (VLLM_APPLE_USE_ENGINE=1) against vLLM's own CPU platform and our own LLM: greedy tokens
of tiny fp32 checkpoints equal, through chunked prefill, preemption, prefix-cache hits; n > 1 and seeds;
logprobs; structured output; platform resolution."""

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from conftest import run_vllm

PROMPTS = [[1 + (i * 7 + j * 3) % 200 for j in range(5 + 9 * i)] for i in range(4)]  # 5, 14, 23, 32 tokens
GREEDY = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True, "detokenize": False}


def engine(model, **kw):
    return {"model": str(model), "skip_tokenizer_init": True, "dtype": "float32", "block_size": 32,
            "max_model_len": 256, "num_gpu_blocks_override": 64, "seed": 0,
            "gpu_memory_utilization": 0.3, **kw}  # vLLM's CPU platform reserves this share of RAM


def tokens(result, rnd=0):
    return [o["samples"][0]["token_ids"] for o in result["rounds"][rnd]]


def ours_standalone(model, prompts, max_tokens):
    import metal_engine

    llm = metal_engine.LLM(model=str(model), dtype="float32", skip_tokenizer_init=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        metal_engine.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_equals_vllm_cpu_and_our_llm(tiny_dir, arch):
    spec = {"engine": engine(tiny_dir / arch), "rounds": [{"prompts": PROMPTS, "params": GREEDY}]}
    theirs = run_vllm(spec, ours=False)
    ours = run_vllm(spec, ours=True)
    assert theirs["platform"] == "CpuPlatform"
    assert ours["platform"] == "MetalEnginePlatform" and ours["device_name"].startswith("metal_engine")
    assert ours["stats"]["steps"] > 0  # our worker ran the steps
    assert tokens(ours) == tokens(theirs)
    assert tokens(ours) == ours_standalone(tiny_dir / arch, PROMPTS, 12)


def test_chunked_prefill_preemption_and_prefix_hits(tiny_dir):
    """A 16-token step budget chunks every prompt but the first; 6 blocks of 16 tokens for 4 requests that grow
    to 44 tokens force preemption; the second round of the same prompts hits the prefix cache. Tokens stay those
    of an unconstrained run."""
    model = tiny_dir / "llama"
    params = {**GREEDY, "max_tokens": 12}
    free = run_vllm({"engine": engine(model), "rounds": [{"prompts": PROMPTS, "params": params}]}, ours=True)
    tight = run_vllm({"engine": engine(model, block_size=16, num_gpu_blocks_override=7, max_num_batched_tokens=16,
                                       max_model_len=64),
                      "rounds": [{"prompts": PROMPTS, "params": params}] * 2}, ours=True)
    st = tight["stats"]
    assert st["partial_prefills"] > 0, st
    assert st["preempted"] > 0 and st["resumed"] > 0, st
    assert st["prefix_hit_tokens"] > 0, st
    assert tokens(tight, 0) == tokens(free) and tokens(tight, 1) == tokens(free)


def test_sliding_window_blocks_freed_by_vllm(tiny_dir):
    """Mistral (every layer slides, window 5) reports a SlidingWindowSpec: vLLM frees the blocks leaving the
    window and names them by its null block in later tables. In the pool that makes Llama preempt (above), the
    same requests run without preemption, their tokens those of an unconstrained run and of vLLM's CPU platform."""
    model = tiny_dir / "mistral"
    params = {**GREEDY, "max_tokens": 12}
    free = run_vllm({"engine": engine(model), "rounds": [{"prompts": PROMPTS, "params": params}]}, ours=True)
    spec = {"engine": engine(model, block_size=16, num_gpu_blocks_override=7, max_num_batched_tokens=16,
                             max_model_len=64), "rounds": [{"prompts": PROMPTS, "params": params}]}
    tight = run_vllm(spec, ours=True)
    assert tight["stats"]["preempted"] == 0, tight["stats"]
    assert tokens(tight) == tokens(free) == tokens(run_vllm(spec, ours=False))


def test_n_and_seeds_and_logprobs(tiny_dir):
    model = tiny_dir / "llama"
    sampled = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 10, "ignore_eos": True, "detokenize": False}
    spec = {"engine": engine(model), "rounds": [
        {"prompts": PROMPTS[:2], "params": {**sampled, "n": 3, "seed": 7}},
        {"prompts": PROMPTS[:2], "params": {**sampled, "n": 3, "seed": 7}},
        {"prompts": PROMPTS[:2], "params": {**sampled, "seed": 8}},
        {"prompts": PROMPTS[:1], "params": {**GREEDY, "max_tokens": 4, "logprobs": 3, "prompt_logprobs": 2}},
        {"prompts": PROMPTS[:1], "params": {**sampled, "n": 2, "seed": -3}},  # vLLM takes negative seeds
    ]}
    r = run_vllm(spec, ours=True)
    first, again, other = r["rounds"][0], r["rounds"][1], r["rounds"][2]
    assert all(len(o["samples"]) == 3 for o in first)
    assert [[s["token_ids"] for s in o["samples"]] for o in first] == \
        [[s["token_ids"] for s in o["samples"]] for o in again]  # per-request seeds reproduce
    assert [o["samples"][0]["token_ids"] for o in other] != [o["samples"][0]["token_ids"] for o in first]
    assert len(r["rounds"][4][0]["samples"]) == 2
    lp = r["rounds"][3][0]
    sample = lp["samples"][0]
    assert len(sample["logprobs"]) == 4
    for tok, pos in zip(sample["token_ids"], sample["logprobs"]):
        assert str(tok) in pos and len(pos) >= 3
        assert pos[str(tok)] == pytest.approx(max(pos.values()), abs=1e-6)  # greedy: the top token
    assert lp["prompt_logprobs"][0] is None and len(lp["prompt_logprobs"]) == len(PROMPTS[0])
    # vLLM's own CPU platform scores the same prompt alike (fp32, tiny model)
    theirs = run_vllm({"engine": engine(model), "rounds": [spec["rounds"][3]]}, ours=False)["rounds"][0][0]
    for a, b in zip(lp["prompt_logprobs"][1:], theirs["prompt_logprobs"][1:]):
        for t in set(a) & set(b):
            assert a[t] == pytest.approx(b[t], abs=1e-3)
    for a, b in zip(sample["logprobs"], theirs["samples"][0]["logprobs"]):
        for t in set(a) & set(b):
            assert a[t] == pytest.approx(b[t], abs=1e-3)


def test_structured_output_json_schema(default_model_dir):
    """A JSON schema through vLLM's structured-output backend (xgrammar): the bitmask reaches our sampler."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}, "admin": {"type": "boolean"}},
              "required": ["name", "age", "admin"], "additionalProperties": False}
    spec = {"engine": {"model": str(default_model_dir), "max_model_len": 512, "seed": 0},
            "rounds": [{"prompts": ["Describe a user as JSON:", "A person record in JSON:"],
                        "params": {"temperature": 0.7, "seed": 1, "max_tokens": 60,
                                   "structured_outputs": {"json": schema}}}]}
    r = run_vllm(spec, ours=True)
    assert r["platform"] == "MetalEnginePlatform"
    for o in r["rounds"][0]:
        jsonschema.validate(json.loads(o["samples"][0]["text"]), schema)


def _platform(env_over):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(env_over)
    code = "from vllm.platforms import current_platform as p; print('PLATFORM', type(p).__name__)"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = [x for x in p.stdout.splitlines() if x.startswith("PLATFORM ")]
    assert line, p.stderr[-3000:]
    return line[0].split()[1], p.stderr


def test_platform_resolution():
    assert _platform({"VLLM_APPLE_USE_ENGINE": "1"})[0] == "MetalEnginePlatform"
    assert _platform({"VLLM_APPLE_USE_ENGINE": "0"})[0] == "CpuPlatform"
    assert _platform({"VLLM_APPLE_USE_ENGINE": "1", "VLLM_PLUGINS": ""})[0] == "CpuPlatform"
    assert _platform({"VLLM_APPLE_USE_ENGINE": "1", "VLLM_PLUGINS": "metal_engine"})[0] == "MetalEnginePlatform"


def test_register_is_cheap_and_honours_the_switch(monkeypatch, caplog):
    import metal_engine.vllm as plugin

    monkeypatch.setenv("VLLM_APPLE_USE_ENGINE", "1")
    assert plugin.register() == "metal_engine.vllm.platform.MetalEnginePlatform"
    monkeypatch.setenv("VLLM_APPLE_USE_ENGINE", "0")
    assert plugin.register() is None
    monkeypatch.delenv("VLLM_APPLE_USE_ENGINE")
    assert plugin.register() is None  # not an Apple GPU
    monkeypatch.setenv("VLLM_APPLE_USE_ENGINE", "maybe")
    with caplog.at_level("WARNING"):
        assert plugin.register() is None
    assert "VLLM_APPLE_USE_ENGINE='maybe'" in caplog.text
    # registration imports no engine: the native module and the worker stay unloaded
    code = ("import sys, os; os.environ['VLLM_APPLE_USE_ENGINE'] = '1'; import metal_engine.vllm as p; p.register(); "
            "print(sorted(m for m in sys.modules if m.startswith('metal_engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "metal_engine._core" not in out and "metal_engine.vllm.worker" not in out, out


def test_our_env_vars_draw_no_unknown_variable_warning(tiny_dir):
    spec = {"engine": engine(tiny_dir / "llama"), "rounds": [{"prompts": PROMPTS[:1], "params": GREEDY}]}
    env = {"VLLM_METAL_SCRATCH_POOL_MB": "256", "VLLM_APPLE_ENGINE_BACKEND": "cpu", "VLLM_METAL_STRICT_NO_MPS": "0"}
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "run_vllm.py"), json.dumps(spec)]
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    full.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_APPLE_USE_ENGINE": "1", **env})
    p = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=600)
    assert "RESULT " in p.stdout, p.stderr[-3000:]
    assert "Unknown vLLM environment variable" not in p.stdout + p.stderr
    bad = dict(full, VLLM_APPLE_ENGINE_BACKEND="gpu")
    p = subprocess.run(cmd, env=bad, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "VLLM_APPLE_ENGINE_BACKEND='gpu'" in p.stderr
    mode = json.loads(cmd[-1])
    mode["engine"]["logprobs_mode"] = "processed_logprobs"
    p = subprocess.run(cmd[:-1] + [json.dumps(mode)], env=full, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "logprobs_mode='processed_logprobs'" in p.stderr, p.stderr[-2000:]
    v2 = dict(full, VLLM_USE_V2_MODEL_RUNNER="1")  # our worker follows the V1 runner's contract
    p = subprocess.run(cmd, env=v2, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "VLLM_USE_V2_MODEL_RUNNER=1" in p.stderr


def test_kv_cache_sized_as_vllm_plans(tiny_dir):
    """kv_cache_memory_bytes and gpu_memory_utilization size our cache; it holds exactly vLLM's blocks."""
    model = tiny_dir / "llama"
    rounds = [{"prompts": PROMPTS[:1], "params": GREEDY}]
    base = engine(model)
    del base["num_gpu_blocks_override"], base["gpu_memory_utilization"]
    by_bytes = run_vllm({"engine": {**base, "kv_cache_memory_bytes": 3 << 20}, "rounds": rounds}, ours=True)["stats"]
    assert by_bytes["num_kv_blocks"] == (3 << 20) // by_bytes["bytes_per_block"]
    full = run_vllm({"engine": {**base, "gpu_memory_utilization": 0.8}, "rounds": rounds}, ours=True)["stats"]
    half = run_vllm({"engine": {**base, "gpu_memory_utilization": 0.4}, "rounds": rounds}, ours=True)["stats"]
    assert abs(half["num_kv_blocks"] * 2 - full["num_kv_blocks"]) <= 2, (half, full)
    assert full["num_kv_blocks"] * full["bytes_per_block"] <= 0.8 * (256 << 20)


REFUSAL = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
errors = {}
for name, value in (("logprob_token_ids", [1, 2]), ("watermarking", True)):
    try:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2, **{name: value}), use_tqdm=False)
        errors[name] = None
    except ValueError as e:
        errors[name] = str(e)
ok = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                  detokenize=False), use_tqdm=False)
print("RESULT " + json.dumps({"errors": errors, "after": list(ok[0].outputs[0].token_ids)}))
"""


def test_unsupported_sampling_fields_are_refused_and_the_engine_lives_on(tiny_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_APPLE_USE_ENGINE": "1"})
    p = subprocess.run([sys.executable, "-c", REFUSAL, json.dumps(engine(tiny_dir / "llama"))], env=env,
                       capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, p.stderr[-4000:]
    r = json.loads(line[0][7:])
    for name, err in r["errors"].items():
        assert err is not None and f"SamplingParams.{name} is not supported by metal_engine" in err, (name, err)
    assert len(r["after"]) == 3


def test_long_prompt_logprobs_chunk_equals_vllm(tiny_dir):
    """A 300-token chunk with prompt logprobs: more logits rows than one engine call takes (ModelRunner.MAX_ROWS),
    scored in parts, equal to vLLM's own CPU platform."""
    prompt = [1 + (j * 13) % 200 for j in range(300)]
    spec = {"engine": engine(tiny_dir / "llama", max_model_len=512, max_num_batched_tokens=512),
            "rounds": [{"prompts": [prompt], "params": {**GREEDY, "max_tokens": 2, "prompt_logprobs": 1}}]}
    ours = run_vllm(spec, ours=True)["rounds"][0][0]
    theirs = run_vllm(spec, ours=False)["rounds"][0][0]
    assert len(ours["prompt_logprobs"]) == len(theirs["prompt_logprobs"]) == 300
    for a, b in zip(ours["prompt_logprobs"][1:], theirs["prompt_logprobs"][1:]):
        for t in set(a) & set(b):
            assert a[t] == pytest.approx(b[t], abs=1e-3)
    assert ours["samples"][0]["token_ids"] == theirs["samples"][0]["token_ids"]


def test_async_scheduling_feeds_tokens_on_the_device(tiny_dir):
    """vLLM's async scheduling (its default) on metal-sim: vLLM schedules step N+1 before it has step N's tokens;
    plain greedy steps leave theirs on the device, where the next step takes them (prev_token_rows), and vLLM
    reads them after handing us that step. Tokens equal the synchronous cpu run's through stop tokens, chunked
    prefill, preemption, and greedy rows beside sampled and seeded ones (those steps sampled on the host)."""
    model = tiny_dir / "llama"
    sim = {"VLLM_APPLE_ENGINE_BACKEND": "metal-sim"}
    free = tokens(run_vllm({"engine": engine(model), "rounds": [{"prompts": PROMPTS, "params": GREEDY}]},
                           ours=True))
    stop = {**GREEDY, "stop_token_ids": [free[1][4], free[3][2]]}  # two requests stop early, mid-batch
    sampled = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 10, "ignore_eos": True, "detokenize": False,
               "seed": 5}
    rounds = [{"prompts": PROMPTS, "params": GREEDY}, {"prompts": PROMPTS, "params": stop},
              {"prompts": PROMPTS, "params": [GREEDY, sampled, GREEDY, {**GREEDY, "min_tokens": 3}]}]
    tight = engine(model, block_size=16, num_gpu_blocks_override=7, max_num_batched_tokens=16, max_model_len=64)
    sync = run_vllm({"engine": engine(model), "rounds": rounds}, ours=True)  # cpu backend: async off
    assert sync["stats"]["async_scheduling"] is False and sync["stats"]["async_steps"] == 0
    asyn = run_vllm({"engine": engine(model), "rounds": rounds}, ours=True, extra_env=sim)
    st = asyn["stats"]
    assert st["async_scheduling"] is True and st["async_steps"] > 0 and st["fed_rows"] > 0, st
    for rnd in range(len(rounds)):
        assert tokens(asyn, rnd) == tokens(sync, rnd), rnd
    assert tokens(asyn, 0) == free
    assert all(len(t) < 12 for t in (tokens(asyn, 1)[1], tokens(asyn, 1)[3]))
    pressed = run_vllm({"engine": tight, "rounds": [{"prompts": PROMPTS, "params": GREEDY}] * 2}, ours=True,
                       extra_env=sim)
    st = pressed["stats"]
    assert st["async_steps"] > 0 and st["preempted"] > 0 and st["partial_prefills"] > 0, st
    assert tokens(pressed, 0) == free and tokens(pressed, 1) == free
    off = run_vllm({"engine": engine(model, async_scheduling=False), "rounds": rounds[:1]}, ours=True, extra_env=sim)
    assert off["stats"]["async_scheduling"] is False and off["stats"]["async_steps"] == 0
    assert tokens(off) == free

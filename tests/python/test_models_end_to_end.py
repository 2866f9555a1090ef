"""Tiny random Llama, Mistral and Qwen2 checkpoints made by transformers: the engine's fp32 logits at
every prompt position and at each of 16 greedy decode steps match transformers fp32."""

import numpy as np
import pytest
import torch
import transformers

from tiny_models import ARCHS, make_tiny_checkpoint
from engine_harness import Harness

import metal_engine

DECODE_STEPS = 16
ATOL = 2e-4  # fp32 vs fp32; logits are O(1)-O(10)


def order_atol(engine):
    """Batched vs alone, chunked vs whole: the GEMV and GEMM paths sum in different orders (fp32 rounding that
    grows with depth: 1e-5 for the 2-layer tiny models)."""
    return 1e-5 * max(1.0, engine.model_config.num_layers / 2)


def hf_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def prompts(n, lengths, vocab=211, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=l).tolist() for l in lengths[:n]]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_transformers(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    engine = metal_engine.Engine(path, dtype="float32", kv_cache_memory=8 << 20)
    [prompt] = prompts(1, [19])
    (logits, tokens), = Harness(engine).prefill_and_decode([prompt], DECODE_STEPS)
    assert logits.shape == (len(prompt) + DECODE_STEPS, 211)
    ref = hf_logits(path, tokens)
    np.testing.assert_allclose(logits, ref, atol=ATOL, rtol=0)
    # greedy tokens are the reference model's argmax at every decode step
    assert tokens[len(prompt):] == [int(t) for t in ref[len(prompt) - 1 : -1].argmax(-1)]


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_different_lengths_equals_each_alone(tiny_checkpoints, arch):
    engine = metal_engine.Engine(tiny_checkpoints[arch], dtype="float32", kv_cache_memory=8 << 20)
    ps = prompts(4, [3, 17, 1, 40], seed=1)
    batched = Harness(engine, seed=2).prefill_and_decode(ps, 6, batched=True)
    alone = Harness(engine, seed=3).prefill_and_decode(ps, 6, batched=False)
    for (lb, tb), (la, ta) in zip(batched, alone):
        assert tb == ta
        np.testing.assert_allclose(lb, la, atol=order_atol(engine), rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_continues_over_cached_pages(tiny_checkpoints, arch):
    engine = metal_engine.Engine(tiny_checkpoints[arch], dtype="float32", kv_cache_memory=8 << 20)
    ps = prompts(2, [37, 22], seed=4)
    whole = Harness(engine).prefill_and_decode(ps, 4)
    chunked = Harness(engine, seed=5).prefill_and_decode(ps, 4, chunk=7)  # 7: not a block multiple
    for (lw, tw), (lc, tc) in zip(whole, chunked):
        assert tw == tc
        np.testing.assert_allclose(lw, lc, atol=order_atol(engine), rtol=0)


def test_mistral_window_is_smaller_than_the_prompt(tiny_checkpoints):
    engine = metal_engine.Engine(tiny_checkpoints["mistral"], dtype="float32")
    assert engine.model_config.sliding_window == 5
    assert all(engine.model_config.layer_uses_sliding_window)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_matches_transformers(tmp_path, rope):
    path = make_tiny_checkpoint(tmp_path / "ck", "llama", rope_parameters=rope, head_dim=32, num_attention_heads=2,
                                num_key_value_heads=1)
    engine = metal_engine.Engine(path, dtype="float32")
    [prompt] = prompts(1, [50], seed=6)
    (logits, tokens), = Harness(engine).prefill_and_decode([prompt], 4)
    np.testing.assert_allclose(logits, hf_logits(path, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "arch,rope,max_pos,prompt_len,decode",
    [
        # yarn (Qwen3's long-context RoPE): interpolated low frequencies, cos/sin scaled by its attention factor
        ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
         256, 30, 8),
        ("llama", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0,
                   "beta_fast": 16.0, "beta_slow": 2.0}, 256, 20, 4),
        # dynamic NTK: the base grows with the step's context past max_position_embeddings (one step: the prefill)
        ("llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 32, 50, 0),
        ("llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 256, 20, 6),
        # longrope (Phi-3, Phi-4-mini): short factors within original_max_position_embeddings, long past it
        ("phi3", "longrope", 256, 12, 8),
        ("phi3", "longrope", 256, 40, 4),
    ],
    ids=["yarn", "yarn-betas", "dynamic-past-max", "dynamic-within", "longrope-short", "longrope-long"],
)
def test_more_rope_types_match_transformers(tmp_path, arch, rope, max_pos, prompt_len, decode):
    if rope == "longrope":
        rng = np.random.default_rng(11)
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": (1 + rng.random(6)).tolist(), "long_factor": (1 + 4 * rng.random(6)).tolist(),
                "original_max_position_embeddings": 32}
    path = make_tiny_checkpoint(tmp_path / "ck", arch, rope_parameters=rope, max_position_embeddings=max_pos)
    engine = metal_engine.Engine(path, dtype="float32")
    [prompt] = prompts(1, [prompt_len], seed=12)
    (logits, tokens), = Harness(engine).prefill_and_decode([prompt], decode)
    np.testing.assert_allclose(logits, hf_logits(path, tokens), atol=ATOL, rtol=0)


def test_gemma3_head_dim_256_and_its_own_layer_pattern(tmp_path):
    """Gemma 3's real head_dim (256) on the cpu backend, with layer_types saved explicitly and a full-attention
    first layer, a prompt longer than the window; linear RoPE scaling on the full layers only."""
    path = make_tiny_checkpoint(tmp_path / "g", "gemma3", head_dim=256, num_hidden_layers=3, sliding_window=5,
                                layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                    "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    engine = metal_engine.Engine(path, dtype="float32")
    assert engine.model_config.layer_uses_sliding_window == [False, True, True]
    [prompt] = prompts(1, [23], seed=13)
    (logits, tokens), = Harness(engine).prefill_and_decode([prompt], 6)
    np.testing.assert_allclose(logits, hf_logits(path, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_step_reads_only_the_routed_experts(tiny_checkpoints, arch):
    """A decode step of one token reads its 2 experts per projection, not the 8; a 40-token prefill reads each
    selected expert once per projection (at most 8), not once per token (80)."""
    engine = metal_engine.Engine(tiny_checkpoints[arch], dtype="float32")
    moe_layers = 2 if arch == "mixtral" else 1  # qwen3_moe: layer 1 is dense (mlp_only_layers)
    h = Harness(engine)
    before = metal_engine._core.cpu_moe_expert_matmuls()
    (logits, tokens), = h.prefill_and_decode([prompts(1, [40], seed=14)[0]], 0)
    prefill = metal_engine._core.cpu_moe_expert_matmuls() - before
    assert 2 * moe_layers * 2 <= prefill <= 2 * moe_layers * 8  # 2 projections per MoE layer
    before = metal_engine._core.cpu_moe_expert_matmuls()
    h.prefill_and_decode([[3]], 0)
    assert metal_engine._core.cpu_moe_expert_matmuls() - before == 2 * moe_layers * 2


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    path = tmp_path / "sharded"
    src = make_tiny_checkpoint(tmp_path / "single", "llama", tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    engine = metal_engine.Engine(path, dtype="float32")
    [prompt] = prompts(1, [9], seed=7)
    (logits, tokens), = Harness(engine).prefill_and_decode([prompt], 3)
    np.testing.assert_allclose(logits, hf_logits(path, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tol", [("float16", 0.02), ("bfloat16", 0.15)])
def test_half_precision_logits_stay_close_to_fp32(tiny_checkpoints, arch, dtype, tol):
    ps = prompts(2, [21, 8], seed=8)
    ref = Harness(metal_engine.Engine(tiny_checkpoints[arch], dtype="float32")).prefill_and_decode(ps, 0)
    half = Harness(metal_engine.Engine(tiny_checkpoints[arch], dtype=dtype)).prefill_and_decode(ps, 0)
    for (lr, _), (lh, _) in zip(ref, half):
        assert np.abs(lh - lr).max() < tol


@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_in_place(tmp_path, tiny_checkpoints, src_dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], dtype=src_dtype)
    model.save_pretrained(tmp_path / "half")
    engine = metal_engine.Engine(tmp_path / "half")  # dtype auto: the checkpoint's own
    assert engine.dtype == {torch.float16: "f16", torch.bfloat16: "bf16"}[src_dtype]
    [prompt] = prompts(1, [12], seed=9)
    (logits, tokens), = Harness(engine).prefill_and_decode([prompt], 2)
    ref = hf_logits(tmp_path / "half", tokens)  # transformers upcasts to fp32 on request
    assert np.abs(logits - ref).max() < 0.05


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("llama", "mistral", "qwen2")])
def test_llm_greedy_text_equals_transformers(tmp_path, arch):
    """The new architectures through LLM with a real tokenizer: the greedy text of transformers' generate."""
    from tiny_models import make_tiny_text_checkpoint

    path = make_tiny_text_checkpoint(tmp_path / arch, arch, seed=4)
    llm = metal_engine.LLM(str(path), dtype="float32", max_model_len=128, progress=False)
    prompt = "The quick brown fox"
    [out] = llm.generate([prompt], metal_engine.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)
    tok = llm.get_tokenizer()
    ids = out.prompt_token_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()
    # the text as far as it decodes: a byte-level BPE's trailing incomplete character is held back
    assert out.outputs[0].text == tok.decode(ref[0, len(ids):].tolist()).rstrip("\ufffd")

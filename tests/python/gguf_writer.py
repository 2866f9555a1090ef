"""Writes GGUF files as llama.cpp's converter lays them out (tensor names from gguf-py's TensorNameMap, Q/K
permuted for llama-style RoPE, experts merged into [experts, out, in]), optionally quantized: the tests'
stand-in for files downloaded from the hub."""

import json

import numpy as np

from op_testing import random_quant_rows

GGUF_ARCH = {"llama": "LLAMA", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE", "mixtral": "LLAMA",  # Mixtral: llama
             "gemma2": "GEMMA2", "gemma3": "GEMMA3", "phi3": "PHI3"}                         # with experts
PERMUTED_QK = ("llama", "mixtral")  # llama.cpp permutes Q/K rows for llama-style RoPE


def permute(w, n_head):
    """llama.cpp's convert permute for llama-style RoPE (our converter undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantized(x, fmt, rng):
    """x as `fmt` blocks (gguf-py's quantizer; it has none for the K-quants, which get random blocks)."""
    import gguf

    t = gguf.GGMLQuantizationType[fmt.upper()]
    try:
        return gguf.quants.quantize(x.astype(np.float32), t), t
    except NotImplementedError:
        return random_quant_rows(fmt, int(np.prod(x.shape[:-1])), x.shape[-1], rng).reshape(
            *x.shape[:-1], -1), t


def write_gguf(src, dst, arch, quant=None, seed=0):
    """A GGUF of checkpoint `src` as llama.cpp's converter lays it out; with `quant` (a format name, or a function
    of the GGUF tensor name giving one or None), its matrices in that format (norms stay F32)."""
    fmt_of = quant if callable(quant) else (lambda name: quant)
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
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: per layer type; the full layers' here
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "phi3":  # as Phi3MiniModel writes it: no key length, the rotary dims, the longrope factors
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(partial * cfg["hidden_size"]) // cfg["num_attention_heads"])
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch != "gemma2":  # Gemma2Model writes no RoPE fields (llama.cpp's default base: 10000)
        w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta",
                                                                                   cfg.get("rope_local_base_freq"))
        if local is not None:
            w.add_rope_freq_base_swa(local)
    extra = {}
    if arch == "phi3" and rope.get("rope_type") in ("longrope", "su"):
        import math

        orig = cfg.get("original_max_position_embeddings") or rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        scale = cfg["max_position_embeddings"] / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
        extra = {"rope_factors_long.weight": np.array(rope["long_factor"], np.float32),
                 "rope_factors_short.weight": np.array(rope["short_factor"], np.float32)}
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
    rng = np.random.default_rng(seed)
    names = gguf.TensorNameMap(enum, L)
    experts = {}
    for hf, x in tensors.items():
        if ".experts." in hf:  # model.layers.{l}.<block>.experts.{e}.{proj}.weight -> merged per layer and proj
            parts = hf.split(".")
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = x
            continue
        if arch in PERMUTED_QK and hf.endswith("q_proj.weight"):
            x = permute(x, cfg["num_attention_heads"])
        elif arch in PERMUTED_QK and hf.endswith("k_proj.weight"):
            x = permute(x, cfg["num_key_value_heads"])
        if arch in ("gemma2", "gemma3") and hf.endswith("norm.weight"):
            x = x + np.float32(1.0)  # llama.cpp's converter stores Gemma's (1 + w) norms as 1 + w
        if arch == "gemma2" and hf == "lm_head.weight":
            continue  # Gemma2Model drops it (tied)
        base, suffix = hf.rsplit(".", 1)  # .weight or .bias
        g = names.get_name(base)
        if g is None and base.endswith("block_sparse_moe.gate"):
            g = f"blk.{base.split('.')[2]}.ffn_gate_inp"
        assert g is not None, hf
        if x.ndim == 2 and fmt_of(f"{g}.{suffix}"):
            q, t = quantized(x, fmt_of(f"{g}.{suffix}"), rng)
            w.add_tensor(f"{g}.{suffix}", q, raw_dtype=t)
        else:
            w.add_tensor(f"{g}.{suffix}", x)
    for name, x in extra.items():
        w.add_tensor(name, x)
    for (layer, proj), by_expert in sorted(experts.items()):
        kind = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}[proj]
        x = np.stack([by_expert[e] for e in sorted(by_expert)])
        if fmt_of(f"blk.{layer}.{kind}.weight"):
            q, t = quantized(x, fmt_of(f"blk.{layer}.{kind}.weight"), rng)
            w.add_tensor(f"blk.{layer}.{kind}.weight", q, raw_dtype=t)
        else:
            w.add_tensor(f"blk.{layer}.{kind}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

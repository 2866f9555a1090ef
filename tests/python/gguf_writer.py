"""Writes GGUF files as llama.cpp's converter lays them out (tensor names from gguf-py's TensorNameMap, Q/K
permuted for llama-style RoPE, experts merged into [experts, out, in]), optionally quantized: the tests'
stand-in for files downloaded from the hub."""

import json

import numpy as np

from op_testing import random_quant_rows

GGUF_ARCH = {"llama": "LLAMA", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE", "mixtral": "LLAMA"}  # Mixtral: llama with experts
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

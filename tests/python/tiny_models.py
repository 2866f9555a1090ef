"""Tiny random checkpoints made by transformers, for tests that need a real model quickly."""

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gemma2", "mixtral", "qwen3_moe")


def make_tiny_checkpoint(path, arch: str, seed: int = 0, **overrides):
    """A tiny random checkpoint saved by transformers itself (fp32 safetensors + config.json)."""
    import torch
    import transformers

    common = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**{**common, "rope_theta": 10000.0, **overrides})
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": 5, **overrides})
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, **overrides})
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":  # per-head q/k RMSNorm; head_dim 24 (heads * head_dim != hidden_size)
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 24, **overrides})
        cls = transformers.Qwen3ForCausalLM
    elif arch == "phi3":  # fused qkv_proj / gate_up_proj as stored; partial rotary (12 of 16 dims rotate)
        cfg = transformers.Phi3Config(**{**common, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.75}, **overrides})
        cls = transformers.Phi3ForCausalLM
    elif arch == "gemma3":  # 5 sliding-window layers (window 7 < the prompts) then 1 full; q/k norm; GeGLU
        cfg = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "head_dim": 32, "sliding_window": 7,
                                               "query_pre_attn_scalar": 24, "tie_word_embeddings": True,
                                               "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
                                               **overrides})
        cls = transformers.Gemma3ForCausalLM
    elif arch == "gemma2":  # even layers slide (window 7); attention and final-logit softcapping; GeGLU
        cfg = transformers.Gemma2Config(**{**common, "num_hidden_layers": 4, "head_dim": 32, "sliding_window": 7,
                                           "query_pre_attn_scalar": 24, "attn_logit_softcapping": 3.0,
                                           "final_logit_softcapping": 4.0, "tie_word_embeddings": True,
                                           "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, **overrides})
        cls = transformers.Gemma2ForCausalLM
    elif arch == "mixtral":  # 8 experts, top-2, renormalised; sliding window 5
        cfg = transformers.MixtralConfig(**{**common, "num_local_experts": 8, "num_experts_per_tok": 2,
                                            "sliding_window": 5, **overrides})
        cls = transformers.MixtralForCausalLM
    elif arch == "qwen3_moe":  # 8 experts, top-2, not renormalised; layer 1 a dense MLP (mlp_only_layers)
        cfg = transformers.Qwen3MoeConfig(**{**common, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 24, "norm_topk_prob": False,
                                             "decoder_sparse_step": 1, "mlp_only_layers": [1], **overrides})
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    with torch.no_grad():  # random init gives near-uniform logits; widen weights so tokens differ
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's RMSNorm multiplies by (1 + w): its w is the offset from one
                p.copy_((0.0 if arch.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08 if p.ndim > 1 else 0.05)
        for name, p in model.named_parameters():  # uneven routing: the router favours the first experts
            if name.endswith(".gate.weight") and p.ndim == 2 and p.shape[0] == getattr(cfg, "num_local_experts", 0):
                p.mul_(torch.linspace(3.0, 0.5, p.shape[0])[:, None])
    model.save_pretrained(path, safe_serialization=True)
    return path


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_text_checkpoint(path, arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random checkpoint with a real byte-level BPE tokenizer (trained here in milliseconds) and a
    ChatML chat template, so text, chat and server paths run on a tiny model."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [
        "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
        "The quick brown fox jumps over the lazy dog. Hello world, hello engine!",
        "Paris is the capital of France. Berlin is the capital of Germany.",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    eos = tok.token_to_id("<|im_end|>")
    make_tiny_checkpoint(path, arch, seed=seed, vocab_size=tok.get_vocab_size(), eos_token_id=eos, bos_token_id=None,
                         **overrides)
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML, "add_bos_token": False}))
    return path


# Chat templates in the manner of the model families' own (what their tool-call parsers read), for tiny models.
HERMES_TEMPLATE = (  # Qwen2.5 / Qwen3: tools in the system turn, calls as <tool_call> blocks, results as user turns
    "{%- if tools %}<|im_start|>system\nYou may call one or more functions. <tools>\n"
    "{%- for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\nFor each call, return "
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Llama 3.1: tools in the first user turn, a call is the JSON reply, results as ipython turns
    "{%- for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{%- if loop.first and tools %}Given the following functions, respond with a JSON for a function call with its "
    "proper arguments. Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name "
    "and its value}.\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
    "{{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (  # Mistral: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] and [TOOL_RESULTS]
    "{%- set ns = namespace(last_user=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{% if loop.index0 == ns.last_user and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]"
    "{% endif %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}{\"name\": "
    "\"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}{{ ', ' if not loop.last }}"
    "{% endfor %}]<|im_end|>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{%- else %}{{ m.content }}{% endif %}{% endfor %}"
)


def with_chat_template(path, template):
    """The checkpoint at `path` with `template` as its chat template."""
    import json
    from pathlib import Path

    p = Path(path) / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["chat_template"] = template
    p.write_text(json.dumps(cfg))
    return path

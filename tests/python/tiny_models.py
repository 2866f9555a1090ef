"""Tiny random checkpoints made by transformers, for tests that need a real model quickly."""

ARCHS = ("llama", "mistral", "qwen2")


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
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    with torch.no_grad():  # random init gives near-uniform logits; widen weights so tokens differ
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08 if p.ndim > 1 else 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return path

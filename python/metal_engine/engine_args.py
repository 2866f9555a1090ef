"""vLLM's engine-argument names for metal_engine's LLM, so vLLM scripts (`LLM(**vars(args))` from EngineArgs)
run unchanged: each name vLLM has is mapped onto our knob, accepted where it cannot change what we do, or
refused with a ValueError naming it and why. A name vLLM does not have is a TypeError, as in vLLM."""

from __future__ import annotations

from typing import Any

# vLLM name -> our EngineConfig knob, with the value converted
MAPPED = {
    "num_gpu_blocks_override": "num_kv_blocks",
    "kv_cache_memory_bytes": "kv_cache_memory",
    "tokenizer": "tokenizer",
    "skip_tokenizer_init": "skip_tokenizer_init",
    "max_logprobs": "max_logprobs",
    "async_scheduling": "async_scheduling",
}


def _any(_v) -> bool:
    return True


def _is(*allowed):
    return lambda v: v in allowed


# vLLM names accepted because this engine already behaves as any value asks: name -> (accepted when, why not
# otherwise)
ACCEPTED = {
    "enforce_eager": (_any, ""),                        # no CUDA graphs or torch.compile here: always eager
    "trust_remote_code": (_any, ""),                    # no model code is ever loaded from a checkpoint
    "disable_log_stats": (_any, ""),                    # no periodic stats log
    "disable_custom_all_reduce": (_any, ""),            # one device
    "served_model_name": (_any, ""),                    # a server's name for the model; LLM has none
    "tensor_parallel_size": (_is(1, None), "one device: tensor parallelism is not supported"),
    "pipeline_parallel_size": (_is(1, None), "one device: pipeline parallelism is not supported"),
    "data_parallel_size": (_is(1, None), "one engine: data parallelism is not supported"),
    "tokenizer_mode": (_is("auto", "hf", None), "only the checkpoint's tokenizer.json (tokenizer_mode 'auto')"),
    "load_format": (_is("auto", "safetensors", "gguf", None), "metal_engine loads safetensors and GGUF"),
    "device": (_is("auto", "cpu", None), "choose the device with backend= (cpu, metal, metal-sim)"),
    "distributed_executor_backend": (_is(None, "uni"), "one process: no distributed executor"),
    "revision": (_is(None, "main"), "no model hub: pass a local checkpoint folder or .gguf file"),
    "download_dir": (_is(None), "no model hub: pass a local checkpoint folder or .gguf file"),
    "hf_overrides": (_is(None, {}), "config overrides are not supported; edit the checkpoint's config.json"),
    "limit_mm_per_prompt": (_is(None, {}), "metal_engine runs text-only models"),
    "swap_space": (_any, ""),                           # preemption recomputes; nothing is swapped
    "cpu_offload_gb": (_is(0, None), "weight offloading is not supported"),
    "speculative_config": (_is(None), "speculative decoding is not supported"),
    "enable_lora": (_is(False, None), "LoRA adapters are not supported"),
}


def apply_engine_args(kwargs: dict[str, Any], knobs: dict[str, Any]) -> None:
    """Moves vLLM's names in `kwargs` onto `knobs` (our EngineConfig's fields); raises on the rest."""
    for name in list(kwargs):
        value = kwargs.pop(name)
        if name in MAPPED:
            knobs[MAPPED[name]] = value
        elif name == "gpu_memory_utilization":
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {value!r}")
            knobs["kv_cache_memory_share"] = float(value)  # a share of the KV budget (kv_cache_memory)
        elif name == "enable_chunked_prefill":
            knobs["chunked_prefill"] = value is not False
        elif name == "quantization":
            knobs["quantization"] = value
        elif name in ACCEPTED:
            ok, why = ACCEPTED[name]
            if not ok(value):
                raise ValueError(f"{name}={value!r} is not supported by metal_engine: {why}")
        else:
            raise TypeError(f"LLM() got an unexpected keyword argument {name!r} (neither metal_engine's nor "
                            "vLLM's engine arguments have it)")

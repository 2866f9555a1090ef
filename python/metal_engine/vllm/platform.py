"""The vLLM platform: out-of-tree, "cpu" to vLLM's torch plumbing (tensors vLLM makes live in host memory), our
engine's name to the user, and a config check that hands every step to our Worker (worker.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger
from vllm.platforms.interface import Platform, PlatformEnum

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger("vllm." + __name__)  # under vLLM's logger, which vLLM configures

WORKER = "metal_engine.vllm.worker.MetalEngineWorker"
# SamplingParams fields vLLM's GPU model runner implements and our worker does not: refused per request, never
# silently ignored (validate_request).
UNSUPPORTED_SAMPLING_FIELDS = ("watermarking", "logprob_token_ids", "prompt_logprob_token_ids",
                               "prompt_logprob_start", "thinking_token_budget")


def engine_backend() -> str:
    """The backend our Engine runs on under vLLM: VLLM_APPLE_ENGINE_BACKEND, else auto."""
    from metal_engine.config import BACKENDS
    from metal_engine.vllm import ENV_BACKEND

    b = os.environ.get(ENV_BACKEND, "").strip() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={b!r} is not one of {', '.join(BACKENDS)}")
    return b


def _backend_runs_at_submit() -> bool:
    from metal_engine.config import EngineConfig

    return EngineConfig(backend=engine_backend()).select_backend() == "cpu"


class MetalEnginePlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "cpu"
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
    simple_compile_backend: str = "eager"
    supported_quantization: list[str] = ["gguf"]

    def is_cpu(self) -> bool:
        # Host memory and no torch accelerator, as vLLM's CPU platform: vLLM then skips its accelerator calls
        # (torch.accelerator.empty_cache at shutdown fails on a machine without one) and takes its CPU defaults.
        return True

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        from metal_engine.config import EngineConfig

        return f"metal_engine ({EngineConfig(backend=engine_backend()).select_backend()})"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        pass

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        torch.manual_seed(seed)

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        # Our engine runs attention itself; vLLM asks only where it builds its own layers (it does not here).
        return "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"

    @classmethod
    def supports_structured_output(cls) -> bool:
        return True

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        return False

    @classmethod
    def check_and_update_config(cls, vllm_config: "VllmConfig") -> None:
        """Our Worker on the in-process executor; no torch.compile or CUDA graphs (our engine runs the forward);
        vLLM's async scheduling as vLLM resolved it (on by default) on Metal, off on the cpu backend, whose steps
        run as they are submitted (vLLM's CPU platform turns it off too); our block size unless the user chose
        one. What we cannot honour is refused here, before anything loads."""
        from vllm.config import CompilationMode

        parallel = vllm_config.parallel_config
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(parallel, name, 1) > 1:
                raise ValueError(f"{name}={getattr(parallel, name)}: metal_engine runs one model on one device; "
                                 f"set {name}=1 (or VLLM_APPLE_USE_ENGINE=0 for vLLM's own platform)")
        if vllm_config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported by metal_engine: drop speculative_config "
                             "(or set VLLM_APPLE_USE_ENGINE=0)")
        if vllm_config.lora_config is not None:
            raise ValueError("LoRA adapters are not supported by metal_engine: drop enable_lora "
                             "(or set VLLM_APPLE_USE_ENGINE=0)")
        if vllm_config.model_config is not None and getattr(vllm_config.model_config, "logits_processors", None):
            raise ValueError("custom logits_processors are not supported by metal_engine: drop them "
                             "(or set VLLM_APPLE_USE_ENGINE=0)")
        # The runner follows vLLM's V1 model-runner contract (a resumed request arrives as cached data, its
        # tokens kept by the worker); V2 sends resumed requests as new ones.
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
            raise ValueError("VLLM_USE_V2_MODEL_RUNNER=1: metal_engine's worker follows vLLM's V1 model-runner "
                             "contract; unset it (or set VLLM_APPLE_USE_ENGINE=0)")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        from metal_engine.config import ENV_MAX_BATCH_SIZE, _env_int

        budget = _env_int(ENV_MAX_BATCH_SIZE)
        if budget is not None:  # the seed's knob for the token budget per step, as in our own LLM
            vllm_config.scheduler_config.max_num_batched_tokens = budget
        mode = getattr(vllm_config.model_config, "logprobs_mode", None) if vllm_config.model_config else None
        if mode is not None and str(getattr(mode, "value", mode)) != "raw_logprobs":
            raise ValueError(f"logprobs_mode={getattr(mode, 'value', mode)!r}: metal_engine returns raw_logprobs "
                             "(the model's distribution, grammar mask applied); drop logprobs_mode")
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER
        if parallel.distributed_executor_backend in (None, "mp"):
            parallel.distributed_executor_backend = "uni"
        if vllm_config.scheduler_config.async_scheduling and _backend_runs_at_submit():
            logger.info("metal_engine: async scheduling off on the cpu backend (a step runs as it is submitted: "
                        "nothing would overlap)")
            vllm_config.scheduler_config.async_scheduling = False
        comp = vllm_config.compilation_config
        comp.mode = CompilationMode.NONE
        comp.cudagraph_capture_sizes = []
        try:
            from vllm.config import CUDAGraphMode

            comp.cudagraph_mode = CUDAGraphMode.NONE
        except ImportError:
            pass
        cache = vllm_config.cache_config
        if not getattr(cache, "user_specified_block_size", False):
            from metal_engine.config import native_default

            cache.block_size = native_default("block_size")
        model = vllm_config.model_config
        if model is not None and cache.cache_dtype not in ("auto", "float32", "float16", "bfloat16", "fp16",
                                                          "bf16", "fp32"):
            raise ValueError(f"kv_cache_dtype={cache.cache_dtype!r}: metal_engine's KV cache is auto, float32, "
                             "float16 or bfloat16")
        engine_backend()  # a bad VLLM_APPLE_ENGINE_BACKEND fails here, naming the variable

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:
        """Refuses, before the request reaches the engine core, what our worker cannot honour: pooling, prompt
        embeddings and the SamplingParams fields vLLM's own GPU runner implements and ours does not."""
        from vllm import SamplingParams

        if not isinstance(params, SamplingParams):
            raise ValueError("metal_engine runs generation only: pooling requests need vLLM's own platform "
                             "(VLLM_APPLE_USE_ENGINE=0)")
        kind = processed_inputs.get("type") if isinstance(processed_inputs, dict) else None
        if kind == "embeds" or (isinstance(processed_inputs, dict) and processed_inputs.get("prompt_embeds")
                                is not None):
            raise ValueError("metal_engine does not take prompt embeddings: send token ids or text")
        for name in UNSUPPORTED_SAMPLING_FIELDS:
            if getattr(params, name, None) not in (None, False):
                raise ValueError(f"SamplingParams.{name} is not supported by metal_engine; drop it, or run vLLM's "
                                 "own platform (VLLM_APPLE_USE_ENGINE=0)")

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: "VllmConfig") -> None:
        pass  # the block size is ours (check_and_update_config); no vLLM attention backend to ask

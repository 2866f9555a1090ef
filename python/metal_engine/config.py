"""EngineConfig: every knob of the Python engine with its default, and the environment variables
that map onto them (documented in the README). The knobs the native engine has take their defaults from it
(include/metal_engine/config.h, through _core.EngineConfig()): each is defined once, in one unit."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Optional

ENV_SCRATCH_POOL_MB = "VLLM_METAL_SCRATCH_POOL_MB"
ENV_MAX_BATCH_SIZE = "VLLM_METAL_MAX_BATCH_SIZE"
ENV_ENGINE_PREFILL = "VLLM_APPLE_ENGINE_PREFILL"
ENV_STRICT = "VLLM_METAL_STRICT_NO_MPS"

BACKENDS = ("auto", "cpu", "metal", "metal-sim")


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not an integer") from None
    if n <= 0:
        raise ValueError(f"{name}={v!r} must be positive")
    return n


def _env_flag(name: str) -> Optional[bool]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={v!r}: use 1 or 0")


def native_default(name: str):
    """A knob's default as the native engine defines it (include/metal_engine/config.h)."""
    from . import _core

    return getattr(_core.EngineConfig(), name)


@dataclass
class EngineConfig:
    model: Optional[str] = None           # checkpoint folder or .gguf file; None = the default model
    dtype: str = "auto"                   # auto: float16 for float32/float16 checkpoints, bfloat16 for bfloat16
                                          # (vLLM's; resolved by the native engine, config.h)
    activation_dtype: str = "auto"        # auto: the weights' 16-bit dtype on Metal, float32 on cpu; or float32
    kv_cache_dtype: str = "auto"          # auto: the weights' float dtype; or float32 | float16 | bfloat16 (vLLM's)
    quantization: Optional[str] = None    # q8_0 | q4_0 | q4_k: a float checkpoint's matrices quantized at load (cached)
    backend: str = "auto"                 # auto | cpu | metal | metal-sim
    max_model_len: Optional[int] = None   # default: the model's max_position_embeddings, capped at 4096
    block_size: int = field(default_factory=lambda: native_default("block_size"))
    kv_cache_memory: int = field(default_factory=lambda: native_default("kv_cache_memory"))  # bytes, K and V
    num_kv_blocks: Optional[int] = None   # overrides kv_cache_memory (vLLM's num_gpu_blocks_override)
    max_num_seqs: int = 64
    max_num_batched_tokens: Optional[int] = None  # token budget per step; env VLLM_METAL_MAX_BATCH_SIZE, else 256
    enable_prefix_caching: bool = True
    scratch_pool_mb: Optional[int] = None  # env VLLM_METAL_SCRATCH_POOL_MB, else the native default (512)
    engine_prefill: bool = True           # env VLLM_APPLE_ENGINE_PREFILL; prefill always runs in the engine
    strict: Optional[bool] = None         # env VLLM_METAL_STRICT_NO_MPS: never fall back silently, raise
    seed: int = 0
    num_threads: int = field(default_factory=lambda: native_default("num_threads"))  # cpu backend; 0 = all cores
    kv_cache_memory_share: float = 1.0     # vLLM's gpu_memory_utilization: this share of kv_cache_memory
    chunked_prefill: bool = True           # False (vLLM's enable_chunked_prefill): a prompt prefills in one step
    tokenizer: Optional[str] = None        # a folder with tokenizer.json (default: the checkpoint's)
    skip_tokenizer_init: bool = False      # no tokenizer: prompts are token ids, outputs have no text
    max_logprobs: Optional[int] = None     # vLLM's: the most logprobs / prompt_logprobs a request may ask for
    async_scheduling: Optional[bool] = None  # vLLM's: greedy decode steps are scheduled and submitted before the
                                           # step ahead of them has been read back (two in flight; their tokens
                                           # passed on the device). None: on with Metal, off on cpu (whose steps
                                           # run as they are submitted: nothing would overlap)
    extra: dict = field(default_factory=dict)

    def resolve(self) -> "EngineConfig":
        """Applies environment variables and checks every knob; returns self."""
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = _env_int(ENV_MAX_BATCH_SIZE) or 256
        env_scratch = _env_int(ENV_SCRATCH_POOL_MB)
        if env_scratch is not None:
            self.scratch_pool_mb = env_scratch
        elif self.scratch_pool_mb is None:
            self.scratch_pool_mb = native_default("scratch_pool_mb")
        prefill = _env_flag(ENV_ENGINE_PREFILL)
        if prefill is not None:
            self.engine_prefill = prefill
        if self.strict is None:
            self.strict = bool(_env_flag(ENV_STRICT))
        if not self.engine_prefill:
            raise ValueError(
                f"{ENV_ENGINE_PREFILL}=0 asks for prefill outside the engine, but metal_engine has no other "
                "prefill path (it always prefills in-engine, mixed with decode); unset it or set it to 1"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.kv_cache_memory_share != 1.0:
            self.kv_cache_memory = max(1, int(self.kv_cache_memory * self.kv_cache_memory_share))
            self.kv_cache_memory_share = 1.0
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (auto), got {self.async_scheduling!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len <= 0):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        return self

    def select_backend(self) -> str:
        """auto: metal on Apple GPUs (where this build has it), cpu elsewhere. Strict mode raises instead of
        falling back. An explicit backend this build lacks raises, naming what it has."""
        from . import _core

        available = list(_core.available_backends())
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        backend = self.backend
        if backend == "auto":
            if "metal" in available:
                return "metal"
            if apple and self.strict:
                raise RuntimeError(
                    f"{ENV_STRICT}=1: this is an Apple GPU but this build has no Metal backend; strict mode does "
                    "not fall back to the cpu backend (unset it, or pass backend='cpu')"
                )
            return "cpu"
        if backend not in available:
            how = ("build on a Mac with Xcode" if backend == "metal" else
                   "install clang-19, libobjc-12-dev and libblocksruntime-dev, then reinstall (README: metal-sim)")
            raise ValueError(f"backend {backend!r} is not in this build (it has {', '.join(available)}); {how}")
        return backend

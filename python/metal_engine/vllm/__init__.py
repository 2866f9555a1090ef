"""metal_engine as a vLLM platform plugin: vLLM code (`from vllm import LLM`, `vllm serve`) runs on our engine
when VLLM_APPLE_USE_ENGINE=1. vLLM's scheduler and KV-cache manager decide each step; our Engine computes it.

vLLM finds `register` through the entry point group `vllm.platform_plugins` (pyproject.toml) and calls it in
every process, more than once: it imports nothing heavy and builds nothing. The platform is platform.py, the
worker vLLM's executor drives is worker.py, the step it runs (SchedulerOutput -> Engine.step -> sampled
tokens) model_runner.py.
"""

from __future__ import annotations

import os
import platform as _platform

ENV_USE_ENGINE = "VLLM_APPLE_USE_ENGINE"
ENV_BACKEND = "VLLM_APPLE_ENGINE_BACKEND"

# Our knobs vLLM should know (else it warns "Unknown vLLM environment variable"), with what each does.
ENV_VARS = {
    ENV_USE_ENGINE: "1: vLLM runs on metal_engine (default on an Apple GPU with a Metal build); 0: never",
    ENV_BACKEND: "metal_engine's backend under vLLM: auto (default), cpu, metal or metal-sim",
    "VLLM_APPLE_ENGINE_PREFILL": "prefill in the engine (always; 0 is refused)",
    "VLLM_METAL_SCRATCH_POOL_MB": "the engine's per-step scratch arena in MiB",
    "VLLM_METAL_MAX_BATCH_SIZE": "the token budget per step (vLLM's max_num_batched_tokens) when not given",
    "VLLM_METAL_STRICT_NO_MPS": "1: never fall back silently to another backend; raise instead",
}

PLATFORM = "metal_engine.vllm.platform.MetalEnginePlatform"


def _flag(name: str):
    v = os.environ.get(name, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return None


def _apple_gpu_with_metal() -> bool:
    if _platform.system() != "Darwin" or _platform.machine() != "arm64":
        return False
    try:
        from metal_engine import _core
    except ImportError:
        return False
    return "metal" in _core.available_backends()


def register_env_vars() -> None:
    """Adds our variables to vLLM's list, so that setting them draws no warning."""
    try:
        from vllm import envs
    except ImportError:
        return
    for name in ENV_VARS:
        envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))


def register():
    """vLLM's platform-plugin hook: our platform's qualified name when active, else None.

    Active with VLLM_APPLE_USE_ENGINE=1, and by default on an Apple GPU with a Metal build; never with =0."""
    use = _flag(ENV_USE_ENGINE)
    if use is None and os.environ.get(ENV_USE_ENGINE, "").strip():
        # vLLM swallows a plugin's exception (logged at debug level only): say it where it is seen
        import logging

        logging.getLogger("metal_engine").warning(
            "%s=%r is neither 1 nor 0: metal_engine stays inactive; set it to 1 to run vLLM on metal_engine",
            ENV_USE_ENGINE, os.environ[ENV_USE_ENGINE])
        return None
    if use is False or (use is None and not _apple_gpu_with_metal()):
        return None
    register_env_vars()
    return PLATFORM

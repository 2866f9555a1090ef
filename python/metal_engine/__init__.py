"""metal_engine: a native LLM inference engine for Apple Silicon, with a fast cpu backend.

    from metal_engine import LLM, SamplingParams
    llm = LLM()  # the default model, SmolLM2-135M-Instruct
    print(llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=64, temperature=0))[0].outputs[0].text)

The public names load on first use (PEP 562), so that `import metal_engine.vllm` (vLLM's plugin hook, called in
every vLLM process) loads neither the native extension nor the engine.
"""

import importlib

from metal_engine import _blas  # noqa: F401  (loads the BLAS library before the extension needs it; milliseconds)

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "metal_engine.llm", "StreamDelta": "metal_engine.llm", "LLMEngine": "metal_engine.llm_engine",
    "SamplingParams": "metal_engine.sampling_params", "StructuredOutputsParams": "metal_engine.sampling_params",
    "RequestOutput": "metal_engine.outputs", "CompletionOutput": "metal_engine.outputs",
    "Logprob": "metal_engine.outputs", "RequestMetrics": "metal_engine.outputs", "EngineConfig": "metal_engine.config",
    "Engine": "metal_engine.engine", "ScratchPoolExhausted": "metal_engine._core",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:  # a submodule, as `metal_engine._core` after `import metal_engine`
        try:
            return importlib.import_module(f"metal_engine.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"metal_engine.{name}":
                raise
            raise AttributeError(f"module 'metal_engine' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))

"""metal_engine: a native LLM inference engine for Apple Silicon, with a fast cpu backend.

    from metal_engine import LLM, SamplingParams
    llm = LLM()  # the default model, SmolLM2-135M-Instruct
    print(llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=64, temperature=0))[0].outputs[0].text)
"""

from metal_engine import _blas  # noqa: F401  (loads the BLAS library before the extension needs it)
from metal_engine._core import ScratchPoolExhausted
from metal_engine.config import EngineConfig
from metal_engine.engine import Engine
from metal_engine.llm import LLM, StreamDelta
from metal_engine.llm_engine import LLMEngine
from metal_engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from metal_engine.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = [
    "LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics",
    "StreamDelta", "EngineConfig", "Engine", "ScratchPoolExhausted", "__version__",
]

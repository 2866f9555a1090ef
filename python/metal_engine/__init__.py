"""metal_engine: a native LLM inference engine for Apple Silicon, with a fast cpu backend."""

from metal_engine._core import EngineConfig, ModelConfig, ScratchPoolExhausted
from metal_engine.engine import Engine

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "ModelConfig", "ScratchPoolExhausted", "__version__"]

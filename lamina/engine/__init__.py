"""The engine: KV cache, sampling, the model runner, the Llama generation facade and `load`."""

from lamina.engine.config import EngineConfig
from lamina.engine.generate import Completion, Llama, StreamDelta
from lamina.engine.loader import load

__all__ = ["Completion", "EngineConfig", "Llama", "StreamDelta", "load"]

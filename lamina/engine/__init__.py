"""The engine: KV cache, sampling, the model runner and the Llama generation facade."""

from lamina.engine.config import EngineConfig
from lamina.engine.generate import Completion, Llama

__all__ = ["Completion", "EngineConfig", "Llama"]

"""The engine: KV cache, sampling, the model runner, the Llama generation facade, the serving Engine and `load`."""

from lamina.engine.config import EngineConfig
from lamina.engine.engine import Engine, RequestOutput
from lamina.engine.generate import Completion, Llama, StreamDelta
from lamina.engine.loader import load
from lamina.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "Llama", "RequestOutput", "SamplingParams", "StreamDelta", "load"]

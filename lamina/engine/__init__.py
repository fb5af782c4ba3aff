"""The engine: one core (EngineCore) that every front end drives: requests, the scheduler and block pool, the model
runner with the one KV cache, the sampler, the output processor; and the engine's configuration."""

from lamina.engine.config import EngineConfig
from lamina.engine.core import EngineCore
from lamina.engine.request import Request, RequestOutput
from lamina.engine.sampling import SamplingParams, StructuredOutputs

__all__ = ["EngineConfig", "EngineCore", "Request", "RequestOutput", "SamplingParams", "StructuredOutputs"]

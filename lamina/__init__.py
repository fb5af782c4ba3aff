"""lamina: a Llama-family text-generation engine with Meta's Llama 3 `generate` API."""

from lamina.engine import EngineConfig, EngineCore, Request, RequestOutput, SamplingParams, StructuredOutputs
from lamina.errors import CapacityError, ConfigError, LaminaError, RequestError, TokenizerError, WeightsError
from lamina.llama import Completion, Llama, StreamDelta
from lamina.loader import load
from lamina.model import ModelConfig, RopeScaling
from lamina.tokenizer import ChatFormat, Dialog, Llama3Tokenizer, Message

Tokenizer = Llama3Tokenizer  # the reference's name, so `from llama import Llama, Tokenizer` ports by one import

__version__ = "0.1.0"

__all__ = [
    "CapacityError",
    "ChatFormat",
    "Completion",
    "ConfigError",
    "Dialog",
    "EngineConfig",
    "EngineCore",
    "LaminaError",
    "Llama",
    "Llama3Tokenizer",
    "Message",
    "ModelConfig",
    "Request",
    "RequestError",
    "RequestOutput",
    "RopeScaling",
    "SamplingParams",
    "StreamDelta",
    "StructuredOutputs",
    "Tokenizer",
    "TokenizerError",
    "WeightsError",
    "load",
]

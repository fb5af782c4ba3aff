"""The Llama-family network: configuration, rotary embeddings, transformer."""

from lamina.model.config import PRESETS, ModelConfig, RopeScaling
from lamina.model.transformer import Decode, Prefill, Transformer, build_transformer

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "Transformer", "Prefill", "Decode", "build_transformer"]

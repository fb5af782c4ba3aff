"""Checkpoint readers: one per format, each returning (ModelConfig, state dict in lamina's naming)."""

from lamina.weights.common import check_state_dict
from lamina.weights.gguf import load_gguf
from lamina.weights.hf import load_hf_checkpoint
from lamina.weights.meta import load_meta_checkpoint

__all__ = ["check_state_dict", "load_gguf", "load_hf_checkpoint", "load_meta_checkpoint"]

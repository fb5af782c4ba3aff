"""Checkpoint readers: one per format, each returning (ModelConfig, state dict in lamina's naming)."""

from lamina.weights.common import check_state_dict
from lamina.weights.meta import load_meta_checkpoint

__all__ = ["check_state_dict", "load_meta_checkpoint"]

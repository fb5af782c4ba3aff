"""Weight-only quantization: a pure transform of a linear layer's weight, and a module swap on a built model."""

from lamina.quant.int8 import MODES, Int8Linear, quantize_int8_per_channel, quantize_model

__all__ = ["MODES", "Int8Linear", "quantize_int8_per_channel", "quantize_model"]

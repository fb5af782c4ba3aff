"""Weight-only quantization in GGML's block formats, chosen per weight when a model is built.

The modules: `ggml` (the formats' reference quantizers and dequantizers, in torch), `linear` (the layers over blocks,
QLinear and QEmbedding, and which kernels run them), `build` (the quantization modes: which format each weight gets,
and the model built with them) and `report` (what a built model's weights are stored as).
"""

from lamina.quant import ggml
from lamina.quant.build import (
    FALLBACK,
    FORMAT_MODES,
    MODES,
    Blocks,
    _format_for,  # noqa: F401 (a test checks the fallback choice directly)
    build_model,
    is_projection,
    quantized_modules,
)
from lamina.quant.linear import PREFILL_DTYPES, QEmbedding, QLinear, kernel_path, use_kernels
from lamina.quant.report import describe, weight_types

__all__ = [
    "FALLBACK",
    "FORMAT_MODES",
    "MODES",
    "PREFILL_DTYPES",
    "Blocks",
    "QEmbedding",
    "QLinear",
    "build_model",
    "describe",
    "ggml",
    "is_projection",
    "kernel_path",
    "quantized_modules",
    "use_kernels",
    "weight_types",
]

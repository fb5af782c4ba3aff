"""The one table of the GGML formats lamina keeps as a file stores them: names, block geometry, kernel ids.

A matrix [N, K] in one of these formats is stored row by row as K / `block` blocks of `nbytes` bytes each, held as
uint8 [N, K / block * nbytes]. `kid` is the id the C kernels know the format by (kernels.h's enum, the same order);
`family` names the kernel that reads it: "quant" the integer products of qmatmul.c, "float" the 16-bit float
products of f16.c. The decode step (decode.c), the quantized products (qmatmul.c, f16.c), prefill's
dequantization, tensor-parallel slicing, the quantizer (lamina.quant.ggml) and `lamina info` all read this table, so
that adding a format is one row here and one unpacking function in qmatmul.c (or f16.c).

Layouts (GGML's `block_*` structs; every float16 little-endian):
  Q4_0    d, qs[16]                              w = d * (q - 8)           q: 4 bits
  Q4_1    d, m, qs[16]                           w = d * q + m
  Q5_0    d, qh[4], qs[16]                       w = d * (q - 16)          q: 4 low bits in qs, the 5th in qh
  Q5_1    d, m, qh[4], qs[16]                    w = d * q + m
  Q8_0    d, qs[32] (int8)                       w = d * q
  IQ4_NL  d, qs[16]                              w = d * KVALUES[q]        a 16-value non-linear grid
  IQ4_XS  d, scales_h, scales_l[4], qs[128]      w = d * (ls - 32) * KVALUES[q], a 6-bit ls per 32
  Q2_K    scales[16], qs[64], d, dmin            w = d * sc * q - dmin * m, 4-bit sc and m per 16
  Q3_K    hmask[32], qs[64], scales[12], d       w = d * (sc - 32) * (q - 4), a 6-bit sc per 16, q: 2 + 1 bits
  Q4_K    d, dmin, scales[12], qs[128]           w = d * sc * q - dmin * m, 6-bit sc and m per 32
  Q5_K    d, dmin, scales[12], qh[32], qs[128]   w = d * sc * q - dmin * m, q: 4 + 1 bits
  Q6_K    ql[128], qh[64], scales[16], d         w = d * sc * (q - 32), an int8 sc per 16, q: 4 + 2 bits
  F16     w[32] (float16)                        w                         GGML's blocks of 1, counted 32 at a time
  BF16    w[32] (bfloat16)                       w                         (a row of K values is K / 32 "blocks")
In the 32-weight formats a nibble byte j holds q[j] in its low half and q[j + 16] in its high half. F16 and BF16 rows
are the file's 16-bit values as they are; counting them in blocks of 32 (the activations' block) lets the loader,
tensor-parallel cuts and the kernels treat them as the other formats (columns cut in whole blocks of 32).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    name: str  # GGML's (and the gguf package's) name
    block: int  # weights per block
    nbytes: int  # bytes per block
    kid: int  # the C kernels' id (kernels.h)
    family: str = "quant"  # the kernel that reads it: "quant" (qmatmul.c) or "float" (f16.c)

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` weights (a multiple of `block`)."""
        return cols // self.block * self.nbytes

    @property
    def bits(self) -> float:
        """Bits a weight, scales included."""
        return 8 * self.nbytes / self.block


TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("Q4_1", 32, 20, 0),
        GGMLType("Q8_0", 32, 34, 1),
        GGMLType("Q4_0", 32, 18, 2),
        GGMLType("Q5_0", 32, 22, 3),
        GGMLType("Q5_1", 32, 24, 4),
        GGMLType("IQ4_NL", 32, 18, 5),
        GGMLType("IQ4_XS", 256, 136, 6),
        GGMLType("Q2_K", 256, 84, 7),
        GGMLType("Q3_K", 256, 110, 8),
        GGMLType("Q4_K", 256, 144, 9),
        GGMLType("Q5_K", 256, 176, 10),
        GGMLType("Q6_K", 256, 210, 11),
        GGMLType("F16", 32, 64, 12, "float"),
        GGMLType("BF16", 32, 64, 13, "float"),
    )
}

# IQ4_NL's and IQ4_XS's grid: the value a 4-bit index stands for (GGML's kvalues_iq4nl).
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# The format outside TYPES that lamina reads: F32, loaded as float tensors (as are 1-D tensors of every type, and F16
# or BF16 matrices whose rows are not whole blocks of 32).
FLOAT_TYPES = ("F32",)


def type_of(name: str) -> GGMLType:
    """The table's row for a GGML type name; a ValueError naming the type and the ones lamina reads."""
    if name not in TYPES:
        raise ValueError(f"GGML type {name} is not one lamina reads; it reads {readable()}")
    return TYPES[name]


def readable() -> str:
    """The GGML types lamina reads, in words (for errors)."""
    floats = [name for name, t in TYPES.items() if t.family == "float"]
    return ", ".join((*FLOAT_TYPES, *floats, *(name for name in TYPES if name not in floats)))

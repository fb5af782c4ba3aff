"""The ctypes bindings of a path's library: loading it (built on first use) with its functions' signatures, the
decode step's structures, and `Kernels`, the Python face of one path's library (products, quantizing, dequantizing,
the decode step)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from dataclasses import dataclass

import torch

from lamina.kernels.build import PATHS, SOURCES, _compile, build_flags
from lamina.kernels.cpu import NEEDS, best_path, cpu_features, supported_paths
from lamina.kernels.types import TYPES, type_of

QTYPES = {name: t.kid for name, t in TYPES.items()}  # the formats the kernels read, by GGML name: their ids

_lock = threading.Lock()
_kernels: dict[tuple[str, bool], "Kernels | str"] = {}  # (path, emulated) -> built kernels, or why they cannot be


def _load(path: str, emulate: bool) -> "Kernels":
    name, flags = build_flags(path, emulate)
    lib = ctypes.CDLL(str(_compile(name, SOURCES, flags)))
    lib.lamina_path.restype = ctypes.c_char_p
    lib.lamina_exact_rows.restype = ctypes.c_int64
    fn = lib.lamina_qmatmul
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    fn.argtypes += [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    deq = lib.lamina_dequantize
    deq.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    deq.restype = None
    quant = lib.lamina_quantize_rows
    quant.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    quant.argtypes += [ctypes.c_void_p]
    quant.restype = None
    step = lib.lamina_decode
    step.argtypes = [ctypes.POINTER(DecodeModel), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    step.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    step.restype = ctypes.c_int
    for t in TYPES.values():  # the C side of the type table agrees with the Python side
        if (lib.lamina_type_block(t.kid), lib.lamina_type_bytes(t.kid)) != (t.block, t.nbytes):
            raise RuntimeError(f"{name}: the C kernels' {t.name} is not {t.block} weights in {t.nbytes} bytes")
    return Kernels(path, lib, emulate)


def get(path: str | None = None, *, emulate: bool = False) -> "Kernels":
    """The kernels of one path (None: the best this CPU runs), built on first call. A path this CPU cannot run is a
    RuntimeError naming what it lacks; `emulate=True` builds an x86 SIMD path over SIMDe instead (for tests: its
    arithmetic, at a fraction of its speed, on any CPU with AVX2)."""
    if os.environ.get("LAMINA_NATIVE", "1") == "0":
        raise RuntimeError("lamina's native kernels are disabled by LAMINA_NATIVE=0")
    path = best_path() if path is None else path
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}: this machine's are {', '.join(PATHS)}")
    if emulate and (path == "portable" or "avx2" not in cpu_features()):
        raise RuntimeError(f"the {path} path can be emulated only on an x86 CPU with AVX2, and not for portable")
    if not emulate and path not in supported_paths():
        raise RuntimeError(
            f"this CPU cannot run the {path} kernels: they need {NEEDS[path]} (this CPU's paths: "
            f"{', '.join(supported_paths())})"
        )
    key = (path, emulate)
    if key not in _kernels:
        with _lock:
            if key not in _kernels:
                try:
                    _kernels[key] = _load(path, emulate)
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _kernels[key] = str(e)
    found = _kernels[key]
    if isinstance(found, str):
        raise RuntimeError(f"lamina's {path} kernels could not be built: {found}")
    return found


class DecodeLayer(ctypes.Structure):
    """decode.c's lamina_layer: one layer's block matrices (each with its format's id), norms and KV cache, by
    address."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")),
        *((f"{name}_type", ctypes.c_int32) for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")),
        *((name, ctypes.c_void_p) for name in ("attention_norm", "ffn_norm", "k_cache", "v_cache")),
        *((name, ctypes.c_void_p) for name in ("k_scale", "v_scale")),
    ]


# decode.c's reduce: sums float x [n] over the tensor-parallel ranks in place; 0 when it worked.
REDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64)


class DecodeModel(ctypes.Structure):
    """decode.c's lamina_model: the shapes and the per-layer tables of a model, by address (and, under tensor
    parallelism, the sum over the ranks it calls between stages)."""

    _fields_ = [
        *(
            (name, ctypes.c_int64)
            for name in (
                "n_layers",
                "dim",
                "hidden_dim",
                "n_heads",
                "n_kv_heads",
                "head_dim",
                "num_blocks",
                "block_size",
            )
        ),
        ("norm_eps", ctypes.c_double),
        ("inv_freq", ctypes.c_void_p),
        ("norm", ctypes.c_void_p),
        ("layers", ctypes.POINTER(DecodeLayer)),
        ("output", ctypes.c_void_p),
        ("vocab_size", ctypes.c_int64),
        ("output_type", ctypes.c_int32),
        ("reduce", REDUCE),
        ("kv_type", ctypes.c_int32),
    ]


def available() -> bool:
    """Whether the best path's kernels can be built and loaded here."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    if os.environ.get("LAMINA_NATIVE", "1") == "0":
        return "disabled by LAMINA_NATIVE=0"
    try:
        get()
    except RuntimeError as e:
        return str(e)
    return None


def _check(x: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int) -> None:
    t = type_of(qtype)
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"qmatmul needs a 2-D float32 CPU input, got {tuple(x.shape)} {x.dtype} on {x.device}")
    if x.shape[1] % t.block or blocks.dtype != torch.uint8 or blocks.shape != (out_features, t.row_bytes(x.shape[1])):
        raise ValueError(
            f"qmatmul: {qtype} blocks {tuple(blocks.shape)} {blocks.dtype} do not match {out_features} rows "
            f"of {x.shape[1]} inputs"
        )


@dataclass(frozen=True, eq=False)
class Kernels:
    """One path's compiled library (see `get`)."""

    path: str
    lib: ctypes.CDLL
    emulated: bool = False

    def __repr__(self) -> str:
        return f"Kernels({self.lib.lamina_path().decode()})"

    def __reduce__(self):  # one library per path and process: copies and pickles name it
        return _unpickle, (self.path, self.emulated)

    def __deepcopy__(self, memo) -> "Kernels":
        return self

    def qmatmul(self, x: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int) -> torch.Tensor:
        """x [M, K] float32 @ W.T for W [out_features, K] stored as GGML `qtype` blocks (uint8 [N, K/32 * bytes])."""
        _check(x, blocks, qtype, out_features)
        return self.run(QTYPES[qtype], blocks.contiguous(), out_features, x.contiguous())

    def run(self, qtype_id: int, blocks: torch.Tensor, out_features: int, x: torch.Tensor) -> torch.Tensor:
        """`qmatmul` without its checks, for callers that checked the weights once (lamina.quant.QLinear): x must be
        a contiguous float32 [M, K] CPU tensor, blocks contiguous and matching."""
        y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
        if self.lib.lamina_qmatmul(
            qtype_id, blocks.data_ptr(), out_features, x.shape[1], x.data_ptr(), x.shape[0], y.data_ptr()
        ):
            raise MemoryError("lamina_qmatmul could not allocate its activation buffer")
        return y

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The activation quantization before every product: x [M, K] float32 -> int16 q [M, K], per block of 32
        the scale d [M, K/32] and d * sum(q) [M, K/32]."""
        x = x.float().contiguous()
        M, K = x.shape
        if K % 32:
            raise ValueError(f"rows of {K} values are not whole blocks of 32")
        q = torch.empty(M, K, dtype=torch.int16)
        groups = -(-M // 4)  # the C layout: rows in groups of 4, each group's scales [block][row in group]
        d, s = torch.zeros(groups, K // 32, 4), torch.zeros(groups, K // 32, 4)
        self.lib.lamina_quantize_rows(x.data_ptr(), M, K, q.data_ptr(), d.data_ptr(), s.data_ptr())
        return q, *(t.transpose(1, 2).reshape(groups * 4, K // 32)[:M] for t in (d, s))

    def dequantize(
        self, qtype_id: int, blocks: torch.Tensor, out_features: int, in_features: int, dtype=torch.float32
    ) -> torch.Tensor:
        """The matrix [out_features, in_features] of checked, contiguous blocks (see `run`), float32 or bfloat16
        (rounded to nearest even, as torch's conversion)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the kernels dequantize to float32 or bfloat16, not {dtype}")
        w = torch.empty(out_features, in_features, dtype=dtype)
        bf16 = int(dtype == torch.bfloat16)
        self.lib.lamina_dequantize(qtype_id, blocks.data_ptr(), out_features, in_features, w.data_ptr(), bf16)
        return w

    def decode(
        self,
        model: DecodeModel,
        h: torch.Tensor,
        tables: torch.Tensor,
        positions: torch.Tensor,
        logits: torch.Tensor | None,
        logit_rows: torch.Tensor | None = None,
    ) -> None:
        """decode.c's lamina_decode: one step for h.shape[0] sequences; h [B, dim] float32 (the new tokens'
        embeddings) becomes their final normalised hidden states, and `logits` (when given, and `model` has an output
        projection) their logits: [B, vocab], or [n, vocab] for the rows `logit_rows` (int64 [n]) lists. tables:
        int64 [B, width], each sequence's cache blocks; positions: int64 [B]; both checked by the caller against the
        cache (lamina.engine.native), as the logit rows; every tensor behind `model` must stay alive."""
        out = None if logits is None else logits.data_ptr()
        B, width = tables.shape
        picked, n = (None, 0) if logit_rows is None else (logit_rows.data_ptr(), len(logit_rows))
        rc = self.lib.lamina_decode(
            ctypes.byref(model), B, h.data_ptr(), tables.data_ptr(), width, positions.data_ptr(), out, picked, n
        )
        if rc == -1:
            raise MemoryError("lamina_decode could not allocate its working buffers")
        if rc:
            raise RuntimeError("lamina_decode stopped: the sum over the tensor-parallel ranks failed")


def _unpickle(path: str, emulated: bool) -> Kernels:
    return get(path, emulate=emulated)

"""lamina's native CPU kernels: quantized matrix products over GGML blocks (`qmatmul.c`) and the whole decode step of
a block-quantized model (`decode.c`, driven by lamina.engine.native).

The C sources are compiled on first use with the machine's C compiler for the machine it runs on (-march=native) and
cached (under $LAMINA_CACHE_DIR, else $XDG_CACHE_HOME/lamina, else ~/.cache/lamina) by a hash of the source, the flags
and the CPU, so later processes only load it. It is called through ctypes behind a PyTorch operator,
`torch.ops.lamina.qmatmul`, which torch.compile treats as one opaque call. OpenMP in the library resolves to the
libgomp PyTorch has already loaded, so it shares PyTorch's threads and `torch.set_num_threads`.

`LAMINA_KERNEL_CFLAGS` adds compiler flags (the tests build the portable C path with "-mno-avx2" that way).
Where no compiler works, `available()` is False and the callers (lamina.quant) fall back to dequantize-and-matmul in
PyTorch; `LAMINA_NATIVE=0` forces that fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("qmatmul.c", "decode.c"))
HEADER = Path(__file__).with_name("kernels.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
QTYPES = {"Q4_1": 0, "Q8_0": 1}  # the block formats the kernel reads, by GGML name
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 weights: the C structs' sizes

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def cache_dir() -> Path:
    if os.environ.get("LAMINA_CACHE_DIR"):
        return Path(os.environ["LAMINA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lamina"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    flags = (*FLAGS, *os.environ.get("LAMINA_KERNEL_CFLAGS", "").split())
    source = b"".join(path.read_bytes() for path in (HEADER, *SOURCES))
    key = hashlib.sha256(source + repr((compiler, flags, _cpu_key())).encode()).hexdigest()[:16]
    target = cache_dir() / f"lamina-kernels-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build to a temporary name and rename: concurrent processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run(
                [compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
            )
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed to build lamina's kernels: {result.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    fn = lib.lamina_qmatmul
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    fn.argtypes += [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    deq = lib.lamina_dequantize
    deq.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    deq.restype = None
    step = lib.lamina_decode
    step.argtypes = [ctypes.POINTER(DecodeModel), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    step.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
    step.restype = ctypes.c_int
    return lib


class DecodeLayer(ctypes.Structure):
    """decode.c's lamina_layer: one layer's block matrices, norms and KV cache, by address."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("wqkv", "wo", "w13", "w2")),
        *((name, ctypes.c_int32) for name in ("qkv_type", "o_type", "w13_type", "w2_type")),
        *((name, ctypes.c_void_p) for name in ("attention_norm", "ffn_norm", "k_cache", "v_cache")),
    ]


class DecodeModel(ctypes.Structure):
    """decode.c's lamina_model: the shapes and the per-layer tables of a model, by address."""

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
    ]


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (see `unavailable_reason()`) when they cannot be."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("LAMINA_NATIVE", "1") == "0":
                _error = "disabled by LAMINA_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _error = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _error


def _check(x: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"qmatmul reads {', '.join(QTYPES)} blocks, not {qtype}")
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"qmatmul needs a 2-D float32 CPU input, got {tuple(x.shape)} {x.dtype} on {x.device}")
    if (
        x.shape[1] % 32
        or blocks.dtype != torch.uint8
        or blocks.shape != (out_features, x.shape[1] // 32 * BLOCK_BYTES[qtype])
    ):
        raise ValueError(
            f"qmatmul: {qtype} blocks {tuple(blocks.shape)} {blocks.dtype} do not match {out_features} rows "
            f"of {x.shape[1]} inputs"
        )


def qmatmul(x: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int) -> torch.Tensor:
    """x [M, K] float32 @ W.T for W [out_features, K] stored as GGML `qtype` blocks (uint8 [N, K/32 * bytes]).

    A direct call (about 10 us of Python around the kernel). Compiled code reaches the same function through the
    operator torch.ops.lamina.qmatmul."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"lamina's native kernels are unavailable: {_error}")
    _check(x, blocks, qtype, out_features)
    return run(QTYPES[qtype], blocks.contiguous(), out_features, x.contiguous())


def run(qtype_id: int, blocks: torch.Tensor, out_features: int, x: torch.Tensor) -> torch.Tensor:
    """`qmatmul` without its checks, for callers that checked the weights once (lamina.quant.QLinear): x must be a
    contiguous float32 [M, K] CPU tensor, blocks contiguous and matching."""
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if _lib.lamina_qmatmul(
        qtype_id, blocks.data_ptr(), out_features, x.shape[1], x.data_ptr(), x.shape[0], y.data_ptr()
    ):
        raise MemoryError("lamina_qmatmul could not allocate its activation buffer")
    return y


def dequantize(qtype_id: int, blocks: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The float32 matrix [out_features, in_features] of checked, contiguous blocks (see `run`)."""
    w = torch.empty(out_features, in_features, dtype=torch.float32)
    _lib.lamina_dequantize(qtype_id, blocks.data_ptr(), out_features, in_features, w.data_ptr())
    return w


def decode(
    model: DecodeModel, h: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor | None
) -> None:
    """decode.c's lamina_decode: one step for h.shape[0] sequences; h [B, dim] float32 (the new tokens' embeddings)
    becomes their final normalised hidden states, and `logits` [B, vocab] (when given, and `model` has an output
    projection) their logits. tables: int64 [B, width], each sequence's cache blocks; positions: int64 [B]; both
    checked by the caller against the cache (lamina.engine.native); every tensor behind `model` must stay alive."""
    out = None if logits is None else logits.data_ptr()
    B, width = tables.shape
    if _lib.lamina_decode(ctypes.byref(model), B, h.data_ptr(), tables.data_ptr(), width, positions.data_ptr(), out):
        raise MemoryError("lamina_decode could not allocate its working buffers")


# The operator for torch.compile: an opaque call in the graph. Defined with the low-level Library API rather than
# torch.library.custom_op, whose Python wrapper costs ~50 us a call (more than the kernel on a small matrix).
_LIBRARY = torch.library.Library("lamina", "DEF")
_LIBRARY.define("qmatmul(Tensor x, Tensor blocks, str qtype, int out_features) -> Tensor")
_LIBRARY.impl("qmatmul", qmatmul, "CPU")


@torch.library.register_fake("lamina::qmatmul", lib=_LIBRARY)
def _(x, blocks, qtype, out_features):
    return x.new_empty(x.shape[0], out_features)

"""lamina's native CPU kernels: quantized matrix products over GGML blocks (`qmatmul.c`; F16 and BF16 matrices in
`f16.c`) and the whole decode step of a block-quantized model (`decode.c`, driven by lamina.engine.native).

One source, several paths: the C files are compiled once per instruction set into a library each (`PATHS`: portable
C for any CPU, AVX2, AVX-512 with VNNI) and the process picks the best one the CPU and the OS support, asked at run
time with cpuid and xgetbv (`cpu.c`, built for the architecture's baseline) rather than taken from the build host's
-march=native. `get(path)` returns the kernels of one path (None: the best), so tests and callers can force any path
this CPU runs; a path it cannot run is refused with the reason, never executed. AMX and AVX-512 BF16 are reported
too (`cpu_features()`): lamina's C has no tile code, and the prefill product on such CPUs is oneDNN's bfloat16
matmul through PyTorch (lamina.quant), which asks Linux for the tile state itself and loads its tile configuration
in every call.

Libraries are compiled on first use with the machine's C compiler and cached (under $LAMINA_CACHE_DIR, else
$XDG_CACHE_HOME/lamina, else ~/.cache/lamina) by a hash of the source, the flags and the compiler, so later processes
only load them. They are called through ctypes behind a PyTorch operator, `torch.ops.lamina.qmatmul`, which
torch.compile treats as one opaque call. OpenMP in the library resolves to the libgomp PyTorch has already loaded, so
it shares PyTorch's threads and `torch.set_num_threads`.

`LAMINA_KERNEL_CFLAGS` adds compiler flags to every path. Where no compiler works, `available()` is False and the
callers (lamina.quant) fall back to dequantize-and-matmul in PyTorch; `LAMINA_NATIVE=0` forces that fallback.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from lamina.kernels.types import TYPES, GGMLType, type_of

HERE = Path(__file__).parent
SOURCES = tuple(HERE / name for name in ("qmatmul.c", "f16.c", "decode.c"))
HEADER = HERE / "kernels.h"
BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
PATHS = ("portable", "avx2", "avx512") if X86 else ("portable",)  # worst to best
PATH_FLAGS = {  # what each path's library is compiled for
    "portable": () if X86 else ("-march=native",),  # x86: the baseline (SSE2) every x86-64 CPU runs
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": (
        *("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
        "-mprefer-vector-width=512",
    ),
}
NEEDS = {"avx2": "AVX2 with FMA and F16C", "avx512": "AVX-512 F/BW/VL/DQ with VNNI"}  # in words, for errors
FEATURES = {"avx2": 1, "avx512": 2, "avx512_bf16": 4, "amx_bf16": 8, "amx_int8": 16}  # cpu.c's bits
QTYPES = {name: t.kid for name, t in TYPES.items()}  # the formats the kernels read, by GGML name: their ids

_lock = threading.Lock()
_kernels: dict[tuple[str, bool], "Kernels | str"] = {}  # (path, emulated) -> built kernels, or why they cannot be
_features: frozenset[str] | None = None


def cache_dir() -> Path:
    if os.environ.get("LAMINA_CACHE_DIR"):
        return Path(os.environ["LAMINA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lamina"


def _compile(name: str, sources: tuple[Path, ...], flags: tuple[str, ...]) -> Path:
    """`sources` compiled with `flags` into a shared library in the cache (reused when already there)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    flags = (*flags, *os.environ.get("LAMINA_KERNEL_CFLAGS", "").split())
    source = b"".join(path.read_bytes() for path in (HEADER, *sources))
    key = hashlib.sha256(source + repr((compiler, flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"lamina-{name}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build to a temporary name and rename: concurrent processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run(
                [compiler, *flags, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
            )
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed to build lamina's {name}: {result.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def cpu_features() -> frozenset[str]:
    """What this CPU and OS let the kernels use: names from FEATURES (empty where nothing beyond the baseline, or
    where the probe cannot be built)."""
    global _features
    if _features is None:
        found: frozenset[str] = frozenset()
        if X86 and os.environ.get("LAMINA_NATIVE", "1") != "0":
            try:
                probe = ctypes.CDLL(str(_compile("cpu", (HERE / "cpu.c",), BASE_FLAGS)))
                bits = probe.lamina_cpu_features()
                found = frozenset(name for name, bit in FEATURES.items() if bits & bit)
            except (OSError, RuntimeError, subprocess.SubprocessError):
                pass
        _features = found
    return _features


def supported_paths() -> tuple[str, ...]:
    """The kernel paths this machine can run, worst to best."""
    features = cpu_features()
    return tuple(path for path in PATHS if path == "portable" or path in features)


def best_path() -> str:
    return supported_paths()[-1]


def simde_include() -> str | None:
    """Where SIMDe's headers are (the simde-py package, else the system's), for `get(path, emulate=True)`."""
    try:
        import simde_py  # a test dependency

        return simde_py.get_include()
    except ImportError:
        return "/usr/include" if Path("/usr/include/simde/x86/avx512.h").is_file() else None


def build_flags(path: str, emulate: bool = False) -> tuple[str, tuple[str, ...]]:
    """The cache name and compiler flags of a path's library (`emulate`: its source over SIMDe, see `get`)."""
    if not emulate:
        return f"kernels-{path}", (*BASE_FLAGS, *PATH_FLAGS[path])
    include = simde_include()
    if include is None:
        raise RuntimeError("SIMDe's headers are not installed (pip install simde-py)")
    return f"kernels-{path}-simde", (*BASE_FLAGS, *PATH_FLAGS["avx2"], "-DLAMINA_SIMDE", f"-I{include}")


def _load(path: str, emulate: bool) -> "Kernels":
    name, flags = build_flags(path, emulate)
    lib = ctypes.CDLL(str(_compile(name, SOURCES, flags)))
    lib.lamina_path.restype = ctypes.c_char_p
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
    step.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
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
    if (
        x.shape[1] % t.block
        or blocks.dtype != torch.uint8
        or blocks.shape != (out_features, t.row_bytes(x.shape[1]))
    ):
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
    ) -> None:
        """decode.c's lamina_decode: one step for h.shape[0] sequences; h [B, dim] float32 (the new tokens'
        embeddings) becomes their final normalised hidden states, and `logits` [B, vocab] (when given, and `model`
        has an output projection) their logits. tables: int64 [B, width], each sequence's cache blocks; positions:
        int64 [B]; both checked by the caller against the cache (lamina.engine.native); every tensor behind `model`
        must stay alive."""
        out = None if logits is None else logits.data_ptr()
        B, width = tables.shape
        rc = self.lib.lamina_decode(
            ctypes.byref(model), B, h.data_ptr(), tables.data_ptr(), width, positions.data_ptr(), out
        )
        if rc == -1:
            raise MemoryError("lamina_decode could not allocate its working buffers")
        if rc:
            raise RuntimeError("lamina_decode stopped: the sum over the tensor-parallel ranks failed")


def _unpickle(path: str, emulated: bool) -> Kernels:
    return get(path, emulate=emulated)


def qmatmul(
    x: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int, path: str | None = None
) -> torch.Tensor:
    """`Kernels.qmatmul` on the kernels of `path` (None or "": the best this CPU runs). A direct call (about 10 us of
    Python around the kernel); compiled code reaches the same function through torch.ops.lamina.qmatmul."""
    return get(path or None).qmatmul(x, blocks, qtype, out_features)


# The operator for torch.compile: an opaque call in the graph. Defined with the low-level Library API rather than
# torch.library.custom_op, whose Python wrapper costs ~50 us a call (more than the kernel on a small matrix).
_LIBRARY = torch.library.Library("lamina", "DEF")
_LIBRARY.define("qmatmul(Tensor x, Tensor blocks, str qtype, int out_features, str path) -> Tensor")
_LIBRARY.impl("qmatmul", qmatmul, "CPU")


@torch.library.register_fake("lamina::qmatmul", lib=_LIBRARY)
def _(x, blocks, qtype, out_features, path):
    return x.new_empty(x.shape[0], out_features)

"""lamina's native CPU kernels: quantized matrix products over GGML blocks (`qmatmul.c`; F16 and BF16 matrices in
`f16.c`) and the whole decode step of a block-quantized model (`decode.c`, driven by lamina.engine.native).

One source, several paths: the C files are compiled once per instruction set into a library each (`PATHS`: portable
C for any CPU, AVX2, AVX-512 with VNNI) and the process picks the best one the CPU and the OS support, asked at run
time with cpuid and xgetbv (`cpu.c`, built for the architecture's baseline) rather than taken from the build host's
-march=native. `get(path)` returns the kernels of one path (None: the best), so tests and callers can force any path
this CPU runs; a path it cannot run is refused with the reason, never executed. AMX and AVX-512 BF16 are reported
too (`cpu_features()`): lamina's C has no tile code; prefill on AVX-512 runs lamina's int16 panels, and bfloat16
prefill, when asked for, is oneDNN's bfloat16 matmul through PyTorch (lamina.quant), which asks Linux for the tile
state itself and loads its tile configuration in every call.

Libraries are compiled on first use with the machine's C compiler and cached (under $LAMINA_CACHE_DIR, else
$XDG_CACHE_HOME/lamina, else ~/.cache/lamina) by a hash of the source, the flags and the compiler, so later processes
only load them. They are called through ctypes behind a PyTorch operator, `torch.ops.lamina.qmatmul`, which
torch.compile treats as one opaque call. OpenMP in the library resolves to the libgomp PyTorch has already loaded, so
it shares PyTorch's threads and `torch.set_num_threads`.

`LAMINA_KERNEL_CFLAGS` adds compiler flags to every path. Where no compiler works, `available()` is False and the
callers (lamina.quant) fall back to dequantize-and-matmul in PyTorch; `LAMINA_NATIVE=0` forces that fallback.

The modules: `build` (compiler flags per path, compiling into the cache), `cpu` (probing the CPU), `binding` (the
ctypes bindings: `get`, `Kernels`, the decode step's structures), `op` (the torch operator) and `types` (the GGML
formats the kernels read).
"""

from lamina.kernels.binding import (
    QTYPES,
    REDUCE,
    DecodeLayer,
    DecodeModel,
    Kernels,
    available,
    get,
    unavailable_reason,
)
from lamina.kernels.build import BASE_FLAGS, PATH_FLAGS, PATHS, SOURCES, X86, build_flags, cache_dir
from lamina.kernels.build import _compile  # noqa: F401 (a test compiles a library by hand)
from lamina.kernels.cpu import FEATURES, NEEDS, best_path, cpu_features, supported_paths
from lamina.kernels.op import qmatmul

__all__ = [
    "BASE_FLAGS",
    "FEATURES",
    "NEEDS",
    "PATHS",
    "PATH_FLAGS",
    "QTYPES",
    "REDUCE",
    "SOURCES",
    "X86",
    "DecodeLayer",
    "DecodeModel",
    "Kernels",
    "available",
    "best_path",
    "build_flags",
    "cache_dir",
    "cpu_features",
    "get",
    "qmatmul",
    "supported_paths",
    "unavailable_reason",
]

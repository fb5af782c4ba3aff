"""Building the kernels: each path's compiler flags, and compiling C sources into a shared library in the on-disk
cache (under $LAMINA_CACHE_DIR, else $XDG_CACHE_HOME/lamina, else ~/.cache/lamina), keyed by a hash of the source,
the flags and the compiler, so later processes only load it. `LAMINA_KERNEL_CFLAGS` adds flags to every build."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = tuple(HERE / name for name in ("qmatmul.c", "f16.c", "decode.c"))
HEADER = HERE / "kernels.h"
INCLUDED = (HEADER, HERE / "panel.h")  # what the sources include: part of a build's hash
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
    source = b"".join(path.read_bytes() for path in (*INCLUDED, *sources))
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

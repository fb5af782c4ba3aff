"""What this CPU and OS let the kernels use, asked at run time with cpuid and xgetbv (`cpu.c`, built for the
architecture's baseline) rather than taken from the build host's -march=native: the paths it runs, and the best."""

from __future__ import annotations

import ctypes
import os
import subprocess

from lamina.kernels.build import BASE_FLAGS, HERE, PATHS, X86, _compile

NEEDS = {"avx2": "AVX2 with FMA and F16C", "avx512": "AVX-512 F/BW/VL/DQ with VNNI"}  # in words, for errors
FEATURES = {"avx2": 1, "avx512": 2, "avx512_bf16": 4, "amx_bf16": 8, "amx_int8": 16}  # cpu.c's bits

_features: frozenset[str] | None = None


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

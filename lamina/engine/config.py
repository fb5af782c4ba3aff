"""EngineConfig: the runtime limits and placement of one loaded model (not properties of the model itself)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.errors import ConfigError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU. Strings are parsed by torch ("cpu", "cuda", "cuda:1")."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; expected e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this PyTorch build sees no CUDA device")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device type {resolved.type!r} is not supported; use 'cpu' or 'cuda'")
    return resolved


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX); elsewhere bfloat16 is emulated and
    slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, *, blocks: bool = False) -> torch.dtype:
    """None -> bfloat16 on CUDA and on CPUs with native bfloat16 (AVX-512 BF16, AMX), else float32; float32 on any
    CPU when the projections are GGML blocks (`blocks`): lamina's native decode step computes in float32, and only
    the norms, the KV cache and the activations are in this dtype then. Accepts torch dtypes and names such as
    "bf16" or "float32"."""
    if dtype is None:
        if device.type == "cpu" and blocks:
            return torch.float32
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and options of one engine: `max_batch_size` sequences at once, each at most `max_seq_len` tokens
    (prompt + output), on `device` in `dtype`.

    The KV cache is allocated once: blocks of `block_size` positions (None: one block of max_seq_len a sequence,
    Meta's layout) from `kv_cache_memory` bytes (None: room for max_batch_size sequences of max_seq_len). Each step
    runs at most `max_step_tokens` tokens (decode tokens plus prompt chunks); at most `max_waiting` requests queue
    beyond the running batch. `prefix_caching`: a request reuses the cached full blocks that begin its tokens.
    `kv_cache_dtype`: see lamina.engine.kv_cache.KV_DTYPES."""

    max_seq_len: int
    max_batch_size: int
    device: torch.device
    dtype: torch.dtype
    compile: bool = False  # compile the decode step with torch.compile (minutes of compiling, then faster steps)
    block_size: int | None = None
    kv_cache_memory: int | None = None
    max_step_tokens: int = 512
    max_waiting: int = 256
    prefix_caching: bool = True  # reuse the cached blocks that begin a prompt (lamina.engine.blocks)
    kv_cache_dtype: torch.dtype | str = "auto"  # what the KV cache holds: "auto" (dtype), f32, f16, bf16 or q8_0

    def __post_init__(self):
        check_limits(
            max_seq_len=self.max_seq_len,
            max_batch_size=self.max_batch_size,
            block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory,
            max_step_tokens=self.max_step_tokens,
        )
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        self.kv_dtype  # noqa: B018 - raises ConfigError for an unknown kv_cache_dtype

    @property
    def kv_dtype(self):
        """What the KV cache holds: a torch float dtype, or "q8_0"."""
        from lamina.engine.kv_cache import resolve_kv_dtype

        return resolve_kv_dtype(None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype, self.dtype)

    def cache_blocks(self, bytes_per_token: int) -> tuple[int, int]:
        """(number of blocks, positions per block) of the KV cache, for a model whose keys and values take
        `bytes_per_token` bytes a position."""
        block_size = self.block_size or self.max_seq_len
        if self.kv_cache_memory is None:
            return self.max_batch_size * -(-self.max_seq_len // block_size), block_size
        num_blocks = self.kv_cache_memory // (block_size * bytes_per_token)
        if num_blocks < 1:
            raise ConfigError(
                f"kv_cache_memory {self.kv_cache_memory} bytes holds no block (one is {block_size * bytes_per_token} "
                "bytes)"
            )
        return num_blocks, block_size


def check_limits(**limits) -> None:
    """Each given limit must be a positive int (None means "the default" and passes)."""
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")

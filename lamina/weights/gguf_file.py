"""A GGUF container reader: metadata as Python values and tensors as memory-mapped raw blocks.

The `gguf` package's reader builds numpy views field by field and takes seconds on a 49k-token vocabulary; this one
parses the same layout (magic, version, key/value metadata, tensor infos, aligned data) with `struct` and stays fast.
Type sizes and names come from the `gguf` package, the format's reference.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamina.errors import WeightsError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # row-major (outermost first), as torch wants it; GGUF stores the reverse
    qtype: str  # GGML type name: F32, F16, Q4_1, Q4_K, ...
    data: np.ndarray  # raw bytes, uint8, a view into the mapped file
    offset: int  # where those bytes start in the file


@dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


def read_gguf_file(path: str | Path) -> GGUFFile:
    """Parse a GGUF file (versions 2 and 3). Raises WeightsError naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return _parse(buf)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    except (struct.error, ValueError, OverflowError, UnicodeDecodeError, IndexError) as e:
        raise WeightsError(f"{path} is not a valid GGUF file ({e})") from None


def _parse(buf) -> GGUFFile:
    import gguf

    if buf[:4] != b"GGUF":
        raise WeightsError("not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version & 0xFFFFFF == 0 and version >> 24 in (2, 3):  # the version written big-endian
        raise WeightsError("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise WeightsError(f"GGUF version {version} is not supported (2 or 3)")
    reader = _Reader(buf, 24)
    metadata = {}
    for _ in range(n_kv):
        key = reader.string()
        metadata[key] = reader.value(reader.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = reader.string()
        n_dims = reader.scalar("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, reader.pos)
        reader.pos += 8 * n_dims
        qtype, offset = reader.scalar("<I"), reader.scalar("<Q")
        infos.append((name, tuple(int(d) for d in reversed(dims)), qtype, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (reader.pos + alignment - 1) // alignment * alignment
    whole = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for name, shape, qtype, offset in infos:
        try:
            kind = gguf.GGMLQuantizationType(qtype)
        except ValueError:
            raise WeightsError(f"tensor {name} has unknown GGML type {qtype}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        n = int(np.prod(shape)) if shape else 1
        start = data_start + offset
        size = n // block * block_bytes
        if n % block or start + size > len(buf):
            raise WeightsError(f"tensor {name} runs past the end of the file or is not whole blocks")
        tensors[name] = GGUFTensor(name, shape, kind.name, whole[start : start + size], start)
    return GGUFFile(metadata, tensors)


class _Reader:
    def __init__(self, buf, pos: int):
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        value = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return values.tolist()
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")

"""The safetensors file format: validated headers, memory-mapped tensors, and writing a file whose
tensors arrive in pieces.

The format: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [start, end]}, "__metadata__": {...}}, then the data; offsets are relative to the
data section, whose tensors must cover it exactly, in order, without gaps or overlap (as the
reference implementation requires). Headers are parsed and fully validated before any tensor is
read, so a truncated or damaged file fails up front with its name in the message.

Used for the Hugging Face sources (checkpoints_convert reads them) and for the converted
checkpoint's expert tiers, which the runtime reads by memory mapping: a tensor is a read-only
numpy view of the map, and nothing is read from disk until it is touched.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from dynaexq_jax.errors import CheckpointNotFoundError, CorruptCheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the reference implementation enforces
DATA_ALIGN = 64                        # written files start their data here: aligned views (zero-copy on the CPU)

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str                 # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int                # absolute byte offset in the file
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def _corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {what}")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate one .safetensors file's header -> ({name: TensorInfo}, __metadata__)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            raise _corrupt(path, f"header length {n} is impossible for a {size}-byte file "
                                 "(not a safetensors file, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset - data_start != pos:
            raise _corrupt(path, f"tensor '{t.name}' starts at data offset {t.offset - data_start}, "
                                 f"expected {pos} (overlapping or non-contiguous tensors)")
        pos += t.nbytes
    if pos != data_size:
        raise _corrupt(path, f"data section is {data_size} bytes but its tensors cover {pos}")
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _corrupt(path, f"tensor '{name}': header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _corrupt(path, f"tensor '{name}': unknown dtype '{dtype}'")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor '{name}': bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor '{name}': bad data_offsets {offsets!r}")
    start, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != nbytes:
        raise _corrupt(path, f"tensor '{name}': data_offsets {offsets} span {end - start} bytes but "
                             f"{dtype}{shape} needs {nbytes}")
    if end > data_size:
        raise _corrupt(path, f"tensor '{name}' ends at data offset {end} but the file's data section "
                             f"is only {data_size} bytes (file truncated?)")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + start, nbytes)


class MappedFile:
    """A safetensors file mapped read-only: `arrays` holds one numpy view of the map per tensor.
    Reading a view reads the file (through the OS page cache); nothing is read up front."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.arrays = {name: np.frombuffer(self._map, t.np_dtype, math.prod(t.shape), t.offset).reshape(t.shape)
                       for name, t in self.tensors.items()}


def release_pages(tree) -> None:
    """Drop the pages of the memory maps behind the arrays of `tree` from this process's resident
    set. They stay in the OS page cache, and reading a view again maps them back (a read-only
    file mapping re-reads the file), so this is always safe; it keeps what this process holds
    (its RSS) to what it owns, however much of the maps it has read."""
    maps = {}
    for a in jax.tree.leaves(tree):
        base = a
        while isinstance(base, np.ndarray | memoryview):     # numpy views a buffer through a memoryview
            base = base.obj if isinstance(base, memoryview) else base.base
        if isinstance(base, mmap.mmap):
            maps[id(base)] = base
    if hasattr(mmap, "MADV_DONTNEED"):
        for m in maps.values():
            m.madvise(mmap.MADV_DONTNEED)


class FileWriter:
    """Writes a safetensors file whose tensors (given up front as name -> (shape, dtype), stored in
    that order) arrive in pieces from any thread: write(name, start, rows) puts rows [start,
    start + len(rows)) of a tensor's leading axis in place (positional writes, no shared file
    position). The header is padded so that the data section starts DATA_ALIGN-aligned."""

    def __init__(self, path: str | Path, tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header, offsets, pos = {}, {}, 0
        for name, (shape, dtype) in tensors.items():
            dtype = np.dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            offsets[name] = (pos, tuple(shape), dtype)
            pos += nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
        self._data_start = 8 + len(raw)
        self._tensors = offsets
        self.nbytes = self._data_start + pos
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self._fd, self.nbytes)

    def write(self, name: str, start: int, rows: np.ndarray) -> None:
        pos, shape, dtype = self._tensors[name]
        rows = np.ascontiguousarray(rows, dtype)
        if rows.shape[1:] != shape[1:] or not 0 <= start <= start + len(rows) <= shape[0]:
            raise ValueError(f"{self.path.name}: rows {start}..{start + len(rows)} of shape {rows.shape} "
                             f"do not fit tensor '{name}' {list(shape)}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        buf, offset = memoryview(rows.reshape(-1).view(np.uint8)), self._data_start + pos + start * row_bytes
        while buf:
            n = os.pwrite(self._fd, buf, offset)
            buf, offset = buf[n:], offset + n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

"""A validating, one-tensor-at-a-time reader of Hugging Face safetensors checkpoints.

The format: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [start, end]}, "__metadata__": {...}}, then the data; offsets are relative to the
data section. Headers are parsed and fully validated up front (so a bad file fails before any
work is done); tensor data is read later with seek + readinto, one tensor at a time, so memory
holds only the tensors the converter is working on.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from dynaexq_jax.errors import CheckpointNotFoundError, CorruptCheckpointError, MissingTensorError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the reference implementation enforces

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what the converter accepts as weights


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
    # The data section must be exactly covered by the tensors, in order, without gaps or overlap
    # (as the reference implementation requires); anything else means a damaged file.
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


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor's data into a fresh, owned numpy array."""
    out = np.empty(info.shape, info.np_dtype)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    except OSError as e:
        raise _corrupt(info.file, f"tensor '{info.name}': read failed ({e})") from None
    if got != info.nbytes:
        raise _corrupt(info.file, f"tensor '{info.name}': read {got} of {info.nbytes} bytes "
                                  "(file truncated since it was opened?)")
    return out


class SafetensorsCheckpoint:
    """Every tensor of a HF checkpoint directory: model.safetensors, or the shards that
    model.safetensors.index.json lists. `tensors` maps name -> TensorInfo; `files` lists the
    files read (index first)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointNotFoundError(f"{self.dir}: checkpoint directory not found")
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        if index.exists():
            shards = self._read_index(index)
            self.files = [index] + shards
        elif single.exists():
            shards = [single]
            self.files = [single]
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            raise CheckpointNotFoundError(
                f"{self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found"
                + (f" (found {', '.join(found[:4])}{'...' if len(found) > 4 else ''})" if found else ""))
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            infos, _ = read_header(shard)
            for name, info in infos.items():
                if name in self.tensors:
                    raise _corrupt(shard, f"tensor '{name}' is also in {self.tensors[name].file.name}")
                self.tensors[name] = info
        if index.exists():
            self._check_index(index)

    def _read_index(self, index: Path) -> list[Path]:
        try:
            self._weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(self._weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise _corrupt(index, f"not a valid safetensors index ({type(e).__name__}: {e})") from None
        shards = []
        for name in dict.fromkeys(self._weight_map.values()):
            shard = self.dir / str(name)
            if not shard.is_file():
                raise CheckpointNotFoundError(f"{shard}: shard listed in {index.name} not found")
            shards.append(shard)
        return shards

    def _check_index(self, index: Path) -> None:
        for name, shard in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise MissingTensorError(f"{index}: lists tensor '{name}' in {shard}, but no shard holds it")
            if info.file.name != shard:
                raise _corrupt(index, f"lists tensor '{name}' in {shard}, but it is in {info.file.name}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.tensors[name])

"""A validating reader of Hugging Face safetensors checkpoints (one file, or shards + index).

Headers are parsed and validated up front (dynaexq_jax.serving.safetensors_io, which also reads
the converted checkpoint's expert files), so a bad file fails before any work is done. Tensor
data is read later with positional reads into fresh arrays, a tensor or a range of its rows at a
time, from any thread: memory holds only what the converter is working on, and the OS page
cache, not this process, holds what was read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import CheckpointNotFoundError, CorruptCheckpointError, MissingTensorError
from dynaexq_jax.serving.safetensors_io import TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what the converter accepts as weights


def _corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {what}")


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor not read yet. ref[a:b] reads only rows a..b of its leading axis (one expert range
    of a fused expert tensor); np.asarray(ref) reads all of it. read(info, rows) does the reading."""
    info: TensorInfo
    read: Callable[[TensorInfo, slice], np.ndarray]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> np.dtype:
        return self.info.np_dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"tensor '{self.info.name}': only a range of rows can be read, not {rows!r}")
        return self.read(self.info, rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.read(self.info, slice(None))
        return a if dtype is None else a.astype(dtype, copy=False)


class SafetensorsCheckpoint:
    """Every tensor of a HF checkpoint directory: model.safetensors, or the shards that
    model.safetensors.index.json lists. `tensors` maps name -> TensorInfo; `files` lists the
    files read (index first). Close it (or use it as a context manager) to close the files."""

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
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

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
        return self.read_rows(self.tensors[name], slice(None))

    def read_rows(self, info: TensorInfo, rows: slice) -> np.ndarray:
        """Rows `rows` of a tensor's leading axis (all of them for slice(None)), into a fresh array."""
        n_rows = info.shape[0] if info.shape else 1          # a scalar is one row
        start, stop, _ = rows.indices(n_rows)
        stop = max(start, stop)
        row_bytes = info.nbytes // n_rows if n_rows else 0
        out = np.empty((stop - start,) + info.shape[1:] if info.shape else (), info.np_dtype)
        buf, pos = memoryview(out.reshape(-1).view(np.uint8)), info.offset + start * row_bytes
        try:
            fd = self._fd(info.file)
            while buf:
                n = os.preadv(fd, [buf], pos)
                if n == 0:
                    break
                buf, pos = buf[n:], pos + n
        except OSError as e:
            raise _corrupt(info.file, f"tensor '{info.name}': read failed ({e})") from None
        if buf:
            raise _corrupt(info.file, f"tensor '{info.name}': read {out.nbytes - len(buf)} of {out.nbytes} bytes "
                                      "(file truncated since it was opened?)")
        return out

    def ref(self, name: str, on_read: Callable[[TensorInfo, int], None] | None = None) -> TensorRef:
        """A TensorRef of tensor `name`, reading through this checkpoint (and telling on_read)."""
        def read(info: TensorInfo, rows: slice) -> np.ndarray:
            a = self.read_rows(info, rows)
            if on_read is not None:
                on_read(info, a.nbytes)
            return a
        return TensorRef(self.tensors[name], read)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

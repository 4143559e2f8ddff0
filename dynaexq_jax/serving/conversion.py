"""The Hugging Face -> converted-checkpoint converter, found as a plugin, and the file digests
that it records (of its sources, for reuse checks; of what it wrote, for `info --verify`).

checkpoints_convert depends on dynaexq_jax (config, formats, errors), so dynaexq_jax never
imports it: checkpoints_convert registers its `convert` as the entry point "huggingface" of the
group "dynaexq_jax.converters" (pyproject.toml), and hf_converter() loads it from there.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from pathlib import Path

from dynaexq_jax.errors import ConverterNotInstalledError

CONVERTERS = "dynaexq_jax.converters"     # entry-point group


def hf_converter():
    """The registered Hugging Face converter: convert(hf_dir, out_dir, *, hi, lo, dtype, overwrite,
    progress) -> Path of the converted checkpoint (checkpoints_convert.convert)."""
    found = importlib.metadata.entry_points(group=CONVERTERS, name="huggingface")
    if not found:
        raise ConverterNotInstalledError(
            f"converting a Hugging Face checkpoint needs the checkpoints_convert package (entry point "
            f"'huggingface' of group '{CONVERTERS}'), which is not installed: run `pip install -e .` "
            f"in the dynaexq-jax repository")
    return next(iter(found)).load()


def sha256_file(path: Path, stop: threading.Event | None = None) -> str | None:
    """The sha256 hex digest of a file (None if `stop` was set before it was read to the end)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            if stop is not None and stop.is_set():
                return None
            h.update(chunk)
    return h.hexdigest()


def sha256_files(files: list[Path], stop: threading.Event | None = None) -> dict[str, str]:
    """{file name: sha256} of files (stops early, partial, once `stop` is set)."""
    out = {}
    for f in files:
        digest = sha256_file(f, stop)
        if digest is None:
            return out
        out[f.name] = digest
    return out

"""The Hugging Face -> converted-checkpoint converter, found as a plugin, and the source digests
that it records and that reuse checks compare.

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


def sha256_files(files: list[Path], stop: threading.Event | None = None) -> dict[str, str]:
    """{file name: sha256} of files (stops early, partial, once `stop` is set)."""
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 23):
                if stop is not None and stop.is_set():
                    return out
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out

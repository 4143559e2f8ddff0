"""The Hugging Face -> converted-checkpoint converter, found as a plugin, and the file digests
that it records (of its sources, for reuse checks; of what it wrote, for `info --verify`).

Also what a conversion's calibration text becomes (calibration_rows: token ids in rows).

checkpoints_convert depends on dynaexq_jax (config, formats, errors), so dynaexq_jax never
imports it: checkpoints_convert registers its `convert` as the entry point "huggingface" of the
group "dynaexq_jax.converters" (pyproject.toml), and hf_converter() loads it from there.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import CalibrationError, ConverterNotInstalledError

CONVERTERS = "dynaexq_jax.converters"     # entry-point group
# Calibration text for gptq tiers (the converter's `calibration` argument: checkpoints_convert/calibration.py)
ROW_LENGTH = 512        # calibration text is cut into rows of this many tokens (fewer if the text is shorter)
MIN_TEXT_TOKENS = 64    # less text than this is refused
DEFAULT_TOKENS = 8192   # `dynaexq convert --calibration-tokens` default


def calibration_rows(ids, tokens: int = DEFAULT_TOKENS, row_length: int = ROW_LENGTH) -> np.ndarray:
    """The first `tokens` token ids of a text (a 1-D sequence) as int32 rows [B, T] of row_length
    (or one row of the whole text, if shorter); a partial last row is dropped."""
    ids = np.asarray(ids, np.int64).reshape(-1)[:tokens]
    if ids.size < MIN_TEXT_TOKENS:
        raise CalibrationError(f"calibration text of {ids.size} tokens: at least {MIN_TEXT_TOKENS} are needed "
                               f"(a few thousand give every expert data of its own)")
    T = min(row_length, ids.size)
    return ids[: ids.size // T * T].reshape(-1, T).astype(np.int32)


def calibration_digest(tokens: np.ndarray) -> str:
    """The sha256 of calibration tokens as the metadata records them (int32 rows): what says
    whether two conversions calibrated on the same text."""
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()


def hf_converter():
    """The registered Hugging Face converter: convert(hf_dir, out_dir, *, hi, lo, dtype, calibration,
    overwrite, progress) -> Path of the converted checkpoint (checkpoints_convert.convert)."""
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

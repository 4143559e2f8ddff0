"""Writing a converted checkpoint atomically: everything goes into a hidden temp directory beside
the output (same parent, so the final rename is atomic on one filesystem) and is renamed into
place only after the last file is written. Any error, Ctrl-C included, removes the temp dir.
(A process killed with SIGKILL cannot clean up: it leaves a `.NAME.tmp-*` directory, never a
half-written NAME.)"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from dynaexq_jax.errors import OutputExistsError


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory; refusing to replace it")


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temp dir beside `out`; on success it becomes `out` (replacing an existing
    `out` only if overwrite), on any exception it is removed together with any parent
    directories this call created."""
    out = out.absolute()
    check_output(out, overwrite)
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        check_output(out, overwrite)  # someone may have created it while we worked
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if still empty
        raise


class TreeWriter:
    """Saves nested dicts of numpy arrays as orbax checkpoints under a root directory, one
    sub-directory per tree, waiting for each save so that at most one tree is held in memory."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self._ckpt = ocp.StandardCheckpointer()

    def write(self, rel: str, tree: dict) -> None:
        tree = _contiguous(tree)
        self._ckpt.save(self.root / rel, tree)
        self._ckpt.wait_until_finished()

    def close(self) -> None:
        self._ckpt.close()

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)

"""Writing a converted checkpoint atomically: everything goes into a hidden temp directory beside
the output (same parent, so the final rename is atomic on one filesystem) and is renamed into
place only after the last file is written. Any error, Ctrl-C included, removes the temp dir.

A process killed with SIGKILL cannot clean up: it leaves a `.NAME.tmp-*` directory (tens of GB
at real scale), never a half-written NAME. So a conversion first takes NAME's lock, a file
`.NAME.lock` beside it locked with flock (the kernel releases it when its holder dies, however
it dies): while it holds the lock no other conversion writes NAME, so any `.NAME.tmp-*` (or
`.NAME.old-*`, from a replace cut short) left there belongs to a dead process and is removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
def staging_dir(out: Path, overwrite: bool, on_stale: Callable[[Path, int], None] | None = None) -> Iterator[Path]:
    """Yield an empty temp dir beside `out`; on success it becomes `out` (replacing an existing
    `out` only if overwrite), on any exception it is removed together with any parent
    directories this call created. Holds out's lock throughout (OutputExistsError if another
    live conversion holds it) and first removes the temp dirs of dead conversions of `out`,
    telling on_stale(path, bytes) of each."""
    out = out.absolute()
    check_output(out, overwrite)
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        with _output_lock(out):
            for stale in _stale_dirs(out):
                size = _tree_bytes(stale)
                shutil.rmtree(stale)
                if on_stale is not None:
                    on_stale(stale, size)
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
                raise
        ok = True
    finally:
        if not ok:
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if still empty


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on `.NAME.lock` (holding our pid, for the message of a conversion
    that finds it taken); the file is removed when released."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputExistsError(f"{out}: another conversion (pid {holder}) is writing it; wait for it "
                                    "to finish or stop it") from None
        # The previous holder may have removed the file between our open and our lock: then we
        # hold a lock on a file nobody else will open. Only the file at `path` counts.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _stale_dirs(out: Path) -> list[Path]:
    """The temp dirs of earlier conversions of `out` (call only while holding out's lock)."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir())


def _tree_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


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

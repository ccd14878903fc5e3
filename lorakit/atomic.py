"""Atomic writes: a reader (or a run resumed after kill -9) never sees half a file or directory.

One rule for every file lorakit writes that someone reads back: write into a temporary sibling
(same file system, so the rename is atomic), fsync, rename into place. Imports nothing of lorakit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temporary siblings start with this; listings of results skip them


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(final: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into `tmp`; on success its files are fsynced
    and it is renamed to `out`. An existing `out` is replaced, or with `keep_existing` kept (and
    ours dropped: another process finished the same work first). On an error nothing changes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are shared like any other directory
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            if keep_existing:
                return
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (keep_existing and final.exists()):  # lost a race we may lose
                raise
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

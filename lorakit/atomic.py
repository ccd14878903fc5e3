"""Atomic writes: a reader (or a run resumed after kill -9) never sees half a file or directory.

One rule for every file lorakit writes that someone reads back: write into a temporary sibling
(same file system, so the rename is atomic), fsync, rename into place. A write that fails (disk
full, no permission) raises `WriteError` naming the path and leaves no temporary behind. Imports
only lorakit.errors.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorakit.errors import WriteError

TMP_PREFIX = ".tmp-"  # temporary siblings start with this; listings of results skip them
# what the place written to can refuse; any other OSError (a file to read that is missing...)
# keeps its own type
WRITE_ERRNOS = frozenset(
    {
        errno.ENOSPC,  # disk full
        errno.EDQUOT,  # quota
        errno.EFBIG,  # file-size limit (RLIMIT_FSIZE, the file system's maximum)
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,  # a file where a directory is needed
        errno.EISDIR,
        errno.ENAMETOOLONG,
    }
)


# how Rust-backed writers (safetensors) report an OSError: "... I/O error: ... (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _errno(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    found = _RUST_OS_ERROR.search(str(error))
    return int(found.group(1)) if found else None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, a failed write (an OSError of WRITE_ERRNOS, or a library's error
    wrapping one) is a `WriteError` naming `path`: the user can act on it (free space, fix
    permissions) and resume."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        code = _errno(e)
        if code not in WRITE_ERRNOS:
            raise
        raise WriteError(f"cannot write {path}: {os.strerror(code)}") from e


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
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private; results are shared
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_file(out) as tmp:` write the file `tmp` (a library writes it by path); on
    success it is fsynced and renamed to `out`. On an error nothing changes."""
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with _named(tmp, final), writing(final):
            yield tmp
            os.chmod(tmp, 0o644)  # mkstemp makes it private; results are shared
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(final: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into `tmp`; on success its files are fsynced
    and it is renamed to `out`. An existing `out` is replaced, or with `keep_existing` kept (and
    ours dropped: another process finished the same work first). On an error nothing changes.

    A symbolic link at `out` is replaced by the directory; what it points to is never touched."""
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are shared like other dirs
        with _named(tmp, final), writing(final):
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final.is_symlink():
                final.unlink()
            elif final.exists():
                if keep_existing:
                    return
                remove_tree(final)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (keep_existing and final.exists()):  # lost a race we may lose
                    raise
            fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _named(tmp: Path, final: Path) -> Iterator[None]:
    """A WriteError about a file inside the temporary directory names it as it would have been
    (the temporary is gone when the user reads the message)."""
    try:
        yield
    except WriteError as e:
        if str(tmp) not in str(e):
            raise
        raise WriteError(str(e).replace(str(tmp), str(final))) from e.__cause__


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory so that no reader (or a run resumed after kill -9) sees it half
    deleted: renamed to a temporary sibling first, then removed. A symbolic link is unlinked;
    what it points to is never touched."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    os.rename(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed process left under `root` (which only the caller writes
    to); the paths removed."""
    found = sorted(Path(root).rglob(f"{TMP_PREFIX}*")) if Path(root).is_dir() else []
    removed: list[Path] = []
    for p in found:
        if any(parent in removed for parent in p.parents):
            continue  # inside a temporary directory already removed
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed

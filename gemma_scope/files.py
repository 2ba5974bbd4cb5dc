"""Atomic file writes (readers, and a run killed mid-write, see the old file or the whole new one, never a part),
writes that fail for lack of space named in one line, the check of an output directory before the work that fills
it, the sha256 of a file, UTF-8 text that names where it failed, and strict-JSON conversion of metric records."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# NumPy's tofile (np.save) on a short write; TensorStore's errors (Orbax's array writes) carry only text
NO_SPACE_TEXT = re.compile(r"\d+ requested and \d+ written|No space left on device|Disk quota exceeded")


class NoSpaceError(OSError):
    """A write failed for lack of space (or quota); the message names the file and the bytes it needed. Exit status
    74 on the command line (sysexits.h EX_IOERR)."""

    exit_status = 74

    def __init__(self, path: str | os.PathLike, nbytes: int | None):
        path = pathlib.Path(path).absolute()
        where = next(p for p in (path, *path.parents) if p.exists())
        needs = f"it needs {nbytes:,} bytes" if nbytes is not None else "it needs more space"
        self.message = (f"no space left on the device to write {path}: {needs}, {shutil.disk_usage(where).free:,} "
                        "bytes are free there; free some space (or choose another directory) and rerun")
        super().__init__(errno.ENOSPC, self.message, str(path))

    def __str__(self) -> str:
        return self.message


def is_no_space(error: BaseException | None) -> bool:
    """Whether an exception, or one in its chain of causes (Orbax and asyncio wrap them), is a write that failed
    for lack of space: ENOSPC, EDQUOT, EFBIG, NumPy's short write or TensorStore's "No space left on device"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS or NO_SPACE_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def as_no_space(error: BaseException, path: str | os.PathLike) -> NoSpaceError:
    """The ``NoSpaceError`` in ``error``'s chain (the first write that failed), or one naming the failing OSError's
    file (else ``path``) for an error that ``is_no_space``."""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    named = [e for e in chain if isinstance(e, NoSpaceError)]
    if named:
        return named[-1]
    return NoSpaceError(next((e.filename for e in chain if isinstance(e, OSError) and e.filename), path), None)


@contextlib.contextmanager
def space_for(path: str | os.PathLike, nbytes: int | None = None) -> Iterator[None]:
    """Turns a failure for lack of space in the block (``is_no_space``) into ``NoSpaceError(path, nbytes)``."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as e:
        if not is_no_space(e):
            raise
        raise NoSpaceError(path, nbytes) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, nbytes: int | None = None) -> Iterator[pathlib.Path]:
    """Yields a temporary path in ``path``'s directory (created if missing) to write to; when the block ends
    without an error the file is made world-readable (0644) and renamed onto ``path``, otherwise it is removed (and
    ``path`` is as it was).

    Raises:
      NoSpaceError: the disk filled up; names ``path`` and ``nbytes`` (the size to be written, if known).
    """
    path = pathlib.Path(path)
    with space_for(path, nbytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield pathlib.Path(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; releases and caches are meant to be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def check_output_dir(path: str | os.PathLike, what: str) -> pathlib.Path:
    """Checks, without creating anything, that directory ``path`` exists or can be created and written, so that a
    command fails before its work rather than after; returns ``path`` as a Path.

    Raises:
      NotADirectoryError: ``path`` or one of its parents is a file (the message names ``what``, e.g. "--out").
      PermissionError: the nearest existing directory is not writable.
    """
    path = pathlib.Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a directory; expected a directory or "
                                 "a path where one can be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: cannot write to {existing} (permission denied)")
    return path


def sha256_file(path: str | os.PathLike, offset: int = 0) -> str:
    """The sha256 (64 hex digits) of a file's bytes from byte ``offset`` to its end, read in blocks.

    Raises:
      OSError (FileNotFoundError, ...): the file cannot be read.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.file_digest(f, "sha256").hexdigest()


def utf8_text(data: bytes, where) -> str:
    """``data`` decoded as UTF-8.

    Raises:
      ValueError: naming ``where`` (a file, ``file:line`` or ``<stdin>``) and the offset of the first bad byte.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); convert it, "
                         "e.g. with iconv") from None


def json_ready(value):
    """A JSON-ready copy of ``value``: arrays to lists, NumPy scalars to Python, non-finite floats to None
    (strict JSON has no NaN/Inf)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value

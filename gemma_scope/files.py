"""Atomic file writes (readers, and a run killed mid-write, see the old file or the whole new one, never a part),
the check of an output directory before the work that fills it, the sha256 of a file, UTF-8 text that names where
it failed, and strict-JSON conversion of metric records."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pathlib
import tempfile
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path in ``path``'s directory (created if missing) to write to; when the block ends
    without an error the file is made world-readable (0644) and renamed onto ``path``, otherwise it is removed."""
    path = pathlib.Path(path)
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

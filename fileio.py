"""Atomic file writes: a file is either its old self or its complete new self, never half-written.

Everything the suite writes (checkpoints, submissions, probability files, CSV logs, the saved arguments) goes
through :func:`atomic_write`, which writes to a temporary file in the same folder, flushes it to disk and renames
it over the target. A crash, a SIGKILL or a full disk at any moment leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import faults

_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteError(OSError):
    """A file could not be written (disk full, no permission...); the previous version of it is intact."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}; its previous version is intact"
                             ) from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_csv(df, path: str | os.PathLike, **kwargs) -> None:
    """Write a pandas DataFrame to ``path`` atomically (no index column unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_write(path) as f:
        df.to_csv(f, **kwargs)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

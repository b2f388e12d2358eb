"""Crash-safe file writes shared by every part of BitMar (config, caches, reports)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable_dir(path: str | os.PathLike) -> None:
    """Raise OSError (naming the directory) unless files can be created in `path`, or, if it does not exist yet, in
    its nearest existing parent (where it would be created). Call it before long work whose results go there: a
    permission bit or a read-only mount found only at the end loses the work. Creates and removes one probe file."""
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{probe} is a file, not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".bitmar-write-check-")
    except OSError as err:  # permission denied, read-only file system, ...
        raise type(err)(f"cannot create files in {probe} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(tmp)

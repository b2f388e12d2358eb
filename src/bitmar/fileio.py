"""Crash-safe file writes shared by every part of BitMar (config, caches, reports).

`tempfile.mkstemp`/`mkdtemp` create 0600/0700 entries, and a temporary file renamed into place keeps that mode: a
checkpoint or config would then be unreadable by the user's group although every other file follows the umask.
`mkstemp`/`mkdtemp` here give the temporary entry the mode a plain `open()`/`mkdir()` would (0666/0777 & ~umask).
Every temporary name made through them starts with a dot and ends with a random 8-character part, so a run can
recognise (and remove) its own orphans after a SIGKILL.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (`os.umask` is set-and-return)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no read-only query: set and restore at once
    os.umask(mask)
    return mask


def mkstemp(*, dir: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, str]:  # noqa: A002
    """`tempfile.mkstemp` whose file gets the umask's mode (0644 under umask 022), not 0600."""
    fd, path = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    return fd, path


def mkdtemp(*, dir: str | os.PathLike, prefix: str, suffix: str = "") -> str:  # noqa: A002
    """`tempfile.mkdtemp` whose directory gets the umask's mode (0755 under umask 022), not 0700."""
    path = tempfile.mkdtemp(dir=dir, prefix=prefix, suffix=suffix)
    try:
        os.chmod(path, 0o777 & ~current_umask())
    except BaseException:
        os.rmdir(path)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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

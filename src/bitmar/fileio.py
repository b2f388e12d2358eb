"""Crash-safe file writes shared by every part of BitMar (config, caches, reports).

`tempfile.mkstemp`/`mkdtemp` create 0600/0700 entries, and a temporary file renamed into place keeps that mode: a
checkpoint or config would then be unreadable by the user's group although every other file follows the umask.
`mkstemp`/`mkdtemp` here give the temporary entry the mode a plain `open()`/`mkdir()` would (0666/0777 & ~umask).
Every temporary name made through them starts with a dot and ends with a random 8-character part, so a run can
recognise (and remove) its own orphans after a SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_file(path: str | os.PathLike, *, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """The one crash-safe file write of BitMar: yield a temporary path in the target's folder (named like our other
    temporaries, ending in `suffix`: matplotlib and numpy read the format from it), rename it onto `path` when the
    block ends cleanly, remove it when the block raises. Readers never see a half-written file. `fsync=True` flushes
    the bytes to disk before the rename (checkpoints: a power cut must not leave a renamed but empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # no-op after the rename


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; when the block ends cleanly it replaces `path` with renames only
    (an existing `path` is renamed aside first and put back if the final rename fails), when it raises it is removed.
    For outputs that are a folder of files (an export, a tokenizer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        old = Path(mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.replace(path, old / "previous")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / "previous", path)  # put the previous version back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after the rename


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

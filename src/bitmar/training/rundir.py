"""Safety of a run directory: one trainer at a time (a lock), and no orphaned temporary files after a SIGKILL.

The lock is `<run_dir>/.run.lock`, held with `fcntl.flock` for the life of the trainer (the kernel drops it when the
process dies, however it dies) and holding a JSON record of its owner (pid, host, start time, command). A clean exit
empties the record; a record left behind by a killed process is reported and taken over. Under torchrun only rank 0
takes the lock: the ranks of one run share it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bitmar")

LOCK_NAME = ".run.lock"

# Our temporary names (bitmar.fileio.mkstemp/mkdtemp): a dot, the target's name, 8 random [a-z0-9_] characters.
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}(\.npz|\.npy)?\.tmp$")
_TEMP_PLOT = re.compile(r"^\..+\.[a-z0-9_]{8}\.png$")
_TEMP_TOKENIZER_DIR = re.compile(r"^\.tokenizer\.(tmp|old)-[a-z0-9_]{8}$")
# Folders of a run directory that only the trainer writes into (where an orphan can only be ours).
_TEMP_FILE_DIRS = ("", "checkpoints", "evaluation", "attention_analysis")


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    text = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}"
    if owner.get("command"):
        text += f" ({owner['command'][:200]})"
    return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """`acquire()` or raise RunDirectoryBusy; `release()` at the end (also fine to call twice)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read_record(fd)
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: this filesystem has no file locks (%s); running without the run lock", self.path, err)
                return
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise RunDirectoryBusy(
                f"run directory {self.path.parent} is in use by another trainer: {_describe(owner)}. Wait for it to "
                "finish (or stop it), or pass another --output_dir"
            ) from None
        previous = _read_record(fd)
        if previous:
            host = socket.gethostname()
            pid = previous.get("pid")
            if previous.get("host") == host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
                # The lock is free but its recorded owner lives: a reused pid (the owner died). Say so.
                log.warning("run lock %s names live pid %d, which no longer holds it (pid reused)", self.path, pid)
            elif previous.get("host") != host:
                os.close(fd)
                raise RunDirectoryBusy(
                    f"run directory {self.path.parent} was locked by a trainer on another host: {_describe(previous)}; "
                    f"its process cannot be checked from here. If that run is gone, delete {self.path} and start again"
                )
            log.warning(
                "taking over a stale run lock %s: its owner (%s) is no longer running (killed?)",
                self.path,
                _describe(previous),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record means "released cleanly" (the file stays: unlinking races)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}  # unreadable: still someone's lock
    return record if isinstance(record, dict) else {"pid": "?", "host": "?"}


def remove_orphaned_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files/folders that a killed run left behind (only names our atomic writers make, only in the
    run directory's own folders); log each one. Call it while holding the run lock, before anything writes."""
    run_dir = Path(run_dir)
    removed: list[Path] = []
    candidates: list[Path] = []
    for sub in _TEMP_FILE_DIRS:
        folder = run_dir / sub
        if folder.is_dir():
            candidates += [p for p in folder.iterdir() if p.is_file() and _TEMP_FILE.match(p.name)]
    if (run_dir / "plots").is_dir():
        candidates += [p for p in (run_dir / "plots").iterdir() if p.is_file() and _TEMP_PLOT.match(p.name)]
    if run_dir.is_dir():
        candidates += [p for p in run_dir.iterdir() if p.is_dir() and _TEMP_TOKENIZER_DIR.match(p.name)]
    for path in sorted(candidates):
        try:
            size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*"))
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as err:
            log.warning("could not remove the orphaned temporary %s: %s", path, err)
            continue
        removed.append(path)
        log.warning("removed %s (%.1f MB), left behind by an interrupted write", path, size / 1e6)
    return removed

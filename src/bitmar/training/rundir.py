"""The run directory: one trainer at a time (a lock), no orphaned temporary files after a SIGKILL, and the files a
trainer writes there (config.yaml, checkpoints/, summary.json; `RunFiles`, `run_summary`).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bitmar.bitnet import quantization_stats
from bitmar.config import BitMarConfig, save_config
from bitmar.fileio import atomic_write_text
from bitmar.infra.checkpoint import save_checkpoint
from bitmar.training.distributed import DistInfo, barrier
from bitmar.training.progress import Progress

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


# ------------------------------------------------------------------------------------------------- the run's files
class RunFiles:
    """What a trainer writes into its run directory; rank 0 writes, and every rank waits at a checkpoint, so nobody
    races ahead of one."""

    def __init__(self, output_dir: Path, dist: DistInfo) -> None:
        self.output_dir = Path(output_dir)
        self.dist = dist
        self.checkpoints = self.output_dir / "checkpoints"

    def write_config(self, cfg: BitMarConfig) -> None:
        if self.dist.is_main:
            save_config(cfg, self.output_dir / "config.yaml")

    def save_checkpoint(self, payload: Callable[[], dict[str, Any]], *names: str) -> None:
        """checkpoints/<name> for each name, of one `payload()` (built on rank 0 only)."""
        if self.dist.is_main:
            state = payload()
            for name in names:
                save_checkpoint(state, self.checkpoints / name)
        barrier(self.dist)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.dist.is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def run_summary(
    final: dict[str, float],
    progress: Progress,
    model: torch.nn.Module,
    model_sizes: dict[str, tuple[int, int]],
    *,
    use_vision: bool,
    ranks_agree: bool | None = None,
) -> dict[str, Any]:
    """summary.json (and the Summary/ metrics): the final validation `final` next to the run's start and counters,
    the share of ternary weights and the compression ratios; `ranks_agree` only under DDP."""
    summary: dict[str, Any] = {
        "initial_validation_loss": progress.initial_val_loss,
        "final_validation_loss": final["Validation/loss"],
        "best_validation_loss": progress.best_val_loss,
        "final_text_loss": final["Validation/Text_Loss"],
        "final_perplexity": final["Validation/Perplexity"],
        "caption_loss_true_image": final["Validation/Caption_Loss"],
        "caption_loss_no_image": final["Validation/Caption_Loss_No_Image"],
        "optimizer_steps": progress.global_step,
        "tokens_seen": progress.tokens_seen,
        "skipped_nonfinite_steps": progress.skipped_nonfinite,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if use_vision:
        summary["caption_loss_shuffled_image"] = final["Validation/Caption_Loss_Shuffled_Image"]
        summary["grounding_gain"] = summary["caption_loss_shuffled_image"] - summary["caption_loss_true_image"]
    if "Validation/Memory_Recall_Loss" in final:
        summary["memory_recall_loss"] = final["Validation/Memory_Recall_Loss"]
    if ranks_agree is not None:
        summary["ranks_agree"] = ranks_agree
    stats = quantization_stats(model)
    summary["ternary_fraction"] = stats["ternary_fraction"]
    unpacked, packed = model_sizes["total"]
    summary["compression_ratio"] = unpacked / packed  # whole model, float32 / packed (as the evaluation reports)
    summary["ternary_compression_ratio"] = stats["compression_ratio"]
    return summary

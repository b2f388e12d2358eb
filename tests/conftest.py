"""Shared test settings."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tiny matmuls on a loaded 2-core machine get far slower with 2 threads (contention); 1 thread keeps tests predictable.
torch.set_num_threads(1)


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in which no file can be created: read-only by mode for a normal user; as root (who ignores mode
    bits) a sysfs directory, where nobody can create files."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        sysfs = Path("/sys")
        try:
            (sysfs / ".bitmar-probe").touch()
        except OSError:
            yield sysfs
            return
        pytest.skip("running as root and /sys accepts new files: no directory is read-only for this user")
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)

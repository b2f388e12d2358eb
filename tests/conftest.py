"""Shared test settings."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bitmar.config import SampleDataConfig
from bitmar.data.sample import generate_sample_dataset

# Tiny matmuls on a loaded 2-core machine get far slower with 2 threads (contention); 1 thread keeps tests predictable.
torch.set_num_threads(1)

# The sample world the training tests run on (test_training_e2e, test_run_safety): big enough for three phases with
# validation and memory episodes, small enough to generate in a fraction of a second.
SMALL_WORLD = SampleDataConfig(num_cc3m=300, num_local_narratives=40, num_text_lines=600, num_novel_episodes=16)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sample world for the whole session. No test changes its files; runs on it share its token caches
    (`<world>/.bitmar_cache`, keyed by data and tokenizer), so the first run builds what the others reuse."""
    data_dir = tmp_path_factory.mktemp("small_world")
    generate_sample_dataset(data_dir, SMALL_WORLD)
    return data_dir


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

"""The user-facing check script test_cpu_compatibility.py, run as users run it (a subprocess, tiny config)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "test_cpu_compatibility.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cpu_compatibility_script_passes_on_the_tiny_config() -> None:
    result = _run("--config", "configs/bitmar_tiny.yaml")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for line in ("train step", "KV cache == recompute", "store write/read/forget ok", "all checks passed"):
        assert line in result.stdout, line


def test_cpu_compatibility_script_refuses_a_bad_config_with_exit_2(tmp_path: Path, capsys) -> None:
    """In-process (the script's main), so the refusal path costs no second interpreter start."""
    spec = importlib.util.spec_from_file_location("cpu_compat", ROOT / "test_cpu_compatibility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  memroy_size: 8\n")
    assert module.main(["--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "memory_size" in captured.out + captured.err  # the nearest valid key

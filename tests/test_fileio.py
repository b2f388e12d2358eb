"""The shared crash-safe writers in bitmar.fileio: a failed write leaves the old content and no temporary behind."""

from __future__ import annotations

import pytest

from bitmar import fileio


def test_atomic_file_replaces_on_success_and_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    fileio.atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError), fileio.atomic_file(target, fsync=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]  # the temporary is gone
    with fileio.atomic_file(target, suffix=".png") as tmp:
        assert tmp.name.startswith(".out.bin.") and tmp.suffix == ".png" and tmp.parent == target.parent
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second"
    assert fileio.atomic_write_text(target, "drei") == target and target.read_text(encoding="utf-8") == "drei"


def test_atomic_directory_swaps_whole_folders_and_restores_nothing_half_done(tmp_path):
    target = tmp_path / "export"
    with fileio.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with fileio.atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b.txt"]  # replaced as a whole, not merged
    with pytest.raises(ValueError), fileio.atomic_directory(target) as tmp:
        (tmp / "c.txt").write_text("3")
        raise ValueError("save failed")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary or aside folder left

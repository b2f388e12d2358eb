"""Dataset verifier: a hand-built valid data set passes; each kind of damage gives a clear failing check."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bitmar.data import layout
from bitmar.data import verify as vf
from bitmar.data.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DIM = 16

TEXT = {
    "bnc_spoken": ["well I think so", "yeah", ""],
    "childes": ["= = = file = = =", "*CHI:\tmore juice please", "*MOT:\there you go"],
    "gutenberg": ["It was a dark and stormy night.", "The end."],
    "open_subtitles": ["Where are you going?", "Home."],
    "simple_wiki": ["Paris is the capital of France."],
    "switchboard": ["A:\tuh-huh", "B:\tright"],
}


def _features(n: int, seed: int, dim: int = DIM, dtype: type = np.float16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(dtype)


def _write_zip(path: Path, prefix: str = "", text: dict[str, list[str]] = TEXT, stored: bool = False) -> None:
    mode = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", mode) as zf:
        for src, lines in text.items():
            zf.writestr(f"{prefix}{src}.train", "\n".join(lines) + "\n")


def make_dataset(root: Path, cc: tuple[int, int] = (6, 4), ln: int | None = 5, prefix: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write_zip(root / layout.TEXT_ZIP, prefix)
    (root / layout.CC3M_CAPTIONS).write_text(json.dumps([f"a photo of thing number {i}" for i in range(sum(cc))]))
    for name, n, seed in zip(layout.CC3M_FEATURES, cc, (1, 2), strict=True):
        np.save(root / name, _features(n, seed))
    if ln is not None:
        narratives = [f"in this image we see a dog {i}" for i in range(ln)]
        (root / layout.LOCAL_NARR_CAPTIONS).write_text(json.dumps(narratives))
        np.save(root / layout.LOCAL_NARR_FEATURES, _features(ln, 3, dtype=np.float32))
    return root


def _check(report: vf.VerifyReport, name: str) -> vf.Check:
    found = [c for c in report.checks if c.name == name]
    assert found, f"no check named {name!r}; have {[c.name for c in report.checks]}"
    return found[0]


def _failing(report: vf.VerifyReport) -> list[str]:
    return [c.name for c in report.errors]


def test_valid_dataset_passes_with_summary(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert report.usable and not report.errors and not report.warnings
    rows = {r.source if "features" not in r.source else r.file: r for r in report.rows}
    assert rows["childes"].rows == 3 and rows["childes"].words == 15  # raw words, speaker labels and headers included
    assert rows["bnc_spoken"].rows == 2  # the empty line is not a row
    assert rows["cc3m captions"].rows == 10 and rows["cc3m captions"].words == 60
    first = rows[layout.CC3M_FEATURES[0]]
    assert (first.rows, first.dim, first.dtype) == (6, DIM, "float16")
    ref = _features(6, 1).astype(np.float64)  # fewer rows than the sample size: stats are exact
    assert first.mean == pytest.approx(ref.mean()) and first.std == pytest.approx(ref.std())
    assert first.l2 == pytest.approx(np.linalg.norm(ref, axis=1).mean())
    assert rows[layout.LOCAL_NARR_FEATURES].dtype == "float32"
    pairs = _check(report, "cc3m: caption-feature pairs")
    assert "10 captions (cc_3M_captions.json) vs 10 feature rows = 6" in pairs.message
    text = vf.format_report(report)
    assert "RESULT: usable" in text and "childes" in text and f"{ref.mean():.4f}" in text


def test_zip_with_train_50M_folder_passes(tmp_path: Path) -> None:
    report = vf.verify_dataset(make_dataset(tmp_path / "d", prefix="train_50M/"), feature_dim=DIM)
    assert report.usable, _failing(report)
    assert "train_50M.zip at train_50M/" in _check(report, "text corpus: six sources").message


def test_missing_file_names_it_and_the_fetch_command(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    (root / layout.CC3M_FEATURES[1]).unlink()
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert not report.usable
    assert _failing(report) == [f"{layout.CC3M_FEATURES[1]}: present"]
    msg = report.errors[0].message
    assert "missing" in msg and f"--only {layout.CC3M_FEATURES[1]}" in msg and "download_babylm_data.py" in msg


def test_local_narratives_optional_unless_required(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", ln=None)
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert report.usable and [c.name for c in report.warnings] == ["local_narratives: present"]
    required = vf.verify_dataset(root, feature_dim=DIM, require_local_narratives=True)
    assert not required.usable
    ln_files = (layout.LOCAL_NARR_CAPTIONS, layout.LOCAL_NARR_FEATURES)
    assert set(_failing(required)) == {f"{n}: present" for n in ln_files}


def test_present_but_broken_local_narratives_fail_unless_skipped(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    np.save(root / layout.LOCAL_NARR_FEATURES, _features(4, 3))  # 5 captions, 4 rows
    assert _failing(vf.verify_dataset(root, feature_dim=DIM)) == ["local_narratives: caption-feature pairs"]
    skipped = vf.verify_dataset(root, feature_dim=DIM, check_local_narratives=False)
    assert skipped.usable and not any("local_narr" in c.name for c in skipped.checks)


def test_count_mismatch_names_both_counts_and_files(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    np.save(root / layout.CC3M_FEATURES[1], _features(3, 2))
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == ["cc3m: caption-feature pairs"]
    msg = report.errors[0].message
    assert "cc_3M_captions.json holds 10 captions but its feature files hold 9 feature rows" in msg
    assert f"6 ({layout.CC3M_FEATURES[0]}) + 3 ({layout.CC3M_FEATURES[1]})" in msg


def test_wrong_width_and_dtype(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    np.save(root / layout.CC3M_FEATURES[0], _features(6, 1, dim=32))
    np.save(root / layout.CC3M_FEATURES[1], _features(4, 2).astype(np.int32))
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert set(_failing(report)) == {f"{n}: features" for n in layout.CC3M_FEATURES}
    width = _check(report, f"{layout.CC3M_FEATURES[0]}: features")
    assert "feature width 32, expected 16 (--feature_dim)" in width.message
    assert "dtype int32 (expected float16 or float32 features)" in report.errors[1].message
    assert "cc3m: caption-feature pairs" not in [c.name for c in report.checks]  # no count without both arrays
    # float64 is read as float32 by the loaders, so it is not an error here either
    np.save(root / layout.CC3M_FEATURES[0], _features(6, 1).astype(np.float64))
    np.save(root / layout.CC3M_FEATURES[1], _features(4, 2))
    assert vf.verify_dataset(root, feature_dim=DIM).usable


def test_nan_rows_follow_the_loader_policy_across_scan_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitmar.data import features as features_module

    monkeypatch.setattr(features_module, "SCAN_CHUNK_ROWS", 7)  # exercise chunk offsets
    root = make_dataset(tmp_path / "d", cc=(300, 4))
    feats = _features(300, 1)
    feats[150, 3] = np.nan
    feats[299, 0] = np.inf
    np.save(root / layout.CC3M_FEATURES[0], feats)
    report = vf.verify_dataset(root, feature_dim=DIM)
    check = _check(report, "cc3m: rows")
    assert report.usable and check.status == "warn"
    assert "dropped 2 of 304 rows whose features hold NaN/inf (rows 150, 299)" in check.message
    row = next(r for r in report.rows if r.file == layout.CC3M_FEATURES[0])
    assert row.mean is not None and np.isfinite(row.mean)  # stats skip the broken rows

    feats[10:20] = np.nan  # 12 of 304 rows: training drops them (data.nonfinite_features=drop), so no failure here
    np.save(root / layout.CC3M_FEATURES[0], feats)
    report = vf.verify_dataset(root, feature_dim=DIM)
    check = _check(report, "cc3m: rows")
    assert report.usable and check.status == "warn"
    assert "12 of 304" in check.message and "rows 10, 11, 12, 13, 14, ..." in check.message
    assert "may be corrupt" in check.message  # more than 1%: a hint, not a verdict
    strict = vf.verify_dataset(root, feature_dim=DIM, nonfinite="error")
    assert _failing(strict) == ["cc3m: rows"]
    assert "12 of 304 feature rows hold NaN/inf" in strict.errors[0].message
    assert "data.nonfinite_features=error" in strict.errors[0].message


def test_empty_captions_warn_and_non_strings_fail(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    caps = [f"caption {i}" for i in range(10)]
    caps[2], caps[7] = "", "   "
    (root / layout.CC3M_CAPTIONS).write_text(json.dumps(caps))
    report = vf.verify_dataset(root, feature_dim=DIM)
    empty = _check(report, "cc3m: rows")
    assert report.usable and empty.status == "warn"
    assert "dropped 2 of 10 rows with an empty caption (rows 2, 7)" in empty.message

    caps[4], caps[5] = None, {"text": "x"}  # a dict without "caption" is not a caption
    (root / layout.CC3M_CAPTIONS).write_text(json.dumps(caps))
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == [f"{layout.CC3M_CAPTIONS}: strings"]
    assert "2 entries are not caption strings (NoneType, dict); first at index 4, 5" in report.errors[0].message


def test_corrupt_json(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    (root / layout.CC3M_CAPTIONS).write_text('["one", "two", "thr')  # cut-off download
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == [f"{layout.CC3M_CAPTIONS}: JSON"]
    assert "not valid JSON" in report.errors[0].message and "line 1" in report.errors[0].message
    (root / layout.CC3M_CAPTIONS).write_text('{"captions": []}')
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert "holds a JSON object whose entry 'captions' is a list" in report.errors[0].message


def test_corrupt_and_truncated_npy(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    (root / layout.CC3M_FEATURES[0]).write_bytes(b"this is an html error page, not numpy")
    path = root / layout.CC3M_FEATURES[1]
    path.write_bytes(path.read_bytes()[:-10])
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == [f"{n}: features" for n in layout.CC3M_FEATURES]
    assert "not a readable .npy file" in report.errors[0].message
    assert "truncated" in report.errors[1].message and "(4, 16) float16" in report.errors[1].message


def test_corrupt_zip(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    (root / layout.TEXT_ZIP).write_bytes(b"PK\x03\x04 garbage")
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == ["text corpus: six sources"]
    assert "not a readable zip" in report.errors[0].message and "--only train_50M.zip" in report.errors[0].message


def test_zip_missing_a_source(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    _write_zip(root / layout.TEXT_ZIP, text={k: v for k, v in TEXT.items() if k != "gutenberg"})
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == ["text corpus: six sources"]
    msg = report.errors[0].message
    assert "no member named gutenberg.train" in msg and "childes.train" in msg and "--only train_50M.zip" in msg


def test_zip_member_with_bad_crc(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    path = root / layout.TEXT_ZIP
    _write_zip(path, stored=True)
    raw = path.read_bytes()
    assert raw.count(b"capital of France") == 1
    path.write_bytes(raw.replace(b"capital of France", b"capital of Spain!"))
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == [f"{layout.TEXT_ZIP}:simple_wiki.train: readable"]
    assert "CRC" in report.errors[0].message


def test_non_utf8_line_reports_file_and_line(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    with zipfile.ZipFile(root / layout.TEXT_ZIP, "w") as zf:
        for src, lines in TEXT.items():
            body = "\n".join(lines).encode() + b"\n"
            if src == "childes":
                body += b"*CHI:\tcaf\xe9 latin-1\n"  # line 4
            zf.writestr(f"{src}.train", body)
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert _failing(report) == [f"{layout.TEXT_ZIP}:childes.train: UTF-8"]
    msg = report.errors[0].message
    assert (
        "1 line(s) are not valid UTF-8" in msg
        and "childes.train: line 4 is not valid UTF-8 (byte 0xe9 at column 10" in msg
    )


def test_bad_arguments_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory.*download_babylm_data.py"):
        vf.verify_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="feature_dim must be positive"):
        vf.verify_dataset(tmp_path, feature_dim=0)


def test_sample_dataset_passes(tmp_path: Path) -> None:
    from bitmar.config import SampleDataConfig
    from bitmar.data.sample import generate_sample_dataset

    cfg = SampleDataConfig(num_cc3m=60, num_local_narratives=20, num_text_lines=120, num_novel_episodes=8)
    generate_sample_dataset(tmp_path, cfg, feature_dim=DIM, dtype=np.float16)
    report = vf.verify_dataset(tmp_path, feature_dim=DIM, require_local_narratives=True)
    assert report.usable and not report.warnings, vf.format_report(report)
    assert sum(r.rows for r in report.rows if r.source == "cc3m features") == 60


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "test_dataset_compatibility.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_script_exit_codes(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    ok = _script("--data_dir", str(root), "--feature_dim", str(DIM))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "RESULT: usable" in ok.stdout and "mean" in ok.stdout

    (root / layout.CC3M_CAPTIONS).write_text("[")
    bad = _script("--data_dir", str(root), "--feature_dim", str(DIM))
    assert bad.returncode == 1 and "RESULT: NOT usable" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr

    for args in (("--data_dir", str(tmp_path / "nowhere")), ("--data_dir", str(root), "--feature_dim", "0")):
        usage = _script(*args)
        assert usage.returncode == 2 and "Traceback" not in usage.stderr
        assert "not a directory" in usage.stderr or "must be positive" in usage.stderr


# ---------------------------------------------------------------------------------------------------------------
# The verifier and the loaders agree (they call the same functions)
# ---------------------------------------------------------------------------------------------------------------


def _unpack(root: Path) -> None:
    """Replace train_50M.zip by the unpacked folder train_50M/<source>.train (documented as accepted)."""
    (root / layout.TEXT_ZIP).unlink()
    folder = root / "train_50M"
    folder.mkdir()
    for src, lines in TEXT.items():
        (folder / f"{src}.train").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _nan_rows(root: Path, rows: slice) -> None:
    feats = _features(6, 1)
    feats[rows, 0] = np.nan
    np.save(root / layout.CC3M_FEATURES[0], feats)


def _loader_outcome(root: Path, nonfinite: str) -> tuple[str | None, list[str]]:
    """(DataError message or None, warning messages) of the training loaders on `root`."""
    import warnings

    from bitmar.data.features import CaptionFeatureStore
    from bitmar.data.text import iter_text_lines, locate_text_files

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            list(iter_text_lines(locate_text_files(root)))
            CaptionFeatureStore.from_data_dir(root, feature_dim=DIM, nonfinite=nonfinite, use_local_narratives=False)
        except DataError as err:
            return str(err), []
    return None, [str(w.message) for w in caught]


CASES = {
    "unpacked train_50M/": lambda root: _unpack(root),
    "caption objects": lambda root: (root / layout.CC3M_CAPTIONS).write_text(
        json.dumps([{"caption": f"a photo of thing number {i}", "id": i} for i in range(10)])
    ),
    "captions by id": lambda root: (root / layout.CC3M_CAPTIONS).write_text(
        json.dumps({str(i): f"caption {i}" for i in reversed(range(10))})
    ),
    "one NaN row": lambda root: _nan_rows(root, slice(2, 3)),
    "many NaN rows (> 1%)": lambda root: _nan_rows(root, slice(0, 4)),
    "every row NaN": lambda root: (
        np.save(root / layout.CC3M_FEATURES[0], np.full((6, DIM), np.nan, np.float16)),
        np.save(root / layout.CC3M_FEATURES[1], np.full((4, DIM), np.inf, np.float16)),
    ),
    "every caption empty": lambda root: (root / layout.CC3M_CAPTIONS).write_text(json.dumps([" "] * 10)),
    "a caption object without a caption": lambda root: (root / layout.CC3M_CAPTIONS).write_text(
        json.dumps([{"text": "x"}] + [f"c {i}" for i in range(9)])
    ),
    "wrapped captions": lambda root: (root / layout.CC3M_CAPTIONS).write_text(json.dumps({"captions": ["a"] * 10})),
    "Fortran-ordered features": lambda root: np.save(
        root / layout.CC3M_FEATURES[0], np.asfortranarray(_features(6, 1))
    ),
    "zip missing two sources": lambda root: _write_zip(
        root / layout.TEXT_ZIP, text={k: v for k, v in TEXT.items() if k not in ("gutenberg", "childes")}
    ),
}


@pytest.mark.parametrize("nonfinite", ["drop", "error"])
@pytest.mark.parametrize("case", list(CASES))
def test_verifier_reports_what_the_loaders_do(tmp_path: Path, case: str, nonfinite: str) -> None:
    root = make_dataset(tmp_path / "d", ln=None)
    CASES[case](root)
    report = vf.verify_dataset(root, feature_dim=DIM, check_local_narratives=False, nonfinite=nonfinite)
    error, warned = _loader_outcome(root, nonfinite)
    assert report.usable == (error is None), (case, error, vf.format_report(report))
    if error is not None:
        assert any(error in c.message for c in report.errors), (error, [c.message for c in report.errors])
    else:
        reported = [c.message for c in report.warnings]
        assert warned == reported, (warned, reported)  # the same warnings, word for word


def test_every_row_dropped_is_said_clearly(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", ln=None)
    CASES["every row NaN"](root)
    report = vf.verify_dataset(root, feature_dim=DIM, check_local_narratives=False)
    assert _failing(report) == ["cc3m: rows"]
    assert "every one of its 10 rows would be dropped (10 with NaN/inf features" in report.errors[0].message


def test_unpacked_corpus_and_caption_objects_are_usable(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    CASES["unpacked train_50M/"](root)
    CASES["caption objects"](root)
    report = vf.verify_dataset(root, feature_dim=DIM)
    assert report.usable and not report.warnings, vf.format_report(report)
    assert "unpacked files in" in _check(report, "text corpus: six sources").message
    assert _check(report, "train_50M/childes.train: UTF-8").ok


def test_sample_world_is_announced_as_not_babylm(tmp_path: Path) -> None:
    from bitmar.config import SampleDataConfig
    from bitmar.data.sample import generate_sample_dataset

    cfg = SampleDataConfig(num_cc3m=20, num_local_narratives=6, num_text_lines=60, num_novel_episodes=4)
    generate_sample_dataset(tmp_path, cfg, feature_dim=DIM)
    report = vf.verify_dataset(tmp_path, feature_dim=DIM)
    assert report.usable and report.sample_world and not report.warnings
    note = _check(report, "sample world")
    assert note.status == "note" and "GENERATED SAMPLE WORLD" in note.message and "NOT real BabyLM data" in note.message
    assert "RESULT: usable: a generated SAMPLE WORLD, not BabyLM data" in vf.format_report(report)
    # A real file arrives on top of it: no longer a pure sample world, and the verifier says which file.
    (tmp_path / layout.CC3M_CAPTIONS).write_text(json.dumps([f"real caption {i}" for i in range(20)]))
    report = vf.verify_dataset(tmp_path, feature_dim=DIM)
    mixed = _check(report, "sample world")
    assert not report.sample_world and mixed.status == "warn"
    assert f"{layout.CC3M_CAPTIONS} are not the files it wrote" in mixed.message
    assert "SAMPLE WORLD" not in vf.format_report(report).splitlines()[-1]


def test_script_nonfinite_policy(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", ln=None)
    CASES["one NaN row"](root)
    drop = _script("--data_dir", str(root), "--feature_dim", str(DIM), "--no_local_narratives")
    assert drop.returncode == 0 and "[warn] cc3m: rows" in drop.stdout, drop.stdout
    strict = _script(
        "--data_dir", str(root), "--feature_dim", str(DIM), "--no_local_narratives", "--nonfinite_features", "error"
    )
    assert strict.returncode == 1 and "data.nonfinite_features=error" in strict.stdout

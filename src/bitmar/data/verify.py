"""Check that a BabyLM multimodal data directory is complete and readable before training on it.

Every problem becomes a failing check with a message that names the file and says what to do; nothing here
raises on bad data. Feature files are never loaded whole: headers are parsed, arrays are memory-mapped,
the finiteness scan walks fixed-size chunks and the statistics use a strided sample of rows.

Severity: a failing check is an "error" (the loaders would fail or train on garbage) or a "warning"
(usable, but look at it: optional Localized Narratives absent, a few NaN rows the loaders drop, empty captions).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bitmar.data import layout
from bitmar.data.errors import DataError

SCAN_CHUNK_BYTES = 64 << 20  # finiteness scan reads this much of a feature file at a time
STAT_SAMPLE_ROWS = 4096  # rows in the strided sample behind mean / std / L2
MAX_NONFINITE_FRACTION = 0.01  # more broken rows than this means a broken file, not a few bad images
SHOW_INDICES = 5
BABYLM_WORD_BUDGET = 100_000_000
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError)


@dataclass
class Check:
    name: str
    ok: bool
    message: str
    severity: str = "error"  # "error": the data set is not usable; "warning": usable, worth a look

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.severity == "error" else "warn")


@dataclass
class SummaryRow:
    source: str
    file: str
    rows: int
    words: int | None = None
    dim: int | None = None
    dtype: str | None = None
    mean: float | None = None  # over the strided sample of finite rows
    std: float | None = None
    l2: float | None = None  # mean per-row L2 norm


@dataclass
class VerifyReport:
    data_dir: Path
    checks: list[Check] = field(default_factory=list)
    rows: list[SummaryRow] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return all(c.ok or c.severity != "error" for c in self.checks)

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "warning"]

    def add(self, name: str, ok: bool, message: str, severity: str = "error") -> bool:
        self.checks.append(Check(name, ok, message, severity))
        return ok


def _indices(idx: Sequence[int], total: int | None = None) -> str:
    shown = ", ".join(str(int(i)) for i in list(idx)[:SHOW_INDICES])
    return shown + (", ..." if (len(idx) if total is None else total) > SHOW_INDICES else "")


def _present(report: VerifyReport, name: str, severity: str = "error") -> Path | None:
    path = report.data_dir / name
    if path.is_file():
        report.add(f"{name}: present", True, f"{path.stat().st_size:,} bytes")
        return path
    report.add(
        f"{name}: present",
        False,
        f"{path} is missing. Fetch it: {layout.fetch_command(str(report.data_dir), name)}",
        severity,
    )
    return None


# ---------------------------------------------------------------- text-only corpus (train_50M.zip)


def _check_text_zip(report: VerifyReport, progress: bool) -> None:
    path = _present(report, layout.TEXT_ZIP)
    if path is None:
        return
    refetch = layout.fetch_command(str(report.data_dir), layout.TEXT_ZIP)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        report.add(f"{layout.TEXT_ZIP}: opens", False, f"not a readable zip archive ({err}). Re-download: {refetch}")
        return
    with zf:
        names = set(zf.namelist())
        members: dict[str, str] = {}
        for src in layout.TEXT_SOURCES:
            for candidate in (f"{src}.train", f"train_50M/{src}.train"):
                if candidate in names:
                    members[src] = candidate
                    break
        missing = [s for s in layout.TEXT_SOURCES if s not in members]
        found = sorted(n for n in names if n.endswith(".train")) or sorted(names)[:10]
        report.add(
            f"{layout.TEXT_ZIP}: six sources",
            not missing,
            f"all six .train files at {'train_50M/' if any('/' in m for m in members.values()) else 'the root'}"
            if not missing
            else f"missing {', '.join(f'{s}.train' for s in missing)} (looked at the root and under train_50M/); "
            f"the archive holds: {', '.join(found) or 'nothing'}. Re-download: {refetch}",
        )
        for src, member in members.items():
            _check_text_member(report, zf, src, member, progress)


def _check_text_member(report: VerifyReport, zf: zipfile.ZipFile, src: str, member: str, progress: bool) -> None:
    label = f"{layout.TEXT_ZIP}:{member}"
    rows = words = bad = 0
    first_bad: tuple[int, str] | None = None
    size = zf.getinfo(member).file_size
    try:
        with (
            zf.open(member) as fh,
            tqdm(total=size, unit="B", unit_scale=True, desc=src, disable=not progress, leave=False) as bar,
        ):
            for lineno, raw in enumerate(fh, 1):
                bar.update(len(raw))
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad += 1
                    if first_bad is None:
                        first_bad = (lineno, f"byte 0x{raw[err.start]:02x} at column {err.start + 1}")
                    continue
                if line.strip():
                    rows += 1
                    words += len(line.split())
    except ZIP_MEMBER_ERRORS as err:  # CRC mismatch, truncated deflate stream, encryption, odd compression
        report.add(
            f"{label}: readable",
            False,
            f"cannot read {member} inside the zip ({err}). Re-download: "
            f"{layout.fetch_command(str(report.data_dir), layout.TEXT_ZIP)}",
        )
        return
    if first_bad is not None:
        report.add(
            f"{label}: UTF-8",
            False,
            f"{bad} line(s) are not valid UTF-8; first at line {first_bad[0]} ({first_bad[1]}). "
            "The release is UTF-8: re-download the zip, or re-encode the file to UTF-8.",
        )
    else:
        report.add(f"{label}: UTF-8", True, f"{rows:,} non-empty lines")
    if rows == 0:
        report.add(f"{label}: not empty", False, f"{member} holds no text lines")
    report.rows.append(SummaryRow(source=src, file=member, rows=rows, words=words))


# ---------------------------------------------------------------- captions (JSON list of strings)


def _check_captions(report: VerifyReport, name: str, severity: str) -> list[str] | None:
    path = _present(report, name, severity)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            captions = json.load(f)
    except OSError as err:
        report.add(f"{name}: JSON", False, f"cannot read {path} ({err})")
        return None
    except UnicodeDecodeError as err:
        report.add(
            f"{name}: JSON",
            False,
            f"not UTF-8 at byte {err.start} ({err.reason}). "
            f"Re-download: {layout.fetch_command(str(report.data_dir), name)}",
        )
        return None
    except json.JSONDecodeError as err:
        report.add(
            f"{name}: JSON",
            False,
            f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno} "
            f"(truncated download?). Re-download: {layout.fetch_command(str(report.data_dir), name)}",
        )
        return None
    if not isinstance(captions, list):
        report.add(f"{name}: JSON", False, f"expected a JSON list of caption strings, got {type(captions).__name__}")
        return None
    report.add(f"{name}: JSON", True, f"list of {len(captions):,} entries")

    not_str = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if not_str:
        kinds = sorted({type(captions[i]).__name__ for i in not_str})
        report.add(
            f"{name}: strings",
            False,
            f"{len(not_str):,} entries are not strings ({', '.join(kinds)}); "
            f"first at index {_indices(not_str)}. Each entry must be one caption string.",
        )
    empty = [i for i, c in enumerate(captions) if isinstance(c, str) and not c.strip()]
    if empty:
        report.add(
            f"{name}: non-empty",
            False,
            f"{len(empty):,} captions are empty or whitespace; first at index "
            f"{_indices(empty)}. They train on nothing but BOS/EOS; consider removing the pairs.",
            "warning",
        )
    if not captions:
        report.add(f"{name}: not empty", False, "the caption list is empty")
    return captions


# ---------------------------------------------------------------- features (.npy, memory-mapped)


def _open_features(report: VerifyReport, name: str, feature_dim: int, severity: str) -> np.memmap | None:
    path = _present(report, name, severity)
    if path is None:
        return None
    refetch = layout.fetch_command(str(report.data_dir), name)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (ValueError, OSError, EOFError) as err:
        report.add(f"{name}: .npy header", False, f"not a readable .npy file ({err}). Re-download: {refetch}")
        return None

    problems = []
    if dtype.kind != "f" or dtype.itemsize not in (2, 4):
        problems.append(f"dtype {dtype} (expected float16 or float32)")
    if len(shape) != 2:
        problems.append(f"{len(shape)}-D shape {shape} (expected (rows, {feature_dim}))")
    elif shape[1] != feature_dim:
        problems.append(f"width {shape[1]} (expected {feature_dim}; pass --feature_dim {shape[1]} if intended)")
    elif shape[0] == 0:
        problems.append("0 rows")
    if problems:
        report.add(f"{name}: shape/dtype", False, f"shape {shape} {dtype}: " + "; ".join(problems))
        return None
    need = offset + math.prod(shape) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        report.add(
            f"{name}: size",
            False,
            f"truncated: {have:,} bytes on disk, the header of shape {shape} {dtype} "
            f"needs {need:,}. Re-download: {refetch}",
        )
        return None
    report.add(f"{name}: shape/dtype", True, f"shape {shape} {dtype}")
    if fortran:
        report.add(
            f"{name}: row-major",
            False,
            "stored in Fortran order: reading one row touches the whole file; "
            "re-save with np.save(path, np.ascontiguousarray(a))",
            "warning",
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


def _row_chunks(feats: np.memmap, rows_per_chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) over the whole array, one block in memory at a time."""
    n, dim = feats.shape
    if not feats.flags.c_contiguous:  # Fortran order: rows are strided, let the memmap gather them
        for start in range(0, n, rows_per_chunk):
            yield start, np.asarray(feats[start : start + rows_per_chunk])
        return
    # Plain reads: touching every page of a memmap would map the whole file (GBs) into resident memory.
    with open(feats.filename, "rb") as f:
        f.seek(feats.offset)
        for start in range(0, n, rows_per_chunk):
            count = min(rows_per_chunk, n - start) * dim
            block = np.fromfile(f, dtype=feats.dtype, count=count)
            if block.size != count:
                raise OSError(f"{feats.filename} ended early at row {start + block.size // dim} (file changed?)")
            yield start, block.reshape(-1, dim)


def _scan_features(report: VerifyReport, name: str, feats: np.memmap, progress: bool) -> SummaryRow:
    n, dim = feats.shape
    chunk = max(1, SCAN_CHUNK_BYTES // (dim * feats.dtype.itemsize))
    stride = max(1, n // STAT_SAMPLE_ROWS)  # statistics use every stride-th row, taken from the scan's blocks
    bad_count = 0
    first_bad: list[int] = []
    picked: list[np.ndarray] = []
    chunks = _row_chunks(feats, chunk)
    for start, block in tqdm(chunks, total=-(-n // chunk), desc=f"scan {name}", disable=not progress, leave=False):
        picked.append(block[(-start) % stride :: stride].astype(np.float64))  # (S_i, D)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            bad_count += len(bad)
            first_bad.extend((bad[: SHOW_INDICES - len(first_bad)] + start).tolist())
    if bad_count:
        fraction = bad_count / n
        broken = fraction > MAX_NONFINITE_FRACTION
        report.add(
            f"{name}: finite",
            False,
            f"{bad_count:,} of {n:,} rows ({fraction:.2%}) hold NaN/inf; "
            f"first at row {_indices(first_bad, bad_count)}. "
            + (
                "More than 1% of rows: the file is likely corrupt or saved with the wrong dtype; re-download it."
                if broken
                else "The loaders drop these rows with their captions (data.nonfinite_features=drop)."
            ),
            "error" if broken else "warning",
        )
    else:
        report.add(f"{name}: finite", True, f"all {n:,} rows finite")

    sample = np.concatenate(picked)  # (S, D)
    sample = sample[np.isfinite(sample).all(axis=1)]
    row = SummaryRow(source="", file=name, rows=n, dim=dim, dtype=str(feats.dtype))
    if len(sample):
        row.mean, row.std = float(sample.mean()), float(sample.std())
        row.l2 = float(np.linalg.norm(sample, axis=1).mean())
        if row.std == 0.0:
            report.add(
                f"{name}: not constant",
                False,
                f"every sampled value equals {row.mean:g}: the features carry no image information",
                "warning",
            )
    return row


# ---------------------------------------------------------------- caption-feature pairs


def _check_pair(
    report: VerifyReport,
    source: str,
    captions_name: str,
    feature_names: Sequence[str],
    feature_dim: int,
    severity: str,
    progress: bool,
) -> None:
    captions = _check_captions(report, captions_name, severity)
    feats = [_open_features(report, f, feature_dim, severity) for f in feature_names]
    if captions is not None:
        words = sum(len(c.split()) for c in captions if isinstance(c, str))
        report.rows.append(SummaryRow(source=f"{source} captions", file=captions_name, rows=len(captions), words=words))
    for name, arr in zip(feature_names, feats, strict=True):
        if arr is not None:
            try:
                row = _scan_features(report, name, arr, progress)
            except OSError as err:  # read error or the file shrank under us
                report.add(f"{name}: readable", False, f"reading the rows failed ({err})")
                continue
            row.source = f"{source} features"
            report.rows.append(row)
    if captions is not None and all(a is not None for a in feats):
        counts = [len(a) for a in feats]
        n_feat = sum(counts)
        parts = " + ".join(f"{c:,} ({n})" for c, n in zip(counts, feature_names, strict=True))
        report.add(
            f"{source}: caption-feature pairs",
            len(captions) == n_feat,
            f"{len(captions):,} captions ({captions_name}) vs {n_feat:,} feature rows = {parts}"
            + (
                ""
                if len(captions) == n_feat
                else ". Row i of the stacked features must belong to caption i: re-download the mismatched file(s)."
            ),
        )


def verify_dataset(
    data_dir: str | Path,
    feature_dim: int = layout.FEATURE_DIM,
    require_local_narratives: bool = False,
    check_local_narratives: bool = True,
    progress: bool = False,
) -> VerifyReport:
    """Run every check on data_dir. Raises DataError only for bad arguments (not a directory, width <= 0).

    Localized Narratives: checked when present (the loaders read them by default), a warning when absent,
    an error when absent and `require_local_narratives`; skipped entirely when `check_local_narratives` is False.
    """
    if feature_dim <= 0:
        raise DataError(f"feature_dim must be positive, got {feature_dim}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory. Fetch the data first: {layout.fetch_command(str(root))}")
    report = VerifyReport(data_dir=root)
    _check_text_zip(report, progress)
    _check_pair(report, "cc3m", layout.CC3M_CAPTIONS, layout.CC3M_FEATURES, feature_dim, "error", progress)
    if check_local_narratives:
        ln_files = (layout.LOCAL_NARR_CAPTIONS, layout.LOCAL_NARR_FEATURES)
        if require_local_narratives or any((root / n).exists() for n in ln_files):
            _check_pair(
                report,
                "local_narr",
                layout.LOCAL_NARR_CAPTIONS,
                (layout.LOCAL_NARR_FEATURES,),
                feature_dim,
                "error",
                progress,
            )
        else:
            report.add(
                "local_narratives: present",
                False,
                f"optional Localized Narratives not found ({', '.join(ln_files)}); train with "
                f"data.use_local_narratives=false, or fetch them: "
                f"python download_babylm_data.py --data_dir {root} --only {' '.join(ln_files)}",
                "warning",
            )
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: VerifyReport) -> str:
    lines = [f"BabyLM multimodal data set in {report.data_dir}", ""]
    lines += [f"  [{c.status:>4}] {c.name}: {c.message}" for c in report.checks]
    if report.rows:
        lines += [
            "",
            f"  {'source':<22} {'file':<34} {'rows':>11} {'words':>12} {'dim':>5} {'dtype':>8} "
            f"{'mean':>8} {'std':>8} {'L2':>8}",
        ]
        for r in report.rows:
            words = "-" if r.words is None else f"{r.words:,}"
            lines.append(
                f"  {r.source:<22} {r.file[-34:]:<34} {r.rows:>11,} {words:>12} {r.dim or '-':>5} {r.dtype or '-':>8} "
                f"{_fmt(r.mean, '.4f'):>8} {_fmt(r.std, '.4f'):>8} {_fmt(r.l2, '.3f'):>8}"
            )
        text = sum(r.words or 0 for r in report.rows if not r.source.endswith("captions"))
        caps = sum(r.words or 0 for r in report.rows if r.source.endswith("captions"))
        lines.append(
            f"  words: {text:,} text + {caps:,} caption = {text + caps:,} "
            f"(BabyLM multimodal budget {BABYLM_WORD_BUDGET:,})"
        )
    lines.append("")
    if report.usable:
        lines.append(f"RESULT: usable ({len(report.checks)} checks, {len(report.warnings)} warning(s))")
    else:
        lines.append(
            f"RESULT: NOT usable: {len(report.errors)} failing check(s): " + "; ".join(c.name for c in report.errors)
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test_dataset_compatibility.py",
        description="Check a BabyLM multimodal data directory: files, shapes, dtypes, counts, NaN/inf, encodings.",
        epilog="Exit status: 0 usable, 1 not usable, 2 usage error.",
    )
    p.add_argument("--data_dir", default="../babylm_dataset", help="data directory (default: %(default)s)")
    p.add_argument("--feature_dim", type=int, default=layout.FEATURE_DIM, help="image feature width (default: 768)")
    ln = p.add_mutually_exclusive_group()
    ln.add_argument(
        "--no_local_narratives",
        action="store_true",
        help="skip Localized Narratives (for runs with data.use_local_narratives=false)",
    )
    ln.add_argument(
        "--require_local_narratives",
        action="store_true",
        help="fail when Localized Narratives are missing (default: a warning)",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars while scanning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.feature_dim <= 0:
        parser.error(f"--feature_dim must be positive, got {args.feature_dim}")
    try:
        report = verify_dataset(
            args.data_dir,
            feature_dim=args.feature_dim,
            require_local_narratives=args.require_local_narratives,
            check_local_narratives=not args.no_local_narratives,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.usable else 1

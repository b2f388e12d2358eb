"""Check that a BabyLM multimodal data directory is complete and readable before training on it.

Every problem becomes a failing check with a message that names the file and says what to do; nothing here
raises on bad data. Feature files are never loaded whole: headers are parsed, rows are read in fixed-size chunks
for the NaN/inf scan and a strided sample of rows gives the statistics.

The verifier and the loaders agree by construction: each rule lives in one function of the loaders' modules and
both call it. Where the text corpus is found and how (`text.locate_text_files`: the zip, an unpacked `train_50M/`,
or flat `.train` files), what a line must be (`text.decode_line`), what a feature file must be
(`features.open_feature_file`, `StackedFeatures`), which caption layouts are read (`features.read_captions`: a list of
strings, of `{"caption": ...}` objects, or an id -> caption object), how captions pair with rows
(`features.pairing_problem`) and what happens to empty captions and NaN/inf rows under `data.nonfinite_features`
(`features.judge_rows`: dropped with a warning, or an error; a source whose every row would be dropped is an error).

Severity: a failing check is an "error" (the loaders would refuse the data), a "warning" (usable, but look at it:
optional Localized Narratives absent, rows the loaders drop) or a "notice" (the directory is a generated sample
world, not BabyLM data).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from bitmar.data import layout
from bitmar.data.corpus import TextFile, decode_line, iter_raw_lines, locate_text_files
from bitmar.data.errors import DataError
from bitmar.data.features import (
    NONFINITE_CHOICES,
    StackedFeatures,
    empty_caption_rows,
    judge_rows,
    non_string_message,
    non_string_rows,
    pairing_problem,
    read_captions,
)

STAT_SAMPLE_ROWS = 4096  # rows in the strided sample behind mean / std / L2
BABYLM_WORD_BUDGET = 100_000_000
SEVERITIES = ("error", "warning", "notice")


@dataclass
class Check:
    name: str
    ok: bool
    message: str
    severity: str = "error"  # "error": not usable; "warning": usable, worth a look; "notice": for information

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return {"error": "FAIL", "warning": "warn", "notice": "note"}[self.severity]


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
    sample_world: bool = False  # the directory is a generated sample world (its manifest vouches for every file)

    @property
    def usable(self) -> bool:
        return all(c.ok or c.severity != "error" for c in self.checks)

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "warning"]

    @property
    def notices(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "notice"]

    def add(self, name: str, ok: bool, message: str, severity: str = "error") -> bool:
        assert severity in SEVERITIES, severity
        self.checks.append(Check(name, ok, message, severity))
        return ok


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


# ---------------------------------------------------------------- sample world


def _check_sample_world(report: VerifyReport) -> None:
    root = report.data_dir
    if not (root / layout.SAMPLE_MANIFEST).exists():
        return
    from bitmar.data.sample import sample_world_status  # only here: the generator's imports are heavy

    try:
        status = sample_world_status(root)
    except DataError as err:
        report.add("sample world", False, f"{err}; delete it if this is real BabyLM data", "warning")
        return
    if status is None:
        return
    m = status.manifest
    what = f"seed {m.get('seed')}, {m.get('num_cc3m')} CC3M-style pairs, {m.get('num_text_lines')} text lines"
    if status.pure:
        report.sample_world = True
        report.add(
            "sample world",
            False,
            f"{root} is a GENERATED SAMPLE WORLD ({what}; written by `download_babylm_data.py --test` or "
            f"data.sample.generate_if_missing; {layout.SAMPLE_MANIFEST} records every file with its sha256), "
            "NOT real BabyLM data: fine for smoke tests and the tiny config, meaningless for BabyLM results. "
            "The real release: python download_babylm_data.py --data_dir ../babylm_dataset",
            "notice",
        )
        return
    parts = []
    if status.foreign:
        parts.append(f"{', '.join(status.foreign)} are not the files it wrote (a real download on top of it?)")
    if status.missing:
        parts.append(f"{', '.join(status.missing[:5])}{' ...' if len(status.missing) > 5 else ''} are missing")
    if not status.manifest.get("complete", True):
        parts.append("its last generation did not finish")
    report.add(
        "sample world",
        False,
        f"{layout.SAMPLE_MANIFEST} marks a generated sample world ({what}), but "
        + "; ".join(parts)
        + ". The directory mixes sample and other files. If the BabyLM files here are a real download, delete the "
        f"sample's leftovers ({layout.EVAL_DIR}/) and train with data.sample.generate_if_missing=false (the sample "
        "world never overwrites files it did not write); keep sample worlds in their own directory "
        f"({layout.SAMPLE_DEFAULT_DIR}).",
        "warning",
    )


# ---------------------------------------------------------------- text-only corpus (train_50M.zip or unpacked)


def _text_label(report: VerifyReport, file: TextFile) -> str:
    if file.member is not None:
        return f"{file.path.name}:{file.member}"
    try:
        return file.path.relative_to(report.data_dir).as_posix()
    except ValueError:
        return str(file.path)


def _check_text(report: VerifyReport, progress: bool) -> None:
    try:
        files = locate_text_files(report.data_dir)  # the loaders' own search: zip, unpacked train_50M/, flat files
    except DataError as err:
        report.add("text corpus: six sources", False, str(err))
        return
    if files[0].member is not None:
        folders = sorted({PurePosixPath(f.member).parent.as_posix() for f in files if f.member})
        where = f"{layout.TEXT_ZIP} at " + ", ".join("the root" if d == "." else f"{d}/" for d in folders)
    else:
        where = "unpacked files in " + ", ".join(sorted({str(f.path.parent) for f in files}))
    report.add("text corpus: six sources", True, f"all six .train files, in {where}")
    for file in files:
        _check_text_file(report, file, progress)


def _text_size(file: TextFile) -> int | None:
    try:
        if file.member is None:
            return file.path.stat().st_size
        with zipfile.ZipFile(file.path) as archive:
            return archive.getinfo(file.member).file_size
    except (OSError, KeyError, ValueError):
        return None


def _check_text_file(report: VerifyReport, file: TextFile, progress: bool) -> None:
    label = _text_label(report, file)
    rows = words = bad = 0
    first_bad: str | None = None
    try:
        with tqdm(
            total=_text_size(file), unit="B", unit_scale=True, desc=file.source, disable=not progress, leave=False
        ) as bar:
            for lineno, raw in iter_raw_lines(file):
                bar.update(len(raw))
                try:
                    line = decode_line(raw, file, lineno)  # the loaders' rule: a line that is not UTF-8 is an error
                except DataError as err:
                    bad += 1
                    first_bad = first_bad or str(err)
                    continue
                if line.strip():
                    rows += 1
                    words += len(line.split())
    except DataError as err:  # CRC mismatch, truncated deflate stream, encryption, odd compression
        report.add(f"{label}: readable", False, str(err))
        return
    if first_bad is not None:
        report.add(f"{label}: UTF-8", False, f"{bad} line(s) are not valid UTF-8; the first: {first_bad}")
    else:
        report.add(f"{label}: UTF-8", True, f"{rows:,} non-empty lines")
    if rows == 0:
        report.add(f"{label}: not empty", False, f"{label} holds no text lines")
    report.rows.append(SummaryRow(source=file.source, file=file.member or label, rows=rows, words=words))


# ---------------------------------------------------------------- captions


def _check_captions(report: VerifyReport, name: str, severity: str) -> list | None:
    path = _present(report, name, severity)
    if path is None:
        return None
    try:
        captions = read_captions(path)  # the loaders' reader: strings, {"caption": ...} objects, id -> caption
    except DataError as err:
        report.add(f"{name}: JSON", False, str(err))
        return None
    report.add(f"{name}: JSON", True, f"{len(captions):,} captions")
    bad = non_string_rows(captions)
    if bad.size:
        report.add(f"{name}: strings", False, non_string_message(path, captions, bad))
    if not captions:
        report.add(f"{name}: not empty", False, f"{path} holds no captions")
    return captions


# ---------------------------------------------------------------- features (.npy, read in chunks)


def _open_features(report: VerifyReport, name: str, feature_dim: int, severity: str) -> StackedFeatures | None:
    path = _present(report, name, severity)
    if path is None:
        return None
    try:
        feats = StackedFeatures([path], feature_dim, width_key="--feature_dim")  # the loaders' checks
    except DataError as err:
        report.add(f"{name}: features", False, str(err))
        return None
    report.add(f"{name}: features", True, f"shape ({len(feats):,}, {feature_dim}) {feats.dtypes[0]}")
    return feats


def _scan_features(name: str, feats: StackedFeatures, progress: bool) -> tuple[SummaryRow, np.ndarray]:
    """(summary row, rows holding NaN/inf) with the loaders' chunked scan; statistics from a strided sample."""
    n = len(feats)
    with tqdm(total=n, unit="rows", desc=f"scan {name}", disable=not progress, leave=False) as bar:
        bad = feats.scan_nonfinite(on_rows=bar.update)
    stride = max(1, n // STAT_SAMPLE_ROWS)
    sample = feats.read(np.arange(0, n, stride)).astype(np.float64)  # (S, D)
    sample = sample[np.isfinite(sample).all(axis=1)]
    row = SummaryRow(source="", file=name, rows=n, dim=feats.feature_dim, dtype=str(feats.dtypes[0]))
    if len(sample):
        row.mean, row.std = float(sample.mean()), float(sample.std())
        row.l2 = float(np.linalg.norm(sample, axis=1).mean())
    return row, bad


# ---------------------------------------------------------------- caption-feature pairs


def _check_pair(
    report: VerifyReport,
    source: str,
    captions_name: str,
    feature_names: Sequence[str],
    feature_dim: int,
    severity: str,
    progress: bool,
    nonfinite: str,
) -> None:
    captions = _check_captions(report, captions_name, severity)
    feats = [_open_features(report, f, feature_dim, severity) for f in feature_names]
    if captions is not None:
        words = sum(len(c.split()) for c in captions if isinstance(c, str))
        report.rows.append(SummaryRow(source=f"{source} captions", file=captions_name, rows=len(captions), words=words))
    bad_rows: list[np.ndarray] = []
    for name, arr in zip(feature_names, feats, strict=True):
        if arr is None:
            continue
        try:
            row, bad = _scan_features(name, arr, progress)
        except (OSError, DataError) as err:  # read error or the file shrank under us
            report.add(f"{name}: readable", False, f"reading the rows failed ({err})")
            return
        row.source = f"{source} features"
        report.rows.append(row)
        if row.std == 0.0:
            report.add(
                f"{name}: not constant",
                False,
                f"every sampled value equals {row.mean:g}: the features carry no image information",
                "warning",
            )
        bad_rows.append(bad)
    if captions is None or any(a is None for a in feats):
        return
    counts = [len(a) for a in feats]  # type: ignore[arg-type]
    paths = [report.data_dir / n for n in feature_names]
    problem = pairing_problem(report.data_dir / captions_name, len(captions), paths, counts)
    parts = " + ".join(f"{c:,} ({n})" for c, n in zip(counts, feature_names, strict=True))
    report.add(
        f"{source}: caption-feature pairs",
        not problem,
        problem or f"{len(captions):,} captions ({captions_name}) vs {sum(counts):,} feature rows = {parts}",
    )
    if problem or non_string_rows(captions).size:
        return  # the loaders stop before judging rows
    offsets = np.cumsum([0, *counts])
    nonfinite_rows = np.concatenate([b + o for b, o in zip(bad_rows, offsets[:-1], strict=True)])
    verdict = judge_rows(
        f"{source} ({captions_name})", len(captions), empty_caption_rows(captions), nonfinite_rows, nonfinite
    )
    if verdict.error:
        report.add(f"{source}: rows", False, verdict.error)
    for message in verdict.warnings:
        report.add(f"{source}: rows", False, message, "warning")
    if not verdict.error and not verdict.warnings:
        report.add(f"{source}: rows", True, f"all {verdict.total:,} rows kept")


def verify_dataset(
    data_dir: str | Path,
    feature_dim: int = layout.FEATURE_DIM,
    require_local_narratives: bool = False,
    check_local_narratives: bool = True,
    progress: bool = False,
    nonfinite: str = "drop",
) -> VerifyReport:
    """Run every check on data_dir. Raises DataError only for bad arguments (not a directory, width <= 0).

    Localized Narratives: checked when present (the loaders read them by default), a warning when absent,
    an error when absent and `require_local_narratives`; skipped entirely when `check_local_narratives` is False.
    `nonfinite` is the run's `data.nonfinite_features`: rows with NaN/inf are reported as the loaders treat them.
    """
    if feature_dim <= 0:
        raise DataError(f"feature_dim must be positive, got {feature_dim}")
    if nonfinite not in NONFINITE_CHOICES:
        raise DataError(f"nonfinite_features must be one of {list(NONFINITE_CHOICES)}, got {nonfinite!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory. Fetch the data first: {layout.fetch_command(str(root))}")
    report = VerifyReport(data_dir=root)
    _check_sample_world(report)
    _check_text(report, progress)
    _check_pair(report, "cc3m", layout.CC3M_CAPTIONS, layout.CC3M_FEATURES, feature_dim, "error", progress, nonfinite)
    if check_local_narratives:
        ln_files = (layout.LOCAL_NARR_CAPTIONS, layout.LOCAL_NARR_FEATURES)
        if require_local_narratives or any((root / n).exists() for n in ln_files):
            _check_pair(
                report,
                "local_narratives",
                layout.LOCAL_NARR_CAPTIONS,
                (layout.LOCAL_NARR_FEATURES,),
                feature_dim,
                "error",
                progress,
                nonfinite,
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
            f"  {'source':<26} {'file':<34} {'rows':>11} {'words':>12} {'dim':>5} {'dtype':>8} "
            f"{'mean':>8} {'std':>8} {'L2':>8}",
        ]
        for r in report.rows:
            words = "-" if r.words is None else f"{r.words:,}"
            lines.append(
                f"  {r.source:<26} {r.file[-34:]:<34} {r.rows:>11,} {words:>12} {r.dim or '-':>5} {r.dtype or '-':>8} "
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
        kind = ": a generated SAMPLE WORLD, not BabyLM data" if report.sample_world else ""
        lines.append(f"RESULT: usable{kind} ({len(report.checks)} checks, {len(report.warnings)} warning(s))")
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
    p.add_argument(
        "--nonfinite_features",
        choices=NONFINITE_CHOICES,
        default="drop",
        help="the run's data.nonfinite_features: rows with NaN/inf are dropped with a warning, or an error "
        "(default: %(default)s)",
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
            nonfinite=args.nonfinite_features,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.usable else 1

"""Memory-mapped image features paired with their captions (CC3M and Localized Narratives).

`StackedFeatures` shows several `.npy` parts as one (N, D) array without copying or loading them: each part is
checked with `np.load(path, mmap_mode="r")` and a global row is routed to its part. Rows come back as float32
whatever the file holds (float16 or float32). A batch is read with its row indices sorted per part, straight from
the file with `os.preadv` (runs of consecutive rows in one call): no page of the file is mapped into the process,
so its resident memory stays flat however many rows it streams (see `StackedFeatures`). Descriptors are opened
lazily in each process, so DataLoader workers open their own.

`CaptionFeatureStore` pairs caption i with feature row i of each source, CC3M (`_1of2` then `_2of2`) followed by
Localized Narratives. Caption files may hold
- a JSON list of strings (the release format),
- a JSON list of objects with a `"caption"` key, or
- a JSON object id -> caption (or id -> {"caption": ...}): ordered by the integer value of the ids when all ids are
  integers, else in file order.
A caption that is not a string is an error naming the file and the index; an empty (or whitespace-only) caption is
dropped with a warning, and so is a feature row holding NaN or inf when `nonfinite="drop"` (`"error"` stops instead).
A source whose every row would be dropped is an error. The scan for NaN/inf is chunked and cached in
`<cache_dir>/feature_scan.json`, keyed by path, size and mtime.

This module owns these rules: `open_feature_file`, `read_captions`, `non_string_rows`, `pairing_problem` and
`judge_rows` are what the loaders apply and what the verifier (`bitmar.data.verify`) reports, so the two agree by
construction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitmar.data import layout
from bitmar.data.corpus import file_lock
from bitmar.data.errors import DataError
from bitmar.fileio import atomic_write_text

logger = logging.getLogger(__name__)

SCAN_CHUNK_ROWS = 32768  # 48 MB of float16 rows per read during the NaN/inf scan
NONFINITE_CHOICES = ("drop", "error")
MANY_NONFINITE_FRACTION = 0.01  # past this share of dropped rows the warning suggests a corrupt file


def _fetch_hint(path: Path) -> str:
    return layout.fetch_command(str(path.parent), path.name)


FEATURE_DTYPES = ("float16", "float32", "float64")  # read as float32 whatever the file holds


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from the .npy header, without touching the data."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        return tuple(shape), bool(fortran), np.dtype(dtype), handle.tell()


def open_feature_file(path: Path, feature_dim: int, width_key: str = "model.vision_encoder_dim") -> np.ndarray:
    """np.load(mmap_mode="r") with the checks a user needs: exists, is a 2-D float .npy of width `feature_dim`
    with at least one row and all the bytes its header promises. Every problem is named at once (DataError).

    `width_key` names the setting that holds `feature_dim` in the caller's world (config key or CLI flag)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing feature file {path}; fetch it with: {_fetch_hint(path)}")
    try:
        shape, _, dtype, offset = _read_npy_header(path)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(
            f"{path} is not a readable .npy file ({err}); it is probably truncated or corrupt. Delete it and "
            f"re-download: {_fetch_hint(path)}"
        ) from err
    problems = []
    if dtype.kind != "f" or dtype.name not in FEATURE_DTYPES:
        problems.append(f"dtype {dtype} (expected float16 or float32 features)")
    if len(shape) != 2:
        problems.append(f"shape {shape} (expected (N, {feature_dim}): one feature vector per row)")
    else:
        if shape[1] != feature_dim:
            problems.append(
                f"feature width {shape[1]}, expected {feature_dim} ({width_key}); use features from the matching "
                f"DINOv2 model or change {width_key}"
            )
        if shape[0] == 0:
            problems.append("0 rows")
    if problems:
        raise DataError(f"{path} has " + "; ".join(problems))
    need = offset + math.prod(shape) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        raise DataError(
            f"{path} is truncated: {have:,} bytes on disk, its header ({shape} {dtype}) needs {need:,}. Delete it "
            f"and re-download: {_fetch_hint(path)}"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(
            f"{path} is not a readable .npy file ({err}); it is probably truncated or corrupt. Delete it and "
            f"re-download: {_fetch_hint(path)}"
        ) from err
    return array


def nonfinite_mask(block: np.ndarray) -> np.ndarray:
    """(rows,) bool: row holds NaN or inf. Checks the exponent bits (all ones), twice as fast as np.isfinite."""
    if block.dtype == np.float16:
        return ((block.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    if block.dtype == np.float32:
        return ((block.view(np.uint32) & 0x7F800000) == 0x7F800000).any(axis=1)
    return ~np.isfinite(block).all(axis=1)


class StackedFeatures:
    """Row-stacked view over `.npy` parts; global row r lives in part p where offsets[p] <= r < offsets[p + 1].

    Each part is validated with `np.load(mmap_mode="r")` (header, shape, dtype, size); rows are then read with
    `os.preadv` into fresh buffers, runs of consecutive rows in one call. Unlike fancy-indexing a memmap this maps
    no pages into the process: on recent kernels a memmap's random access maps whole large folios, and the resident
    size of a process reading random rows climbs to the size of the file. File descriptors are opened lazily per
    process (DataLoader workers open their own; nothing open is ever pickled).
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike], feature_dim: int, width_key: str = "model.vision_encoder_dim"
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.feature_dim = feature_dim
        arrays = [open_feature_file(p, feature_dim, width_key) for p in self.paths]
        self.dtypes = [a.dtype for a in arrays]
        self.data_offsets = [int(a.offset) for a in arrays]  # byte offset of row 0 (after the .npy header)
        self.row_bytes = [a.dtype.itemsize * feature_dim for a in arrays]
        if any(a.dtype.byteorder == ">" or not a.flags.c_contiguous for a in arrays):
            bad = [
                str(p)
                for p, a in zip(self.paths, arrays, strict=True)
                if a.dtype.byteorder == ">" or not a.flags.c_contiguous
            ]
            raise DataError(
                f"{', '.join(bad)}: big-endian or Fortran-ordered .npy files are not supported (a row would not be "
                "contiguous on disk); re-save them as C-ordered native floats: "
                "np.save(path, np.ascontiguousarray(a).astype(a.dtype.newbyteorder('=')))"
            )
        self.offsets = np.cumsum([0, *(a.shape[0] for a in arrays)]).astype(np.int64)
        self._fds: list[int] | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = None  # a worker opens its own descriptors
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        fds = getattr(self, "_fds", None)
        if fds is not None and self._pid == os.getpid():  # never close descriptors inherited from a parent
            for fd in fds:
                os.close(fd)
        self._fds = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _descriptors(self) -> list[int]:
        if self._fds is None or self._pid != os.getpid():
            self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
            self._pid = os.getpid()
        return self._fds

    def memmap(self, part: int) -> np.ndarray:
        """The raw (rows, D) memmap of one part (for sequential access; `read` is the batch path)."""
        return np.load(self.paths[part], mmap_mode="r", allow_pickle=False)

    def _read_part(self, part: int, local_rows: np.ndarray) -> np.ndarray:
        """(len(local_rows), D) rows of one part in the file's dtype; `local_rows` sorted ascending."""
        fd = self._descriptors()[part]
        rb, base = self.row_bytes[part], self.data_offsets[part]
        out = np.empty((local_rows.size, self.feature_dim), dtype=self.dtypes[part])
        view = memoryview(out).cast("B")
        breaks = np.flatnonzero(np.diff(local_rows) != 1) + 1  # runs of consecutive rows: one read each
        starts = np.concatenate([[0], breaks]).tolist()
        stops = np.concatenate([breaks, [local_rows.size]]).tolist()
        for start, stop in zip(starts, stops, strict=True):
            n = os.preadv(fd, [view[start * rb : stop * rb]], base + int(local_rows[start]) * rb)
            if n != (stop - start) * rb:
                raise DataError(f"{self.paths[part]} is shorter than its header says; re-download it")
        return out

    def read(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """(len(rows), D) float32 for global `rows` (any order, repeats allowed), read sorted per part."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.feature_dim), np.float32)
        if rows.size == 0:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"feature row out of range [0, {len(self)})")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        part_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        for p in np.unique(part_of).tolist():
            sel = part_of == p
            out[order[sel]] = self._read_part(p, sorted_rows[sel] - self.offsets[p])
        return out

    def scan_nonfinite(
        self,
        limit: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        on_rows: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Sorted global rows (< limit) holding NaN/inf; whole-part scans are cached in `cache_dir`.

        `on_rows(n)` is called after each scanned chunk of n rows (progress bars)."""
        bad: list[np.ndarray] = []
        cache_path = Path(cache_dir) / "feature_scan.json" if cache_dir is not None else None
        cache: dict[str, Any] = {}
        if cache_path is not None and cache_path.is_file():
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        updated = False
        for p, path in enumerate(self.paths):
            start, stop = int(self.offsets[p]), int(self.offsets[p + 1])
            if limit is not None and start >= limit:
                break
            n_rows = stop - start if limit is None else min(stop, limit) - start
            stat = path.stat()
            key = str(path.resolve())
            entry = cache.get(key)
            whole = n_rows == stop - start
            if whole and entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
                local = np.asarray(entry["nonfinite_rows"], dtype=np.int64)
            else:
                local = self._scan_part(p, n_rows, on_rows)
                if whole and cache_path is not None:
                    cache[key] = {
                        "size": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns,
                        "rows": n_rows,
                        "nonfinite_rows": local.tolist(),
                    }
                    updated = True
            bad.append(local[local < n_rows] + start)
        if updated and cache_path is not None:
            with file_lock(cache_path.with_name(".feature_scan.lock")):
                merged = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
                merged.update(cache)
                atomic_write_text(cache_path, json.dumps(merged))
        return np.concatenate(bad) if bad else np.zeros(0, np.int64)

    def _scan_part(self, part: int, n_rows: int, on_rows: Callable[[int], None] | None = None) -> np.ndarray:
        """Chunked scan: one SCAN_CHUNK_ROWS buffer at a time, never the whole part in memory."""
        found = []
        for start in range(0, n_rows, SCAN_CHUNK_ROWS):
            block = self._read_part(part, np.arange(start, min(n_rows, start + SCAN_CHUNK_ROWS), dtype=np.int64))
            found.append(np.flatnonzero(nonfinite_mask(block)) + start)
            if on_rows is not None:
                on_rows(len(block))
        return np.concatenate(found) if found else np.zeros(0, np.int64)


def read_captions(path: Path) -> list[Any]:
    """The captions of a JSON file in one of the accepted layouts (module docstring), in row order.

    Entries are returned as found (a `{"caption": ...}` object becomes its caption); `non_string_rows` finds the
    entries that are not captions."""
    if not path.is_file():
        raise DataError(f"missing caption file {path}; fetch it with: {_fetch_hint(path)}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); it is probably "
            f"truncated. Delete it and re-download: {_fetch_hint(path)}"
        ) from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 JSON (byte {err.start}); re-download: {_fetch_hint(path)}") from err
    except OSError as err:
        raise DataError(f"cannot read {path} ({err})") from err
    if isinstance(data, dict):
        wrapped = [k for k, v in data.items() if isinstance(v, list)]
        if wrapped:  # {"captions": [...]}: a wrapper, not an id -> caption map
            raise DataError(
                f"{path} holds a JSON object whose entry {wrapped[0]!r} is a list; expected a JSON list of caption "
                'strings (or of {"caption": ...} objects, or an object id -> caption)'
            )
        keys = list(data)
        if all(isinstance(k, str) and k.lstrip("-").isdigit() for k in keys):
            keys.sort(key=int)
        items = [data[k] for k in keys]
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a JSON list of caption strings")
    return [item["caption"] if isinstance(item, dict) and "caption" in item else item for item in items]


def non_string_rows(captions: Sequence[Any]) -> np.ndarray:
    """Indices of entries that are not caption strings (an error: caption i must pair with feature row i)."""
    return np.asarray([i for i, c in enumerate(captions) if not isinstance(c, str)], dtype=np.int64)


def empty_caption_rows(captions: Sequence[Any]) -> np.ndarray:
    """Indices of empty or whitespace-only captions (dropped with their feature rows)."""
    return np.asarray([i for i, c in enumerate(captions) if isinstance(c, str) and not c.strip()], dtype=np.int64)


def _shown(rows: np.ndarray | Sequence[int], limit: int = 5) -> str:
    rows = np.asarray(rows)
    return ", ".join(map(str, rows[:limit].tolist())) + (", ..." if rows.size > limit else "")


def non_string_message(path: Path, captions: Sequence[Any], bad: np.ndarray) -> str:
    kinds = ", ".join(sorted({type(captions[int(i)]).__name__ for i in bad}))
    first = captions[int(bad[0])]
    return (
        f"{path}: {bad.size:,} entries are not caption strings ({kinds}); first at index {_shown(bad)} "
        f'(entry {int(bad[0])} is {str(first)[:60]!r}). Each entry must be a string or a {{"caption": ...}} '
        "object; fix or re-download the file (caption i pairs with feature row i)"
    )


def pairing_problem(captions_path: Path, n_captions: int, feature_paths: Sequence[Path], counts: Sequence[int]) -> str:
    """The message for captions and stacked feature rows of one source that do not pair one to one ('' if they do)."""
    n_rows = int(sum(counts))
    if n_captions == n_rows:
        return ""
    parts = " + ".join(f"{c:,} ({p.name})" for c, p in zip(counts, feature_paths, strict=True))
    return (
        f"{captions_path} holds {n_captions:,} captions but its feature files hold {n_rows:,} feature rows = {parts}; "
        "caption i pairs with feature row i, so the counts must match. Re-download the mismatched file(s): "
        f"{_fetch_hint(captions_path)}"
    )


@dataclass(frozen=True)
class RowVerdict:
    """What happens to the rows of one caption source: `error` stops the run; `warnings` report dropped rows."""

    total: int
    kept: int
    error: str | None
    warnings: tuple[str, ...]


def judge_rows(label: str, total: int, empty: np.ndarray, nonfinite: np.ndarray, policy: str) -> RowVerdict:
    """The row policy of one source (`label`, e.g. 'cc3m (cc_3M_captions.json)'), shared by loaders and verifier.

    `empty` / `nonfinite`: local rows (0..total-1) with an empty caption / a NaN or inf feature value. Empty captions
    are dropped with a warning; NaN/inf rows are dropped with a warning under `policy="drop"` and stop the run under
    `"error"`; a source whose every row would be dropped stops the run too (nothing of it would be trained on)."""
    if policy not in NONFINITE_CHOICES:
        raise DataError(f"data.nonfinite_features={policy!r} is not one of {list(NONFINITE_CHOICES)}")
    empty, nonfinite = np.asarray(empty, np.int64), np.asarray(nonfinite, np.int64)
    dropped = np.union1d(empty, nonfinite) if policy == "drop" else empty
    kept = total - int(dropped.size)
    warns = []
    if nonfinite.size and policy == "error":
        return RowVerdict(
            total,
            kept,
            f"{label}: {nonfinite.size:,} of {total:,} feature rows hold NaN/inf (rows {_shown(nonfinite)}); "
            "data.nonfinite_features=error stops here: re-download the features, or set data.nonfinite_features=drop "
            "to train without these rows",
            (),
        )
    if empty.size:
        warns.append(f"{label}: dropped {empty.size:,} of {total:,} rows with an empty caption (rows {_shown(empty)})")
    if nonfinite.size:
        many = nonfinite.size / max(total, 1) > MANY_NONFINITE_FRACTION
        hint = f"; more than {MANY_NONFINITE_FRACTION:.0%} of the rows: the file may be corrupt, consider a re-download"
        warns.append(
            f"{label}: dropped {nonfinite.size:,} of {total:,} rows whose features hold NaN/inf "
            f"(rows {_shown(nonfinite)}) with their captions (data.nonfinite_features=drop; set it to error to stop "
            "instead)" + (hint if many else "")
        )
    error = None
    if total > 0 and kept == 0:
        error = (
            f"{label}: every one of its {total:,} rows would be dropped ({nonfinite.size:,} with NaN/inf features, "
            f"{empty.size:,} with an empty caption): nothing of it is left to train on. Re-download the files, or "
            "turn the source off (data.use_cc3m / data.use_local_narratives)"
        )
    return RowVerdict(total, kept, error, tuple(warns))


@dataclass(frozen=True)
class CaptionSource:
    """One caption file and the feature parts whose stacked rows pair with it."""

    name: str
    captions: Path
    features: tuple[Path, ...]


def default_sources(
    data_dir: str | os.PathLike, use_cc3m: bool = True, use_local_narratives: bool = True
) -> list[CaptionSource]:
    """CC3M (required when enabled) and Localized Narratives (skipped with a warning when absent)."""
    data_dir = Path(data_dir)
    sources = []
    if use_cc3m:
        sources.append(
            CaptionSource("cc3m", data_dir / layout.CC3M_CAPTIONS, tuple(data_dir / f for f in layout.CC3M_FEATURES))
        )
    if use_local_narratives:
        caps, feats = data_dir / layout.LOCAL_NARR_CAPTIONS, data_dir / layout.LOCAL_NARR_FEATURES
        if caps.is_file() or feats.is_file():  # one without the other is a broken download: the checks say which
            sources.append(CaptionSource("local_narratives", caps, (feats,)))
        else:
            warnings.warn(
                f"Localized Narratives not found in {data_dir} ({caps.name}, {feats.name}); training without them. "
                f"Fetch them with: {layout.fetch_command(str(data_dir), caps.name)}, or set "
                "data.use_local_narratives=false",
                stacklevel=2,
            )
    return sources


class CaptionFeatureStore:
    """Captions and features of one or more sources; index i (0..len-1) runs over the kept rows only.

    `rows` maps a store index to its global raw row (sources stacked in order); dropped rows (NaN/inf features,
    empty captions) and rows past `max_samples` are absent from it.
    """

    def __init__(
        self,
        sources: Sequence[CaptionSource],
        *,
        feature_dim: int = layout.FEATURE_DIM,
        nonfinite: str = "drop",
        cache_dir: str | os.PathLike | None = None,
        max_samples: int | None = None,
    ) -> None:
        if nonfinite not in NONFINITE_CHOICES:
            raise DataError(f"data.nonfinite_features={nonfinite!r} is not one of {list(NONFINITE_CHOICES)}")
        if not sources:
            raise DataError("no caption sources: enable data.use_cc3m or data.use_local_narratives")
        self.sources = list(sources)
        self.feature_dim = feature_dim
        self.features = StackedFeatures([p for s in self.sources for p in s.features], feature_dim)
        self._blob: np.ndarray  # all captions, UTF-8, concatenated
        self._caption_offsets: np.ndarray  # (raw rows + 1,)
        texts: list[str] = []
        starts = [0]
        for source in self.sources:
            captions = read_captions(source.captions)
            counts = self._part_rows(source)
            problem = pairing_problem(source.captions, len(captions), source.features, counts)
            if problem:
                raise DataError(problem)
            bad_types = non_string_rows(captions)
            if bad_types.size:
                raise DataError(non_string_message(source.captions, captions, bad_types))
            texts.extend(captions)
            starts.append(starts[-1] + sum(counts))
        self.source_starts = np.asarray(starts, dtype=np.int64)
        raw_rows = len(texts)
        limit = raw_rows if max_samples is None else min(raw_rows, max_samples)
        keep = np.ones(limit, dtype=bool)

        empty = empty_caption_rows(texts[:limit])
        bad = self.features.scan_nonfinite(limit=limit, cache_dir=cache_dir)
        self.num_nonfinite = int(bad.size)
        self.num_empty = int(empty.size)
        for k, source in enumerate(self.sources):  # the row policy is judged per source, as the verifier does
            lo, hi = int(self.source_starts[k]), min(int(self.source_starts[k + 1]), limit)
            if hi <= lo:
                continue  # past max_samples
            local_empty = empty[(empty >= lo) & (empty < hi)] - lo
            local_bad = bad[(bad >= lo) & (bad < hi)] - lo
            verdict = judge_rows(f"{source.name} ({source.captions.name})", hi - lo, local_empty, local_bad, nonfinite)
            if verdict.error:
                raise DataError(verdict.error)
            for message in verdict.warnings:
                warnings.warn(message, stacklevel=2)
        keep[empty] = False
        keep[bad] = False
        self.rows = np.flatnonzero(keep).astype(np.int64)
        encoded = [t.encode("utf-8") for t in texts[:limit]]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._caption_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.max_samples = max_samples
        logger.info(
            "caption store: %d rows kept of %d (%d empty, %d non-finite) from %s",
            len(self.rows),
            raw_rows,
            self.num_empty,
            self.num_nonfinite,
            ", ".join(s.name for s in self.sources),
        )

    @classmethod
    def from_data_dir(
        cls,
        data_dir: str | os.PathLike,
        *,
        use_cc3m: bool = True,
        use_local_narratives: bool = True,
        feature_dim: int = layout.FEATURE_DIM,
        nonfinite: str = "drop",
        cache_dir: str | os.PathLike | None = None,
        max_samples: int | None = None,
    ) -> CaptionFeatureStore:
        return cls(
            default_sources(data_dir, use_cc3m, use_local_narratives),
            feature_dim=feature_dim,
            nonfinite=nonfinite,
            cache_dir=cache_dir,
            max_samples=max_samples,
        )

    def _part_rows(self, source: CaptionSource) -> list[int]:
        """Rows of each feature part of `source`, in stacking order."""
        first = sum(len(s.features) for s in self.sources[: self.sources.index(source)])
        return np.diff(self.features.offsets[first : first + len(source.features) + 1]).astype(int).tolist()

    def __len__(self) -> int:
        return int(self.rows.size)

    def raw_caption(self, raw_row: int) -> str:
        start, stop = self._caption_offsets[raw_row], self._caption_offsets[raw_row + 1]
        return self._blob[start:stop].tobytes().decode("utf-8")

    def caption(self, i: int) -> str:
        return self.raw_caption(int(self.rows[i]))

    def iter_captions(self, indices: Sequence[int] | np.ndarray | None = None) -> Iterator[str]:
        for i in range(len(self)) if indices is None else indices:
            yield self.caption(int(i))

    def feature(self, i: int) -> np.ndarray:
        """(D,) float32 feature of store index i."""
        return self.features.read([int(self.rows[i])])[0]

    def feature_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(B, D) float32 features of store indices (sorted reads under the hood, returned in the given order)."""
        return self.features.read(self.rows[np.asarray(indices, dtype=np.int64)])

    def source_of(self, i: int) -> str:
        k = int(np.searchsorted(self.source_starts, self.rows[i], side="right") - 1)
        return self.sources[k].name

    def fingerprint(self) -> dict[str, Any]:
        """What determines the kept rows and their captions (keys caches built on top of the store)."""
        files = []
        for source in self.sources:
            for path in (source.captions, *source.features):
                stat = path.stat()
                files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        return {"files": files, "rows": len(self), "max_samples": self.max_samples,
                "nonfinite": self.num_nonfinite, "empty": self.num_empty}  # fmt: skip

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
The scan for NaN/inf is chunked and cached in `<cache_dir>/feature_scan.json`, keyed by path, size and mtime.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitmar.data import layout
from bitmar.data.errors import DataError
from bitmar.data.text import atomic_write_text, file_lock

logger = logging.getLogger(__name__)

SCAN_CHUNK_ROWS = 32768  # 48 MB of float16 rows per read during the NaN/inf scan
NONFINITE_CHOICES = ("drop", "error")


def _fetch_hint(path: Path) -> str:
    return layout.fetch_command(str(path.parent), path.name)


def open_feature_file(path: Path, feature_dim: int) -> np.ndarray:
    """np.load(mmap_mode="r") with the checks a user needs: exists, is a 2-D float .npy of width `feature_dim`."""
    if not path.is_file():
        raise DataError(f"missing feature file {path}; fetch it with: {_fetch_hint(path)}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(
            f"{path} is not a readable .npy file ({err}); it is probably truncated or corrupt. Delete it and "
            f"re-download: {_fetch_hint(path)}"
        ) from err
    if not isinstance(array, np.ndarray):
        raise DataError(
            f"{path} holds {type(array).__name__}, expected a single .npy array of shape (N, {feature_dim})"
        )
    if array.ndim != 2:
        raise DataError(f"{path} has shape {array.shape}, expected (N, {feature_dim}): one feature vector per row")
    if array.dtype.kind != "f":
        raise DataError(f"{path} has dtype {array.dtype}, expected float16 or float32 features")
    if array.shape[1] != feature_dim:
        raise DataError(
            f"{path} has feature width {array.shape[1]}, expected {feature_dim} (model.vision_encoder_dim); "
            "use features from the matching DINOv2 model or change model.vision_encoder_dim"
        )
    return array


def _nonfinite_mask(block: np.ndarray) -> np.ndarray:
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

    def __init__(self, paths: Sequence[str | os.PathLike], feature_dim: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.feature_dim = feature_dim
        arrays = [open_feature_file(p, feature_dim) for p in self.paths]
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
                f"{bad}: big-endian or Fortran-ordered .npy files are not supported; re-save them with np.save"
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

    def scan_nonfinite(self, limit: int | None = None, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
        """Sorted global rows (< limit) holding NaN/inf; whole-part scans are cached in `cache_dir`."""
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
                local = self._scan_part(p, n_rows)
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

    def _scan_part(self, part: int, n_rows: int) -> np.ndarray:
        """Chunked scan: one SCAN_CHUNK_ROWS buffer at a time, never the whole part in memory."""
        found = []
        for start in range(0, n_rows, SCAN_CHUNK_ROWS):
            block = self._read_part(part, np.arange(start, min(n_rows, start + SCAN_CHUNK_ROWS), dtype=np.int64))
            found.append(np.flatnonzero(_nonfinite_mask(block)) + start)
        return np.concatenate(found) if found else np.zeros(0, np.int64)


def read_captions(path: Path) -> list[Any]:
    """The captions of a JSON file in one of the accepted layouts (module docstring), in row order."""
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
    if isinstance(data, dict):
        keys = list(data)
        if all(isinstance(k, str) and k.lstrip("-").isdigit() for k in keys):
            keys.sort(key=int)
        items = [data[k] for k in keys]
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of caption strings")
    return [item["caption"] if isinstance(item, dict) and "caption" in item else item for item in items]


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
            part_rows = self._source_rows(source)
            if len(captions) != part_rows:
                names = ", ".join(p.name for p in source.features)
                raise DataError(
                    f"{source.captions} holds {len(captions)} captions but {names} hold {part_rows} feature rows; "
                    "caption i pairs with feature row i, so the counts must match. Re-download both: "
                    f"{_fetch_hint(source.captions)}"
                )
            for i, caption in enumerate(captions):
                if not isinstance(caption, str):
                    raise DataError(
                        f"{source.captions}: caption {i} is {type(caption).__name__} ({str(caption)[:60]!r}), "
                        "expected a string; fix or re-download the file (caption i pairs with feature row i)"
                    )
            texts.extend(captions)
            starts.append(starts[-1] + part_rows)
        self.source_starts = np.asarray(starts, dtype=np.int64)
        raw_rows = len(texts)
        limit = raw_rows if max_samples is None else min(raw_rows, max_samples)
        keep = np.ones(limit, dtype=bool)

        empty = np.asarray([i for i in range(limit) if not texts[i].strip()], dtype=np.int64)
        if empty.size:
            keep[empty] = False
            warnings.warn(f"dropped {empty.size} empty captions ({self._describe_rows(empty)})", stacklevel=2)
        bad = self.features.scan_nonfinite(limit=limit, cache_dir=cache_dir)
        self.num_nonfinite = int(bad.size)
        self.num_empty = int(empty.size)
        if bad.size:
            what = f"{bad.size} feature rows hold NaN/inf ({self._describe_rows(bad)})"
            if nonfinite == "error":
                raise DataError(f"{what}; re-download the features, or set data.nonfinite_features=drop to skip them")
            keep[bad] = False
            warnings.warn(f"dropped {what}; set data.nonfinite_features=error to stop instead", stacklevel=2)
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

    def _source_rows(self, source: CaptionSource) -> int:
        first = sum(len(s.features) for s in self.sources[: self.sources.index(source)])
        return int(self.features.offsets[first + len(source.features)] - self.features.offsets[first])

    def _describe_rows(self, raw_rows: np.ndarray) -> str:
        """'cc3m rows 3, 17, ...' style description of raw rows, naming their source files."""
        parts = []
        for k, source in enumerate(self.sources):
            lo, hi = self.source_starts[k], self.source_starts[k + 1]
            local = raw_rows[(raw_rows >= lo) & (raw_rows < hi)] - lo
            if local.size:
                shown = ", ".join(map(str, local[:5].tolist())) + (", ..." if local.size > 5 else "")
                parts.append(f"{local.size} in {source.name} ({source.captions.name}) at rows {shown}")
        return "; ".join(parts)

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

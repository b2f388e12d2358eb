"""Feature loader throughput and memory on a CC3M-sized feature file.

    python -m bitmar.bench.loader [--rows 1000000] [--batches N] [--workers 1] [--quick] [--json out.json]

Writes `rows` x 768 float16 features as two `.npy` halves (like CC3M, ~1.5 GB for 1M rows; written in chunks, never
held whole in RAM) plus a caption file into a temp dir, with a few NaN rows, then
1. times the NaN/inf scan (chunked) and the cached re-scan of a second open;
2. iterates `ImageCaptionDataset` + `collate_captions` through a DataLoader (batch 256, `--workers` workers,
   shuffled indices as training draws them) in three variants, side by side:
   - `batched`: the shipped path (`__getitems__`: one sorted `os.preadv` pass per file per batch);
   - `per-item`: the same dataset without `__getitems__` (one random memmap row per sample);
   - `memmap`: batched and sorted, but fancy-indexing `np.load(mmap_mode="r")` arrays instead of `os.preadv`
     (shows why the store reads rows from the file: mapped pages count as resident memory).
3. reports samples/s and the peak resident-memory growth over the baseline (main process + workers, sampled with
   psutil every few batches; a worker's baseline is its size when it started, before it read anything).
Goals: >= 20,000 samples/s with one worker, RSS growth < 300 MB. Captions are pre-tokenized synthetic ids (the
tokenizer is not what is measured).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from bitmar.bench.rows import Goal, Row, Settings, Unavailable, ratio_row, value_row
from bitmar.cli_args import positive_int
from bitmar.data import layout
from bitmar.data.datasets import CaptionTokens, ImageCaptionDataset, collate_captions
from bitmar.data.features import CaptionFeatureStore, CaptionSource, StackedFeatures
from bitmar.fileio import atomic_write_text

GOAL_SAMPLES_PER_S = 20_000
GOAL_RSS_MB = 300
MB = 1 << 20


def write_features(path: Path, rows: int, dim: int, seed: int = 0, nan_rows: Sequence[int] = ()) -> None:
    """A (rows, dim) float16 .npy written chunk by chunk (a random block, varied per chunk: writing stays cheap)."""
    rng = np.random.default_rng(seed)
    chunk = 65536
    base = rng.standard_normal((chunk, dim), dtype=np.float32).astype(np.float16)
    nan_rows = set(nan_rows)
    with open(path, "wb") as handle:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (rows, dim)})
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            block = np.roll(base[:n], start // chunk + 1, axis=1)
            hit = [r - start for r in nan_rows if start <= r < start + n]
            if hit:
                block = block.copy()
                block[hit, 0] = np.nan
            handle.write(block.tobytes())


def make_dataset(root: Path, rows: int, dim: int) -> tuple[list[CaptionSource], list[int]]:
    half = (rows + 1) // 2
    nan_rows = [3, half - 1, half, rows - 1] if rows >= 8 else []
    paths = [root / layout.CC3M_FEATURES[0], root / layout.CC3M_FEATURES[1]]
    write_features(paths[0], half, dim, seed=0, nan_rows=[r for r in nan_rows if r < half])
    write_features(paths[1], rows - half, dim, seed=1, nan_rows=[r - half for r in nan_rows if r >= half])
    captions = root / layout.CC3M_CAPTIONS
    with open(captions, "w", encoding="utf-8") as handle:
        json.dump([f"a photo of item {i}" for i in range(rows)], handle)
    return [CaptionSource("cc3m", captions, tuple(paths))], nan_rows


def synthetic_caption_tokens(n: int, seed: int = 0) -> CaptionTokens:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 24, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(4, 16000, size=int(offsets[-1])).astype(np.uint16)
    return CaptionTokens(tokens, offsets, np.full(n, 5, np.int32))


class _PerItem(Dataset):
    """The caption dataset without `__getitems__`: the DataLoader fetches one random row per sample."""

    def __init__(self, dataset: ImageCaptionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[i]


class _MemmapFeatures(StackedFeatures):
    """The alternative the store does not take: sorted fancy-indexing into np.load(mmap_mode="r") arrays."""

    def read(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        if getattr(self, "_arrays_pid", None) != os.getpid():
            self._arrays = [self.memmap(p) for p in range(len(self.paths))]
            self._arrays_pid = os.getpid()
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.feature_dim), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        part_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        for p in np.unique(part_of).tolist():
            sel = part_of == p
            out[order[sel]] = self._arrays[p][sorted_rows[sel] - self.offsets[p]]
        return out


class _Tokenizer:
    pad_token_id = 0


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def _record_worker_start(pids: Any, rss: Any, worker_id: int) -> None:
    """worker_init_fn: the worker's pid and resident size before it reads anything (its growth baseline)."""
    pids[worker_id] = os.getpid()
    rss[worker_id] = psutil.Process().memory_info().rss


def run_variant(
    dataset: Dataset, batches: int, workers: int, batch_size: int = 256, seed: int = 0, sample_every: int = 8
) -> dict[str, Any]:
    """Iterate `batches` shuffled batches; samples/s and peak RSS growth (main + workers)."""
    main = psutil.Process()
    main_base = _rss(main)
    generator = torch.Generator().manual_seed(seed)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    worker_pids, worker_base = context.Array("q", max(workers, 1)), context.Array("q", max(workers, 1))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        num_workers=workers,
        collate_fn=collate_captions,
        worker_init_fn=functools.partial(_record_worker_start, worker_pids, worker_base) if workers else None,
        multiprocessing_context=context if workers else None,
    )
    peak_main = peak_workers = 0
    samples = 0
    start = None
    it = iter(loader)
    for b in range(batches):
        batch = next(it, None)
        if batch is None:
            break
        if start is None:  # worker start-up is not throughput
            start = time.perf_counter()
        else:
            samples += batch["vision_features"].shape[0]
        if b % sample_every == 0:
            peak_main = max(peak_main, _rss(main) - main_base)
            growth = 0
            for k in range(workers):
                if worker_pids[k]:
                    growth += _rss(psutil.Process(worker_pids[k])) - worker_base[k]
            peak_workers = max(peak_workers, growth)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    del it
    return {
        "batches": b + 1,
        "samples": samples,
        "seconds": elapsed,
        "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        "rss_growth_main_mb": peak_main / MB,
        "rss_growth_workers_mb": peak_workers / MB,
        "rss_growth_mb": (peak_main + peak_workers) / MB,
    }


def run_loader_benchmark(
    rows: int = 1_000_000,
    dim: int = layout.FEATURE_DIM,
    batches: int | None = None,
    workers: int = 1,
    batch_size: int = 256,
    compare_batches: int | None = None,
    tmp_dir: str | None = None,
) -> dict[str, Any]:
    """The whole benchmark; a dict of numbers (see the module docstring). `batches=None`: one full epoch."""
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="bitmar-loader-bench-") as tmp:
        root = Path(tmp)
        main = psutil.Process()
        t0 = time.perf_counter()
        sources, nan_rows = make_dataset(root, rows, dim)
        write_s = time.perf_counter() - t0
        base = _rss(main)
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the planted NaN rows are dropped with a warning, as they should be
            warnings.simplefilter("ignore")
            store = CaptionFeatureStore(sources, feature_dim=dim, cache_dir=root / "cache")
        open_s = time.perf_counter() - t0
        open_growth = (_rss(main) - base) / MB
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CaptionFeatureStore(sources, feature_dim=dim, cache_dir=root / "cache")
        reopen_s = time.perf_counter() - t0
        dataset = ImageCaptionDataset(
            store, _Tokenizer(), max_length=64, caption_tokens=synthetic_caption_tokens(len(store))
        )
        epoch = -(-len(dataset) // batch_size)
        n_main = epoch if batches is None else min(batches, epoch)
        n_compare = min(n_main, compare_batches or n_main)
        results = {"batched": run_variant(dataset, n_main, workers, batch_size)}
        results["per-item"] = run_variant(_PerItem(dataset), n_compare, workers, batch_size)
        memmap_store = copy.copy(store)
        memmap_store.features = _MemmapFeatures(store.features.paths, dim)
        memmap_dataset = copy.copy(dataset)
        memmap_dataset.store = memmap_store
        results["memmap"] = run_variant(memmap_dataset, n_main, workers, batch_size)
    batched = results["batched"]
    return {
        "rows": rows,
        "dim": dim,
        "file_gb": rows * dim * 2 / 1e9,
        "workers": workers,
        "batch_size": batch_size,
        "write_s": write_s,
        "open_with_scan_s": open_s,
        "open_cached_scan_s": reopen_s,
        "open_rss_growth_mb": open_growth,
        "nonfinite_found": store.num_nonfinite,
        "nonfinite_planted": len(nan_rows),
        "variants": results,
        "goal_samples_per_s": GOAL_SAMPLES_PER_S,
        "goal_rss_mb": GOAL_RSS_MB,
        "meets_throughput": batched["samples_per_s"] >= GOAL_SAMPLES_PER_S,
        "meets_memory": batched["rss_growth_mb"] < GOAL_RSS_MB,
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"features: {r['rows']:,} x {r['dim']} float16 in two halves ({r['file_gb']:.2f} GB), "
        f"written in {r['write_s']:.1f}s",
        f"open + NaN/inf scan: {r['open_with_scan_s']:.2f}s (found {r['nonfinite_found']} of {r['nonfinite_planted']} "
        f"planted), cached re-open: {r['open_cached_scan_s']:.2f}s, "
        f"RSS growth at open: {r['open_rss_growth_mb']:.0f} MB",
        f"loader: batch {r['batch_size']}, {r['workers']} worker(s), shuffled indices",
        f"{'variant':<12}{'batches':>9}{'samples/s':>12}{'x batched':>11}{'RSS main MB':>13}{'RSS workers MB':>16}"
        f"{'RSS total MB':>14}",
    ]
    ref = r["variants"]["batched"]["samples_per_s"] or 1.0
    for name, v in r["variants"].items():
        lines.append(
            f"{name:<12}{v['batches']:>9}{v['samples_per_s']:>12,.0f}{v['samples_per_s'] / ref:>11.2f}"
            f"{v['rss_growth_main_mb']:>13.0f}{v['rss_growth_workers_mb']:>16.0f}{v['rss_growth_mb']:>14.0f}"
        )
    b = r["variants"]["batched"]
    lines.append(
        f"goals: >= {r['goal_samples_per_s']:,} samples/s: {'met' if r['meets_throughput'] else 'MISSED'} "
        f"({b['samples_per_s']:,.0f}); RSS growth < {r['goal_rss_mb']} MB: {'met' if r['meets_memory'] else 'MISSED'} "
        f"({b['rss_growth_mb']:.0f} MB)"
    )
    return "\n".join(lines)


def loader_rows(settings: Settings) -> list[Row | Unavailable]:
    """`bench.loader.run_loader_benchmark` repeated (each repeat writes a fresh CC3M-like float16 feature file and
    runs its three loader variants one after the other): batched `os.preadv` reads (the shipped path) against
    per-item memmap rows and against batched memmap fancy-indexing; samples/s and RSS growth of the shipped path."""
    n_rows, batches, compare, repeats = (40_000, 60, 30, 2) if settings.quick else (1_000_000, 600, 300, 3)
    runs = [
        run_loader_benchmark(rows=n_rows, batches=batches, workers=1, compare_batches=compare, tmp_dir=settings.tmp_dir)
        for _ in range(repeats)
    ]

    def values(variant: str, key: str) -> list[float]:
        return [r["variants"][variant][key] for r in runs]

    batched = values("batched", "samples_per_s")
    name = f"loader, {n_rows:,} x 768 float16 ({runs[0]['file_gb']:.2f} GB), batch 256, 1 worker"
    metric = "samples/s A / samples/s B"
    details = {"runs": runs}
    return [
        ratio_row(
            "loader",
            name,
            "batched preadv",
            "per-item memmap",
            metric,
            batched,
            values("per-item", "samples_per_s"),
            None,
            details,
        ),
        ratio_row(
            "loader", name, "batched preadv", "batched memmap", metric, batched, values("memmap", "samples_per_s"), None
        ),
        value_row(
            "loader",
            f"{name}: throughput",
            "batched preadv",
            "samples/s",
            batched,
            Goal(">=", GOAL_SAMPLES_PER_S, f">= {GOAL_SAMPLES_PER_S:,} samples/s"),
            "samples/s",
        ),
        value_row(
            "loader",
            f"{name}: RSS growth",
            "batched preadv",
            "MB (main + worker)",
            values("batched", "rss_growth_mb"),
            Goal("<=", GOAL_RSS_MB, f"<= {GOAL_RSS_MB} MB"),
            "MB",
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitmar.bench.loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=1_000_000, help="feature rows (default 1,000,000)")
    parser.add_argument("--batches", type=positive_int, default=None, help="batches per variant (default: one epoch)")
    parser.add_argument("--compare-batches", type=positive_int, default=600, help="batches of the per-item variant")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    parser.add_argument("--quick", action="store_true", help="200,000 rows, 300 batches per variant")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary feature files go (default: system tmp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result dict as JSON")
    args = parser.parse_args(argv)
    rows, batches = (200_000, 300) if args.quick else (args.rows, args.batches)
    result = run_loader_benchmark(
        rows=rows, batches=batches, workers=args.workers, compare_batches=args.compare_batches, tmp_dir=args.tmp_dir
    )
    print(format_report(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Download the BabyLM multimodal release from OSF (project ad7qg, folder multimodal_data/).

The listing and the HTTP rules (https only, checked redirects, which failures are transient) live in
`bitmar.data.osf`; this module fetches, resumes and verifies the files, and holds the command line. Its public
names (`DownloadError`, `RemoteFile`, `list_remote_files`, `check_url`, ...) are re-exported here.

Each file streams into `<name>.part`; an interrupted run resumes it with an HTTP Range request (a server
that ignores Range and answers 200 restarts the file), and the `.part` file is renamed to its final name only
when it is complete: its size matches the listing (or, when the listing has no size, the size the server declared
in Content-Length / Content-Range) and its md5 / sha256 match the hashes OSF lists (`attributes.extra.hashes`).
A body whose completeness nothing can confirm (no size, no hash, no length) is refused and kept as `.part`.
A file already in place counts as complete only when its size and hashes match the listing: a same-size file with
other content is moved aside to `<name>.corrupt` and downloaded again (the `.corrupt` copy is deleted once the new
file verifies). A download whose hash does not match is deleted and refused with the command that fetches it again.
Transient failures (timeouts, dropped connections, HTTP 408/425/429/5xx) are retried a bounded number of times with
exponential backoff; everything else fails at once with a message naming the URL, the status and what to do.

Only `https://` links are followed (plain `http://` on loopback hosts only: the tests' fake OSF server), and a
listing with unsafe or duplicate names is refused before anything is written (`bitmar.data.osf`).

`--test` writes the built-in sample world in the same layout instead (no network), by default into
`data/babylm_sample` (the tiny config's data_dir), never into the release's directory.
Standard library only (urllib), so downloading needs nothing beyond the base requirements.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import sys
import time
import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bitmar.cli_args import non_negative_int, positive_int
from bitmar.data import layout
from bitmar.data.errors import DataError
from bitmar.data.osf import (  # noqa: F401  (re-exported: users import the download's names from here)
    HASH_ALGORITHMS,
    MAX_LISTING_PAGES,
    NETWORK_ERRORS,
    OSF_PROJECT_URL,
    TRANSIENT_HTTP,
    USER_AGENT,
    DownloadError,
    RemoteFile,
    TransientError,
    backoff_sleep,
    check_name,
    check_url,
    human_size,
    list_remote_files,
    log,
    open_url,
)

CHUNK_BYTES = 1 << 20
DEFAULT_DATA_DIR = "../babylm_dataset/"
DEFAULT_SAMPLE_DIR = layout.SAMPLE_DEFAULT_DIR  # --test: its own directory, never the release's


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """'bytes START-END/TOTAL' -> (START, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if m is None:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _fetch_once(remote: RemoteFile, part: Path, *, timeout: float, progress: bool) -> int | None:
    """One HTTP request appending to (or restarting) `part`; returns the whole file's size as the server declared it
    (Content-Range total, or Content-Length of a full answer), None when it declared none.
    Raises TransientError when the stream ends before the declared length."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    what = f"downloading {remote.name}"
    try:
        resp = open_url(remote.url, headers, timeout, what)
    except urllib.error.HTTPError as err:  # 416: nothing at or past our offset
        m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", err.headers.get("Content-Range") or "")  # RFC 9110 form
        total = int(m.group(1)) if m else None
        raise DownloadError(
            f"{remote.name}: the server has no bytes past {offset} ({part.name} so far; server size "
            f"{human_size(total)}) but the OSF listing says {human_size(remote.size)} ({remote.size} bytes).\n"
            f"The file on the server is shorter than listed. Delete {part} and rerun to start over; "
            f"if it persists, report it ({OSF_PROJECT_URL})."
        ) from err

    with resp:
        length_header = resp.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if resp.status == 206:
            content_range = _parse_content_range(resp.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                part.unlink(missing_ok=True)  # bytes for another offset cannot be appended
                raise TransientError(
                    f"{remote.name}: server answered the resume at byte {offset} with "
                    f"Content-Range {resp.headers.get('Content-Range')!r}; restarting the file"
                )
            mode = "ab"
            declared = content_range[1]
        else:
            if offset:
                log(f"{remote.name}: server ignored the resume request (HTTP {resp.status}); restarting from byte 0")
                offset = 0
            mode = "wb"
            declared = length
        total = remote.size if remote.size is not None else (offset + length if length is not None else None)
        received = 0
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=remote.name,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while chunk := resp.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except NETWORK_ERRORS as err:
                raise TransientError(f"{remote.name}: connection lost after {offset + received} bytes ({err})") from err
    if length is not None and received < length:
        raise TransientError(f"{remote.name}: connection closed after {received} of {length} bytes of the response")
    return declared


def file_digests(
    path: Path, algorithms: Sequence[str], on_bytes: Callable[[int], None] | None = None
) -> dict[str, str]:
    """Hex digests of `path` for each algorithm, in one streamed pass."""
    hashers = {a: hashlib.new(a, usedforsecurity=False) for a in algorithms}
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            for h in hashers.values():
                h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


def hash_mismatch(remote: RemoteFile, path: Path, progress: bool = False) -> str | None:
    """'sha256 abc… (listed def…)' when `path` does not hold what the listing's hashes say; None when it matches
    (or the listing gives no hash)."""
    if not remote.hashes:
        return None
    size = path.stat().st_size
    with tqdm(
        total=size, unit="B", unit_scale=True, desc=f"verify {remote.name}", disable=not progress, leave=False
    ) as bar:
        got = file_digests(path, list(remote.hashes), bar.update)
    bad = [f"{a} {got[a]} (listed {remote.hashes[a]})" for a in remote.hashes if got[a] != remote.hashes[a]]
    return ", ".join(bad) or None


def _refetch_command(remote: RemoteFile, data_dir: Path) -> str:
    return f"python download_babylm_data.py --data_dir {data_dir} --only {remote.name}"


def download_file(
    remote: RemoteFile,
    data_dir: str | os.PathLike[str],
    *,
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 2.0,
    progress: bool = True,
) -> Path:
    """Fetch one file into data_dir (resuming `<name>.part`) and verify it; returns the final path."""
    data_dir = Path(data_dir)
    final = data_dir / check_name(remote.name, "the download request")
    part = final.with_name(final.name + ".part")
    aside = final.with_name(final.name + ".corrupt")
    if final.exists() and not final.is_file():
        raise DataError(f"{final} exists and is not a file; move it away and rerun.")
    if final.is_file():
        have = final.stat().st_size
        if remote.size is not None and have != remote.size:  # kept until the new copy is complete (os.replace)
            log(f"{remote.name}: the existing file has {have} bytes, the listing says {remote.size}; downloading again")
        elif remote.size is None and not remote.hashes:
            log(
                f"{remote.name}: the listing gives no size and no hash to check the existing file by; downloading again"
            )
        else:
            mismatch = hash_mismatch(remote, final, progress)
            if mismatch is None:
                what = human_size(have) + (f", {'/'.join(remote.hashes)} verified" if remote.hashes else "")
                log(f"{remote.name}: already complete ({what}), skipped")
                return final
            # Same size, other bytes: not complete. Out of the way (not deleted) until a verified copy replaces it.
            os.replace(final, aside)
            log(
                f"{remote.name}: the existing file does not match the OSF listing ({mismatch}); moved to {aside.name} "
                "and downloading it again (the .corrupt copy is deleted once the new file verifies)"
            )

    failures = 0
    fetched = False
    while True:
        have = part.stat().st_size if part.exists() else 0
        if remote.size is not None and have > remote.size:
            log(f"{remote.name}: {part.name} holds {have} bytes, more than the listed {remote.size}; starting over")
            part.unlink()
            have = 0
        if remote.size is not None and have == remote.size and part.exists():
            expected: int | None = remote.size
        else:
            try:
                declared = _fetch_once(remote, part, timeout=timeout, progress=progress)
                fetched = True
            except TransientError as err:
                failures += 1
                if failures > retries:
                    kept = f"{part.name} ({part.stat().st_size} bytes) is kept, " if part.exists() else ""
                    raise DownloadError(
                        f"{err}\nGave up on {remote.name} after {failures} attempts; {kept}rerun the same command to "
                        "resume"
                    ) from err
                log(f"retrying ({failures}/{retries}): {err}")
                backoff_sleep(failures, backoff)
                continue
            expected = remote.size if remote.size is not None else declared
            have = part.stat().st_size
            if expected is not None and have > expected:
                part.unlink()
                raise DownloadError(
                    f"{remote.name}: the server sent {have} bytes but "
                    + (f"the OSF listing says {remote.size}" if remote.size is not None else f"declared {expected}")
                    + ". The listing may have changed while downloading; rerun the same command."
                )
            if expected is not None and have < expected:
                failures += 1
                err_text = f"{remote.name}: the response ended at {have} of {expected} bytes"
                if failures > retries:
                    raise DownloadError(
                        f"{err_text}\nGave up on {remote.name} after {failures} attempts; {part.name} ({have} bytes) "
                        "is kept, rerun the same command to resume"
                    )
                log(f"retrying ({failures}/{retries}): {err_text}")
                backoff_sleep(failures, backoff)
                continue
        if expected is None and not remote.hashes:
            raise DownloadError(
                f"{remote.name}: neither the OSF listing (no size, no hash) nor the server (no Content-Length) says "
                f"how long the file is, so a cut-off body cannot be told from a complete one. {part.name} "
                f"({part.stat().st_size} bytes) is kept but not used; rerun later (the listing usually says), or "
                f"check the file by hand and rename it to {remote.name} at your own risk."
            )
        mismatch = hash_mismatch(remote, part, progress)
        if mismatch is None:
            break
        part.unlink()  # a complete body with wrong bytes: resuming from it cannot help
        if not fetched:  # a leftover .part from an earlier run: start over once
            log(f"{remote.name}: {part.name} does not match the OSF listing ({mismatch}); starting over")
            continue
        raise DownloadError(
            f"{remote.name}: the downloaded file does not match the hash the OSF listing gives ({mismatch}). It is "
            f"deleted, not kept as {remote.name}. The transfer was damaged or the file on OSF changed; download it "
            f"again with: {_refetch_command(remote, data_dir)}\nIf it fails again, report it ({OSF_PROJECT_URL})."
        )

    size = part.stat().st_size
    # Not fileio.atomic_file: `<name>.part` is the resume protocol (a fixed name the next run continues from).
    os.replace(part, final)
    aside.unlink(missing_ok=True)
    verified = f", {'/'.join(remote.hashes)} verified" if remote.hashes else ""
    log(f"{remote.name}: done ({human_size(size)}{verified})")
    return final


def select_files(files: Sequence[RemoteFile], only: Sequence[str] | None) -> list[RemoteFile]:
    """The files named by --only (all when None); unknown names fail listing the available ones."""
    if not only:
        return list(files)
    by_name = {f.name: f for f in files}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise DataError(
            f"--only: {', '.join(unknown)} not in the OSF folder `{layout.OSF_FOLDER}`. Available: {', '.join(by_name)}"
        )
    return [by_name[n] for n in dict.fromkeys(only)]


def _prepare_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data_dir {data_dir} exists and is not a directory; pass a directory path.")
    data_dir.mkdir(parents=True, exist_ok=True)


def download_dataset(
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
    only: Sequence[str] | None = None,
    *,
    base_url: str = layout.OSF_API_BASE,
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 2.0,
    progress: bool = True,
) -> list[Path]:
    """Download the release (or the files in `only`) into data_dir; returns the final paths."""
    data_dir = Path(data_dir)
    files = select_files(list_remote_files(base_url, timeout=timeout, retries=retries, backoff=backoff), only)
    _prepare_dir(data_dir)

    # Fail before hours of downloading when the disk cannot hold the rest.
    def missing_bytes(f: RemoteFile) -> int:
        final, part = data_dir / f.name, data_dir / (f.name + ".part")
        if f.size is None or (final.is_file() and final.stat().st_size == f.size):
            return 0
        return max(f.size - (part.stat().st_size if part.is_file() else 0), 0)

    need = sum(missing_bytes(f) for f in files)
    free = shutil.disk_usage(data_dir).free
    if need > free:
        raise DownloadError(
            f"{data_dir} has {human_size(free)} free but the download needs {human_size(need)} more; "
            "free space or pass another --data_dir (or --only a subset)."
        )
    return [
        download_file(f, data_dir, timeout=timeout, retries=retries, backoff=backoff, progress=progress) for f in files
    ]


def format_listing(files: Sequence[RemoteFile]) -> str:
    width = max(len(f.name) for f in files)
    lines = [
        f"{f.name:<{width}}  {human_size(f.size):>10}  {f.size if f.size is not None else '?':>13} bytes" for f in files
    ]
    total = sum(f.size or 0 for f in files)
    lines.append(f"{'total':<{width}}  {human_size(total):>10}  {total:>13} bytes")
    return "\n".join(lines)


def write_sample(
    data_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_cc3m: int | None = None,
    num_local_narratives: int | None = None,
    num_text_lines: int | None = None,
    num_novel_episodes: int | None = None,
    feature_dim: int = layout.FEATURE_DIM,
    dtype: str = "float16",
    overwrite: bool = False,
) -> dict[str, Any]:
    """The built-in sample world in the official layout (no network); returns the generator's summary."""
    import numpy as np

    from bitmar.config import SampleDataConfig
    from bitmar.data.sample import generate_sample_dataset

    data_dir = Path(data_dir)
    _prepare_dir(data_dir)
    cfg = SampleDataConfig(seed=seed)
    for key, value in (
        ("num_cc3m", num_cc3m),
        ("num_local_narratives", num_local_narratives),
        ("num_text_lines", num_text_lines),
        ("num_novel_episodes", num_novel_episodes),
    ):
        if value is not None:
            setattr(cfg, key, value)
    # The generator refuses a directory holding real BabyLM files unless overwrite is set.
    return generate_sample_dataset(data_dir, cfg, feature_dim=feature_dim, dtype=np.dtype(dtype), overwrite=overwrite)


def _finite(text: str, minimum: float, inclusive: bool, want: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0 (nan, inf, 0 and negatives are usage errors, exit 2)."""
    return _finite(text, 0.0, False, "a finite number of seconds > 0")


def non_negative_seconds(text: str) -> float:
    return _finite(text, 0.0, True, "a finite number of seconds >= 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_babylm_data.py",
        description=f"Download the BabyLM multimodal data ({OSF_PROJECT_URL}, folder {layout.OSF_FOLDER}/), "
        "or write the built-in sample data set with --test.",
    )
    p.add_argument(
        "--data_dir",
        help=f"where the files go (default: {DEFAULT_DATA_DIR}; with --test: {DEFAULT_SAMPLE_DIR}, the tiny config's "
        "data_dir, so a sample world never lands in the release's directory)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the OSF listing with sizes and exit")
    mode.add_argument("--test", action="store_true", help="write the small sample data set (seconds, no network)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="download only these files (names as in --list)")
    p.add_argument(
        "--base_url",
        default=layout.OSF_API_BASE,
        help="OSF API base URL, https:// (http:// only for a server on this machine) (default: %(default)s)",
    )
    p.add_argument("--retries", type=non_negative_int, default=4, help="retries per file on transient errors")
    p.add_argument(
        "--timeout", type=positive_seconds, default=60.0, help="seconds without data before a request fails (> 0)"
    )
    p.add_argument(
        "--backoff", type=non_negative_seconds, default=2.0, help="first retry delay in seconds (doubles each retry)"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    s = p.add_argument_group("sample data set (--test)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="world seed (>= 0)")
    s.add_argument("--num_cc3m", type=positive_int, help="CC3M-style image-caption pairs (default: config default)")
    s.add_argument("--num_local_narratives", type=positive_int, help="Localized-Narratives-style pairs")
    s.add_argument("--num_text_lines", type=positive_int, help="lines over the six text-only .train files")
    s.add_argument("--num_novel_episodes", type=positive_int, help="held-out one-shot episodes")
    s.add_argument("--feature_dim", type=positive_int, default=layout.FEATURE_DIM, help="image feature width")
    s.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="feature dtype")
    s.add_argument("--overwrite", action="store_true", help="replace BabyLM files already in --data_dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 done, 1 download failed (network/server), 2 bad request (arguments, names, paths)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.test and args.only:
        parser.error("--only selects files to download; it has no effect with --test")
    if args.overwrite and not args.test:
        parser.error("--overwrite only applies to --test (downloads resume and skip complete files)")
    if args.data_dir is None:
        args.data_dir = DEFAULT_SAMPLE_DIR if args.test else DEFAULT_DATA_DIR
    if not args.data_dir.strip():
        parser.error("--data_dir is empty: it would write into the current directory; name a directory")
    if not args.test:
        try:
            check_url(args.base_url, "--base_url")
        except DownloadError as err:
            parser.error(str(err))
    net = {"timeout": args.timeout, "retries": args.retries, "backoff": args.backoff}
    try:
        if args.test:
            start = time.perf_counter()
            summary = write_sample(
                args.data_dir,
                seed=args.seed,
                num_cc3m=args.num_cc3m,
                num_local_narratives=args.num_local_narratives,
                num_text_lines=args.num_text_lines,
                num_novel_episodes=args.num_novel_episodes,
                feature_dim=args.feature_dim,
                dtype=args.dtype,
                overwrite=args.overwrite,
            )
            print(
                f"sample data set written to {args.data_dir} in {time.perf_counter() - start:.1f} s "
                f"({summary['text_words']:,} text words, {summary['caption_words']:,} caption words):"
            )
            for name in layout.ALL_FILES:
                print(f"  {name:<34} {human_size((Path(args.data_dir) / name).stat().st_size):>10}")
            print(f"  {layout.EVAL_DIR + '/':<34} evaluation sets of the sample world")
        elif args.list:
            print(format_listing(list_remote_files(args.base_url, **net)))
            return 0
        else:
            paths = download_dataset(
                args.data_dir, args.only, base_url=args.base_url, progress=not args.no_progress, **net
            )
            print(f"{len(paths)} file(s) complete in {args.data_dir}")
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; .part files are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"next: python test_dataset_compatibility.py --data_dir {args.data_dir}")
    return 0

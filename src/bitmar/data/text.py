"""The text-only BabyLM corpus: reading, cleaning, a cached token array and fixed-length LM blocks.

Where the six `<source>.train` files are looked for, in order:
1. `<data_dir>/train_50M.zip`: any member whose file name is `<source>.train` (the release unpacks into
   `train_50M/<source>.train`; a flat zip works too; `__MACOSX/` and `._*` entries are ignored);
2. the unpacked folder `<data_dir>/train_50M/<source>.train`;
3. `<data_dir>/<source>.train`.

Lines must be UTF-8: a line that is not stops with a `DataError` naming the file and line number (silently
replacing bytes would train on mojibake). With `clean=True` (`data.clean_text`), CHAT speaker labels (`*CHI:\\t`),
Switchboard labels (`A:\\t`), dependent tiers (`%mor:\\t...`), CHAT headers (`@Begin`) and `= = = title = = =` headers
are removed and blank lines dropped.

Tokens: every kept line becomes BOS + tokens + EOS (the format the evaluation scores: `<s> sentence`). The token
stream of all sources, in the order of `data.text_sources`, is written once to `<cache_dir>/text_tokens-<fp>.npy`
(uint16, or uint32 for vocabularies over 65,536) and memory-mapped afterwards. The fingerprint `fp` hashes the
input files (names, sizes, mtimes), the tokenizer definition, the cleaning flag and the token cap, so any change
re-tokenizes; a `.json` next to the array holds the fingerprint and word/line/token counts per source.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bitmar import fileio
from bitmar.data import layout
from bitmar.data.errors import DataError
from bitmar.data.tokenizer import encode_batch, tokenizer_fingerprint
from bitmar.fileio import atomic_write_text  # noqa: F401  (re-exported for the data modules)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_BATCH_LINES = 8192

_SPEAKER = re.compile(r"^(\*[A-Za-z0-9_]+:[ \t]+|[A-Z]:\t)")  # "*CHI:\t", "*MOT: ", "A:\t" (Switchboard: tab only)
_DEPENDENT_TIER = re.compile(r"^%[A-Za-z]+:")  # "%mor:", "%gra:"
_CHAT_HEADER = re.compile(r"^@[A-Za-z]")  # "@Begin", "@Participants:"
_TITLE = re.compile(r"^=( =)+ .*=( =)*$")  # "= = = childes_001.cha = = ="


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on `path`: ranks/processes building the same cache take turns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def clean_line(line: str) -> str | None:
    """The utterance of one corpus line without speaker labels, or None for a line that holds no utterance."""
    text = line.strip()
    if not text or _DEPENDENT_TIER.match(text) or _CHAT_HEADER.match(text) or _TITLE.match(text):
        return None
    text = _SPEAKER.sub("", text).strip()
    return text or None


def count_words(lines: Iterator[str] | Sequence[str]) -> int:
    """Whitespace-separated words (the BabyLM budget counts words, not tokens)."""
    return sum(len(line.split()) for line in lines)


@dataclass(frozen=True)
class TextFile:
    """One `<source>.train` file, inside the zip (`member` set) or on disk."""

    source: str
    path: Path  # the zip or the .train file
    member: str | None = None

    @property
    def display(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def identity(self) -> dict[str, Any]:
        stat = self.path.stat()
        return {"source": self.source, "path": str(self.path.resolve()), "member": self.member,
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}  # fmt: skip


def _bad_zip(path: Path, data_dir: Path, err: Exception) -> DataError:
    return DataError(
        f"{path} is not a readable zip archive ({err}); it is probably truncated or corrupt. Delete it and "
        f"re-download: {layout.fetch_command(str(data_dir), layout.TEXT_ZIP)}"
    )


def locate_text_files(data_dir: str | os.PathLike, sources: Sequence[str] = layout.TEXT_SOURCES) -> list[TextFile]:
    """Find the `.train` file of every source (see the module docstring for the search order)."""
    data_dir = Path(data_dir)
    unknown = [s for s in sources if s not in layout.TEXT_SOURCES]
    if unknown:
        raise DataError(f"data.text_sources holds unknown sources {unknown}; valid: {list(layout.TEXT_SOURCES)}")
    if not sources:
        raise DataError(f"data.text_sources is empty; list at least one of {list(layout.TEXT_SOURCES)}")
    zip_path = data_dir / layout.TEXT_ZIP
    if zip_path.is_file():
        try:
            with zipfile.ZipFile(zip_path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise _bad_zip(zip_path, data_dir, err) from err
        found = []
        for source in sources:
            matches = [
                n for n in names
                if PurePosixPath(n).name == f"{source}.train" and "__MACOSX" not in n
                and not PurePosixPath(n).name.startswith("._")
            ]  # fmt: skip
            if len(matches) != 1:
                what = "no member" if not matches else f"{len(matches)} members ({matches})"
                raise DataError(
                    f"{zip_path} has {what} named {source}.train (members: {names[:10]}); re-download it: "
                    f"{layout.fetch_command(str(data_dir), layout.TEXT_ZIP)}"
                )
            found.append(TextFile(source, zip_path, matches[0]))
        return found
    found = []
    for source in sources:
        candidates = [data_dir / Path(layout.TEXT_ZIP).stem / f"{source}.train", data_dir / f"{source}.train"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise DataError(
                f"text source '{source}' not found: looked for {zip_path} and {' and '.join(map(str, candidates))}. "
                f"Fetch it with: {layout.fetch_command(str(data_dir), layout.TEXT_ZIP)}"
            )
        found.append(TextFile(source, path))
    return found


def iter_file_lines(file: TextFile, clean: bool = True) -> Iterator[str]:
    """The lines of one source (cleaned when `clean`); non-UTF-8 bytes raise a DataError with the line number."""
    with contextlib.ExitStack() as stack:
        if file.member is not None:
            try:
                archive = stack.enter_context(zipfile.ZipFile(file.path))
                stream = stack.enter_context(archive.open(file.member))
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise _bad_zip(file.path, file.path.parent, err) from err
        else:
            stream = stack.enter_context(open(file.path, "rb"))
        lineno = 0
        while True:
            try:
                raw = stream.readline()
            except (zipfile.BadZipFile, OSError, EOFError) as err:  # CRC mismatch or truncated member
                raise _bad_zip(file.path, file.path.parent, err) from err
            if not raw:
                break
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{file.display}: line {lineno} is not valid UTF-8 (byte {err.start}: {raw[:80]!r}). BabyLM text "
                    "is UTF-8: re-download the file, or convert it (e.g. `iconv -f latin1 -t utf-8`)"
                ) from err
            line = line.rstrip("\r\n")
            if clean:
                kept = clean_line(line)
                if kept is not None:
                    yield kept
            elif line.strip():
                yield line


def iter_text_lines(files: Sequence[TextFile], clean: bool = True) -> Iterator[str]:
    for file in files:
        yield from iter_file_lines(file, clean)


@dataclass
class TextTokens:
    """The cached token stream (memory-mapped) and its per-source counts."""

    path: Path
    meta: dict[str, Any]

    def array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_words(self) -> int:
        return sum(s["words"] for s in self.meta["sources"].values())


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def text_fingerprint(files: Sequence[TextFile], tokenizer: Any, clean: bool, max_tokens: int | None) -> str:
    key = {
        "format": CACHE_FORMAT,
        "files": [f.identity() for f in files],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "clean": clean,
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


def build_token_cache(
    data_dir: str | os.PathLike,
    tokenizer: Any,
    cache_dir: str | os.PathLike,
    sources: Sequence[str] = layout.TEXT_SOURCES,
    clean: bool = True,
    max_tokens: int | None = None,
) -> TextTokens:
    """Tokenize the text corpus once into `<cache_dir>/text_tokens-<fp>.npy`; later calls memory-map it."""
    files = locate_text_files(data_dir, sources)
    fp = text_fingerprint(files, tokenizer, clean, max_tokens)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"text_tokens-{fp[:16]}.npy"
    meta_path = path.with_suffix(".json")
    with file_lock(cache_dir / ".text_tokens.lock"):
        if meta_path.is_file() and path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("fingerprint") == fp:
                logger.info("text tokens: reusing %s (%d tokens)", path, meta["num_tokens"])
                return TextTokens(path, meta)
        logger.info("text tokens: tokenizing %d sources into %s", len(files), path)
        meta = _tokenize_to(path, files, tokenizer, clean, max_tokens)
        meta["fingerprint"] = fp
        atomic_write_text(meta_path, json.dumps(meta, indent=2))  # written last: marks the cache complete
    return TextTokens(path, meta)


def _chunks(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize_to(
    path: Path, files: Sequence[TextFile], tokenizer: Any, clean: bool, max_tokens: int | None
) -> dict[str, Any]:
    """Stream the corpus through the tokenizer into a raw temp file, then wrap it as `path` (.npy), atomically."""
    dtype = _token_dtype(len(tokenizer))
    budget = float("inf") if max_tokens is None else max_tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict[str, int]] = {}
    total = 0
    fd, raw_tmp = fileio.mkstemp(dir=path.parent, prefix=".text_tokens.", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as raw:
            for file in files:
                if total >= budget:
                    break
                counts = {"lines": 0, "words": 0, "tokens": 0}
                for batch in _chunks(iter_file_lines(file, clean), _BATCH_LINES):
                    for line, seq in zip(batch, encode_batch(tokenizer, batch), strict=True):
                        seq = seq[: int(min(len(seq), budget - total))]
                        if not seq:
                            break
                        raw.write(np.asarray(seq, dtype=dtype).tobytes())
                        counts["lines"] += 1
                        counts["words"] += len(line.split())
                        counts["tokens"] += len(seq)
                        total += len(seq)
                    if total >= budget:
                        break
                sources[file.source] = counts
        if total == 0:
            raise DataError(f"the text corpus ({', '.join(f.display for f in files)}) holds no lines after cleaning")
        fd, npy_tmp = fileio.mkstemp(dir=path.parent, prefix=".text_tokens.", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as out, open(raw_tmp, "rb") as src:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (total,)}
                np.lib.format.write_array_header_1_0(out, header)
                shutil.copyfileobj(src, out, 1 << 24)  # chunked: never the whole stream in RAM
            os.replace(npy_tmp, path)
        except BaseException:
            Path(npy_tmp).unlink(missing_ok=True)
            raise
    finally:
        Path(raw_tmp).unlink(missing_ok=True)
    return {"format": CACHE_FORMAT, "num_tokens": total, "dtype": dtype.name, "clean": clean, "sources": sources}


class TextBlockDataset(Dataset):
    """Fixed-length blocks `tokens[k*L:(k+1)*L]` of the cached token stream, k in `block_indices`.

    The memmap is opened lazily in each process (DataLoader workers never receive an open memmap).
    Items: {"input_ids": LongTensor (L,), "index": block number}.
    """

    def __init__(self, tokens_path: str | os.PathLike, block_length: int, block_indices: np.ndarray | None = None):
        self.tokens_path = Path(tokens_path)
        self.block_length = block_length
        n_tokens = int(np.load(self.tokens_path, mmap_mode="r").shape[0])
        self.num_blocks_total = n_tokens // block_length
        if block_indices is None:
            block_indices = np.arange(self.num_blocks_total, dtype=np.int64)
        self.block_indices = np.asarray(block_indices, dtype=np.int64)
        if self.block_indices.size and int(self.block_indices.max()) >= self.num_blocks_total:
            raise ValueError("block index out of range")
        self._tokens: np.ndarray | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def _array(self) -> np.ndarray:
        if self._tokens is None or self._pid != os.getpid():
            self._tokens, self._pid = np.load(self.tokens_path, mmap_mode="r"), os.getpid()
        return self._tokens

    def __len__(self) -> int:
        return len(self.block_indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        block = int(self.block_indices[i])
        start = block * self.block_length
        ids = np.asarray(self._array()[start : start + self.block_length], dtype=np.int64)
        return {"input_ids": torch.from_numpy(ids), "index": block}

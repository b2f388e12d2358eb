"""The text-only BabyLM corpus: reading, cleaning, a cached token array and fixed-length LM blocks.

Where the six `<source>.train` files are found and how lines are read and cleaned: `bitmar.data.corpus` (shared
with the verifier; its names are re-exported here).

Tokens: every kept line becomes BOS + tokens + EOS (the format the evaluation scores: `<s> sentence`). The token
stream of all sources, in the order of `data.text_sources`, is written once to `<cache_dir>/text_tokens-<fp>.npy`
(uint16, or uint32 for vocabularies over 65,536) and memory-mapped afterwards. The fingerprint `fp` hashes the
input files (names, sizes, mtimes), the tokenizer definition, the cleaning flag and the token cap, so any change
re-tokenizes; a `.json` next to the array holds the fingerprint and word/line/token counts per source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bitmar import fileio
from bitmar.data import layout
from bitmar.data.corpus import (  # noqa: F401  (re-exported: the corpus rules live in bitmar.data.corpus)
    TextFile,
    clean_line,
    decode_line,
    file_lock,
    iter_file_lines,
    iter_raw_lines,
    iter_text_lines,
    locate_text_files,
    text_corpus_present,
)
from bitmar.data.errors import DataError
from bitmar.data.tokenizer import encode_batch, tokenizer_fingerprint
from bitmar.fileio import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_BATCH_LINES = 8192


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
        with atomic_file(path) as npy_tmp, open(npy_tmp, "wb") as out, open(raw_tmp, "rb") as src:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (total,)}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, 1 << 24)  # chunked: never the whole stream in RAM
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

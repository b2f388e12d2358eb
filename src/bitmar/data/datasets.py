"""Datasets, collation, the mixed text/caption batch schedule and `build_data` (everything a training run needs).

- `ImageCaptionDataset`: items {"vision_features": (D,) float32, "input_ids": BOS ... EOS, "index": store index}.
  Captions are tokenized once for the whole store (`tokenize_captions`, cached on disk) and truncated to
  `max_length` at access; a caption longer than that loses its tail and its EOS (the sentence is not over).
  `__getitems__` reads a whole batch of features with one sorted read per file.
- `TextBlockDataset` (`bitmar.data.text`): fixed-length blocks of the tokenized text corpus.
- `split_indices(n, fraction, seed)`: the deterministic train/validation split (validation = `fraction` of a seeded
  permutation). `build_data` splits with the fixed `SPLIT_SEED`, so the split never moves with the training seed and
  a tokenizer trained on the training captions never sees a validation caption.
- `MixedBatchLoader`: one epoch of batches, each all-text or all-caption, tagged `batch["kind"]`. Phase 1 is text
  only. In phases 2-3 an epoch is one pass over the caption training set; text batches are added so that they are
  `text_ratio` of all batches, text blocks drawn from per-epoch permutations (wrapping into a fresh permutation
  when more are needed). The order of kinds and the samples of every batch depend only on (seed, phase, epoch),
  so `start_batch=k` resumes exactly at batch k. Under `world_size` ranks every rank runs the same kind schedule and
  takes its own slice of each global batch (ranks are disjoint; a short last global batch is filled from the next
  permutation with samples it does not hold yet, so all batches are full and every sample is seen in the epoch).
- Batches: caption {"kind": "caption", "input_ids" (B, T) right-padded with <pad>, "attention_mask" (B, T),
  "vision_features" (B, D) float32, "indices" (B,) store indices}; text {"kind": "text", "input_ids" (B, L),
  "attention_mask" (B, L) ones, "indices" (B,) block numbers}.
- `build_data` trains the tokenizer on the text corpus (up to data.max_text_tokens words) plus the training
  captions. Text validation blocks are cut from the same corpus after tokenization, so the BPE merges saw them;
  validation captions never reach the tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from bitmar.config import BitMarConfig
from bitmar.data import layout
from bitmar.data.errors import DataError
from bitmar.data.features import CaptionFeatureStore
from bitmar.data.sample import SAMPLE_DEFAULT_DIR, generate_sample_dataset, read_manifest
from bitmar.data.text import (
    TextBlockDataset,
    TextTokens,
    build_token_cache,
    file_lock,
    iter_text_lines,
    locate_text_files,
    text_corpus_present,
)
from bitmar.data.tokenizer import (
    PAD_TOKEN,
    SPECIAL_TOKENS,
    encode_batch,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from bitmar.fileio import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)

SPLIT_SEED = 1234  # train/validation split seed, independent of training.seed
PAD_ID = SPECIAL_TOKENS.index(PAD_TOKEN)
TEXT, CAPTION = 0, 1
_CAPTION_CACHE_FORMAT = 1


def split_indices(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sorted index arrays; validation holds round(n * fraction) items (>= 1 if fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


class CaptionTokens:
    """Token ids of every store caption (BOS ... EOS) as one flat array + offsets; word counts per caption."""

    def __init__(self, tokens: np.ndarray | Path, offsets: np.ndarray | Path, words: np.ndarray | Path) -> None:
        self._sources = (tokens, offsets, words)
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if any(isinstance(s, Path) for s in self._sources):
            state["_arrays"] = None  # memory-mapped: reopened by each worker
        return state

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, offsets, words), memory-mapped when cached on disk."""
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = tuple(  # type: ignore[assignment]
                np.load(s, mmap_mode="r") if isinstance(s, Path) else s for s in self._sources
            )
            self._pid = os.getpid()
        return self._arrays  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.arrays()[1].shape[0] - 1)

    def ids(self, i: int) -> np.ndarray:
        tokens, offsets, _ = self.arrays()
        return tokens[offsets[i] : offsets[i + 1]]

    def words(self, indices: np.ndarray | None = None) -> int:
        words = self.arrays()[2]
        return int(np.asarray(words if indices is None else words[indices], dtype=np.int64).sum())


def _encode_store(store: CaptionFeatureStore, tokenizer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    chunks, lengths, words = [], [], []
    for start in range(0, len(store), 16384):
        texts = [store.caption(i) for i in range(start, min(len(store), start + 16384))]
        for seq in encode_batch(tokenizer, texts):
            chunks.append(np.asarray(seq, dtype=np.int32))
            lengths.append(len(seq))
        words.extend(len(t.split()) for t in texts)
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
    flat = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return flat, offsets, np.asarray(words, dtype=np.int32)


def tokenize_captions(
    store: CaptionFeatureStore, tokenizer: Any, cache_dir: str | os.PathLike | None = None
) -> CaptionTokens:
    """Tokenize every caption of `store` once; with `cache_dir`, memory-map a cache keyed by data + tokenizer."""
    if cache_dir is None:
        return CaptionTokens(*_encode_store(store, tokenizer))
    key = {"format": _CAPTION_CACHE_FORMAT, "store": store.fingerprint(), "tokenizer": tokenizer_fingerprint(tokenizer)}
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
    base = Path(cache_dir) / f"caption_tokens-{fp[:16]}"
    paths = [base.with_name(base.name + f".{part}.npy") for part in ("tokens", "offsets", "words")]
    meta_path = base.with_name(base.name + ".json")
    with file_lock(Path(cache_dir) / ".caption_tokens.lock"):
        fresh = meta_path.is_file() and json.loads(meta_path.read_text(encoding="utf-8")).get("fingerprint") == fp
        if not (fresh and all(p.is_file() for p in paths)):
            logger.info("caption tokens: tokenizing %d captions into %s", len(store), base)
            for path, array in zip(paths, _encode_store(store, tokenizer), strict=True):
                with atomic_file(path) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
            atomic_write_text(meta_path, json.dumps({"fingerprint": fp, "captions": len(store)}))  # marks complete
    return CaptionTokens(*paths)


class CaptionBatch(Sequence):
    """A batch of caption items held as arrays (what `ImageCaptionDataset.__getitems__` returns).

    Indexing gives the usual per-item dicts, so any collate function works; `collate_captions` takes the fast path
    and pads the whole batch in one vectorized step.
    """

    def __init__(self, features: np.ndarray, ids: np.ndarray, lengths: np.ndarray, indices: np.ndarray) -> None:
        self.features = features  # (B, D) float32
        self.ids = ids  # (sum(lengths),) int64, the captions one after the other
        self.lengths = lengths  # (B,)
        self.indices = indices  # (B,) store indices
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, k: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k = k % len(self)
        start = self._starts[k]
        return {
            "vision_features": torch.from_numpy(self.features[k]),
            "input_ids": torch.from_numpy(self.ids[start : start + self.lengths[k]]),
            "index": int(self.indices[k]),
        }

    def collate(self, pad_id: int) -> dict[str, Any]:
        longest = int(self.lengths.max()) if len(self) else 0
        mask = np.arange(longest)[None, :] < self.lengths[:, None]  # (B, T)
        input_ids = np.full(mask.shape, pad_id, dtype=np.int64)  # (B, T)
        input_ids[mask] = self.ids  # row-major order of the mask = the captions one after the other
        return {
            "kind": "caption",
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "vision_features": torch.from_numpy(self.features),  # (B, D)
            "indices": torch.from_numpy(self.indices.astype(np.int64)),  # (B,)
        }


class ImageCaptionDataset(Dataset):
    """Caption i of `indices` with its image features; see the module docstring."""

    def __init__(
        self,
        store: CaptionFeatureStore,
        tokenizer: Any,
        indices: Sequence[int] | np.ndarray | None = None,
        max_length: int = 64,
        caption_tokens: CaptionTokens | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS and EOS), got {max_length}")
        self.store = store
        self.indices = np.arange(len(store), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.max_length = max_length
        self.pad_id = int(tokenizer.pad_token_id)
        self.caption_tokens = caption_tokens if caption_tokens is not None else tokenize_captions(store, tokenizer)
        if len(self.caption_tokens) != len(store):
            raise ValueError("caption_tokens were built for a different store")

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: Sequence[int]) -> CaptionBatch:
        store_indices = self.indices[np.asarray(items, dtype=np.int64)]
        features = self.store.feature_batch(store_indices)  # (B, D): one sorted read per file
        tokens, offsets, _ = self.caption_tokens.arrays()
        starts = offsets[store_indices]
        lengths = np.minimum(offsets[store_indices + 1] - starts, self.max_length)
        # Positions of all kept tokens in one gather: start of each caption + 0..length-1.
        shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        ids = np.asarray(tokens[shift + np.arange(int(lengths.sum()))], dtype=np.int64)
        return CaptionBatch(features, ids, lengths.astype(np.int64), store_indices)

    def caption(self, i: int) -> str:
        return self.store.caption(int(self.indices[i]))


def collate_captions(batch: Sequence[dict[str, Any]], pad_id: int = PAD_ID) -> dict[str, Any]:
    """Right-pad captions: input_ids (B, T), attention_mask (B, T), vision_features (B, D), indices (B,)."""
    if isinstance(batch, CaptionBatch):
        return batch.collate(pad_id)
    lengths = [int(item["input_ids"].numel()) for item in batch]
    input_ids = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), max(lengths)), dtype=torch.long)  # (B, T)
    for b, (item, n) in enumerate(zip(batch, lengths, strict=True)):
        input_ids[b, :n] = item["input_ids"]
        attention_mask[b, :n] = 1
    return {
        "kind": "caption",
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "vision_features": torch.stack([item["vision_features"] for item in batch]),  # (B, D)
        "indices": torch.tensor([item["index"] for item in batch], dtype=torch.long),  # (B,)
    }


def collate_text(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Equal-length text blocks: input_ids (B, L), attention_mask of ones (B, L), indices (B,) block numbers."""
    input_ids = torch.stack([item["input_ids"] for item in batch])  # (B, L)
    return {
        "kind": "text",
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "indices": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------------------------
# Mixed batches
# ----------------------------------------------------------------------------------------------------------------


class _KindDataset(Dataset):
    """Routes keys (kind, index) to the text or the caption dataset; a batch holds one kind."""

    def __init__(self, datasets: tuple[Dataset | None, Dataset | None]) -> None:
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets if d is not None)  # type: ignore[arg-type]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> tuple[int, list[dict[str, Any]]]:
        kind = keys[0][0]
        dataset = self.datasets[kind]
        indices = [k[1] for k in keys]
        if hasattr(dataset, "__getitems__"):
            return kind, dataset.__getitems__(indices)  # type: ignore[union-attr]
        return kind, [dataset[i] for i in indices]  # type: ignore[index]


class _KindCollate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, fetched: tuple[int, list[dict[str, Any]]]) -> dict[str, Any]:
        kind, items = fetched
        return collate_text(items) if kind == TEXT else collate_captions(items, self.pad_id)


def _rng(seed: int, phase: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, epoch, stream])


class _ScheduleSampler(Sampler[list[tuple[int, int]]]):
    def __init__(self, loader: MixedBatchLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.loader.start_batch, self.loader.num_batches):
            kind, indices = self.loader.batch_indices(b)
            yield [(kind, int(i)) for i in indices]


class MixedBatchLoader:
    """One epoch of text-only and caption batches (module docstring). `len()` counts the batches still to come."""

    def __init__(
        self,
        text_dataset: Dataset | None,
        caption_dataset: Dataset | None,
        *,
        batch_size: int,
        text_ratio: float,
        seed: int,
        epoch: int,
        phase: int = 2,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pad_id: int = PAD_ID,
        pin_memory: bool = False,
    ) -> None:
        if not 0.0 <= text_ratio <= 1.0:
            raise ValueError(f"text_ratio must be in [0, 1], got {text_ratio}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.datasets = (text_dataset, caption_dataset)
        self.sizes = tuple(0 if d is None else len(d) for d in self.datasets)  # type: ignore[arg-type]
        self.batch_size, self.text_ratio, self.seed, self.epoch, self.phase = batch_size, text_ratio, seed, epoch, phase
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pad_id, self.pin_memory = num_workers, pad_id, pin_memory
        global_batch = batch_size * world_size
        if text_ratio < 1.0:
            if self.sizes[CAPTION] == 0:
                raise DataError(
                    "no caption data for a mixed phase: enable data.use_cc3m / data.use_local_narratives (with their "
                    "files present) or set data.text_ratio=1"
                )
            n_caption = math.ceil(self.sizes[CAPTION] / global_batch)
            n_text = round(n_caption * text_ratio / (1.0 - text_ratio))
        else:
            n_caption = 0
            n_text = math.ceil(self.sizes[TEXT] / global_batch)
        if n_text and self.sizes[TEXT] == 0:
            raise DataError("no text blocks: the text corpus is shorter than one data.text_block_length block")
        self.counts = (n_text, n_caption)
        self.num_batches = n_text + n_caption
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.num_batches}]")
        self.start_batch = start_batch
        kinds = np.array([TEXT] * n_text + [CAPTION] * n_caption, dtype=np.int64)
        self.kinds = _rng(seed, phase, epoch, 0).permutation(kinds)
        self._position = np.zeros(self.num_batches, dtype=np.int64)  # batch b is the k-th batch of its kind
        for kind in (TEXT, CAPTION):
            where = np.flatnonzero(self.kinds == kind)
            self._position[where] = np.arange(where.size)
        self._orders = tuple(self._order(kind) for kind in (TEXT, CAPTION))

    def _order(self, kind: int) -> np.ndarray:
        """The epoch's sample order of one kind: seeded permutations chained until every batch is full.

        Where a permutation ends inside a global batch, the next one starts with samples that batch does not hold
        yet, so no global batch (hence no rank's batch, and no two ranks in one step) repeats a sample, as long as
        the dataset is at least one global batch long.
        """
        global_batch = self.batch_size * self.world_size
        need = self.counts[kind] * global_batch
        size = self.sizes[kind]
        rng = _rng(self.seed, self.phase, self.epoch, 1 + kind)
        parts: list[np.ndarray] = []
        filled = 0
        while filled < need:
            perm = rng.permutation(size)
            pos = filled % global_batch
            if pos:  # move samples already in the open global batch to the back of this permutation
                clash = np.isin(perm, np.concatenate(parts)[filled - pos : filled])
                perm = np.concatenate([perm[~clash], perm[clash]])
            parts.append(perm)
            filled += size
        return np.concatenate(parts)[:need].astype(np.int64) if parts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def batch_indices(self, b: int) -> tuple[int, np.ndarray]:
        """(kind, dataset indices of this rank) of batch b of the epoch."""
        kind = int(self.kinds[b])
        global_batch = self.batch_size * self.world_size
        start = int(self._position[b]) * global_batch + self.rank * self.batch_size
        return kind, self._orders[kind][start : start + self.batch_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if len(self) == 0:
            return iter(())
        loader = DataLoader(
            _KindDataset(self.datasets),
            batch_sampler=_ScheduleSampler(self),
            collate_fn=_KindCollate(self.pad_id),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # A private generator: creating the iterator would otherwise draw from the global torch RNG, and a
            # resumed run (new iterator mid-epoch) would then diverge from the uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch),
        )
        return iter(loader)


class _ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... in order: disjoint shards without padding (validation stays exact)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))


# ----------------------------------------------------------------------------------------------------------------
# build_data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BabyLMData:
    """Tokenizer, datasets and loader factories of one run (built by `build_data`)."""

    tokenizer: Any
    text_train: TextBlockDataset
    text_val: TextBlockDataset
    caption_train: ImageCaptionDataset | None
    caption_val: ImageCaptionDataset | None
    store: CaptionFeatureStore | None
    text_tokens: TextTokens
    batch_size: int
    text_ratio: float
    seed: int
    num_workers: int = 0
    rank: int = 0
    world_size: int = 1
    tokenizer_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def loader(self, phase: int, epoch: int, start_batch: int = 0) -> MixedBatchLoader:
        """Batches of one epoch of `phase` (1: text only; 2, 3: mixed by data.text_ratio), from `start_batch`."""
        if phase not in (1, 2, 3):
            raise ValueError(f"phase must be 1, 2 or 3, got {phase}")
        return MixedBatchLoader(
            self.text_train,
            self.caption_train if phase > 1 else None,
            batch_size=self.batch_size,
            text_ratio=1.0 if phase == 1 else self.text_ratio,
            seed=self.seed,
            epoch=epoch,
            phase=phase,
            start_batch=start_batch,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            pad_id=self.pad_id,
            pin_memory=torch.cuda.is_available(),
        )

    def validation_loaders(self) -> dict[str, DataLoader | None]:
        """{"text": ..., "caption": ...}: this rank's shard in order (None where the split is empty)."""
        loaders: dict[str, DataLoader | None] = {}
        for name, dataset, collate in (
            ("text", self.text_val, collate_text),
            ("caption", self.caption_val, _CaptionCollate(self.pad_id)),
        ):
            if dataset is None or len(dataset) == 0:
                loaders[name] = None
                continue
            sampler = BatchSampler(_ShardSampler(len(dataset), self.rank, self.world_size), self.batch_size, False)
            loaders[name] = DataLoader(
                dataset,
                batch_sampler=sampler,
                collate_fn=collate,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(self.seed),  # keep the global RNG untouched (exact resume)
            )
        return loaders

    def summary(self) -> dict[str, Any]:
        return dict(self.info)


class _CaptionCollate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_captions(batch, self.pad_id)


def _missing_required(data_dir: Path, text_sources: Sequence[str] = layout.TEXT_SOURCES) -> list[str]:
    """BabyLM files the loaders need that are absent (the text rule is the loaders' own: zip, or unpacked)."""
    missing = [name for name in layout.REQUIRED_FILES if name != layout.TEXT_ZIP and not (data_dir / name).exists()]
    if not text_corpus_present(data_dir, text_sources):
        missing.insert(0, layout.TEXT_ZIP)
    return missing


def _word_capped(lines: Iterator[str], max_words: int | None) -> Iterator[str]:
    if max_words is None:
        yield from lines
        return
    seen = 0
    for line in lines:
        if seen >= max_words:
            return
        seen += len(line.split())
        yield line


def _tokenizer_split_record(cfg: BitMarConfig, data_dir: Path, n_captions: int) -> dict[str, Any]:
    d = cfg.data
    return {
        "data_dir": str(data_dir.resolve()),
        "validation_fraction": d.validation_fraction,
        "split_seed": SPLIT_SEED,
        "caption_rows": n_captions,
        "use_cc3m": d.use_cc3m,
        "use_local_narratives": d.use_local_narratives,
    }


def _get_tokenizer(
    cfg: BitMarConfig,
    output_dir: Path,
    data_dir: Path,
    text_files: list,
    store: CaptionFeatureStore | None,
    caption_train: np.ndarray,
) -> tuple[Any, Path]:
    d = cfg.data
    record = _tokenizer_split_record(cfg, data_dir, 0 if store is None else len(store))
    if d.tokenizer_path is not None:
        given = Path(d.tokenizer_path)
        tokenizer = load_tokenizer(given)
        tok_dir = given if given.is_dir() else given.parent
    else:
        tok_dir = output_dir / "tokenizer"
        with file_lock(output_dir / ".tokenizer.lock"):
            if not (tok_dir / "tokenizer.json").is_file():
                lines = _word_capped(iter_text_lines(text_files, d.clean_text), d.max_text_tokens)
                captions = store.iter_captions(caption_train) if store is not None else iter(())
                logger.info("training a %d-token BPE tokenizer into %s", d.vocab_size, tok_dir)
                # Training text + TRAINING captions only: the validation split never shapes the vocabulary.
                train_tokenizer(itertools.chain(lines, captions), d.vocab_size, tok_dir)
                atomic_write_text(tok_dir / "bitmar_data.json", json.dumps(record, indent=2))
        tokenizer = load_tokenizer(tok_dir)
    record_path = tok_dir / "bitmar_data.json"
    if record_path.is_file():
        trained = json.loads(record_path.read_text(encoding="utf-8"))
        changed = [k for k in record if trained.get(k) != record[k]]
        if changed:
            warnings.warn(
                f"tokenizer {tok_dir} was trained with other data settings ({', '.join(changed)} differ), so it may "
                "have seen this run's validation captions; delete it to retrain",
                stacklevel=3,
            )
    return tokenizer, tok_dir


def _stale_sample(data_dir: Path, sample_cfg: Any, cfg: BitMarConfig) -> bool:
    """A sample world written with other sizes or seed than the config asks for, or left incomplete by a crash.

    Regenerating it is safe only for the files the manifest records byte for byte: `generate_sample_dataset`
    checks that (sha256) and refuses otherwise."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return False
    if not manifest.get("complete", True):
        return True
    wanted = {k: v for k, v in dataclasses.asdict(sample_cfg).items() if k != "generate_if_missing"}
    wanted["feature_dim"] = cfg.model.vision_encoder_dim
    return any(manifest.get(k) != v for k, v in wanted.items())


def check_data_dir(data_dir: str) -> Path:
    """`data.data_dir` as a Path; an empty value is refused (it would read and write the current directory)."""
    if not str(data_dir).strip():
        raise DataError(
            f"data.data_dir is empty: it would read the data from, and write the sample world into, the current "
            f"directory ({Path.cwd()}). Set it to the BabyLM directory (e.g. ../babylm_dataset) or, for the sample "
            f"world, {SAMPLE_DEFAULT_DIR}: --set data.data_dir={SAMPLE_DEFAULT_DIR}"
        )
    return Path(data_dir)


def data_cache_dir(cfg: BitMarConfig, data_dir: Path) -> Path:
    """Where feature indexes and token caches live: `data.cache_dir`, else `<data_dir>/.bitmar_cache`."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else data_dir / ".bitmar_cache"


def open_caption_store(cfg: BitMarConfig, data_dir: Path) -> CaptionFeatureStore:
    """The caption/feature store of `cfg.data` (training and evaluation must see the very same rows)."""
    d = cfg.data
    return CaptionFeatureStore.from_data_dir(
        data_dir,
        use_cc3m=d.use_cc3m,
        use_local_narratives=d.use_local_narratives,
        feature_dim=cfg.model.vision_encoder_dim,
        nonfinite=d.nonfinite_features,
        cache_dir=data_cache_dir(cfg, data_dir),
        max_samples=d.max_caption_samples,
    )


def build_data(cfg: BitMarConfig, output_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1) -> BabyLMData:
    """Everything the trainer needs from `cfg.data` (see the module docstring). Safe to call on every rank at once:
    the sample world, the tokenizer and the token caches are built under file locks by whichever rank comes first."""
    d = cfg.data
    data_dir = check_data_dir(d.data_dir)
    output_dir = Path(output_dir)
    cache_dir = data_cache_dir(cfg, data_dir)
    if d.sample.generate_if_missing and (
        _missing_required(data_dir, d.text_sources) or _stale_sample(data_dir, d.sample, cfg)
    ):
        data_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(data_dir / ".sample.lock"):
            missing = _missing_required(data_dir, d.text_sources)
            if missing or _stale_sample(data_dir, d.sample, cfg):
                if (
                    missing
                    and read_manifest(data_dir) is None
                    and any((data_dir / n).exists() for n in layout.ALL_FILES)
                ):
                    raise DataError(
                        f"{data_dir} holds part of a BabyLM download (missing: {', '.join(missing)}); finish it with "
                        f"{layout.fetch_command(str(data_dir))}, or point data.data_dir at an empty directory for the "
                        "sample world"
                    )
                logger.info("generating the sample world in %s", data_dir)
                try:
                    # Never overwrite=True: the generator replaces only files its manifest records (sha256).
                    generate_sample_dataset(data_dir, d.sample, feature_dim=cfg.model.vision_encoder_dim)
                except DataError as err:
                    raise DataError(
                        f"{err}\nThis run has data.sample.generate_if_missing=true and wanted to (re)generate the "
                        f"sample world in data.data_dir={data_dir}. To train on the files there as they are, set "
                        "data.sample.generate_if_missing=false."
                    ) from err

    text_files = locate_text_files(data_dir, d.text_sources)
    store = None
    if d.use_cc3m or d.use_local_narratives:
        store = open_caption_store(cfg, data_dir)
    cap_train, cap_val = split_indices(0 if store is None else len(store), d.validation_fraction, SPLIT_SEED)
    tokenizer, tok_dir = _get_tokenizer(cfg, output_dir, data_dir, text_files, store, cap_train)

    text_tokens = build_token_cache(data_dir, tokenizer, cache_dir, d.text_sources, d.clean_text, d.max_text_tokens)
    n_blocks = text_tokens.num_tokens // d.text_block_length
    if n_blocks < 2:
        raise DataError(
            f"the text corpus has {text_tokens.num_tokens} tokens: fewer than 2 blocks of data.text_block_length="
            f"{d.text_block_length}; lower the block length or raise data.max_text_tokens"
        )
    text_train_idx, text_val_idx = split_indices(n_blocks, d.validation_fraction, SPLIT_SEED)
    text_train = TextBlockDataset(text_tokens.path, d.text_block_length, text_train_idx)
    text_val = TextBlockDataset(text_tokens.path, d.text_block_length, text_val_idx)

    caption_train = caption_val = None
    caption_words = 0
    if store is not None:
        caption_tokens = tokenize_captions(store, tokenizer, cache_dir)
        caption_train = ImageCaptionDataset(store, tokenizer, cap_train, d.max_caption_length, caption_tokens)
        caption_val = ImageCaptionDataset(store, tokenizer, cap_val, d.max_caption_length, caption_tokens)
        caption_words = caption_tokens.words(cap_train)

    text_words = text_tokens.num_words
    info = {
        "data_dir": str(data_dir),
        "cache_dir": str(cache_dir),
        "tokenizer": str(tok_dir),
        "vocab_size": len(tokenizer),
        "text_words": text_words,
        "text_words_per_source": {k: v["words"] for k, v in text_tokens.meta["sources"].items()},
        "text_tokens": text_tokens.num_tokens,
        "text_blocks": {"train": len(text_train), "validation": len(text_val)},
        "caption_rows": {"train": len(cap_train), "validation": len(cap_val)},
        "caption_words_train": caption_words,
        "caption_rows_dropped": {} if store is None else {"nonfinite": store.num_nonfinite, "empty": store.num_empty},
        "total_words": text_words + caption_words,
    }
    logger.info("data: %s", json.dumps(info))
    return BabyLMData(
        tokenizer=tokenizer,
        text_train=text_train,
        text_val=text_val,
        caption_train=caption_train,
        caption_val=caption_val,
        store=store,
        text_tokens=text_tokens,
        batch_size=cfg.training.batch_size,
        text_ratio=d.text_ratio,
        seed=cfg.training.seed,
        num_workers=d.num_workers,
        rank=rank,
        world_size=world_size,
        tokenizer_dir=tok_dir,
        info=info,
    )

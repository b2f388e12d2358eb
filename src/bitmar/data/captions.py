"""Caption data: every caption tokenized once (`tokenize_captions`, cached on disk), `ImageCaptionDataset` and
its collation.

- `ImageCaptionDataset`: items {"vision_features": (D,) float32, "input_ids": BOS ... EOS, "index": store index}.
  Captions are tokenized once for the whole store and truncated to `max_length` at access; a caption longer than
  that loses its tail and its EOS (the sentence is not over). `__getitems__` reads a whole batch of features with
  one sorted read per file and returns a `CaptionBatch`, which `collate_captions` pads in one vectorized step.
- Caption batches: {"kind": "caption", "input_ids" (B, T) right-padded with <pad>, "attention_mask" (B, T),
  "vision_features" (B, D) float32, "indices" (B,) store indices}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bitmar.data.corpus import file_lock
from bitmar.data.features import CaptionFeatureStore
from bitmar.data.tokenizer import PAD_TOKEN, SPECIAL_TOKENS, encode_batch, tokenizer_fingerprint
from bitmar.fileio import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)

PAD_ID = SPECIAL_TOKENS.index(PAD_TOKEN)
_CAPTION_CACHE_FORMAT = 1


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

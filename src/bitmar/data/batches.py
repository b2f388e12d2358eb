"""The mixed text/caption batch schedule of one epoch (`MixedBatchLoader`) and the text collation.

`MixedBatchLoader`: one epoch of batches, each all-text or all-caption, tagged `batch["kind"]`. Phase 1 is text
only. In phases 2-3 an epoch is one pass over the caption training set; text batches are added so that they are
`text_ratio` of all batches, text blocks drawn from per-epoch permutations (wrapping into a fresh permutation
when more are needed). The order of kinds and the samples of every batch depend only on (seed, phase, epoch),
so `start_batch=k` resumes exactly at batch k. Under `world_size` ranks every rank runs the same kind schedule and
takes its own slice of each global batch (ranks are disjoint; a short last global batch is filled from the next
permutation with samples it does not hold yet, so all batches are full and every sample is seen in the epoch).

Text batches: {"kind": "text", "input_ids" (B, L), "attention_mask" (B, L) ones, "indices" (B,) block numbers};
caption batches as in `bitmar.data.captions`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bitmar.data.captions import PAD_ID, collate_captions
from bitmar.data.errors import DataError

TEXT, CAPTION = 0, 1


def collate_text(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Equal-length text blocks: input_ids (B, L), attention_mask of ones (B, L), indices (B,) block numbers."""
    input_ids = torch.stack([item["input_ids"] for item in batch])  # (B, L)
    return {
        "kind": "text",
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "indices": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }


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

"""`build_data` (everything a training run needs: tokenizer, datasets, loaders) and the train/validation split.

- `split_indices(n, fraction, seed)`: the deterministic train/validation split (validation = `fraction` of a seeded
  permutation). `build_data` splits with the fixed `SPLIT_SEED`, so the split never moves with the training seed and
  a tokenizer trained on the training captions never sees a validation caption.
- `build_data` trains the tokenizer on the text corpus (up to data.max_text_tokens words) plus the training
  captions. Text validation blocks are cut from the same corpus after tokenization, so the BPE merges saw them;
  validation captions never reach the tokenizer.
- The parts it assembles: `ImageCaptionDataset`, `tokenize_captions`, `collate_captions` (`bitmar.data.captions`);
  `TextBlockDataset` (`bitmar.data.text`); `MixedBatchLoader`, `collate_text` (`bitmar.data.batches`). They are
  re-exported here, where users import them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from bitmar.config import BitMarConfig
from bitmar.data import layout
from bitmar.data.batches import CAPTION, TEXT, MixedBatchLoader, collate_text  # noqa: F401  (re-exported)
from bitmar.data.captions import (  # noqa: F401  (re-exported)
    PAD_ID,
    CaptionBatch,
    CaptionTokens,
    ImageCaptionDataset,
    collate_captions,
    tokenize_captions,
)
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
from bitmar.data.tokenizer import load_tokenizer, train_tokenizer
from bitmar.fileio import atomic_write_text

logger = logging.getLogger(__name__)

SPLIT_SEED = 1234  # train/validation split seed, independent of training.seed


def split_indices(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sorted index arrays; validation holds round(n * fraction) items (>= 1 if fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


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

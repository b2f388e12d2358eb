"""Feature store, text corpus, token cache, datasets, mixed batches and build_data on small temporary files."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerFast

from bitmar.config import load_config
from bitmar.data import layout
from bitmar.data import text as text_module
from bitmar.data.datasets import (
    CaptionTokens,
    ImageCaptionDataset,
    MixedBatchLoader,
    build_data,
    collate_captions,
    split_indices,
)
from bitmar.data.errors import DataError
from bitmar.data.features import CaptionFeatureStore, StackedFeatures
from bitmar.data.text import (
    TextBlockDataset,
    build_token_cache,
    clean_line,
    iter_text_lines,
    locate_text_files,
)
from bitmar.data.tokenizer import train_tokenizer

DIM = 8


def write_cc3m(root: Path, n: int = 11, dim: int = DIM, dtype: type = np.float32, captions: list | None = None) -> Path:
    """CC3M-layout files where feature row i is filled with the value i and caption i is 'caption i'."""
    root.mkdir(parents=True, exist_ok=True)
    rows = np.repeat(np.arange(n, dtype=np.float32)[:, None], dim, axis=1).astype(dtype)
    half = (n + 1) // 2
    np.save(root / layout.CC3M_FEATURES[0], rows[:half])
    np.save(root / layout.CC3M_FEATURES[1], rows[half:])
    caps = [f"caption {i}" for i in range(n)] if captions is None else captions
    (root / layout.CC3M_CAPTIONS).write_text(json.dumps(caps), encoding="utf-8")
    return root


def open_store(root: Path, **kwargs: Any) -> CaptionFeatureStore:
    kwargs.setdefault("feature_dim", DIM)
    kwargs.setdefault("use_local_narratives", False)
    return CaptionFeatureStore.from_data_dir(root, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Feature store
# ---------------------------------------------------------------------------------------------------------------


def test_caption_k_pairs_with_row_k_across_the_halves(tmp_path: Path) -> None:
    store = open_store(write_cc3m(tmp_path, n=11, dtype=np.float16))
    assert len(store) == 11 and store.features.offsets.tolist() == [0, 6, 11]
    for k in range(11):  # row 6 is the first row of the second half
        assert store.caption(k) == f"caption {k}"
        feature = store.feature(k)
        assert feature.dtype == np.float32 and feature.shape == (DIM,) and np.all(feature == k)
    order = np.array([10, 0, 6, 5, 6, 3])  # shuffled, crossing the boundary, with a repeat
    assert np.array_equal(store.feature_batch(order)[:, 0], order.astype(np.float32))


def test_stacked_features_never_copy_the_files(tmp_path: Path) -> None:
    write_cc3m(tmp_path, n=9)
    stacked = StackedFeatures([tmp_path / f for f in layout.CC3M_FEATURES], DIM)
    assert len(stacked) == 9
    clone = __import__("pickle").loads(__import__("pickle").dumps(stacked))  # what a spawned worker receives
    assert clone._fds is None and np.array_equal(clone.read([8, 0]), stacked.read([8, 0]))
    with pytest.raises(IndexError):
        stacked.read([9])


def test_missing_feature_file_names_file_and_fetch_command(tmp_path: Path) -> None:
    write_cc3m(tmp_path)
    (tmp_path / layout.CC3M_FEATURES[1]).unlink()
    with pytest.raises(DataError) as err:
        open_store(tmp_path)
    assert layout.CC3M_FEATURES[1] in str(err.value)
    assert "download_babylm_data.py" in str(err.value) and f"--only {layout.CC3M_FEATURES[1]}" in str(err.value)


def test_missing_captions_names_file(tmp_path: Path) -> None:
    write_cc3m(tmp_path)
    (tmp_path / layout.CC3M_CAPTIONS).unlink()
    with pytest.raises(DataError, match=f"missing caption file .*{layout.CC3M_CAPTIONS}.*download_babylm_data.py"):
        open_store(tmp_path)


def test_count_mismatch_names_both_counts_and_files(tmp_path: Path) -> None:
    write_cc3m(tmp_path, n=11, captions=[f"c {i}" for i in range(10)])
    with pytest.raises(DataError) as err:
        open_store(tmp_path)
    message = str(err.value)
    assert "10 captions" in message and "11 feature rows" in message
    assert layout.CC3M_CAPTIONS in message and layout.CC3M_FEATURES[0] in message and layout.CC3M_FEATURES[1] in message


def test_wrong_feature_width(tmp_path: Path) -> None:
    write_cc3m(tmp_path, dim=6)
    with pytest.raises(DataError, match=r"feature width 6, expected 8 \(model.vision_encoder_dim\)"):
        open_store(tmp_path)


def test_nonfinite_rows_dropped_with_warning_or_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cc3m(tmp_path, n=11)
    first = np.load(tmp_path / layout.CC3M_FEATURES[0])
    first[3, 2] = np.nan
    np.save(tmp_path / layout.CC3M_FEATURES[0], first)
    second = np.load(tmp_path / layout.CC3M_FEATURES[1])
    second[0, 5] = np.inf  # global row 6: the first row of the second half
    np.save(tmp_path / layout.CC3M_FEATURES[1], second)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match=r"cc3m .*dropped 2 of 11 rows whose features hold NaN/inf \(rows 3, 6\)"):
        store = open_store(tmp_path, cache_dir=cache)
    assert len(store) == 9 and store.num_nonfinite == 2
    kept = [store.caption(i) for i in range(len(store))]
    assert "caption 3" not in kept and "caption 6" not in kept and kept[3] == "caption 4"
    assert np.all(store.feature(3) == 4)  # captions and features stay paired after the drop
    assert np.isfinite(store.feature_batch(np.arange(9))).all()
    with pytest.raises(DataError, match="2 of 11 feature rows hold NaN/inf.*nonfinite_features=error stops"):
        open_store(tmp_path, nonfinite="error", cache_dir=cache)
    # the scan is cached: a second open reads no feature data ...
    monkeypatch.setattr(StackedFeatures, "_scan_part", lambda *a: pytest.fail("re-scanned despite the cache"))
    with pytest.warns(UserWarning, match="dropped 2 of 11"):
        open_store(tmp_path, cache_dir=cache)
    assert json.loads((cache / "feature_scan.json").read_text())
    # ... until a file changes
    monkeypatch.undo()
    second[0, 5] = 1.0
    np.save(tmp_path / layout.CC3M_FEATURES[1], second)
    with pytest.warns(UserWarning, match="dropped 1 of 11 rows whose features"):
        assert len(open_store(tmp_path, cache_dir=cache)) == 10


def test_scan_is_chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitmar.data import features as features_module

    write_cc3m(tmp_path, n=50)
    reads: list[int] = []
    real = StackedFeatures._read_part

    def counting(self: StackedFeatures, part: int, rows: np.ndarray) -> np.ndarray:
        reads.append(len(rows))
        return real(self, part, rows)

    monkeypatch.setattr(features_module, "SCAN_CHUNK_ROWS", 7)
    monkeypatch.setattr(StackedFeatures, "_read_part", counting)
    open_store(tmp_path)
    assert max(reads) == 7 and sum(reads) == 50


def test_empty_captions_dropped_non_strings_rejected(tmp_path: Path) -> None:
    caps = [f"caption {i}" for i in range(11)]
    caps[2], caps[7] = "", "   "
    write_cc3m(tmp_path, captions=caps)
    with pytest.warns(UserWarning, match=r"dropped 2 of 11 rows with an empty caption \(rows 2, 7\)"):
        store = open_store(tmp_path)
    assert len(store) == 9 and np.all(store.feature(2) == 3)
    caps[2], caps[7] = None, "fine"
    write_cc3m(tmp_path, captions=caps)
    with pytest.raises(DataError, match=r"1 entries are not caption strings \(NoneType\); first at index 2"):
        open_store(tmp_path)


def test_caption_file_layouts(tmp_path: Path) -> None:
    write_cc3m(tmp_path, captions=[{"caption": f"caption {i}", "id": i} for i in range(11)])
    assert open_store(tmp_path).caption(10) == "caption 10"
    by_id = {str(i): f"caption {i}" for i in reversed(range(11))}  # ids in file order 10..0: sorted numerically
    write_cc3m(tmp_path, captions=by_id)  # type: ignore[arg-type]
    store = open_store(tmp_path)
    assert [store.caption(i) for i in (0, 6, 10)] == ["caption 0", "caption 6", "caption 10"]


def test_corrupt_json_and_npy(tmp_path: Path) -> None:
    write_cc3m(tmp_path)
    path = tmp_path / layout.CC3M_CAPTIONS
    path.write_text(path.read_text()[:25], encoding="utf-8")
    with pytest.raises(DataError, match=f"{layout.CC3M_CAPTIONS} is not valid JSON .*line 1.*re-download"):
        open_store(tmp_path)
    write_cc3m(tmp_path)
    npy = tmp_path / layout.CC3M_FEATURES[1]
    npy.write_bytes(npy.read_bytes()[:-40])  # truncated data
    with pytest.raises(DataError, match=f"{layout.CC3M_FEATURES[1]} is truncated: 248 bytes on disk.*needs 288"):
        open_store(tmp_path)
    npy.write_bytes(b"this is not a numpy file at all")
    with pytest.raises(DataError, match="not a readable .npy file.*re-download"):
        open_store(tmp_path)
    np.save(npy, np.zeros((5, DIM), dtype=np.int32))
    with pytest.raises(DataError, match="dtype int32"):
        open_store(tmp_path)


def test_local_narratives_optional_but_not_half_present(tmp_path: Path) -> None:
    write_cc3m(tmp_path, n=5)
    with pytest.warns(UserWarning, match="Localized Narratives not found"):
        store = open_store(tmp_path, use_local_narratives=True)
    assert len(store) == 5
    (tmp_path / layout.LOCAL_NARR_CAPTIONS).write_text(json.dumps(["a long caption. it goes on."]), encoding="utf-8")
    with pytest.raises(DataError, match=f"missing feature file .*{layout.LOCAL_NARR_FEATURES}"):
        open_store(tmp_path, use_local_narratives=True)
    np.save(tmp_path / layout.LOCAL_NARR_FEATURES, np.full((1, DIM), 99.0, dtype=np.float32))
    store = open_store(tmp_path, use_local_narratives=True)
    assert len(store) == 6 and store.caption(5).startswith("a long") and np.all(store.feature(5) == 99)
    assert store.source_of(5) == "local_narratives" and store.source_of(4) == "cc3m"


def test_max_samples(tmp_path: Path) -> None:
    store = open_store(write_cc3m(tmp_path, n=11), max_samples=7)
    assert len(store) == 7 and store.caption(6) == "caption 6"


# ---------------------------------------------------------------------------------------------------------------
# Text corpus
# ---------------------------------------------------------------------------------------------------------------


def write_text_zip(root: Path, lines: dict[str, list[str]] | None = None, prefix: str = "train_50M/") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = lines or {}
    with zipfile.ZipFile(root / layout.TEXT_ZIP, "w") as archive:
        for source in layout.TEXT_SOURCES:
            body = lines.get(source, [f"the {source} line {i} ." for i in range(30)])
            archive.writestr(f"{prefix}{source}.train", "\n".join(body) + "\n")
    return root


@pytest.mark.parametrize(
    ("line", "clean"),
    [
        ("*CHI:\tlook at the red ball .", "look at the red ball ."),
        ("*MOT: where is it ?", "where is it ?"),
        ("A:\tuh-huh .", "uh-huh ."),
        ("%mor:\tdet|the n|ball .", None),
        ("@Begin", None),
        ("= = = childes_001.cha = = =", None),
        ("= = = Dogs = = =", None),
        ("   ", None),
        ("The dog said: yes.", "The dog said: yes."),
        ("A dog.", "A dog."),
    ],
)
def test_clean_line(line: str, clean: str | None) -> None:
    assert clean_line(line) == clean


def test_locate_zip_folder_or_flat(tmp_path: Path) -> None:
    write_text_zip(tmp_path / "nested")
    write_text_zip(tmp_path / "flat", prefix="")
    for root in (tmp_path / "nested", tmp_path / "flat"):
        files = locate_text_files(root)
        assert [f.source for f in files] == list(layout.TEXT_SOURCES) and files[0].member is not None
        assert next(iter_text_lines(files)) == "the bnc_spoken line 0 ."
    unpacked = tmp_path / "unpacked" / "train_50M"
    unpacked.mkdir(parents=True)
    for source in layout.TEXT_SOURCES:
        (unpacked / f"{source}.train").write_text("*CHI:\thello .\n", encoding="utf-8")
    assert list(iter_text_lines(locate_text_files(unpacked.parent, ["childes"]))) == ["hello ."]
    assert list(iter_text_lines(locate_text_files(unpacked, ["childes"]))) == ["hello ."]  # data_dir itself
    with pytest.raises(DataError, match="text source 'childes' not found.*download_babylm_data.py"):
        locate_text_files(tmp_path / "empty", ["childes"])
    with pytest.raises(DataError, match="unknown sources"):
        locate_text_files(tmp_path / "nested", ["childes", "wikipedia"])


def test_zip_without_a_source_and_corrupt_zip(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    with zipfile.ZipFile(root / layout.TEXT_ZIP, "w") as archive:
        archive.writestr("train_50M/childes.train", "hi\n")
    with pytest.raises(DataError, match="no member named bnc_spoken.train"):
        locate_text_files(root)
    (root / layout.TEXT_ZIP).write_bytes(b"PK\x03\x04 truncated garbage")
    with pytest.raises(DataError, match="not a readable zip archive.*download_babylm_data.py"):
        locate_text_files(root)


def test_non_utf8_line_names_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "childes.train").write_bytes(b"*CHI:\tfine .\n*MOT:\talso fine .\n*CHI:\tcaf\xe9 au lait .\n")
    with pytest.raises(DataError, match=r"childes.train: line 3 is not valid UTF-8"):
        list(iter_text_lines(locate_text_files(root, ["childes"])))


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    texts = [f"the {s} line {i} ." for s in layout.TEXT_SOURCES for i in range(30)] + ["caption 1", "more text"]
    return train_tokenizer(iter(texts), 300, tmp_path_factory.mktemp("tok") / "tokenizer")


def test_token_cache_reused_and_invalidated(
    tmp_path: Path,
    small_tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = write_text_zip(tmp_path / "d")
    cache = tmp_path / "cache"
    first = build_token_cache(root, small_tokenizer, cache)
    tokens = np.asarray(first.array())
    assert tokens.dtype == np.uint16 and first.num_tokens == tokens.size
    assert first.meta["sources"]["childes"] == {
        "lines": 30,
        "words": 150,
        "tokens": first.meta["sources"]["childes"]["tokens"],
    }
    bos, eos = small_tokenizer.bos_token_id, small_tokenizer.eos_token_id
    assert tokens[0] == bos and (tokens == bos).sum() == (tokens == eos).sum() == 180  # one per line
    first_line = small_tokenizer.decode(tokens[: np.flatnonzero(tokens == eos)[0] + 1], skip_special_tokens=True)
    assert first_line == "the bnc_spoken line 0 ."
    assert isinstance(first.array(), np.memmap)

    calls = []
    real = text_module._tokenize_to
    monkeypatch.setattr(text_module, "_tokenize_to", lambda *a: calls.append(1) or real(*a))
    again = build_token_cache(root, small_tokenizer, cache)
    assert calls == [] and again.path == first.path  # reused, not re-tokenized
    assert build_token_cache(root, small_tokenizer, cache, clean=False).path != first.path
    assert len(calls) == 1
    capped = build_token_cache(root, small_tokenizer, cache, max_tokens=50)
    assert capped.num_tokens == 50 and np.array_equal(np.asarray(capped.array()), tokens[:50])
    # changing an input file changes the fingerprint
    os.utime(root / layout.TEXT_ZIP, ns=(1, 1))
    changed = build_token_cache(root, small_tokenizer, cache)
    assert changed.path != first.path and len(calls) == 3
    assert np.array_equal(np.asarray(changed.array()), tokens)
    assert not [p for p in cache.iterdir() if p.name.startswith(".text_tokens") and p.suffix != ".lock"]


def test_corpus_without_utterances_is_an_error(tmp_path: Path, small_tokenizer: PreTrainedTokenizerFast) -> None:
    only_headers = {s: ["= = = header = = =", "%mor:\tn|x ."] for s in layout.TEXT_SOURCES}
    root = write_text_zip(tmp_path / "d", only_headers)
    with pytest.raises(DataError, match="holds no lines after cleaning"):
        build_token_cache(root, small_tokenizer, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.npy"))


def test_text_blocks(tmp_path: Path, small_tokenizer: PreTrainedTokenizerFast) -> None:
    cache = build_token_cache(write_text_zip(tmp_path / "d"), small_tokenizer, tmp_path / "cache")
    tokens = np.asarray(cache.array())
    dataset = TextBlockDataset(cache.path, 16, np.array([3, 0]))
    assert len(dataset) == 2 and dataset.num_blocks_total == tokens.size // 16
    item = dataset[0]
    assert item["index"] == 3 and item["input_ids"].dtype == torch.long
    assert item["input_ids"].tolist() == tokens[48:64].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Datasets and loaders
# ---------------------------------------------------------------------------------------------------------------


class _Tok:
    pad_token_id = 0


def caption_dataset(root: Path, n: int = 40, max_length: int = 6) -> ImageCaptionDataset:
    store = open_store(write_cc3m(root, n=n))
    # caption i -> BOS, i+4 repeated (i % 7) times, EOS (lengths 2..8)
    seqs = [[1, *([i + 4] * (i % 7)), 2] for i in range(n)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    tokens = CaptionTokens(np.concatenate(seqs).astype(np.uint16), offsets, np.ones(n, np.int32))
    return ImageCaptionDataset(store, _Tok(), max_length=max_length, caption_tokens=tokens)


def test_split_indices() -> None:
    train, val = split_indices(100, 0.1, seed=5)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(100))
    assert np.array_equal(split_indices(100, 0.1, seed=5)[1], val)
    assert not np.array_equal(split_indices(100, 0.1, seed=6)[1], val)
    assert len(split_indices(10, 0.01)[1]) == 1 and len(split_indices(10, 0.0)[1]) == 0


def test_caption_items_and_collate(tmp_path: Path) -> None:
    dataset = caption_dataset(tmp_path)
    item = dataset[5]
    assert item["vision_features"].dtype == torch.float32 and item["vision_features"].shape == (DIM,)
    assert item["input_ids"].tolist() == [1, 9, 9, 9, 9, 9]  # truncated to max_length: EOS cut
    assert dataset[2]["input_ids"].tolist() == [1, 6, 6, 2] and item["index"] == 5
    batch = collate_captions(dataset.__getitems__([7, 2, 5, 7]), pad_id=0)
    assert batch["kind"] == "caption"
    assert batch["input_ids"].tolist() == [
        [1, 2, 0, 0, 0, 0],
        [1, 6, 6, 2, 0, 0],
        [1, 9, 9, 9, 9, 9],
        [1, 2, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [2, 4, 6, 2]
    assert batch["vision_features"][:, 0].tolist() == [7, 2, 5, 7] and batch["indices"].tolist() == [7, 2, 5, 7]
    generic = collate_captions([dataset[i] for i in (7, 2, 5, 7)], pad_id=0)  # the per-item path agrees
    for key in ("input_ids", "attention_mask", "vision_features", "indices"):
        assert torch.equal(generic[key], batch[key])


def test_dataloader_with_two_workers_matches_in_process(tmp_path: Path) -> None:
    dataset = caption_dataset(tmp_path)

    def run(workers: int) -> list[dict]:
        return list(DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=collate_captions))

    for a, b in zip(run(0), run(2), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["vision_features"], b["vision_features"])


def test_distributed_sampler_shards_are_disjoint_and_complete(tmp_path: Path) -> None:
    dataset = caption_dataset(tmp_path, n=40)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(dataset, batch_size=6, sampler=sampler, collate_fn=collate_captions)
        seen.append([i for batch in loader for i in batch["indices"].tolist()])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(40))


def _text_blocks(
    tmp_path: Path, small_tokenizer: PreTrainedTokenizerFast, block: int = 4, n_blocks: int | None = None
) -> TextBlockDataset:
    cache = build_token_cache(write_text_zip(tmp_path / "t"), small_tokenizer, tmp_path / "cache")
    return TextBlockDataset(cache.path, block, None if n_blocks is None else np.arange(n_blocks))


def test_mixed_loader_ratio_determinism_and_resume(tmp_path: Path, small_tokenizer: PreTrainedTokenizerFast) -> None:
    captions = caption_dataset(tmp_path / "c", n=40)
    blocks = _text_blocks(tmp_path, small_tokenizer)

    def make(**kw: Any) -> MixedBatchLoader:
        return MixedBatchLoader(blocks, captions, batch_size=4, text_ratio=0.3, seed=1, **kw)

    loader = make(epoch=0)
    assert loader.counts == (4, 10) and len(loader) == 14  # 10 caption batches, 4 text = 0.3 of 14 (rounded)
    full = list(loader)
    kinds = [b["kind"] for b in full]
    assert (
        kinds.count("caption") == 10
        and kinds.count("text") == 4
        and kinds == [("text", "caption")[k] for k in loader.kinds]
    )
    caption_ids = [i for b in full if b["kind"] == "caption" for i in b["indices"].tolist()]
    assert sorted(caption_ids) == list(range(40))  # one pass over the captions
    assert all(b["input_ids"].shape == (4, 4) for b in full if b["kind"] == "text")
    again = list(make(epoch=0))
    other_epoch = make(epoch=1)
    assert [b["indices"].tolist() for b in again] == [b["indices"].tolist() for b in full]
    assert [b["indices"].tolist() for b in other_epoch] != [b["indices"].tolist() for b in full]
    resumed = make(epoch=0, start_batch=9)
    assert len(resumed) == 5
    tail = list(resumed)
    assert len(tail) == 5
    for a, b in zip(tail, full[9:], strict=True):
        assert a["kind"] == b["kind"] and torch.equal(a["input_ids"], b["input_ids"])
    workers = list(make(epoch=0, start_batch=9, num_workers=2))
    for a, b in zip(workers, tail, strict=True):
        assert a["kind"] == b["kind"] and torch.equal(a["input_ids"], b["input_ids"])
    text_only = MixedBatchLoader(blocks, None, batch_size=4, text_ratio=1.0, seed=1, epoch=0)
    assert len(text_only) == -(-len(blocks) // 4) and {b["kind"] for b in text_only} == {"text"}
    with pytest.raises(DataError, match="no caption data"):
        MixedBatchLoader(blocks, None, batch_size=4, text_ratio=0.5, seed=1, epoch=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mixed_loader_ranks_are_disjoint_with_the_same_schedule(
    tmp_path: Path, small_tokenizer: PreTrainedTokenizerFast, seed: int
) -> None:
    captions = caption_dataset(tmp_path / "c", n=37)  # 37 = 4 global batches of 8 + 5: the last one wraps
    blocks = _text_blocks(tmp_path, small_tokenizer, n_blocks=21)
    ranks = [
        MixedBatchLoader(blocks, captions, batch_size=4, text_ratio=0.6, seed=seed, epoch=3, rank=r, world_size=2)
        for r in range(2)
    ]
    assert np.array_equal(ranks[0].kinds, ranks[1].kinds)
    assert ranks[0].counts[0] * 8 > len(blocks)  # text wraps into a second permutation too
    per_rank = [[ld.batch_indices(b) for b in range(ld.num_batches)] for ld in ranks]
    for b in range(ranks[0].num_batches):  # no sample twice in a global batch: ranks disjoint, batches unique
        both = per_rank[0][b][1].tolist() + per_rank[1][b][1].tolist()
        assert len(both) == 8 and len(set(both)) == 8
    caption_ids = {i for r in range(2) for kind, idx in per_rank[r] if kind == 1 for i in idx.tolist()}
    assert caption_ids == set(range(37))  # every caption seen in the epoch


# ---------------------------------------------------------------------------------------------------------------
# build_data on the sample world
# ---------------------------------------------------------------------------------------------------------------


def test_build_data_on_the_sample_world(tmp_path: Path) -> None:
    data_dir = tmp_path / "sample"
    overrides = [
        f"data.data_dir={data_dir}",
        "data.vocab_size=500",
        "data.text_block_length=32",
        "data.validation_fraction=0.1",
        "data.sample.generate_if_missing=true",
        "data.sample.num_cc3m=200",
        "data.sample.num_local_narratives=20",
        "data.sample.num_text_lines=400",
        "data.sample.num_novel_episodes=4",
        "training.batch_size=16",
    ]
    cfg = load_config(None, overrides)
    data = build_data(cfg, tmp_path / "run")
    assert (data_dir / layout.CC3M_CAPTIONS).is_file()  # generated because it was missing
    info = data.summary()
    assert info["caption_rows"] == {"train": 198, "validation": 22}
    assert info["text_words"] > 1000 and info["total_words"] == info["text_words"] + info["caption_words_train"]
    corpus = data.tokenizer.decode(np.asarray(data.text_tokens.array()).tolist())
    assert "look at" in corpus and not any(mark in corpus for mark in ("*CHI:", "*MOT:", "%mor", "A:\t", "= = ="))
    phase1 = list(data.loader(1, epoch=0))
    assert {b["kind"] for b in phase1} == {"text"} and len(phase1) == -(-len(data.text_train) // 16)
    phase2 = data.loader(2, epoch=0)
    kinds = [b["kind"] for b in phase2]
    assert kinds.count("caption") == 13 and kinds.count("text") == round(13 * 0.3 / 0.7)
    batch = next(b for b in data.loader(3, epoch=1) if b["kind"] == "caption")
    assert (
        batch["vision_features"].shape == (16, 768) and batch["input_ids"][:, 0].eq(data.tokenizer.bos_token_id).all()
    )
    ends = batch["input_ids"].gather(1, batch["attention_mask"].sum(1, keepdim=True) - 1)
    assert ends.eq(data.tokenizer.eos_token_id).all()  # short sample captions always fit: BOS ... EOS
    val = data.validation_loaders()
    assert sum(len(b["indices"]) for b in val["caption"]) == 22
    assert sum(len(b["indices"]) for b in val["text"]) == len(data.text_val)
    # limits for smoke runs
    capped = load_config(None, [*overrides, "data.max_caption_samples=50", "data.max_text_tokens=2000"])
    small = build_data(capped, tmp_path / "run-small")
    assert small.summary()["caption_rows"] == {"train": 45, "validation": 5}
    assert small.summary()["text_tokens"] == 2000
    # two ranks split the caption validation set
    rank1 = build_data(cfg, tmp_path / "run", rank=1, world_size=2)
    assert sum(len(b["indices"]) for b in rank1.validation_loaders()["caption"]) == 11


# ---------------------------------------------------------------------------------------------------------------
# One rule each: rows dropped, caption layouts, where the corpus is; the sample world never over other files
# ---------------------------------------------------------------------------------------------------------------


def test_a_source_whose_every_row_would_be_dropped_is_an_error(tmp_path: Path) -> None:
    write_cc3m(tmp_path, n=5)
    for name in layout.CC3M_FEATURES:
        array = np.load(tmp_path / name)
        array[:, 0] = np.nan
        np.save(tmp_path / name, array)
    with pytest.raises(DataError, match=r"cc3m .*every one of its 5 rows would be dropped \(5 with NaN/inf"):
        open_store(tmp_path)
    write_cc3m(tmp_path, n=5, captions=["", " ", "", "\t", ""])
    with pytest.raises(DataError, match=r"every one of its 5 rows would be dropped \(0 with NaN/inf .*5 with an empty"):
        open_store(tmp_path)


def test_wrapped_caption_list_is_named(tmp_path: Path) -> None:
    write_cc3m(tmp_path, captions={"captions": [f"caption {i}" for i in range(11)]})  # type: ignore[arg-type]
    with pytest.raises(DataError, match="JSON object whose entry 'captions' is a list"):
        open_store(tmp_path)


def test_every_missing_text_source_is_named_at_once(tmp_path: Path) -> None:
    root = write_text_zip(tmp_path / "z", lines=None)
    with zipfile.ZipFile(root / layout.TEXT_ZIP, "w") as archive:
        archive.writestr("train_50M/childes.train", "hi\n")
    with pytest.raises(DataError) as exc:
        locate_text_files(root)
    assert all(f"no member named {s}.train" in str(exc.value) for s in layout.TEXT_SOURCES if s != "childes")
    with pytest.raises(DataError, match="text sources 'bnc_spoken', 'gutenberg' not found"):
        locate_text_files(tmp_path / "empty", ["bnc_spoken", "gutenberg"])


def test_unpacked_or_flat_corpus_counts_as_present(tmp_path: Path) -> None:
    from bitmar.data.datasets import _missing_required

    write_cc3m(tmp_path)
    assert _missing_required(tmp_path) == [layout.TEXT_ZIP]
    for source in layout.TEXT_SOURCES:  # flat <source>.train files: what locate_text_files reads
        (tmp_path / f"{source}.train").write_text("hello .\n", encoding="utf-8")
    assert _missing_required(tmp_path) == []


def test_build_data_refuses_an_empty_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitmar.config import ConfigError

    with pytest.raises(ConfigError, match="data.data_dir='' is empty"):
        load_config(None, ["data.data_dir="])
    cfg = load_config(None, ["data.sample.generate_if_missing=true"])
    cfg.data.data_dir = ""  # a config built in code, past validation
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data.data_dir is empty.*current directory"):
        build_data(cfg, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory


def test_build_data_never_regenerates_over_files_it_did_not_write(tmp_path: Path) -> None:
    from bitmar.config import SampleDataConfig
    from bitmar.data.sample import generate_sample_dataset, sha256_file

    sizes = {"num_cc3m": 60, "num_local_narratives": 10, "num_text_lines": 120, "num_novel_episodes": 4}
    data_dir, other = tmp_path / "data", tmp_path / "other"
    generate_sample_dataset(data_dir, SampleDataConfig(seed=0, **sizes))
    generate_sample_dataset(other, SampleDataConfig(seed=7, **sizes))  # a valid data set with other bytes
    for name in layout.ALL_FILES:  # "a real download" into the sample's directory
        (data_dir / name).write_bytes((other / name).read_bytes())
    before = {name: sha256_file(data_dir / name) for name in layout.ALL_FILES}
    overrides = [
        f"data.data_dir={data_dir}",
        "data.sample.generate_if_missing=true",
        *(f"data.sample.{k}={v}" for k, v in sizes.items()),
        "data.sample.seed=3",  # the config asks for another sample world: stale, so it would regenerate
        "data.vocab_size=300",
        "data.text_block_length=16",
        "data.validation_fraction=0.1",
    ]
    with pytest.raises(DataError, match=r"(?s)refusing to overwrite 6 file\(s\).*generate_if_missing=false"):
        build_data(load_config(None, overrides), tmp_path / "run")
    assert {name: sha256_file(data_dir / name) for name in layout.ALL_FILES} == before
    # As the message says: without generate_if_missing the run trains on the files as they are.
    data = build_data(load_config(None, [*overrides, "data.sample.generate_if_missing=false"]), tmp_path / "run2")
    assert data.summary()["caption_rows"]["train"] > 0
    assert {name: sha256_file(data_dir / name) for name in layout.ALL_FILES} == before

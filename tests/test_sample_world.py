"""The sample grounded world: determinism, the official layout, row pairing, grounding and the evaluation sets."""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bitmar.config import SampleDataConfig
from bitmar.data import layout, sample
from bitmar.data.errors import DataError
from bitmar.data.pseudowords import plural_of, pseudo_word_pool, split_of
from bitmar.data.sample import (
    COLOURS,
    SampleWorld,
    Scene,
    generate_sample_dataset,
    normalize_sentence,
    scene_caption_pairs,
    world_scenes,
)

SMALL = SampleDataConfig(seed=3, num_cc3m=1600, num_local_narratives=80, num_text_lines=900, num_novel_episodes=24)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sample")
    return root, generate_sample_dataset(root, SMALL)


def _features(root: Path) -> np.ndarray:
    return np.concatenate([np.load(root / name) for name in layout.CC3M_FEATURES])


def _training_lines(root: Path) -> list[str]:
    with zipfile.ZipFile(root / layout.TEXT_ZIP) as archive:
        return [line for name in archive.namelist() for line in archive.read(name).decode("utf-8").splitlines()]


def _first_colour(caption: str) -> int:
    """Index of the first colour word of the caption's description (after any question-answer turns); -1: none."""
    description = caption.split(". ")[-1] if "?" in caption else caption
    return next((COLOURS.index(w) for w in description.lower().replace(".", " ").split() if w in COLOURS), -1)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, world: tuple[Path, dict]) -> None:
    root, summary = world
    again = tmp_path / "again"
    generate_sample_dataset(again, SMALL)
    for rel in summary["files"]:
        assert (again / rel).read_bytes() == (root / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate_sample_dataset(other, SampleDataConfig(seed=4, num_cc3m=40, num_local_narratives=4, num_text_lines=60))
    assert (
        json.loads((other / layout.CC3M_CAPTIONS).read_text())[:40]
        != json.loads((root / layout.CC3M_CAPTIONS).read_text())[:40]
    )


def test_official_layout_shapes_and_dtypes(world: tuple[Path, dict]) -> None:
    root, summary = world
    for name in layout.ALL_FILES:
        assert (root / name).is_file(), name
    with zipfile.ZipFile(root / layout.TEXT_ZIP) as archive:
        assert sorted(archive.namelist()) == sorted(f"train_50M/{s}.train" for s in layout.TEXT_SOURCES)
    captions = json.loads((root / layout.CC3M_CAPTIONS).read_text(encoding="utf-8"))
    assert len(captions) == SMALL.num_cc3m and all(isinstance(c, str) and c for c in captions)
    halves = [np.load(root / name, mmap_mode="r") for name in layout.CC3M_FEATURES]
    assert [h.shape for h in halves] == [(800, 768), (800, 768)]
    assert all(h.dtype == np.float16 for h in halves)
    narratives = json.loads((root / layout.LOCAL_NARR_CAPTIONS).read_text(encoding="utf-8"))
    ln = np.load(root / layout.LOCAL_NARR_FEATURES, mmap_mode="r")
    assert ln.shape == (len(narratives), 768) == (SMALL.num_local_narratives, 768)
    # Localized Narratives are longer, multi-sentence
    assert np.mean([len(c.split()) for c in narratives]) > 1.5 * np.mean([len(c.split()) for c in captions])
    assert all(c.count(".") >= 2 for c in narratives)
    # DINOv2-CLS-like statistics, not one-hot
    x = _features(root).astype(np.float32)
    norms = np.linalg.norm(x, axis=1)
    assert 30 < norms.mean() < 60
    assert abs(x.mean()) < 0.2 and 1.0 < x.std(axis=0).mean() < 2.5
    assert (np.abs(x) > 0.5).mean() > 0.3  # dense
    # no half-written leftovers
    assert not [p for p in root.iterdir() if p.name.startswith(".sample-tmp")]


def test_caption_k_pairs_with_feature_row_k_across_the_half_boundary(world: tuple[Path, dict]) -> None:
    root, _ = world
    scenes, captions = world_scenes(SMALL)["cc3m"]
    assert json.loads((root / layout.CC3M_CAPTIONS).read_text(encoding="utf-8")) == captions
    x = _features(root).astype(np.float32)
    clean = SampleWorld(SMALL.seed).features(scenes, rng=None)  # noiseless feature of every scene
    half = np.load(root / layout.CC3M_FEATURES[0], mmap_mode="r").shape[0]
    for k in (0, 1, half - 1, half, half + 1, len(scenes) - 1):
        nearest = int(np.argmin(np.linalg.norm(clean - x[k], axis=1)))
        assert scenes[nearest] == scenes[k], f"row {k} is closest to scene {nearest}"


def test_captions_depend_on_features_text_alone_cannot_tell_the_colour(world: tuple[Path, dict]) -> None:
    root, _ = world
    captions = json.loads((root / layout.CC3M_CAPTIONS).read_text(encoding="utf-8"))
    x = _features(root).astype(np.float32)
    y = np.array([_first_colour(c) for c in captions])
    keep = y >= 0  # captions that name a colour ("a dog on a box" names none)
    x, y, captions = x[keep], y[keep], [c for c, k in zip(captions, keep, strict=True) if k]
    n_train = int(0.75 * len(y))
    train, test = slice(0, n_train), slice(n_train, None)  # the test rows are all in half 2

    def ridge_accuracy(a: np.ndarray) -> float:
        mu, sd = a[train].mean(0), a[train].std(0) + 1e-6
        a = np.hstack([(a - mu) / sd, np.ones((len(a), 1))])
        w = np.linalg.solve(a[train].T @ a[train] + 30.0 * np.eye(a.shape[1]), a[train].T @ np.eye(8)[y[train]])
        return float(((a[test] @ w).argmax(1) == y[test]).mean())

    vision = ridge_accuracy(x)
    # text-only baseline: bag of words of the caption with every colour word removed
    vocab = sorted({w for c in captions for w in c.split() if w not in COLOURS})
    bow = np.array([[c.split().count(w) for w in vocab] for c in captions], dtype=np.float32)
    text_only = ridge_accuracy(bow)
    majority = Counter(y[train]).most_common(1)[0][1] / n_train
    assert vision > 0.5, vision  # chance is 1/8
    assert text_only < 0.25, text_only
    assert vision > text_only + 0.3 and vision > 2 * majority


def test_features_are_not_a_linear_code_of_the_words() -> None:
    scenes, captions, x = scene_caption_pairs(200, seed=0)
    assert x.shape == (200, 768) and x.dtype == np.float32 and len(captions) == 200
    # the same object with another colour moves many dimensions, and the move depends on the object
    world = SampleWorld(0)
    base = scenes[0]
    assert base.objects[0].colour is not None
    recolour = [c for c in COLOURS if c != base.objects[0].colour][0]

    def with_colour(scene: Scene, colour: str) -> Scene:
        o0 = dataclasses.replace(scene.objects[0], colour=colour)
        return dataclasses.replace(scene, objects=(o0, *scene.objects[1:]))

    other_noun = next(s for s in scenes if s.objects[0].noun != base.objects[0].noun)
    f = world.features(
        [base, with_colour(base, recolour), with_colour(other_noun, base.objects[0].colour),
         with_colour(other_noun, recolour)], rng=None,
    )  # fmt: skip
    delta_a = f[1] - f[0]  # colour change on object A
    delta_b = f[3] - f[2]  # the same colour change on object B
    assert (np.abs(delta_a) > 0.1).mean() > 0.3
    cosine = float(delta_a @ delta_b / np.linalg.norm(delta_a) / np.linalg.norm(delta_b))
    assert cosine < 0.7  # an additive word code would move the features the same way (cosine 1)


def test_text_corpus_styles(world: tuple[Path, dict]) -> None:
    root, _ = world
    with zipfile.ZipFile(root / layout.TEXT_ZIP) as archive:
        childes = archive.read("train_50M/childes.train").decode("utf-8").splitlines()
        switchboard = archive.read("train_50M/switchboard.train").decode("utf-8").splitlines()
        wiki = archive.read("train_50M/simple_wiki.train").decode("utf-8").splitlines()
    assert childes[0].startswith("= = = ") and childes[0].endswith(" = = =")
    assert all(re.match(r"^(\*[A-Z]{3}:\t|%mor:\t|= = = )", line) for line in childes)
    assert all(re.match(r"^[AB]:\t\S", line) for line in switchboard)
    assert any(line.startswith("= = = ") for line in wiki) and any(line.endswith(".") for line in wiki)


def test_blimp_pairs_are_held_out_minimal_pairs(world: tuple[Path, dict]) -> None:
    root, summary = world
    seen = {normalize_sentence(line) for line in _training_lines(root)}
    files = sorted((root / layout.BLIMP_DIR).glob("*.jsonl"))
    assert {f.stem for f in files} >= {"determiner_noun_agreement", "subject_verb_agreement", "adjective_order"}
    for f in files:
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == sample.BLIMP_PAIRS_PER_UID
        for row in rows:
            assert set(row) >= {"sentence_good", "sentence_bad", "UID", "field"}
            assert row["UID"] == f.stem and row["sentence_good"] != row["sentence_bad"]
            assert normalize_sentence(row["sentence_good"]) not in seen
            good, bad = row["sentence_good"].split(), row["sentence_bad"].split()
            assert len(good) == len(bad)
            if f.stem in ("adjective_order", "word_order"):
                assert sorted(w.lower() for w in good) == sorted(w.lower() for w in bad)
            else:
                assert sum(a != b for a, b in zip(good, bad, strict=True)) == 1


def test_winoground_vqa_and_novel_episode_files(world: tuple[Path, dict]) -> None:
    root, _ = world
    wino = [json.loads(line) for line in (root / layout.WINOGROUND_FILE).read_text().splitlines()]
    wino_x = np.load(root / sample.WINOGROUND_FEATURES)
    assert wino_x.shape == (2 * len(wino), 768)
    for item in wino:
        c0, c1 = item["caption_0"], item["caption_1"]
        assert c0 != c1 and sorted(c0.split()) == sorted(c1.split())
        assert not np.allclose(wino_x[item["image_0"]], wino_x[item["image_1"]])
    vqa = [json.loads(line) for line in (root / layout.VQA_FILE).read_text().splitlines()]
    vqa_x = np.load(root / sample.VQA_FEATURES)
    assert {q["question_type"] for q in vqa} == {"colour", "object", "count", "setting"}
    for q in vqa:
        assert len(q["distractors"]) == 7 and len(set(q["distractors"])) == 7
        assert q["answer"] not in q["distractors"] and 0 <= q["image"] < len(vqa_x)
    novel = [json.loads(line) for line in (root / layout.NOVEL_EPISODES_FILE).read_text().splitlines()]
    novel_x = np.load(root / layout.NOVEL_EPISODES_FEATURES)
    assert len(novel) == SMALL.num_novel_episodes and novel_x.shape == (2 * len(novel), 768)
    training_words = {w for line in _training_lines(root) for w in re.findall(r"[a-z]+", line.lower())}
    for name in (layout.CC3M_CAPTIONS, layout.LOCAL_NARR_CAPTIONS):
        training_words |= {w for c in json.loads((root / name).read_text()) for w in re.findall(r"[a-z]+", c.lower())}
    nonce = {w for ep in novel for w in ep["nonce_words"]}
    assert len(nonce) == len(novel)  # one distinct held-out pseudo-word per episode
    assert all(split_of(w) == "eval" for w in nonce)  # from the evaluation pool, disjoint from phase 3's pool
    assert not nonce & set(pseudo_word_pool("train", 4000, 0))
    assert not training_words & (nonce | {plural_of(w) for w in nonce})  # never in any training text
    for ep in novel:
        assert ep["nonce_words"][0] in ep["caption"].split()
        assert len(ep["foils"]) == 3 and ep["caption"] not in ep["foils"]
        study, test = novel_x[ep["study_image"]].astype(np.float32), novel_x[ep["test_image"]].astype(np.float32)
        assert not np.array_equal(study, test)  # two views, independent noise
    # the two views of an episode are each other's nearest neighbours (recall is possible)
    x = novel_x.astype(np.float32)
    d = np.linalg.norm(x[0::2, None] - x[None, 1::2], axis=-1)
    assert (d.argmin(axis=1) == np.arange(len(novel))).mean() > 0.9


def test_refuses_to_overwrite_a_real_download(tmp_path: Path) -> None:
    (tmp_path / layout.CC3M_CAPTIONS).write_text('["a real caption"]', encoding="utf-8")
    tiny = SampleDataConfig(num_cc3m=10, num_local_narratives=4, num_text_lines=60, num_novel_episodes=4)
    with pytest.raises(DataError, match=r"refusing to overwrite 1 file\(s\) .*did not write.*cc_3M_captions.json"):
        generate_sample_dataset(tmp_path, tiny)
    assert (tmp_path / layout.CC3M_CAPTIONS).read_text(encoding="utf-8") == '["a real caption"]'
    generate_sample_dataset(tmp_path, tiny, overwrite=True)
    generate_sample_dataset(tmp_path, tiny)  # a sample world may be regenerated
    assert len(json.loads((tmp_path / layout.CC3M_CAPTIONS).read_text())) == 10


def test_crash_while_writing_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_write(path: Path, array: np.ndarray) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)

    monkeypatch.setattr(sample, "_write_npy", failing_write)
    tiny = SampleDataConfig(num_cc3m=10, num_local_narratives=4, num_text_lines=60, num_novel_episodes=4)
    with pytest.raises(OSError, match="disk full"):
        generate_sample_dataset(tmp_path, tiny)
    assert list(tmp_path.iterdir()) == []  # no target file, no temporary folder


def test_sample_sizes_are_validated(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="num_cc3m"):
        generate_sample_dataset(tmp_path, SampleDataConfig(num_cc3m=1))


TINY = SampleDataConfig(num_cc3m=10, num_local_narratives=4, num_text_lines=60, num_novel_episodes=4)


def _manifest(root: Path) -> dict:
    return json.loads((root / sample.SAMPLE_MANIFEST).read_text(encoding="utf-8"))


def test_manifest_records_every_written_file_with_sha256(world: tuple[Path, dict]) -> None:
    root, summary = world
    manifest = _manifest(root)
    assert manifest["complete"] is True and "replacing" not in manifest
    assert sorted(manifest["files"]) == sorted(f for f in summary["files"] if f != sample.SAMPLE_MANIFEST)
    for rel, entry in manifest["files"].items():
        assert entry == {"size": (root / rel).stat().st_size, "sha256": sample.sha256_file(root / rel)}, rel
    status = sample.sample_world_status(root)
    assert status is not None and status.pure and not status.foreign and set(layout.ALL_FILES) <= set(status.ours)


def test_a_marker_that_outlives_a_download_is_no_licence_to_overwrite(tmp_path: Path) -> None:
    """--test, then a real download into the same directory: the manifest stays, the files are no longer the
    sample's, and regenerating (e.g. with other sizes) must refuse instead of writing over them."""
    generate_sample_dataset(tmp_path, TINY)
    real = {name: f"real bytes of {name}".encode() for name in layout.ALL_FILES}
    for name, data in real.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match="refusing to overwrite 6 file") as exc:
        generate_sample_dataset(tmp_path, dataclasses.replace(TINY, num_cc3m=12))
    assert all(name in str(exc.value) for name in layout.ALL_FILES[:6]) and "--overwrite" in str(exc.value)
    assert {name: (tmp_path / name).read_bytes() for name in real} == real
    assert not list(tmp_path.glob(".sample-tmp-*"))
    status = sample.sample_world_status(tmp_path)
    assert status is not None and not status.pure and sorted(status.foreign) == sorted(layout.ALL_FILES)


def test_same_size_edit_is_detected_by_hash(tmp_path: Path) -> None:
    generate_sample_dataset(tmp_path, TINY)
    path = tmp_path / layout.CC3M_CAPTIONS
    edited = path.read_bytes().replace(b"a ", b"A ", 1)
    assert len(edited) == path.stat().st_size and edited != path.read_bytes()
    path.write_bytes(edited)
    with pytest.raises(DataError, match=f"refusing to overwrite 1 file.*{layout.CC3M_CAPTIONS}"):
        generate_sample_dataset(tmp_path, dataclasses.replace(TINY, seed=5))
    assert path.read_bytes() == edited
    generate_sample_dataset(tmp_path, dataclasses.replace(TINY, seed=5), overwrite=True)  # explicit: replaced
    assert path.read_bytes() != edited and _manifest(tmp_path)["seed"] == 5


def test_unreadable_manifest_vouches_for_nothing(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / sample.SAMPLE_MANIFEST).write_text('{"kind": "something else"}', encoding="utf-8")
    with pytest.raises(DataError, match="refusing to overwrite 1 file.*eval/sample_world.json"):
        generate_sample_dataset(tmp_path, TINY)
    assert (tmp_path / sample.SAMPLE_MANIFEST).read_text(encoding="utf-8") == '{"kind": "something else"}'


def test_crash_while_moving_files_leaves_a_world_the_next_run_regenerates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_sample_dataset(tmp_path, TINY)
    real_replace = sample.os.replace
    calls = []

    def crash_on_fourth(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 4:  # the pending manifest and two files are in place, the rest still the old seed's
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(sample.os, "replace", crash_on_fourth)
    with pytest.raises(OSError, match="killed"):
        generate_sample_dataset(tmp_path, dataclasses.replace(TINY, seed=9))
    monkeypatch.undo()
    manifest = _manifest(tmp_path)
    assert manifest["complete"] is False and manifest["replacing"]  # old and new content both vouched for
    status = sample.sample_world_status(tmp_path)
    assert status is not None and not status.complete and not status.foreign
    generate_sample_dataset(tmp_path, dataclasses.replace(TINY, seed=9))  # the mix of old and new is all ours
    assert _manifest(tmp_path)["complete"] is True and sample.sample_world_status(tmp_path).pure


def test_empty_directory_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="empty path.*current directory"):
        generate_sample_dataset("", TINY)
    assert list(tmp_path.iterdir()) == []

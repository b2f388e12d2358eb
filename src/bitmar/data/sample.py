"""The sample grounded world: a small, fully synthetic stand-in for the BabyLM multimodal release.

`generate_sample_dataset(data_dir, sample_cfg)` writes exactly the official layout (`bitmar.data.layout`), so
every loader, the verifier and the trainer run unchanged on it, plus evaluation sets under `eval/`.

Where the code lives: the vocabulary in `bitmar.data.vocabulary`, scenes and their features in `bitmar.data.world`,
captions and the text-only corpus in `bitmar.data.world_text`, the evaluation sets in `bitmar.data.world_eval`; this
module writes the files and the manifest, and re-exports the public names of the others (import them from here).

The world
---------
Each "image" is a latent scene (`Scene`): one or two objects (`SceneObject`: a noun out of 14, a colour out of 8,
optionally a size out of 3, a count 1-3), a spatial relation between the two objects (`next to`, `on`, `under`,
`behind`, `in front of`, `near`) and optionally a setting (`in the park`, `at the beach`, ... 8 of them).
Its 768-d "DINOv2" vector is a FIXED random nonlinear function of the scene (`SampleWorld.features`):
the sum of random embeddings of (slot, attribute, value) triples (colour and size mostly bound to their
object by an elementwise product with the noun's embedding), a random 2-layer tanh MLP, then a per-dimension
affine map that gives DINOv2-CLS-like statistics (per-dim mean ~0, std ~1.4 with a few heavy dims, norm ~45),
plus per-view Gaussian noise. The function depends only on the seed. Captions describe the scene with varied
templates, so for a given template the attribute words can be read off the features but not guessed from the text.
A share of the CC3M-style captions (`QA_SHARE`) open with a child-directed question-answer exchange about the picture
("what color is the ball? red. a red ball next to a dog"; `question_answers` lists the questions a scene affords,
all true of it, yes/no ones also false), and the subject of a CC3M-style scene is uncoloured now and then
(`P_COLOUR0`), as in "a dog on a box". Evaluation scenes are drawn on their own stream and held out: no Winoground
caption occurs in any training caption, even inside a longer one (an item that would is redrawn).
Nonce nouns (`wug`, `dax`, ...) have their own embeddings but occur only in the novel-word episodes.

Files (paths relative to data_dir)
----------------------------------
- `train_50M.zip`: members `train_50M/<source>.train` for the six sources of `layout.TEXT_SOURCES`, UTF-8, one
  utterance per line, sentences from a small grammar over the world's vocabulary. `childes.train` uses CHAT lines
  (`*MOT:\\t...`, a few `%mor:\\t...` dependent tiers, `= = = name = = =` file headers), `switchboard.train` uses
  `A:\\t...` / `B:\\t...`, `simple_wiki.train` has `= = = Title = = =` headers, the others are plain lines.
- `cc_3M_captions.json`: JSON list of `num_cc3m` short lowercase captions ("a small red ball next to two dogs").
- `cc_3M_dino_v2_states_1of2.npy` / `_2of2.npy`: (ceil(n/2), 768) and (floor(n/2), 768) feature rows; stacked in
  order, row i pairs with caption i.
- `local_narr_captions.json` + `local_narr_dino_v2_states.npy`: `num_local_narratives` longer multi-sentence
  captions ("In this image we can see ... The ball is red. ...") and their feature rows.
- `eval/blimp/<UID>.jsonl`: minimal pairs, one JSON object a line with the official BLiMP keys `sentence_good`,
  `sentence_bad`, `field`, `linguistics_term`, `UID`, `pairID`. UIDs: `determiner_noun_agreement`,
  `subject_verb_agreement`, `adjective_order`, `word_order`. Sentences are held out (never a training line).
- `eval/winoground.jsonl`: `id`, `caption_0`, `caption_1` (same words, different order), `image_0`, `image_1`
  (row indices into `eval/winoground_features.npy`; image_k is the picture caption_k describes), `tag`
  (`object_swap` | `attribute_swap`).
- `eval/vqa.jsonl`: `id`, `question` ("what color are the balls?"), `answer`, `distractors` (exactly 7 wrong answers),
  `image` (row index into `eval/vqa_features.npy`), `question_type` (`colour` | `object` | `count` | `setting`).
- `eval/novel_episodes.jsonl`: `id`, `caption` (mentions a nonce object, "a red wug next to a dog"), `nonce_words`,
  `study_image` / `test_image` (row indices into `eval/novel_episodes_features.npy`: two views of the same scene
  with independent noise: write the study view into memory, query with the test view), `foils` (3 captions that
  differ from `caption` in the nonce word, a colour or the other object).
- `eval/sample_world.json` (the manifest): seed, counts, the vocabulary and `files`: the size and sha256 of every file
  the generator wrote. It marks the directory as a generated sample world, and it is the generator's licence to
  write: a file at a target path is replaced only when the manifest records it with the same sha256, so a real
  download (or any other file) that arrived later is never overwritten (`overwrite=True` / `--overwrite` forces it).

All feature files share the dtype given to `generate_sample_dataset` (float16 by default, like the release).
Everything is deterministic given `sample_cfg.seed`: the same seed writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitmar import fileio
from bitmar.config import SampleDataConfig
from bitmar.data import layout
from bitmar.data.errors import DataError

# The world is written by four modules (vocabulary, scenes and features, text, evaluation sets); users import their
# public names from here, where they always lived.
from bitmar.data.vocabulary import (  # noqa: F401  (re-exported)
    ASYMMETRIC_RELATIONS,
    COLOURS,
    COUNT_WORDS,
    MAX_COUNT,
    NONCE_NOUNS,
    NOUNS,
    RELATIONS,
    SETTINGS,
    SIZES,
    VERBS,
)
from bitmar.data.world import SampleWorld, Scene, SceneObject, sample_scene  # noqa: F401  (re-exported)
from bitmar.data.world_eval import (  # noqa: F401  (re-exported)
    BLIMP_PAIRS_PER_UID,
    BLIMP_UIDS,
    NUM_VQA,
    NUM_WINOGROUND,
    blimp_sets,
    held_out_pseudo_words,
    novel_episode_set,
    occurs_in_training,
    training_text_index,
    vqa_set,
    winoground_set,
)
from bitmar.data.world_text import (  # noqa: F401  (re-exported)
    P_COLOUR0,
    QA_SHARE,
    TEXT_SOURCE_WEIGHTS,
    canonical_caption,
    long_caption,
    normalize_sentence,
    noun_phrase,
    qa_caption,
    question_answers,
    scene_caption_pairs,
    short_caption,
    text_corpus,
    text_sentence,
    training_caption,
    world_scenes,
)

WINOGROUND_FEATURES = "eval/winoground_features.npy"
VQA_FEATURES = "eval/vqa_features.npy"
SAMPLE_MANIFEST = layout.SAMPLE_MANIFEST
MANIFEST_KIND = "bitmar-sample-world"
SAMPLE_DEFAULT_DIR = layout.SAMPLE_DEFAULT_DIR

_ZIP_DATE = (2024, 1, 1, 0, 0, 0)  # fixed member timestamps: same seed, same bytes


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=None), encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _write_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _write_zip(path: Path, members: dict[str, str]) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in members.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def _words(texts: Iterable[str]) -> int:
    return sum(len(t.split()) for t in texts)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The sample-world manifest of `data_dir` (None when there is none); an unreadable one is a DataError."""
    path = Path(data_dir) / SAMPLE_MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a readable sample-world manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise DataError(f'{path} is not a BitMar sample-world manifest (no "kind": "{MANIFEST_KIND}")')
    return manifest


def _recorded(manifest: dict[str, Any], rel: str) -> list[dict[str, Any]]:
    """What the manifest allows at `rel`: the written entry, plus the old one while a rewrite is under way."""
    entries = []
    for key in ("files", "replacing"):
        entry = (manifest.get(key) or {}).get(rel)
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def written_by_sample(data_dir: str | os.PathLike, manifest: dict[str, Any] | None, rel: str) -> bool:
    """True when the file at `rel` is one the manifest records, byte for byte (size, then sha256)."""
    path = Path(data_dir) / rel
    if manifest is None or not path.is_file():
        return False
    size = path.stat().st_size
    candidates = [e for e in _recorded(manifest, rel) if e.get("size") == size]
    if not candidates:  # sizes differ: no need to hash a multi-GB download
        return False
    digest = sha256_file(path)
    return any(e.get("sha256") == digest for e in candidates)


@dataclass
class SampleWorldStatus:
    """What a directory holds relative to its sample-world manifest."""

    manifest: dict[str, Any]
    ours: list[str]  # recorded files present with the recorded content
    foreign: list[str]  # recorded (or BabyLM) paths present with other content: not written by the generator
    missing: list[str]  # recorded files that are absent

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", True)) and not self.missing

    @property
    def pure(self) -> bool:
        """Every BabyLM file present was written by the generator and nothing it wrote is missing."""
        return self.complete and not self.foreign


def sample_world_status(data_dir: str | os.PathLike) -> SampleWorldStatus | None:
    """None when `data_dir` has no sample-world manifest; raises DataError for an unreadable manifest."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        return None
    rels = sorted(set(manifest.get("files") or {}) | set(layout.ALL_FILES))
    ours, foreign, missing = [], [], []
    for rel in rels:
        recorded = bool(_recorded(manifest, rel))
        if not (data_dir / rel).exists():
            if recorded:
                missing.append(rel)
        elif written_by_sample(data_dir, manifest, rel):
            ours.append(rel)
        else:
            foreign.append(rel)
    return SampleWorldStatus(manifest, ours, foreign, missing)


def _foreign_targets(data_dir: Path, targets: list[str]) -> list[str]:
    """Target paths that hold something the sample world did not write (the generator must not replace them)."""
    try:
        manifest = read_manifest(data_dir)
        foreign = []
    except DataError:  # a manifest we cannot read vouches for nothing, and is not ours to replace either
        manifest, foreign = None, [SAMPLE_MANIFEST]
    for rel in targets:
        if rel != SAMPLE_MANIFEST and (data_dir / rel).exists() and not written_by_sample(data_dir, manifest, rel):
            foreign.append(rel)
    return foreign


def _refuse_foreign(data_dir: Path, foreign: list[str]) -> DataError:
    shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
    return DataError(
        f"refusing to overwrite {len(foreign)} file(s) in {data_dir} that the sample world did not write (or that "
        f"changed since): {shown}. The generator only replaces files that its manifest ({SAMPLE_MANIFEST}) records "
        "with the same sha256, so a real BabyLM download is never lost. If these are real data, keep them and write "
        f"the sample world elsewhere (default {SAMPLE_DEFAULT_DIR}: python download_babylm_data.py --test); to "
        "replace them anyway, delete them first or pass --overwrite (download_babylm_data.py --test --overwrite)."
    )


def _write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    fileio.atomic_write_text(data_dir / SAMPLE_MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=None))


def generate_sample_dataset(
    data_dir: str | os.PathLike,
    sample_cfg: SampleDataConfig | None = None,
    feature_dim: int = layout.FEATURE_DIM,
    dtype: Any = np.float16,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the sample grounded world into `data_dir` (official layout + `eval/`); returns a summary dict.

    Files are built in a temporary folder inside `data_dir` and moved into place one by one with `os.replace`, so
    a crash never leaves a half-written file. A target path that already holds a file the manifest does not record
    with the same sha256 (a real download, a user's file, an edited file) is refused unless `overwrite=True`: nothing
    is moved then. Before the first move the manifest is rewritten as incomplete, recording both the old and the
    new content of every target, so a crash in the middle leaves a directory the next run may still regenerate.
    """
    if not str(data_dir).strip():
        raise DataError(
            f"the sample world needs a directory; got an empty path (it would write into the current directory "
            f"{Path.cwd()}). Pass a directory, e.g. {SAMPLE_DEFAULT_DIR}"
        )
    cfg = sample_cfg or SampleDataConfig()
    for key in ("num_cc3m", "num_local_narratives", "num_text_lines", "num_novel_episodes"):
        if getattr(cfg, key) < 2:
            raise DataError(f"data.sample.{key} must be >= 2, got {getattr(cfg, key)}")
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir} exists and is not a directory; pass a directory for the sample world")
    seed = cfg.seed
    world = SampleWorld(seed, feature_dim)
    rng = np.random.default_rng([seed, 0xBAB1])

    text = text_corpus(cfg.num_text_lines, np.random.default_rng([seed, 1]))
    (cc_scenes, cc_captions), (ln_scenes, ln_captions) = world_scenes(cfg).values()
    cc_features = world.features(cc_scenes, rng).astype(dtype)
    ln_features = world.features(ln_scenes, rng).astype(dtype)

    seen = {normalize_sentence(line) for lines in text.values() for line in lines}
    seen |= {normalize_sentence(c) for c in cc_captions + ln_captions}
    eval_rng = np.random.default_rng([seed, 3])
    blimp = blimp_sets(eval_rng, seen)
    winoground, wino_features = winoground_set(world, eval_rng, training_text_index(cc_captions + ln_captions))
    vqa, vqa_features = vqa_set(world, eval_rng)
    novel, novel_features = novel_episode_set(world, cfg.num_novel_episodes, eval_rng)

    half = (cfg.num_cc3m + 1) // 2
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND,
        "seed": seed,
        "feature_dim": feature_dim,
        "dtype": np.dtype(dtype).name,
        "num_cc3m": cfg.num_cc3m,
        "num_local_narratives": cfg.num_local_narratives,
        "num_text_lines": sum(len(v) for v in text.values()),
        "num_novel_episodes": cfg.num_novel_episodes,
        "vocabulary": {
            "colours": list(COLOURS), "sizes": list(SIZES), "nouns": list(NOUNS), "nonce_nouns": list(NONCE_NOUNS),
            "relations": list(RELATIONS), "settings": list(SETTINGS),
        },
    }  # fmt: skip

    data_dir.mkdir(parents=True, exist_ok=True)
    # Staged in a folder of its own, then moved file by file (not `fileio.atomic_directory`: data_dir also holds files
    # that are not ours, and the manifest must vouch for every file before it moves).
    tmp = Path(fileio.mkdtemp(dir=data_dir, prefix=".sample-tmp-"))
    try:
        prefix = Path(layout.TEXT_ZIP).stem  # "train_50M": the official zip unpacks into train_50M/<source>.train
        _write_zip(tmp / layout.TEXT_ZIP, {f"{prefix}/{s}.train": "\n".join(lines) + "\n" for s, lines in text.items()})
        _write_json(tmp / layout.CC3M_CAPTIONS, cc_captions)
        _write_npy(tmp / layout.CC3M_FEATURES[0], cc_features[:half])
        _write_npy(tmp / layout.CC3M_FEATURES[1], cc_features[half:])
        _write_json(tmp / layout.LOCAL_NARR_CAPTIONS, ln_captions)
        _write_npy(tmp / layout.LOCAL_NARR_FEATURES, ln_features)
        for uid, rows in blimp.items():
            _write_jsonl(tmp / layout.BLIMP_DIR / f"{uid}.jsonl", rows)
        _write_jsonl(tmp / layout.WINOGROUND_FILE, winoground)
        _write_npy(tmp / WINOGROUND_FEATURES, wino_features.astype(dtype))
        _write_jsonl(tmp / layout.VQA_FILE, vqa)
        _write_npy(tmp / VQA_FEATURES, vqa_features.astype(dtype))
        _write_jsonl(tmp / layout.NOVEL_EPISODES_FILE, novel)
        _write_npy(tmp / layout.NOVEL_EPISODES_FEATURES, novel_features.astype(dtype))
        data_files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        written = sorted([*data_files, SAMPLE_MANIFEST])
        if not overwrite:
            foreign = _foreign_targets(data_dir, written)
            if foreign:
                raise _refuse_foreign(data_dir, foreign)
        manifest["files"] = {rel: _file_entry(tmp / rel) for rel in data_files}
        manifest["complete"] = True
        try:
            previous = read_manifest(data_dir) or {}
        except DataError:
            previous = {}
        replacing = {
            rel: entry
            for rel, entry in (previous.get("files") or {}).items()
            if rel in manifest["files"] and entry != manifest["files"][rel]
        }
        # First the manifest that vouches for old and new content alike (a crash below leaves only files it records),
        # then the files, then the final manifest: it marks a complete sample world.
        _write_manifest(data_dir, {**manifest, "complete": False, "replacing": replacing})
        for rel in data_files:
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, data_dir / rel)
        _write_manifest(data_dir, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    text_lines = [line for lines in text.values() for line in lines]
    return {
        **{k: v for k, v in manifest.items() if k not in ("vocabulary", "files", "complete")},
        "data_dir": str(data_dir),
        "files": written,
        "text_words": _words(text_lines),
        "caption_words": _words(cc_captions) + _words(ln_captions),
        "blimp_pairs": {uid: len(rows) for uid, rows in blimp.items()},
        "winoground_items": len(winoground),
        "vqa_items": len(vqa),
    }

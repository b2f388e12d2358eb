"""The sample grounded world: a small, fully synthetic stand-in for the BabyLM multimodal release.

`generate_sample_dataset(data_dir, sample_cfg)` writes exactly the official layout (`bitmar.data.layout`), so
every loader, the verifier and the trainer run unchanged on it, plus evaluation sets under `eval/`.

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
import math
import os
import re
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
from bitmar.data.pseudowords import plural_of, pseudo_word_pool
from bitmar.data.vocabulary import (  # noqa: F401  (re-exported: users import the vocabulary from here)
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

WINOGROUND_FEATURES = "eval/winoground_features.npy"
VQA_FEATURES = "eval/vqa_features.npy"
SAMPLE_MANIFEST = layout.SAMPLE_MANIFEST
MANIFEST_KIND = "bitmar-sample-world"
SAMPLE_DEFAULT_DIR = layout.SAMPLE_DEFAULT_DIR

BLIMP_PAIRS_PER_UID = 100
NUM_WINOGROUND = 100
NUM_VQA = 200
TEXT_SOURCE_WEIGHTS = {  # share of the lines, close to the BabyLM mixture
    "bnc_spoken": 0.08, "childes": 0.29, "gutenberg": 0.26, "open_subtitles": 0.20, "simple_wiki": 0.15,
    "switchboard": 0.02,
}  # fmt: skip
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)  # fixed member timestamps: same seed, same bytes


@dataclass(frozen=True)
class SceneObject:
    noun: str
    colour: str | None
    size: str | None
    count: int = 1

    @property
    def plural(self) -> bool:
        return self.count > 1

    @property
    def noun_form(self) -> str:
        if not self.plural:
            return self.noun
        return NOUNS.get(self.noun) or NONCE_NOUNS.get(self.noun) or plural_of(self.noun)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # 1 or 2; slot 0 is the subject, slot 1 the reference object
    relation: str | None = None  # set iff there are two objects
    setting: str | None = None  # key of SETTINGS


# ----------------------------------------------------------------------------------------------------------------
# Feature function
# ----------------------------------------------------------------------------------------------------------------


class SampleWorld:
    """The fixed random nonlinear map scene -> 768-d feature vector (depends only on `seed` and `feature_dim`)."""

    LATENT = 192
    HIDDEN = 512
    GAIN = 2.0  # pre-activation scale of the tanh layer: clearly nonlinear, still decodable
    NOISE = 0.3  # per-view noise, relative to each dimension's std
    UNBOUND = 0.2  # weight of an attribute's object-independent embedding (the rest is bound to the noun)

    def __init__(self, seed: int, feature_dim: int = layout.FEATURE_DIM) -> None:
        self.seed = seed
        self.feature_dim = feature_dim
        rng = np.random.default_rng([seed, 0x5EED])
        L = self.LATENT
        vocab = {
            "noun": tuple(NOUNS),
            "colour": COLOURS,
            "size": SIZES,
            "count": tuple(range(1, MAX_COUNT + 1)),
        }
        self._emb: dict[tuple[str, int, Any], np.ndarray] = {}
        for slot in range(2):
            for kind, values in vocab.items():
                for value in values:
                    self._emb[(kind, slot, value)] = rng.standard_normal(L)
        for rel in RELATIONS:
            self._emb[("relation", 0, rel)] = rng.standard_normal(L)
        for setting in SETTINGS:
            self._emb[("setting", 0, setting)] = rng.standard_normal(L)
        self._w1 = rng.standard_normal((L, self.HIDDEN)) / math.sqrt(L)
        self._b1 = rng.standard_normal(self.HIDDEN) * 0.3
        self._w2 = rng.standard_normal((self.HIDDEN, feature_dim)) / math.sqrt(self.HIDDEN)
        # DINOv2-like per-dim statistics: lognormal stds around 1.5, a handful of heavy dims, small offsets.
        scale = 1.3 * np.exp(0.25 * rng.standard_normal(feature_dim))
        heavy = rng.choice(feature_dim, size=max(1, feature_dim // 96), replace=False)
        scale[heavy] *= rng.uniform(3.0, 6.0, size=heavy.size)
        self._scale = scale
        self._offset = 0.3 * rng.standard_normal(feature_dim)
        # Nonce nouns get embeddings from their own stream, so adding them never changes the known world.
        nonce_rng = np.random.default_rng([seed, 0xD0D0])
        for slot in range(2):
            for noun in NONCE_NOUNS:
                self._emb[("noun", slot, noun)] = nonce_rng.standard_normal(L)
        # Standardize the MLP output with statistics of a fixed calibration set of known scenes.
        calib = [sample_scene(np.random.default_rng([seed, 0xCA1B, i])) for i in range(512)]
        z = self._mlp(np.stack([self._latent(s) for s in calib]))
        self._mu = z.mean(axis=0)
        self._sd = z.std(axis=0) + 1e-6

    def _noun_embedding(self, slot: int, noun: str) -> np.ndarray:
        """Known and nonce nouns have fixed embeddings; a pseudo-word (a novel kind of object) gets its own, drawn
        from a stream keyed by the word, so adding one never changes the rest of the world."""
        key = ("noun", slot, noun)
        if key not in self._emb:
            digest = int.from_bytes(hashlib.sha256(noun.encode("utf-8")).digest()[:8], "little")
            self._emb[key] = np.random.default_rng([self.seed, 0xD0D0, slot, digest]).standard_normal(self.LATENT)
        return self._emb[key]

    def _latent(self, scene: Scene) -> np.ndarray:
        h = np.zeros(self.LATENT)
        for slot, obj in enumerate(scene.objects):
            noun = self._noun_embedding(slot, obj.noun)
            h += noun + self._emb[("count", slot, obj.count)]
            # Attributes are mostly bound to their object (elementwise product with the noun's embedding), so a
            # "red" object looks different on a ball and on a dog: linearly decodable only in part.
            for kind, value in (("colour", obj.colour), ("size", obj.size)):
                if value is not None:
                    attr = self._emb[(kind, slot, value)]
                    h += self.UNBOUND * attr + noun * attr
        if scene.relation is not None:
            h += self._emb[("relation", 0, scene.relation)]
        if scene.setting is not None:
            h += self._emb[("setting", 0, scene.setting)]
        return h / math.sqrt(3.0)  # keep the pre-activation in tanh's bending range

    def _mlp(self, h: np.ndarray) -> np.ndarray:
        return np.tanh(self.GAIN * (h @ self._w1) + self._b1) @ self._w2  # (N, D)

    def features(self, scenes: list[Scene], rng: np.random.Generator | None) -> np.ndarray:
        """(N, feature_dim) float32 features of `scenes`, one independent noise draw per row (rng=None: noiseless)."""
        if not scenes:
            return np.zeros((0, self.feature_dim), np.float32)
        z = (self._mlp(np.stack([self._latent(s) for s in scenes])) - self._mu) / self._sd
        if rng is not None:
            z = z + self.NOISE * rng.standard_normal(z.shape)
        return (z * self._scale + self._offset).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Scenes and captions
# ----------------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Iterable[Any]) -> Any:
    items = tuple(items)
    return items[int(rng.integers(len(items)))]


def sample_scene(
    rng: np.random.Generator,
    nouns: tuple[str, ...] = tuple(NOUNS),
    p_two: float = 0.6,
    p_setting: float = 0.4,
    p_colour0: float = 1.0,
) -> Scene:
    """A random scene over `nouns` (slot 0 has a colour with probability `p_colour0`, slot 1 with 0.7; the two
    objects never share a noun). The default p_colour0 = 1 draws exactly the random numbers it always drew."""
    n_objects = 2 if rng.random() < p_two else 1
    objects = []
    for slot in range(n_objects):
        noun = _pick(rng, [n for n in nouns if not objects or n != objects[0].noun])
        if slot == 0 and p_colour0 >= 1.0:
            coloured = True
        else:
            coloured = rng.random() < (p_colour0 if slot == 0 else 0.7)
        colour = _pick(rng, COLOURS) if coloured else None
        size = _pick(rng, SIZES) if rng.random() < 0.35 else None
        u = rng.random()
        count = 1 if u < 0.75 else (2 if u < 0.92 else 3)
        objects.append(SceneObject(noun, colour, size, count))
    relation = _pick(rng, RELATIONS) if n_objects == 2 else None
    setting = _pick(rng, SETTINGS) if rng.random() < p_setting else None
    return Scene(tuple(objects), relation, setting)


def noun_phrase(obj: SceneObject, definite: bool = False) -> str:
    """'a small red ball', 'the ball', 'two blue cups' (size before colour, as English wants)."""
    words = [w for w in (obj.size, obj.colour) if w]
    if obj.plural:
        det = "the" if definite else COUNT_WORDS[obj.count]
    else:
        det = "the" if definite else ("an" if (words[0] if words else obj.noun)[0] in "aeiou" else "a")
    return " ".join([det, *words, obj.noun_form])


def _be(obj: SceneObject) -> str:
    return "are" if obj.plural else "is"


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A CC3M-style caption: lowercase, no final period, one of several templates."""
    o0 = scene.objects[0]
    np0 = noun_phrase(o0)
    copula = len(scene.objects) == 2 and rng.random() < 0.3  # "a dog is on a box"
    if len(scene.objects) == 2:
        np1 = noun_phrase(scene.objects[1], definite=rng.random() < 0.3)
        body = f"{np0} {_be(o0)} {scene.relation} {np1}" if copula else f"{np0} {scene.relation} {np1}"
    else:
        body = np0
    if not copula:
        prefix = _pick(rng, ("", "", f"there {_be(o0)} ", "a photo of ", "look at ", "i see ", f"here {_be(o0)} "))
        body = prefix + body
    if scene.setting is not None:
        body += " " + SETTINGS[scene.setting]
    return body


def long_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A Localized-Narratives-style caption: several sentences that walk through the picture."""
    o0 = scene.objects[0]
    first = f"in this image we can see {noun_phrase(o0)}"
    if len(scene.objects) == 2:
        first += f" {scene.relation} {noun_phrase(scene.objects[1])}"
    sentences = [first]
    for obj in scene.objects:
        if obj.colour is not None:
            sentences.append(f"the {obj.noun_form} {_be(obj)} {obj.colour}")
    if scene.setting is not None:
        sentences.append(
            _pick(
                rng,
                (
                    f"this picture is taken {SETTINGS[scene.setting]}",
                    f"in the background we can see the {scene.setting}",
                ),
            )
        )
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


QA_SHARE = 0.35  # share of the training image captions that open with a child-directed question-answer exchange
P_COLOUR0 = 0.8  # CC3M-style training scenes: the subject has a colour this often ("a dog on a box" happens too)


def question_answers(scene: Scene) -> list[tuple[str, str, str, str]]:
    """Every question a parent could ask about `scene`: (kind, question, short answer, sentence answer).

    kind is `colour`, `count`, `object`, `where` or `yes_no`; the answers are true of the scene. Yes/no questions
    come in pairs, one true and one false (a swapped colour or a swapped relation), so a child hears what is not so.
    """
    qa: list[tuple[str, str, str, str]] = []
    two = len(scene.objects) == 2
    for slot, obj in enumerate(scene.objects):
        the, be = f"the {obj.noun_form}", _be(obj)
        pron = "they" if obj.plural else "it"
        if obj.colour is not None:
            for word in ("color", "colour"):
                qa.append(("colour", f"what {word} {be} {the}?", obj.colour, f"{pron} {be} {obj.colour}"))
            other = COLOURS[(COLOURS.index(obj.colour) + 1 + slot) % len(COLOURS)]
            qa.append(("yes_no", f"{be} {the} {obj.colour}?", "yes", f"yes, {pron} {be} {obj.colour}"))
            qa.append(("yes_no", f"{be} {the} {other}?", "no", f"no, {pron} {be} {obj.colour}"))
        count = COUNT_WORDS[obj.count]
        qa.append(("count", f"how many {NOUNS.get(obj.noun, obj.noun_form)} are there?", count,
                   f"there {be} {count} {obj.noun_form}"))  # fmt: skip
        if slot == 0 and scene.setting is not None:
            where = SETTINGS[scene.setting]
            qa.append(("where", f"where {be} {the}?", scene.setting, f"{pron} {be} {where}"))
    if two:
        o0, o1 = scene.objects
        rel = scene.relation
        qa.append(("object", f"what is {rel} the {o1.noun_form}?", o0.noun_form, noun_phrase(o0)))
        pron = "they" if o0.plural else "it"
        qa.append(("where", f"where {_be(o0)} the {o0.noun_form}?", f"{rel} the {o1.noun_form}",
                   f"{pron} {_be(o0)} {rel} the {o1.noun_form}"))  # fmt: skip
        qa.append(("yes_no", f"{_be(o0)} the {o0.noun_form} {rel} the {o1.noun_form}?", "yes",
                   f"yes, {pron} {_be(o0)} {rel} the {o1.noun_form}"))  # fmt: skip
        if rel in ASYMMETRIC_RELATIONS:
            qa.append(("yes_no", f"{_be(o1)} the {o1.noun_form} {rel} the {o0.noun_form}?", "no",
                       f"no, the {o0.noun_form} {_be(o0)} {rel} the {o1.noun_form}"))  # fmt: skip
    else:
        o0 = scene.objects[0]
        qa.append(("object", "what are these?" if o0.plural else "what is this?", o0.noun_form, noun_phrase(o0)))
    return qa


def qa_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A child-directed exchange about the picture, then its description: 'what color is the ball? red. a red
    ball next to two dogs'. One or two questions of different kinds, answered with one word or a sentence."""
    by_kind: dict[str, list[tuple[str, str, str]]] = {}
    for kind, question, short, sentence in question_answers(scene):
        by_kind.setdefault(kind, []).append((question, short, sentence))
    kinds = sorted(by_kind)
    n = 1 if rng.random() < 0.6 else 2
    turns = []
    for k in rng.choice(len(kinds), size=min(n, len(kinds)), replace=False):
        question, short, sentence = _pick(rng, by_kind[kinds[int(k)]])
        turns.append(f"{question} {short if rng.random() < 0.5 else sentence}.")
    description = short_caption(scene, rng)
    while len(turns) > 1 and len(" ".join([*turns, description]).split()) > 30:  # within max_caption_length
        turns.pop()
    return " ".join([*turns, description])


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A CC3M-style training caption: a description, or (QA_SHARE of the time) a question-answer exchange first."""
    return qa_caption(scene, rng) if rng.random() < QA_SHARE else short_caption(scene, rng)


def scene_caption_pairs(
    n: int, seed: int, feature_dim: int = layout.FEATURE_DIM, long: bool = False
) -> tuple[list[Scene], list[str], np.ndarray]:
    """`n` random scenes of the world `seed`, their captions and (n, feature_dim) float32 features (for tests)."""
    world = SampleWorld(seed, feature_dim)
    rng = np.random.default_rng([seed, 0x7E57, int(long)])
    scenes = [sample_scene(rng, p_setting=0.7 if long else 0.4) for _ in range(n)]
    caption = long_caption if long else short_caption
    captions = [caption(s, rng) for s in scenes]
    return scenes, captions, world.features(scenes, rng)


# ----------------------------------------------------------------------------------------------------------------
# Text-only corpus
# ----------------------------------------------------------------------------------------------------------------


def _det_np(rng: np.random.Generator, plural: bool, adjectives: int) -> list[str]:
    """Definite NP tokens with 0-2 adjectives in size-colour order: ['the', 'big', 'red', 'balls']."""
    noun = _pick(rng, NOUNS)
    adjs = []
    if adjectives >= 2 or (adjectives == 1 and rng.random() < 0.5):
        adjs.append(_pick(rng, SIZES))
    if adjectives >= 2 or (adjectives == 1 and not adjs):
        adjs.append(_pick(rng, COLOURS))
    return ["the", *adjs, NOUNS[noun] if plural else noun]


def text_sentence(rng: np.random.Generator) -> list[str]:
    """One sentence of the text-only grammar as lowercase tokens, final punctuation as its own token."""
    plural = rng.random() < 0.3
    frame = int(rng.integers(13))
    noun = _pick(rng, NOUNS)
    form = NOUNS[noun] if plural else noun
    verb_s = _pick(rng, VERBS)
    verb = VERBS[verb_s] if plural else verb_s
    be = "are" if plural else "is"
    if frame == 0:
        return ["look", "at", *_det_np(rng, plural, int(rng.integers(3))), "."]
    if frame == 1:
        tail = SETTINGS[_pick(rng, SETTINGS)].split() if rng.random() < 0.4 else []
        return [*_det_np(rng, plural, int(rng.integers(2))), verb, *tail, "."]
    if frame == 2:
        other = _pick(rng, [n for n in NOUNS if n != noun])
        return ["the", form, be, *_pick(rng, RELATIONS).split(), "the", other, "."]
    if frame == 3:
        return ["where", be, "the", form, "?"]
    if frame == 4:
        det = _pick(rng, ("these", "those") if plural else ("this", "that"))
        return [det, form, be, _pick(rng, COLOURS), "."]
    if frame == 5:
        return ["i", "like", "the", _pick(rng, SIZES), _pick(rng, COLOURS), form, "."]
    if frame == 6:
        return ["can", "you", "give", "me", "the", form, "?"]
    if frame == 7:
        return ["do", "you", "want", "the", _pick(rng, COLOURS), form, "?"]
    if frame == 8:
        count = int(rng.integers(2, 4))
        return [_pick(rng, ("she", "he")), "has", COUNT_WORDS[count], _pick(rng, COLOURS), NOUNS[noun], "."]
    if frame == 9:
        other = _pick(rng, [n for n in NOUNS if n != noun])
        return ["the", form, "sees" if not plural else "see", "a", other, "."]
    if frame == 10:
        return ["what", "color", "is", "the", noun, "?"]
    if frame == 11:
        det = _pick(rng, ("these", "those") if plural else ("this", "that"))
        return ["i", "see", det, form, "."]
    return ["the", _pick(rng, SIZES), form, verb, "."]


def _spaced(tokens: list[str]) -> str:
    return " ".join(tokens)


def _written(tokens: list[str]) -> str:
    text = " ".join(tokens)
    text = re.sub(r" ([.?!,])", r"\1", text)
    text = re.sub(r"\bi\b", "I", text)
    return text[0].upper() + text[1:]


_MOR = {"the": "det|the", "a": "det|a", "is": "cop|be&3S", "are": "cop|be&PRES", ".": ".", "?": "?"}


def _source_lines(source: str, n: int, rng: np.random.Generator) -> list[str]:
    lines: list[str] = []
    if source == "childes":
        k = 0
        while len(lines) < n:
            lines.append(f"= = = childes_{k:03d}.cha = = =")
            k += 1
            for _ in range(int(rng.integers(8, 20))):
                tokens = text_sentence(rng)
                lines.append(f"*{_pick(rng, ('MOT', 'CHI', 'FAT'))}:\t{_spaced(tokens)}")
                if rng.random() < 0.05:  # a dependent tier, as in raw CHAT
                    lines.append("%mor:\t" + " ".join(_MOR.get(t, f"n|{t}") for t in tokens))
    elif source == "switchboard":
        speaker = "A"
        while len(lines) < n:
            lines.append(f"{speaker}:\t{_spaced(text_sentence(rng))}")
            speaker = "B" if speaker == "A" else "A"
    elif source == "simple_wiki":
        while len(lines) < n:
            lines.append(f"= = = {_pick(rng, NOUNS).capitalize()} = = =")
            for _ in range(int(rng.integers(3, 8))):
                lines.append(_written(text_sentence(rng)))
    elif source == "gutenberg":
        while len(lines) < n:
            lines.append(" ".join(_written(text_sentence(rng)) for _ in range(int(rng.integers(1, 4)))))
    elif source == "open_subtitles":
        while len(lines) < n:
            line = _written(text_sentence(rng))
            lines.append(f"- {line}" if rng.random() < 0.2 else line)
    else:  # bnc_spoken
        while len(lines) < n:
            lines.append(_spaced(text_sentence(rng)))
    return lines[:n]


def _text_corpus(num_lines: int, rng: np.random.Generator) -> dict[str, list[str]]:
    counts = {s: max(10, int(round(num_lines * TEXT_SOURCE_WEIGHTS[s]))) for s in layout.TEXT_SOURCES}
    return {s: _source_lines(s, counts[s], rng) for s in layout.TEXT_SOURCES}


def normalize_sentence(text: str) -> str:
    """Lowercase words without punctuation or speaker labels: the key for 'is this sentence held out?'."""
    text = re.sub(r"^(\*[A-Z]+:|[A-Z]:)\s*", "", text.strip())
    return " ".join(re.findall(r"[a-z]+", text.lower()))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------------------------


def _blimp_pair(uid: str, rng: np.random.Generator) -> tuple[str, str]:
    noun = _pick(rng, NOUNS)
    size, colour = _pick(rng, SIZES), _pick(rng, COLOURS)
    plural = rng.random() < 0.5
    if uid == "determiner_noun_agreement":
        det = _pick(rng, ("these", "those") if plural else ("this", "that"))
        subj = _pick(rng, (("I", "see"), ("I", "like"), ("She", "wants"), ("He", "likes"), ("We", "see")))
        good_noun, bad_noun = (NOUNS[noun], noun) if plural else (noun, NOUNS[noun])
        head = [*subj, det, size, colour]
        return " ".join([*head, good_noun]) + ".", " ".join([*head, bad_noun]) + "."
    if uid == "subject_verb_agreement":
        verb_s = _pick(rng, VERBS)
        good_verb, bad_verb = (VERBS[verb_s], verb_s) if plural else (verb_s, VERBS[verb_s])
        subject = ["The", size, colour, NOUNS[noun] if plural else noun]
        tail = SETTINGS[_pick(rng, SETTINGS)].split()
        return " ".join([*subject, good_verb, *tail]) + ".", " ".join([*subject, bad_verb, *tail]) + "."
    if uid == "adjective_order":
        frame = _pick(rng, (("I", "like", "the"), ("Look", "at", "the"), ("She", "has", "the"), ("Give", "me", "the")))
        form = NOUNS[noun] if plural else noun
        return " ".join([*frame, size, colour, form]) + ".", " ".join([*frame, colour, size, form]) + "."
    if uid == "word_order":
        verb_s = _pick(rng, VERBS)
        good = ["The", size, colour, noun, verb_s]
        bad = [size.capitalize(), "the", colour, noun, verb_s]
        return " ".join(good) + ".", " ".join(bad) + "."
    raise ValueError(f"unknown BLiMP UID {uid!r}")


BLIMP_UIDS = {  # UID -> (field, linguistics_term), as in BLiMP
    "determiner_noun_agreement": ("morphology", "determiner_noun_agreement"),
    "subject_verb_agreement": ("morphology", "subject_verb_agreement"),
    "adjective_order": ("syntax", "adjective_order"),
    "word_order": ("syntax", "word_order"),
}


def _blimp_sets(rng: np.random.Generator, seen: set[str]) -> dict[str, list[dict[str, Any]]]:
    sets: dict[str, list[dict[str, Any]]] = {}
    for uid, (field, term) in BLIMP_UIDS.items():
        rows: list[dict[str, Any]] = []
        used: set[str] = set()
        for _ in range(BLIMP_PAIRS_PER_UID * 50):
            if len(rows) == BLIMP_PAIRS_PER_UID:
                break
            good, bad = _blimp_pair(uid, rng)
            key = normalize_sentence(good)
            if key in seen or key in used:  # held out: never a training line, never repeated
                continue
            used.add(key)
            rows.append(
                {"sentence_good": good, "sentence_bad": bad, "field": field, "linguistics_term": term,
                 "UID": uid, "pairID": str(len(rows))}
            )  # fmt: skip
        sets[uid] = rows
    return sets


def _winoground_pair(k: int, rng: np.random.Generator) -> tuple[Scene, Scene, str]:
    a, b = rng.choice(list(NOUNS), size=2, replace=False)
    rel = _pick(rng, ASYMMETRIC_RELATIONS)
    if k % 2 == 0:  # "a dog on a box" vs "a box on a dog"
        s0 = Scene((SceneObject(a, None, None), SceneObject(b, None, None)), rel)
        s1 = Scene((SceneObject(b, None, None), SceneObject(a, None, None)), rel)
        return s0, s1, "object_swap"
    # "a red ball on a blue cup" vs "a blue ball on a red cup"
    c0, c1 = rng.choice(list(COLOURS), size=2, replace=False)
    s0 = Scene((SceneObject(a, c0, None), SceneObject(b, c1, None)), rel)
    s1 = Scene((SceneObject(a, c1, None), SceneObject(b, c0, None)), rel)
    return s0, s1, "attribute_swap"


def training_text_index(texts: Iterable[str]) -> str:
    """Normalized training texts, one per line and padded with spaces: `occurs_in_training` searches it."""
    return "\n".join(f" {normalize_sentence(t)} " for t in texts)


def occurs_in_training(sentence: str, index: str) -> bool:
    """True when `sentence` (normalized) is a training text or a run of whole words inside one."""
    return f" {normalize_sentence(sentence)} " in index


def _winoground(
    world: SampleWorld, rng: np.random.Generator, training_index: str = ""
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Held out: no caption of an item occurs in a training text, not even inside a longer caption. A colliding
    item is redrawn from its own stream, so `rng` draws the same numbers whatever the training data holds."""
    items, scenes = [], []
    for k in range(NUM_WINOGROUND):
        s0, s1, tag = _winoground_pair(k, rng)
        attempt = 0
        while any(occurs_in_training(canonical_caption(s), training_index) for s in (s0, s1)):
            s0, s1, tag = _winoground_pair(k, np.random.default_rng([world.seed, 0x3170, k, attempt]))
            attempt += 1
        captions = [canonical_caption(s) for s in (s0, s1)]
        items.append(
            {"id": k, "caption_0": captions[0], "caption_1": captions[1], "image_0": 2 * k, "image_1": 2 * k + 1,
             "tag": tag}
        )  # fmt: skip
        scenes += [s0, s1]
    return items, world.features(scenes, rng)


def _vqa(world: SampleWorld, rng: np.random.Generator) -> tuple[list[dict[str, Any]], np.ndarray]:
    items, scenes = [], []
    types = ("colour", "object", "count", "setting")
    for k in range(NUM_VQA):
        qtype = types[k % len(types)]
        scene = sample_scene(rng, p_two=1.0 if qtype == "object" else 0.6, p_setting=1.0 if qtype == "setting" else 0.4)
        o0 = scene.objects[0]
        if qtype == "colour":
            question, answer, pool = f"what color {_be(o0)} the {o0.noun_form}?", o0.colour, COLOURS
        elif qtype == "object":
            o1 = scene.objects[1]
            question, answer, pool = f"what is {scene.relation} the {o1.noun_form}?", o0.noun, tuple(NOUNS)
        elif qtype == "count":
            question, answer, pool = f"how many {NOUNS[o0.noun]} are there?", COUNT_WORDS[o0.count], COUNT_WORDS[1:]
        else:
            question, answer, pool = f"where {_be(o0)} the {o0.noun_form}?", scene.setting, tuple(SETTINGS)
        others = [x for x in pool if x != answer]
        distractors = [others[i] for i in rng.choice(len(others), size=7, replace=False)]
        items.append(
            {"id": k, "question": question, "answer": answer, "distractors": distractors, "image": k,
             "question_type": qtype}
        )  # fmt: skip
        scenes.append(scene)
    return items, world.features(scenes, rng)


def canonical_caption(scene: Scene) -> str:
    """The template-free description 'a red wug next to a dog in the park' (used where captions are compared)."""
    text = noun_phrase(scene.objects[0])
    if len(scene.objects) == 2:
        text += f" {scene.relation} {noun_phrase(scene.objects[1])}"
    if scene.setting is not None:
        text += " " + SETTINGS[scene.setting]
    return text


def held_out_pseudo_words(n: int, seed: int) -> list[str]:
    """The evaluation pseudo-words of a sample world: from the EVALUATION pool (`bitmar.data.pseudowords`), disjoint
    from the training pool that phase 3 draws from, and never in any training file of the world."""
    return pseudo_word_pool("eval", n, seed, exclude=[*NOUNS, *NOUNS.values(), *NONCE_NOUNS, *NONCE_NOUNS.values()])


def _novel_episodes(world: SampleWorld, n: int, rng: np.random.Generator) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Held-out fast-mapping episodes: a NOVEL kind of object (its own feature embedding) named by a held-out
    pseudo-word, one word per episode (distinct words, so recall of N episodes needs N different words)."""
    items, scenes = [], []
    nonce = held_out_pseudo_words(n + 8, world.seed)  # 8 spare words for the foils of the last episodes
    for k in range(n):
        o0 = SceneObject(nonce[k], _pick(rng, COLOURS), _pick(rng, SIZES) if rng.random() < 0.3 else None)
        if rng.random() < 0.6:
            o1 = SceneObject(_pick(rng, NOUNS), _pick(rng, COLOURS) if rng.random() < 0.5 else None, None)
            scene = Scene((o0, o1), _pick(rng, RELATIONS))
        else:
            scene = Scene((o0,), None, _pick(rng, SETTINGS) if rng.random() < 0.5 else None)
        rest = scene.objects[1:]
        foil_scenes = [  # each foil changes one thing: the nonce word, the colour, the other object (or setting)
            Scene((SceneObject(_pick(rng, [w for w in nonce if w != o0.noun]), o0.colour, o0.size), *rest),
                  scene.relation, scene.setting),
            Scene((SceneObject(o0.noun, _pick(rng, [c for c in COLOURS if c != o0.colour]), o0.size), *rest),
                  scene.relation, scene.setting),
        ]  # fmt: skip
        if rest:
            o1 = rest[0]
            new1 = SceneObject(_pick(rng, [w for w in NOUNS if w != o1.noun]), o1.colour, o1.size)
            foil_scenes.append(Scene((o0, new1), scene.relation, scene.setting))
        else:
            foil_scenes.append(Scene((o0,), None, _pick(rng, [s for s in SETTINGS if s != scene.setting])))
        items.append(
            {"id": k, "caption": canonical_caption(scene), "nonce_words": [o0.noun], "study_image": 2 * k,
             "test_image": 2 * k + 1, "foils": [canonical_caption(f) for f in foil_scenes]}
        )  # fmt: skip
        scenes += [scene, scene]  # two views: independent noise per row
    return items, world.features(scenes, rng)


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


def world_scenes(sample_cfg: SampleDataConfig) -> dict[str, tuple[list[Scene], list[str]]]:
    """The scenes and captions `generate_sample_dataset` writes, row by row: {"cc3m": ..., "local_narratives": ...}."""
    rng = np.random.default_rng([sample_cfg.seed, 2])
    cc_scenes = [sample_scene(rng, p_colour0=P_COLOUR0) for _ in range(sample_cfg.num_cc3m)]
    cc_captions = [training_caption(s, rng) for s in cc_scenes]
    ln_scenes = [sample_scene(rng, p_setting=0.7) for _ in range(sample_cfg.num_local_narratives)]
    ln_captions = [long_caption(s, rng) for s in ln_scenes]
    return {"cc3m": (cc_scenes, cc_captions), "local_narratives": (ln_scenes, ln_captions)}


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

    text = _text_corpus(cfg.num_text_lines, np.random.default_rng([seed, 1]))
    (cc_scenes, cc_captions), (ln_scenes, ln_captions) = world_scenes(cfg).values()
    cc_features = world.features(cc_scenes, rng).astype(dtype)
    ln_features = world.features(ln_scenes, rng).astype(dtype)

    seen = {normalize_sentence(line) for lines in text.values() for line in lines}
    seen |= {normalize_sentence(c) for c in cc_captions + ln_captions}
    eval_rng = np.random.default_rng([seed, 3])
    blimp = _blimp_sets(eval_rng, seen)
    winoground, wino_features = _winoground(world, eval_rng, training_text_index(cc_captions + ln_captions))
    vqa, vqa_features = _vqa(world, eval_rng)
    novel, novel_features = _novel_episodes(world, cfg.num_novel_episodes, eval_rng)

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

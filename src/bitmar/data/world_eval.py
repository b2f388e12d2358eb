"""The sample world's evaluation sets: BLiMP-style minimal pairs, Winoground-style pairs, 8-way VQA and the
novel-word (fast-mapping) episodes. Every set is held out: none of its sentences or captions occurs in training text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from bitmar.data.pseudowords import pseudo_word_pool
from bitmar.data.vocabulary import (
    ASYMMETRIC_RELATIONS,
    COLOURS,
    COUNT_WORDS,
    NONCE_NOUNS,
    NOUNS,
    RELATIONS,
    SETTINGS,
    SIZES,
    VERBS,
)
from bitmar.data.world import SampleWorld, Scene, SceneObject, pick, sample_scene
from bitmar.data.world_text import be_form, canonical_caption, normalize_sentence

BLIMP_PAIRS_PER_UID = 100
NUM_WINOGROUND = 100
NUM_VQA = 200


def _blimp_pair(uid: str, rng: np.random.Generator) -> tuple[str, str]:
    noun = pick(rng, NOUNS)
    size, colour = pick(rng, SIZES), pick(rng, COLOURS)
    plural = rng.random() < 0.5
    if uid == "determiner_noun_agreement":
        det = pick(rng, ("these", "those") if plural else ("this", "that"))
        subj = pick(rng, (("I", "see"), ("I", "like"), ("She", "wants"), ("He", "likes"), ("We", "see")))
        good_noun, bad_noun = (NOUNS[noun], noun) if plural else (noun, NOUNS[noun])
        head = [*subj, det, size, colour]
        return " ".join([*head, good_noun]) + ".", " ".join([*head, bad_noun]) + "."
    if uid == "subject_verb_agreement":
        verb_s = pick(rng, VERBS)
        good_verb, bad_verb = (VERBS[verb_s], verb_s) if plural else (verb_s, VERBS[verb_s])
        subject = ["The", size, colour, NOUNS[noun] if plural else noun]
        tail = SETTINGS[pick(rng, SETTINGS)].split()
        return " ".join([*subject, good_verb, *tail]) + ".", " ".join([*subject, bad_verb, *tail]) + "."
    if uid == "adjective_order":
        frame = pick(rng, (("I", "like", "the"), ("Look", "at", "the"), ("She", "has", "the"), ("Give", "me", "the")))
        form = NOUNS[noun] if plural else noun
        return " ".join([*frame, size, colour, form]) + ".", " ".join([*frame, colour, size, form]) + "."
    if uid == "word_order":
        verb_s = pick(rng, VERBS)
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


def blimp_sets(rng: np.random.Generator, seen: set[str]) -> dict[str, list[dict[str, Any]]]:
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
    rel = pick(rng, ASYMMETRIC_RELATIONS)
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


def winoground_set(
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


def vqa_set(world: SampleWorld, rng: np.random.Generator) -> tuple[list[dict[str, Any]], np.ndarray]:
    items, scenes = [], []
    types = ("colour", "object", "count", "setting")
    for k in range(NUM_VQA):
        qtype = types[k % len(types)]
        scene = sample_scene(rng, p_two=1.0 if qtype == "object" else 0.6, p_setting=1.0 if qtype == "setting" else 0.4)
        o0 = scene.objects[0]
        if qtype == "colour":
            question, answer, pool = f"what color {be_form(o0)} the {o0.noun_form}?", o0.colour, COLOURS
        elif qtype == "object":
            o1 = scene.objects[1]
            question, answer, pool = f"what is {scene.relation} the {o1.noun_form}?", o0.noun, tuple(NOUNS)
        elif qtype == "count":
            question, answer, pool = f"how many {NOUNS[o0.noun]} are there?", COUNT_WORDS[o0.count], COUNT_WORDS[1:]
        else:
            question, answer, pool = f"where {be_form(o0)} the {o0.noun_form}?", scene.setting, tuple(SETTINGS)
        others = [x for x in pool if x != answer]
        distractors = [others[i] for i in rng.choice(len(others), size=7, replace=False)]
        items.append(
            {"id": k, "question": question, "answer": answer, "distractors": distractors, "image": k,
             "question_type": qtype}
        )  # fmt: skip
        scenes.append(scene)
    return items, world.features(scenes, rng)


def held_out_pseudo_words(n: int, seed: int) -> list[str]:
    """The evaluation pseudo-words of a sample world: from the EVALUATION pool (`bitmar.data.pseudowords`), disjoint
    from the training pool that phase 3 draws from, and never in any training file of the world."""
    return pseudo_word_pool("eval", n, seed, exclude=[*NOUNS, *NOUNS.values(), *NONCE_NOUNS, *NONCE_NOUNS.values()])


def novel_episode_set(world: SampleWorld, n: int, rng: np.random.Generator) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Held-out fast-mapping episodes: a NOVEL kind of object (its own feature embedding) named by a held-out
    pseudo-word, one word per episode (distinct words, so recall of N episodes needs N different words)."""
    items, scenes = [], []
    nonce = held_out_pseudo_words(n + 8, world.seed)  # 8 spare words for the foils of the last episodes
    for k in range(n):
        o0 = SceneObject(nonce[k], pick(rng, COLOURS), pick(rng, SIZES) if rng.random() < 0.3 else None)
        if rng.random() < 0.6:
            o1 = SceneObject(pick(rng, NOUNS), pick(rng, COLOURS) if rng.random() < 0.5 else None, None)
            scene = Scene((o0, o1), pick(rng, RELATIONS))
        else:
            scene = Scene((o0,), None, pick(rng, SETTINGS) if rng.random() < 0.5 else None)
        rest = scene.objects[1:]
        foil_scenes = [  # each foil changes one thing: the nonce word, the colour, the other object (or setting)
            Scene((SceneObject(pick(rng, [w for w in nonce if w != o0.noun]), o0.colour, o0.size), *rest),
                  scene.relation, scene.setting),
            Scene((SceneObject(o0.noun, pick(rng, [c for c in COLOURS if c != o0.colour]), o0.size), *rest),
                  scene.relation, scene.setting),
        ]  # fmt: skip
        if rest:
            o1 = rest[0]
            new1 = SceneObject(pick(rng, [w for w in NOUNS if w != o1.noun]), o1.colour, o1.size)
            foil_scenes.append(Scene((o0, new1), scene.relation, scene.setting))
        else:
            foil_scenes.append(Scene((o0,), None, pick(rng, [s for s in SETTINGS if s != scene.setting])))
        items.append(
            {"id": k, "caption": canonical_caption(scene), "nonce_words": [o0.noun], "study_image": 2 * k,
             "test_image": 2 * k + 1, "foils": [canonical_caption(f) for f in foil_scenes]}
        )  # fmt: skip
        scenes += [scene, scene]  # two views: independent noise per row
    return items, world.features(scenes, rng)

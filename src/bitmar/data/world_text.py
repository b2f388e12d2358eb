"""What the sample world says: captions of a scene (CC3M-style, Localized-Narratives-style, child-directed
question-answer exchanges) and the sentences of the text-only corpus, in the styles of the six BabyLM sources.

`world_scenes(sample_cfg)` gives the scenes and captions `bitmar.data.sample.generate_sample_dataset` writes.
"""

from __future__ import annotations

import re

import numpy as np

from bitmar.config import SampleDataConfig
from bitmar.data import layout
from bitmar.data.vocabulary import ASYMMETRIC_RELATIONS, COLOURS, COUNT_WORDS, NOUNS, RELATIONS, SETTINGS, SIZES, VERBS
from bitmar.data.world import SampleWorld, Scene, SceneObject, pick, sample_scene

TEXT_SOURCE_WEIGHTS = {  # share of the lines, close to the BabyLM mixture
    "bnc_spoken": 0.08, "childes": 0.29, "gutenberg": 0.26, "open_subtitles": 0.20, "simple_wiki": 0.15,
    "switchboard": 0.02,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def noun_phrase(obj: SceneObject, definite: bool = False) -> str:
    """'a small red ball', 'the ball', 'two blue cups' (size before colour, as English wants)."""
    words = [w for w in (obj.size, obj.colour) if w]
    if obj.plural:
        det = "the" if definite else COUNT_WORDS[obj.count]
    else:
        det = "the" if definite else ("an" if (words[0] if words else obj.noun)[0] in "aeiou" else "a")
    return " ".join([det, *words, obj.noun_form])


def be_form(obj: SceneObject) -> str:
    return "are" if obj.plural else "is"


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A CC3M-style caption: lowercase, no final period, one of several templates."""
    o0 = scene.objects[0]
    np0 = noun_phrase(o0)
    copula = len(scene.objects) == 2 and rng.random() < 0.3  # "a dog is on a box"
    if len(scene.objects) == 2:
        np1 = noun_phrase(scene.objects[1], definite=rng.random() < 0.3)
        body = f"{np0} {be_form(o0)} {scene.relation} {np1}" if copula else f"{np0} {scene.relation} {np1}"
    else:
        body = np0
    if not copula:
        prefix = pick(
            rng, ("", "", f"there {be_form(o0)} ", "a photo of ", "look at ", "i see ", f"here {be_form(o0)} ")
        )
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
            sentences.append(f"the {obj.noun_form} {be_form(obj)} {obj.colour}")
    if scene.setting is not None:
        sentences.append(
            pick(
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
        the, be = f"the {obj.noun_form}", be_form(obj)
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
        qa.append(("where", f"where {be_form(o0)} the {o0.noun_form}?", f"{rel} the {o1.noun_form}",
                   f"{pron} {be_form(o0)} {rel} the {o1.noun_form}"))  # fmt: skip
        qa.append(("yes_no", f"{be_form(o0)} the {o0.noun_form} {rel} the {o1.noun_form}?", "yes",
                   f"yes, {pron} {be_form(o0)} {rel} the {o1.noun_form}"))  # fmt: skip
        if rel in ASYMMETRIC_RELATIONS:
            qa.append(("yes_no", f"{be_form(o1)} the {o1.noun_form} {rel} the {o0.noun_form}?", "no",
                       f"no, the {o0.noun_form} {be_form(o0)} {rel} the {o1.noun_form}"))  # fmt: skip
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
        question, short, sentence = pick(rng, by_kind[kinds[int(k)]])
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


def canonical_caption(scene: Scene) -> str:
    """The template-free description 'a red wug next to a dog in the park' (used where captions are compared)."""
    text = noun_phrase(scene.objects[0])
    if len(scene.objects) == 2:
        text += f" {scene.relation} {noun_phrase(scene.objects[1])}"
    if scene.setting is not None:
        text += " " + SETTINGS[scene.setting]
    return text


def world_scenes(sample_cfg: SampleDataConfig) -> dict[str, tuple[list[Scene], list[str]]]:
    """The scenes and captions `generate_sample_dataset` writes, row by row: {"cc3m": ..., "local_narratives": ...}."""
    rng = np.random.default_rng([sample_cfg.seed, 2])
    cc_scenes = [sample_scene(rng, p_colour0=P_COLOUR0) for _ in range(sample_cfg.num_cc3m)]
    cc_captions = [training_caption(s, rng) for s in cc_scenes]
    ln_scenes = [sample_scene(rng, p_setting=0.7) for _ in range(sample_cfg.num_local_narratives)]
    ln_captions = [long_caption(s, rng) for s in ln_scenes]
    return {"cc3m": (cc_scenes, cc_captions), "local_narratives": (ln_scenes, ln_captions)}


# ----------------------------------------------------------------------------------------------------------------
# Text-only corpus
# ----------------------------------------------------------------------------------------------------------------


def _det_np(rng: np.random.Generator, plural: bool, adjectives: int) -> list[str]:
    """Definite NP tokens with 0-2 adjectives in size-colour order: ['the', 'big', 'red', 'balls']."""
    noun = pick(rng, NOUNS)
    adjs = []
    if adjectives >= 2 or (adjectives == 1 and rng.random() < 0.5):
        adjs.append(pick(rng, SIZES))
    if adjectives >= 2 or (adjectives == 1 and not adjs):
        adjs.append(pick(rng, COLOURS))
    return ["the", *adjs, NOUNS[noun] if plural else noun]


def text_sentence(rng: np.random.Generator) -> list[str]:
    """One sentence of the text-only grammar as lowercase tokens, final punctuation as its own token."""
    plural = rng.random() < 0.3
    frame = int(rng.integers(13))
    noun = pick(rng, NOUNS)
    form = NOUNS[noun] if plural else noun
    verb_s = pick(rng, VERBS)
    verb = VERBS[verb_s] if plural else verb_s
    be = "are" if plural else "is"
    if frame == 0:
        return ["look", "at", *_det_np(rng, plural, int(rng.integers(3))), "."]
    if frame == 1:
        tail = SETTINGS[pick(rng, SETTINGS)].split() if rng.random() < 0.4 else []
        return [*_det_np(rng, plural, int(rng.integers(2))), verb, *tail, "."]
    if frame == 2:
        other = pick(rng, [n for n in NOUNS if n != noun])
        return ["the", form, be, *pick(rng, RELATIONS).split(), "the", other, "."]
    if frame == 3:
        return ["where", be, "the", form, "?"]
    if frame == 4:
        det = pick(rng, ("these", "those") if plural else ("this", "that"))
        return [det, form, be, pick(rng, COLOURS), "."]
    if frame == 5:
        return ["i", "like", "the", pick(rng, SIZES), pick(rng, COLOURS), form, "."]
    if frame == 6:
        return ["can", "you", "give", "me", "the", form, "?"]
    if frame == 7:
        return ["do", "you", "want", "the", pick(rng, COLOURS), form, "?"]
    if frame == 8:
        count = int(rng.integers(2, 4))
        return [pick(rng, ("she", "he")), "has", COUNT_WORDS[count], pick(rng, COLOURS), NOUNS[noun], "."]
    if frame == 9:
        other = pick(rng, [n for n in NOUNS if n != noun])
        return ["the", form, "sees" if not plural else "see", "a", other, "."]
    if frame == 10:
        return ["what", "color", "is", "the", noun, "?"]
    if frame == 11:
        det = pick(rng, ("these", "those") if plural else ("this", "that"))
        return ["i", "see", det, form, "."]
    return ["the", pick(rng, SIZES), form, verb, "."]


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
                lines.append(f"*{pick(rng, ('MOT', 'CHI', 'FAT'))}:\t{_spaced(tokens)}")
                if rng.random() < 0.05:  # a dependent tier, as in raw CHAT
                    lines.append("%mor:\t" + " ".join(_MOR.get(t, f"n|{t}") for t in tokens))
    elif source == "switchboard":
        speaker = "A"
        while len(lines) < n:
            lines.append(f"{speaker}:\t{_spaced(text_sentence(rng))}")
            speaker = "B" if speaker == "A" else "A"
    elif source == "simple_wiki":
        while len(lines) < n:
            lines.append(f"= = = {pick(rng, NOUNS).capitalize()} = = =")
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


def text_corpus(num_lines: int, rng: np.random.Generator) -> dict[str, list[str]]:
    counts = {s: max(10, int(round(num_lines * TEXT_SOURCE_WEIGHTS[s]))) for s in layout.TEXT_SOURCES}
    return {s: _source_lines(s, counts[s], rng) for s in layout.TEXT_SOURCES}


def normalize_sentence(text: str) -> str:
    """Lowercase words without punctuation or speaker labels: the key for 'is this sentence held out?'."""
    text = re.sub(r"^(\*[A-Z]+:|[A-Z]:)\s*", "", text.strip())
    return " ".join(re.findall(r"[a-z]+", text.lower()))

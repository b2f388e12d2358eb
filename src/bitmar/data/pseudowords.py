"""Pseudo-words for one-shot word learning (fast mapping), and the caption augmentation that teaches it.

Why: if every caption is predictable from its picture, an episode latent never has to carry word identity, and
one-shot recall of a new word is impossible (docs/design.md §3). Phase-3 episodes therefore rename one object of the
caption with a pseudo-word drawn at random per episode: the word is consistent between the episode that is written
(study view + caption) and the caption that must be recalled from the test view, but no picture predicts it.

Pools. `pseudo_word_pool(split, size, seed)` draws pronounceable words (2-3 syllables: onset, vowel, optional
coda; 4-10 letters) from a seeded generator. The split is decided by a hash of the word itself, never by the draw
order: `train` and `eval` pools are disjoint by construction for every size and seed, and known English /
sample-world words are excluded.
The evaluation pool is written only into held-out evaluation files: the tokenizer, the training data and the model
never see an evaluation word, so recall measures the mechanism, not memorised names.

Augmentation. `PseudoWordAugmenter` works on caption text: it finds the nouns of a caption that belong to its noun
list (the sample world's nouns plus common concrete English nouns of CC3M-style captions, singular and plural),
picks one, and replaces every occurrence of it (plural -> pseudo-word + "s") by one pseudo-word. Captions without a
known noun are left unchanged (and counted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bitmar.data.vocabulary import NOUNS

SIMPLE_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh")
CLUSTER_ONSETS = ("bl", "br", "dr", "fl", "gl", "gr", "kl", "pl", "pr", "sk", "sl", "sn", "sp", "st", "tr")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "oo", "ee")
CODAS = ("n", "m", "k", "t", "p", "x", "ck", "sh")

EVAL_SHARE = 5  # one word in EVAL_SHARE hashes into the evaluation pool

# Common concrete nouns of CC3M-style captions (singular -> plural). The sample world's nouns are added by
# `default_noun_forms`. A caption is augmented only through words of this table, so a replacement is always a noun.
COMMON_NOUNS: dict[str, str] = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "boy": "boys", "girl": "girls",
    "baby": "babies", "dog": "dogs", "cat": "cats", "horse": "horses", "bird": "birds", "fish": "fish",
    "cow": "cows", "sheep": "sheep", "duck": "ducks", "bear": "bears", "car": "cars", "bus": "buses",
    "truck": "trucks", "bike": "bikes", "bicycle": "bicycles", "boat": "boats", "train": "trains",
    "plane": "planes", "house": "houses", "building": "buildings", "tree": "trees", "flower": "flowers",
    "table": "tables", "chair": "chairs", "bed": "beds", "door": "doors", "window": "windows", "cup": "cups",
    "bottle": "bottles", "book": "books", "ball": "balls", "hat": "hats", "shoe": "shoes", "bag": "bags",
    "box": "boxes", "apple": "apples", "cake": "cakes", "phone": "phones", "computer": "computers",
    "lamp": "lamps", "clock": "clocks", "toy": "toys", "guitar": "guitars", "bridge": "bridges",
    "mountain": "mountains", "river": "rivers", "road": "roads", "street": "streets", "player": "players",
    "team": "teams", "dress": "dresses", "shirt": "shirts", "umbrella": "umbrellas", "kite": "kites",
    "sofa": "sofas", "plate": "plates", "bowl": "bowls", "pizza": "pizzas", "sign": "signs", "wall": "walls",
    "rock": "rocks", "beach": "beaches", "garden": "gardens", "park": "parks", "city": "cities",
    "animal": "animals", "chicken": "chickens", "pig": "pigs", "monkey": "monkeys", "lion": "lions",
    "elephant": "elephants", "rabbit": "rabbits", "mouse": "mice", "frog": "frogs",
}  # fmt: skip


def _hash_bucket(word: str) -> int:
    return int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:4], "little") % EVAL_SHARE


def split_of(word: str) -> str:
    """'eval' or 'train': which pool a pseudo-word belongs to (a property of the word, not of any draw)."""
    return "eval" if _hash_bucket(word) == 0 else "train"


def _syllable(rng: np.random.Generator) -> str:
    onset = rng.choice(CLUSTER_ONSETS) if rng.random() < 0.2 else rng.choice(SIMPLE_ONSETS)
    coda = rng.choice(CODAS) if rng.random() < 0.35 else ""
    return str(onset) + str(rng.choice(VOWELS)) + str(coda)


def pseudo_word_pool(split: str, size: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """`size` distinct pronounceable pseudo-words of pool `split` ('train' | 'eval'), deterministic in `seed`.

    Disjointness of the two pools holds for any sizes and seeds (`split_of`). Words in `exclude`, in
    `COMMON_NOUNS` (either form) and shorter than 4 letters are skipped."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    banned = {w.lower() for w in exclude} | set(COMMON_NOUNS) | set(COMMON_NOUNS.values())
    rng = np.random.default_rng([seed, 0x5EED, 1 if split == "eval" else 0])
    words: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(words) < size:
        attempts += 1
        if attempts > 200 * size + 1000:
            raise ValueError(f"could not draw {size} distinct {split} pseudo-words; ask for fewer")
        word = "".join(_syllable(rng) for _ in range(2 if rng.random() < 0.75 else 3))
        if len(word) < 4 or len(word) > 10 or word in seen or word in banned or split_of(word) != split:
            continue
        seen.add(word)
        words.append(word)
    return words


def plural_of(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def default_noun_forms(extra: dict[str, str] | None = None) -> dict[str, tuple[str, bool]]:
    """surface form -> (lemma, is_plural) for COMMON_NOUNS plus `extra` (e.g. the sample world's nouns)."""
    table = dict(COMMON_NOUNS)
    table.update(extra or {})
    forms: dict[str, tuple[str, bool]] = {}
    for singular, plural in table.items():
        forms[singular] = (singular, False)
        if plural != singular:
            forms.setdefault(plural, (singular, True))
    return forms


@dataclass
class Augmented:
    text: str
    word: str | None  # the pseudo-word used, None when the caption has no known noun
    replaced: str | None  # the lemma it replaced


class PseudoWordAugmenter:
    """Rename one known noun of a caption with a pseudo-word, consistently within the caption."""

    def __init__(self, pool: Sequence[str], noun_forms: dict[str, tuple[str, bool]]) -> None:
        if not pool:
            raise ValueError("the pseudo-word pool is empty")
        self.pool = list(pool)
        self.noun_forms = noun_forms

    def augment(self, caption: str, rng: np.random.Generator) -> Augmented:
        words = caption.split(" ")
        lemmas = sorted({self.noun_forms[w.lower()][0] for w in words if w.lower() in self.noun_forms})
        if not lemmas:
            return Augmented(caption, None, None)
        lemma = lemmas[int(rng.integers(len(lemmas)))]
        pseudo = self.pool[int(rng.integers(len(self.pool)))]
        out = []
        for w in words:
            form = self.noun_forms.get(w.lower())
            if form is not None and form[0] == lemma:
                out.append(plural_of(pseudo) if form[1] else pseudo)
            else:
                out.append(w)
        return Augmented(" ".join(out), pseudo, lemma)


def sample_world_noun_forms() -> dict[str, tuple[str, bool]]:
    """COMMON_NOUNS plus the sample world's nouns (never its held-out nonce nouns)."""
    return default_noun_forms(NOUNS)


def augment_episode_ids(
    tokenizer: Any,
    augmenter: PseudoWordAugmenter,
    input_ids: Tensor,  # (B, T) right-padded captions, BOS ... EOS
    attention_mask: Tensor,  # (B, T)
    probability: float,
    rng: np.random.Generator,
    max_len: int,
) -> tuple[Tensor, Tensor, int]:
    """Rename one noun in each caption with probability `probability`; -> (ids (B, T'), mask (B, T'), renamed).

    Works on text (decode, rename, re-encode with the run's tokenizer, BOS + tokens + EOS, cut to max_len), so a
    pseudo-word is split into BPE pieces exactly as the tokenizer splits it at evaluation time."""
    from bitmar.data.tokenizer import encode_batch

    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask, strict=True)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    chosen = rng.random(len(texts)) < probability
    renamed = 0
    out_texts = []
    for text, pick in zip(texts, chosen, strict=True):
        if pick:
            aug = augmenter.augment(text.strip(), rng)
            renamed += aug.word is not None
            out_texts.append(aug.text)
        else:
            out_texts.append(text.strip())
    seqs = [seq[:max_len] for seq in encode_batch(tokenizer, out_texts)]
    length = max(len(s) for s in seqs)
    pad = int(tokenizer.pad_token_id)
    ids = torch.full((len(seqs), length), pad, dtype=input_ids.dtype)
    mask = torch.zeros((len(seqs), length), dtype=attention_mask.dtype)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=input_ids.dtype)
        mask[i, : len(seq)] = 1
    return ids, mask, renamed


def fast_mapping_augmenter(cfg: Any) -> PseudoWordAugmenter | None:
    """The phase-3 augmenter of a run (`data.pseudo_words`), or None when it is disabled."""
    pw = cfg.data.pseudo_words
    if not pw.enabled or pw.probability <= 0.0:
        return None
    forms = sample_world_noun_forms()
    return PseudoWordAugmenter(pseudo_word_pool("train", pw.pool_size, pw.seed, exclude=forms), forms)

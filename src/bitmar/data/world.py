"""The sample world's scenes and the fixed random function that turns a scene into its "DINOv2" feature vector.

A scene (`Scene`) is one or two objects (`SceneObject`: noun, colour, optional size, count 1-3), a spatial relation
between two objects and an optional setting, over the vocabulary of `bitmar.data.vocabulary`. `SampleWorld.features`
maps scenes to 768-d vectors with DINOv2-CLS-like statistics; the map depends only on the seed. The captions of a
scene are written by `bitmar.data.world_text`, the files by `bitmar.data.sample`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitmar.data import layout
from bitmar.data.pseudowords import plural_of
from bitmar.data.vocabulary import COLOURS, MAX_COUNT, NONCE_NOUNS, NOUNS, RELATIONS, SETTINGS, SIZES


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


def pick(rng: np.random.Generator, items: Iterable[Any]) -> Any:
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
        noun = pick(rng, [n for n in nouns if not objects or n != objects[0].noun])
        if slot == 0 and p_colour0 >= 1.0:
            coloured = True
        else:
            coloured = rng.random() < (p_colour0 if slot == 0 else 0.7)
        colour = pick(rng, COLOURS) if coloured else None
        size = pick(rng, SIZES) if rng.random() < 0.35 else None
        u = rng.random()
        count = 1 if u < 0.75 else (2 if u < 0.92 else 3)
        objects.append(SceneObject(noun, colour, size, count))
    relation = pick(rng, RELATIONS) if n_objects == 2 else None
    setting = pick(rng, SETTINGS) if rng.random() < p_setting else None
    return Scene(tuple(objects), relation, setting)


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

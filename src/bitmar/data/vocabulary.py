"""The sample world's vocabulary: its colours, sizes, nouns (and held-out nonce nouns), relations, settings, count
words and verbs.

A module of its own, below both the world generator (`bitmar.data.sample`) and the pseudo-words
(`bitmar.data.pseudowords`): the generator needs the pseudo-word pools, and the pseudo-words need the world's nouns.
"""

from __future__ import annotations

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
SIZES = ("small", "big", "tiny")
NOUNS: dict[str, str] = {
    "ball": "balls", "dog": "dogs", "cat": "cats", "cup": "cups", "box": "boxes", "car": "cars", "bird": "birds",
    "book": "books", "hat": "hats", "chair": "chairs", "apple": "apples", "duck": "ducks", "bear": "bears",
    "shoe": "shoes",
}  # fmt: skip
NONCE_NOUNS: dict[str, str] = {
    "wug": "wugs", "dax": "daxes", "blicket": "blickets", "toma": "tomas", "fep": "feps", "zorp": "zorps",
    "kiki": "kikis", "mipen": "mipens",
}  # fmt: skip
RELATIONS = ("next to", "on", "under", "behind", "in front of", "near")
ASYMMETRIC_RELATIONS = ("on", "under", "behind", "in front of")
SETTINGS: dict[str, str] = {
    "park": "in the park", "kitchen": "in the kitchen", "garden": "in the garden", "beach": "at the beach",
    "bedroom": "in the bedroom", "street": "on the street", "forest": "in the forest", "classroom": "in the classroom",
}  # fmt: skip
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
MAX_COUNT = 3
VERBS: dict[str, str] = {  # 3rd person singular -> plural
    "runs": "run", "jumps": "jump", "sleeps": "sleep", "sits": "sit", "falls": "fall", "plays": "play",
    "rolls": "roll", "waits": "wait",
}  # fmt: skip

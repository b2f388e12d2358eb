"""Hard-negative captions by word swaps (NegCLIP-style), for the binding terms of the phase-2/3 objective.

A caption's hard negative exchanges two different words of one word class everywhere they occur: "a red ball on a
blue cup" -> "a blue ball on a red cup" (colours), "a dog on a box" -> "a box on a dog" (nouns). The negative has
the same words, is as fluent as the caption, and is false of the picture, so only a model that binds attributes and
roles to the right object can tell them apart: exactly what Winoground asks. The caption loss alone never teaches it
(nothing ever says what a picture is NOT), which is why a caption model's log p(c | i) barely differs between the
two.

Word classes are lists of common English words (colours, sizes, the concrete nouns the fast-mapping augmentation
uses); a word the tokenizer splits into several pieces is left out, so a swap is a swap of two token ids and the
negative has the caption's length. Captions without two different words of one class get no negative.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bitmar.data.pseudowords import COMMON_NOUNS

COLOUR_WORDS = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple", "grey", "gray", "golden",
    "silver",
)  # fmt: skip
SIZE_WORDS = ("small", "big", "tiny", "large", "little", "huge", "tall", "short", "long")


def default_word_classes() -> dict[str, list[str]]:
    """Swap classes: colours, sizes, and the concrete nouns of `pseudowords.COMMON_NOUNS` singular and plural apart
    (a swap keeps the caption's agreement)."""
    return {
        "colour": list(COLOUR_WORDS),
        "size": list(SIZE_WORDS),
        "noun": list(COMMON_NOUNS),
        "nouns": sorted(set(COMMON_NOUNS.values()) - set(COMMON_NOUNS)),  # "fish", "sheep": one class only
    }


def swap_token_classes(tokenizer: Any, classes: dict[str, Sequence[str]] | None = None) -> list[list[int]]:
    """Token ids per word class: a word counts when ' word' (the form after a space) is one token; classes with
    fewer than two such words are dropped."""
    out = []
    special = set(tokenizer.all_special_ids)
    for words in (classes or default_word_classes()).values():
        ids = []
        for word in words:
            pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1 and pieces[0] not in ids and pieces[0] not in special:  # not <unk>
                ids.append(int(pieces[0]))
        if len(ids) >= 2:
            out.append(ids)
    return out


def requested_swap_classes(tokenizer: Any, training: Any) -> list[list[int]] | None:
    """The swap classes when a term of `training` (a TrainingConfig) uses hard negatives, else None. A tokenizer that
    splits every listed word into pieces has none: the terms then add nothing, which is said once in the log."""
    if not (training.loss_weights.hard_negative > 0 or training.contrastive_hard_negatives):
        return None
    classes = swap_token_classes(tokenizer)
    if not classes:
        logging.getLogger("bitmar").warning(
            "hard negatives requested (loss_weights.hard_negative / training.contrastive_hard_negatives) but no "
            "colour, size or noun of bitmar.training.hard_negatives is a single token of this tokenizer: no caption "
            "gets a negative; train the tokenizer on data that holds these words or turn the option off"
        )
    return classes


class WordSwapper:
    """Makes the hard negative of every caption of a batch (module docstring)."""

    def __init__(self, token_classes: list[list[int]]) -> None:
        self.token_classes = [list(c) for c in token_classes]
        size = 1 + max((max(c) for c in self.token_classes if c), default=0)
        self.class_of = torch.full((size,), -1, dtype=torch.long)  # token id -> class index, -1: none
        for k, ids in enumerate(self.token_classes):
            self.class_of[torch.as_tensor(ids)] = k

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """input_ids (B, T) -> (negatives (B, T), has_negative (B,) bool). A row without a swappable pair is
        returned unchanged with has_negative False."""
        ids = input_ids.detach().cpu()
        mask = attention_mask.detach().cpu().bool()
        inside = ids.clamp(max=self.class_of.numel() - 1)
        cls = torch.where((ids < self.class_of.numel()) & mask, self.class_of[inside], -1)  # (B, T)
        negatives = ids.clone()
        has = torch.zeros(ids.shape[0], dtype=torch.bool)
        for row in range(ids.shape[0]):
            options = []
            for k in cls[row][cls[row] >= 0].unique().tolist():
                distinct = ids[row][cls[row] == k].unique()
                if distinct.numel() >= 2:
                    options.append(distinct)
            if not options:
                continue
            choice = options[int(torch.randint(len(options), (1,), generator=generator))]
            pick = torch.randperm(choice.numel(), generator=generator)[:2]
            a, b = choice[pick].tolist()
            negatives[row][ids[row] == a] = b
            negatives[row][ids[row] == b] = a
            has[row] = True
        return negatives.to(input_ids.device), has.to(input_ids.device)

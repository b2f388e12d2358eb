"""Image captioning (BLEU-4, ROUGE-L) and grounding (does the caption likelihood use the picture?).

captioning: greedy captions from the DINOv2 features of `evaluation.caption_samples` validation images, scored
    against their reference caption with `sacrebleu.corpus_bleu` (BLEU-4, 0-100, 13a tokenization) and
    `rouge_score.rouge_scorer` (ROUGE-L F1, 0-1). The same decoder run without any image (the unconditional LM
    from BOS) gives the blind baseline that every caption-prior-only model reaches.
grounding: caption NLL per token with the true features, with the features of another image of the set (rolled by
    one) and with no features. gain = NLL(shuffled) - NLL(true) > 0 means the decoder reads the picture. The gain is
    also given for the tokens of two word classes (`WORD_CLASSES`: colour words and concrete nouns, when they are one
    token after a space): a decoder can gain on a caption's frame ("a photo of ...") while still guessing its content.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import sacrebleu
import torch
from rouge_score import rouge_scorer

from bitmar.data.pseudowords import COMMON_NOUNS
from bitmar.evaluation.context import (
    EvalContext,
    TaskSkipped,
    caption_token_ids,
    greedy_captions,
    token_log_probs,
)
from bitmar.training.hard_negatives import COLOUR_WORDS, swap_token_classes

WORD_CLASSES = {"colour_words": COLOUR_WORDS, "nouns": (*COMMON_NOUNS, *COMMON_NOUNS.values())}

NUM_EXAMPLES = 3


def caption_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 0-100) and mean ROUGE-L F1 (rouge-score, 0-1) of hypotheses vs one reference each."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses as references (> 0), got {len(hypotheses)} and {len(references)}")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    return {"bleu4": float(bleu.score), "rouge_l": float(np.mean(rouge))}


def evaluate_captioning(ctx: EvalContext) -> dict[str, Any]:
    split = ctx.captions()
    positions = split.subset(ctx.ecfg.caption_samples)
    n = int(positions.size)
    references = split.captions(positions)
    blind = greedy_captions(ctx, n)  # no picture: what the caption prior alone says
    metrics: dict[str, Any] = {"samples": n, "max_new_tokens": ctx.ecfg.caption_max_new_tokens}
    blind_scores = caption_metrics(blind, references)
    with_memory = None
    if ctx.has_vision:
        features = ctx.tensor(split.features(positions))
        generated = greedy_captions(ctx, n, vision_features=features)
        scores = caption_metrics(generated, references)
        readout = ctx.memory_readout(features)  # support memory of training episodes (None: off)
        if readout is not None:
            with_memory = greedy_captions(ctx, n, vision_features=features, memory_readout=readout)
            metrics["with_memory"] = {
                **caption_metrics(with_memory, references),
                "examples": with_memory[:NUM_EXAMPLES],
            }
    else:
        generated, scores = blind, blind_scores
    metrics.update(scores)
    metrics["conditioned_on_image"] = ctx.has_vision
    metrics["bleu4_no_image"] = blind_scores["bleu4"]
    metrics["rouge_l_no_image"] = blind_scores["rouge_l"]
    matches = [g == " ".join(r.split()) for g, r in zip(generated, references, strict=True)]
    metrics["exact_match"] = float(np.mean(matches))
    metrics["distinct_captions"] = len(set(generated))
    metrics["examples"] = [
        {"reference": r, "generated": g, "generated_no_image": b}
        for r, g, b in list(zip(references, generated, blind, strict=True))[:NUM_EXAMPLES]
    ]
    return {
        "metrics": metrics,
        "headline": [
            {"metric": "BLEU-4", "value": scores["bleu4"], "reference": blind_scores["bleu4"]},
            {"metric": "ROUGE-L F1", "value": scores["rouge_l"], "reference": blind_scores["rouge_l"]},
            *(
                [
                    {
                        "metric": "BLEU-4 with memory",
                        "value": metrics["with_memory"]["bleu4"],
                        "reference": scores["bleu4"],
                    },
                    {
                        "metric": "ROUGE-L F1 with memory",
                        "value": metrics["with_memory"]["rouge_l"],
                        "reference": scores["rouge_l"],
                    },
                ]
                if with_memory is not None
                else []
            ),
        ],  # fmt: skip
        "notes": [
            f"{n} validation images, greedy decoding; reference column = the same decoder without an image"
            + ("" if ctx.has_vision else " (this model has no vision input: both columns are blind)")
        ],
    }


@torch.no_grad()
def evaluate_grounding(ctx: EvalContext) -> dict[str, Any]:
    if not ctx.has_vision:
        raise TaskSkipped("model.use_vision=false: captions cannot be conditioned on an image")
    split = ctx.captions()
    positions = split.subset(max(ctx.ecfg.retrieval_gallery_size, ctx.ecfg.caption_samples))
    n = int(positions.size)
    if n < 2:
        raise TaskSkipped("grounding needs at least 2 validation images (to shuffle features)")
    seqs = caption_token_ids(ctx.tokenizer, split.captions(positions), ctx.max_len)
    features = ctx.tensor(split.features(positions))  # (N, D)
    classes = {
        name: torch.as_tensor([i for ids in swap_token_classes(ctx.tokenizer, {name: words}) for i in ids])
        for name, words in WORD_CLASSES.items()
    }
    nll, class_nll = {}, {}
    for name, vf in (("true", features), ("shuffled", features.roll(1, dims=0)), ("none", None)):
        logp, targets, valid = token_log_probs(ctx, seqs, vf)  # (N, T - 1) each
        nll[name] = float(-logp.sum() / valid.sum())
        for word_class, ids in classes.items():
            chosen = valid & torch.isin(targets, ids)
            if bool(chosen.any()):
                class_nll.setdefault(word_class, {})[name] = float(-logp[chosen].mean())
    metrics = {
        "samples": n,
        "nll_true_image": nll["true"],
        "nll_shuffled_image": nll["shuffled"],
        "nll_no_image": nll["none"],
        "gain_vs_shuffled": nll["shuffled"] - nll["true"],
        "gain_vs_no_image": nll["none"] - nll["true"],
        "perplexity_true_image": math.exp(min(nll["true"], 50.0)),
        "perplexity_shuffled_image": math.exp(min(nll["shuffled"], 50.0)),
    }
    headline = [
        {"metric": "caption NLL/token, true image", "value": nll["true"], "reference": nll["shuffled"]},
        {"metric": "grounding gain (shuffled − true)", "value": metrics["gain_vs_shuffled"], "reference": 0.0},
        {"metric": "caption NLL/token, no image", "value": nll["none"], "reference": None},
    ]
    for word_class, values in class_nll.items():
        metrics[f"nll_true_image_{word_class}"] = values["true"]
        metrics[f"nll_shuffled_image_{word_class}"] = values["shuffled"]
        metrics[f"gain_vs_shuffled_{word_class}"] = values["shuffled"] - values["true"]
        label = word_class.replace("_", " ")
        headline.append(
            {"metric": f"grounding gain, {label}", "value": values["shuffled"] - values["true"], "reference": 0.0}
        )
    return {
        "metrics": metrics,
        "headline": headline,
        "notes": [f"{n} validation captions; reference of the NLL row = the same captions with shuffled images"],
    }

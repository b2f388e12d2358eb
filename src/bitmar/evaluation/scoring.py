"""Zero-shot log-likelihood tasks in the BabyLM style: minimal pairs (BLiMP), Winoground and VQA.

minimal_pairs: every `*.jsonl` under `evaluation.blimp_dir` (default `<data_dir>/eval/blimp`; the official BLiMP
    files work as they are) with `sentence_good` / `sentence_bad` and optional `UID` (default: the file name) and
    `field`. A sentence scores the summed float32 log-probability of its tokens after BOS (BOS + tokens as the
    tokenizer returns them, no EOS: the convention of `bitmar.export.hf_export.score_sentences` and BabyLM's causal
    backend). A pair is right when good > bad; a tie counts as wrong. Accuracy per UID, per field, over all pairs
    (micro) and averaged over UIDs (macro, BabyLM's BLiMP number).
winoground: two captions with the same words in another order and their two images. s(c, i) = log p(c | i), the
    caption (BOS + tokens + EOS) scored with the image's features as the decoder prefix. Scores exactly as Thrush et
    al. 2022: text = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1); image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0);
    group = text and image (chance 1/4, 1/4, 1/6; ties fail). These are the reported scores. An extra column uses the
    pointwise mutual information PMI(c, i) = log p(c | i) - log p(c) (log p(c): the same caption without an image),
    which removes the caption prior from the text comparison; the image comparison is unchanged by it (log p(c)
    cancels between the two images of one caption). Each item's four scores are also split exactly into a caption
    effect, an image effect and their interaction (`winoground_effects`): text = interaction > |caption effect|,
    image = interaction > |image effect|, and the share of items whose interaction is positive (reported as
    "binding") is an upper bound of every score that only re-weights captions or images. Where the interaction comes
    from: for items whose captions are two swapped words in one frame, it is split token by token into the first
    swapped word, the second and the rest (`interaction_by_swapped_word`; rows "binding at the first / second
    swapped word").
vqa: a question about an image, the answer among 7 distractors. Each candidate scores log p(" answer" | BOS question,
    image), summed over the answer tokens (lm-eval's multiple-choice `acc`, the reported accuracy); also per-token mean
    (`acc_norm` style), the blind model (no image) and, as an extra column, PMI = log p(a | q, i) - log p(a | q).
    Accuracy; chance 1/8; ties fail.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitmar.data import layout
from bitmar.data.sample import VQA_FEATURES, WINOGROUND_FEATURES
from bitmar.evaluation.context import (
    EvalContext,
    EvaluationError,
    TaskSkipped,
    caption_token_ids,
    read_features,
    read_jsonl,
    score_sequences,
    sentence_token_ids,
    token_log_probs,
)
from bitmar.evaluation.retrieval import latents

# ----------------------------------------------------------------------------------------------------------------
# Minimal pairs
# ----------------------------------------------------------------------------------------------------------------


def load_minimal_pairs(directory: Path, configured: bool) -> list[dict[str, str]]:
    """All pairs of the `*.jsonl` files under `directory` (sorted, recursive): {"good", "bad", "uid", "field"}."""
    if not directory.is_dir():
        message = f"minimal-pair directory {directory} does not exist"
        if configured:
            raise EvaluationError(f"{message}; fix evaluation.blimp_dir (a folder of BLiMP-format .jsonl files)")
        raise TaskSkipped(f"{message} (set evaluation.blimp_dir to a folder of BLiMP .jsonl files)", True)
    files = sorted(directory.rglob("*.jsonl"))
    if not files:
        raise EvaluationError(f"{directory} holds no .jsonl files; point evaluation.blimp_dir at BLiMP-format files")
    pairs = []
    for path in files:
        for record in read_jsonl(path, ("sentence_good", "sentence_bad")):
            pairs.append(
                {
                    "good": str(record["sentence_good"]),
                    "bad": str(record["sentence_bad"]),
                    "uid": str(record.get("UID") or path.stem),
                    "field": str(record.get("field") or "unknown"),
                }
            )
    return pairs


@torch.no_grad()
def minimal_pair_accuracy(
    model: nn.Module, tokenizer: Any, pairs: Sequence[dict[str, str]], batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Score every pair (see the module docstring); works with any model exposing `forward(...).logits`."""
    good = score_sequences(
        model, sentence_token_ids(tokenizer, [p["good"] for p in pairs]),
        pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device,
    )[0]  # fmt: skip
    bad = score_sequences(
        model, sentence_token_ids(tokenizer, [p["bad"] for p in pairs]),
        pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device,
    )[0]  # fmt: skip
    correct = (good > bad).tolist()  # strict: a tie is wrong
    by_uid: dict[str, list[bool]] = defaultdict(list)
    by_field: dict[str, list[bool]] = defaultdict(list)
    for pair, ok in zip(pairs, correct, strict=True):
        by_uid[pair["uid"]].append(ok)
        by_field[pair["field"]].append(ok)
    per_uid = {uid: float(np.mean(v)) for uid, v in sorted(by_uid.items())}
    return {
        "pairs": len(pairs),
        "accuracy": float(np.mean(correct)),
        "macro_accuracy": float(np.mean(list(per_uid.values()))),
        "ties": int((good == bad).sum()),
        "per_uid": per_uid,
        "per_uid_pairs": {uid: len(v) for uid, v in sorted(by_uid.items())},
        "per_field": {f: float(np.mean(v)) for f, v in sorted(by_field.items())},
    }


def evaluate_minimal_pairs(ctx: EvalContext) -> dict[str, Any]:
    configured = ctx.ecfg.blimp_dir is not None
    directory = Path(ctx.ecfg.blimp_dir) if configured else ctx.eval_path(layout.BLIMP_DIR)
    pairs = load_minimal_pairs(directory, configured)
    metrics = minimal_pair_accuracy(ctx.model, ctx.tokenizer, pairs, ctx.ecfg.batch_size, ctx.device)
    metrics["directory"] = str(directory)
    headline = [{"metric": "accuracy (macro over UIDs)", "value": metrics["macro_accuracy"], "reference": 0.5}]
    headline += [{"metric": f"UID {uid}", "value": acc, "reference": 0.5} for uid, acc in metrics["per_uid"].items()]
    return {
        "metrics": metrics,
        "headline": headline,
        "notes": [f"{metrics['pairs']} pairs from {directory}; summed log-prob after BOS, ties wrong; chance 0.5"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Winoground
# ----------------------------------------------------------------------------------------------------------------


def winoground_outcomes(s: Tensor) -> dict[str, Tensor]:
    """s (N, 2, 2) with s[n, c, i] = score of caption c with image i -> boolean text/image/group outcomes (N,)."""
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text": text, "image": image, "group": text & image}


def winoground_effects(s: Tensor) -> dict[str, Tensor]:
    """The exact two-way decomposition of each item's 2 x 2 scores s (N, 2, 2) into (N,) effects:

    caption = (s00 - s10 + s01 - s11) / 2   (caption 0 preferred whatever the image: the caption prior)
    image = (s00 - s01 + s10 - s11) / 2     (image 0 preferred whatever the caption)
    interaction = (s00 + s11 - s01 - s10) / 2   (matched pairs preferred: binding)

    so that s00 - s10 = caption + interaction and s11 - s01 = interaction - caption: the text outcome is exactly
    `interaction > |caption|`, the image outcome `interaction > |image|`. No rescoring that only shifts captions or
    images (PMI, any prior) changes the interaction, so the share of items with `interaction > 0` bounds every such
    score from above: it measures whether the model binds at all."""
    s00, s01, s10, s11 = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1]
    return {
        "caption": (s00 - s10 + s01 - s11) / 2,
        "image": (s00 - s01 + s10 - s11) / 2,
        "interaction": (s00 + s11 - s01 - s10) / 2,
    }


def _differing_runs(differs: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True in `differs`."""
    runs, start = [], None
    for t, d in enumerate([*differs, False]):
        if d and start is None:
            start = t
        elif not d and start is not None:
            runs.append((start, t))
            start = None
    return runs


def interaction_by_swapped_word(token_logp: Tensor, targets: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Where an item's binding comes from: its interaction split over caption positions.

    token_logp, targets, valid: (N, 2, 2, L) per (item, caption, image) from `token_log_probs`. An item is analysed
    when its two captions have the same number of tokens and differ in at least two separate runs of tokens (two
    swapped words: "a [dog] on a [box]" / "a [box] on a [dog]"). Per position t, I_t = (l00 + l11 - l01 - l10) / 2
    (the interaction of `winoground_effects`, token by token); it is summed over the first run of differing tokens
    (the first swapped word), the last run (the second swapped word) and every other position (the rest), so the
    three add up to the item's interaction. Returns {"analysed": (N,) bool, "first" / "second" / "rest": (N,)
    float32, 0 where not analysed}."""
    per_position = (token_logp[:, 0, 0] + token_logp[:, 1, 1] - token_logp[:, 0, 1] - token_logp[:, 1, 0]) / 2
    n = token_logp.shape[0]
    out = {"analysed": torch.zeros(n, dtype=torch.bool), **{k: torch.zeros(n) for k in ("first", "second", "rest")}}
    for k in range(n):
        if not torch.equal(valid[k, 0, 0], valid[k, 1, 0]):  # captions of different lengths: no aligned positions
            continue
        differs = ((targets[k, 0, 0] != targets[k, 1, 0]) & valid[k, 0, 0]).tolist()
        runs = _differing_runs(differs)
        if len(runs) < 2:
            continue
        (a0, a1), (b0, b1) = runs[0], runs[-1]
        row = per_position[k].float()
        out["analysed"][k] = True
        out["first"][k], out["second"][k] = row[a0:a1].sum(), row[b0:b1].sum()
        out["rest"][k] = row.sum() - out["first"][k] - out["second"][k]
    return out


def _swapped_word_summary(parts: dict[str, Tensor], items: Tensor) -> dict[str, Any]:
    """Mean interaction (nats) and share > 0 of each part over the analysed items among `items` (indices)."""
    chosen = items[parts["analysed"][items]]
    summary: dict[str, Any] = {"items": int(chosen.numel())}
    for name in ("first", "second", "rest"):
        values = parts[name][chosen]
        summary[name] = {
            "mean_interaction": float(values.mean()) if chosen.numel() else float("nan"),
            "positive": float((values > 0).float().mean()) if chosen.numel() else float("nan"),
        }
    return summary


def _swapped_word_rows(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Headline rows of the interaction at the first and the second swapped word (none without a picture)."""
    if not summary or not summary["items"]:
        return []
    rows = []
    for part in ("first", "second"):
        rows.append(
            {
                "metric": f"binding at the {part} swapped word: mean interaction (nats)",
                "value": summary[part]["mean_interaction"],
                "reference": 0.0,
                "higher_is_better": True,
            }
        )
        rows.append(
            {
                "metric": f"binding at the {part} swapped word: share > 0",
                "value": summary[part]["positive"],
                "reference": 0.5,
                "higher_is_better": True,
            }
        )
    return rows


def evaluate_winoground(ctx: EvalContext) -> dict[str, Any]:
    records = read_jsonl(ctx.eval_path(layout.WINOGROUND_FILE), ("caption_0", "caption_1", "image_0", "image_1"))
    rows = max(max(int(r["image_0"]), int(r["image_1"])) for r in records) + 1
    features = read_features(ctx.eval_path(WINOGROUND_FEATURES), ctx.cfg.model.vision_encoder_dim, rows)
    captions, images = [], []
    for r in records:
        for c in (0, 1):
            for i in (0, 1):
                captions.append(str(r[f"caption_{c}"]))
                images.append(int(r[f"image_{i}"]))
    seqs = caption_token_ids(ctx.tokenizer, captions, ctx.max_len)
    vf = ctx.tensor(features[np.asarray(images)]) if ctx.has_vision else None
    scores, _ = score_sequences(
        ctx.model, seqs, pad_id=ctx.tokenizer.pad_token_id, batch_size=ctx.ecfg.batch_size, device=ctx.device,
        vision_features=vf,
    )  # fmt: skip
    scores = scores.view(-1, 2, 2)  # (N, caption, image)
    outcome = winoground_outcomes(scores)
    metrics: dict[str, Any] = {"items": len(records), "conditioned_on_image": ctx.has_vision}
    for name, hits in outcome.items():
        metrics[f"{name}_score"] = float(hits.float().mean())
    effects = winoground_effects(scores)
    metrics["binding"] = {
        "interaction_positive": float((effects["interaction"] > 0).float().mean()),
        **{f"mean_abs_{k}": float(v.abs().mean()) for k, v in effects.items()},
    }
    tags: dict[str, list[int]] = defaultdict(list)
    for n, r in enumerate(records):
        tags[str(r.get("tag", "all"))].append(n)
    if ctx.has_vision:  # where the binding comes from: the interaction at the first and at the second swapped word
        per_token = (x.view(len(records), 2, 2, -1) for x in token_log_probs(ctx, seqs, vf))
        parts = interaction_by_swapped_word(*per_token)
        metrics["binding"]["by_swapped_word"] = _swapped_word_summary(parts, torch.arange(len(records)))
        metrics["binding"]["by_swapped_word_per_tag"] = {
            tag: _swapped_word_summary(parts, torch.as_tensor(idx)) for tag, idx in sorted(tags.items())
        }
    if ctx.has_vision:  # the PMI column: log p(c | i) - log p(c), each caption scored once without an image
        prior, _ = score_sequences(
            ctx.model, seqs[::2], pad_id=ctx.tokenizer.pad_token_id, batch_size=ctx.ecfg.batch_size,
            device=ctx.device,
        )  # fmt: skip
        for name, hits in winoground_outcomes(scores - prior.view(-1, 2, 1)).items():
            metrics[f"{name}_score_pmi"] = float(hits.float().mean())
    if ctx.has_vision:  # image-text matching: cos(z_t, z_v) of the contrastive latents (CLIP's Winoground score)
        pair_captions = [str(r[f"caption_{c}"]) for r in records for c in (0, 1)]
        pair_images = np.asarray([int(r[f"image_{i}"]) for r in records for i in (0, 1)])
        text_latent, vision_latent = latents(ctx, pair_captions, ctx.tensor(features[pair_images]))
        text_latent = F.normalize(text_latent, dim=-1).view(-1, 2, 1, text_latent.shape[-1])
        vision_latent = F.normalize(vision_latent, dim=-1).view(-1, 1, 2, vision_latent.shape[-1])
        matching = (text_latent * vision_latent).sum(-1)  # (N, caption, image)
        for name, hits in winoground_outcomes(matching).items():
            metrics[f"{name}_score_matching"] = float(hits.float().mean())
        # Why matching fails or works: how far apart the latents of an item's two captions (same words, other order)
        # and its two pictures are, against two captions / pictures of different items (the next item's).
        t, v = text_latent[:, :, 0], vision_latent[:, 0, :]  # (N, 2, L) unit rows
        metrics["latent_cosine"] = {
            "caption_pair": float((t[:, 0] * t[:, 1]).sum(-1).mean()),
            "caption_other_item": float((t[:, 0] * t[:, 0].roll(1, 0)).sum(-1).mean()),
            "image_pair": float((v[:, 0] * v[:, 1]).sum(-1).mean()),
            "image_other_item": float((v[:, 0] * v[:, 0].roll(1, 0)).sum(-1).mean()),
        }
    readout = ctx.memory_readout(vf) if vf is not None else None  # support memory of training episodes
    if readout is not None:
        with_memory, _ = score_sequences(
            ctx.model, seqs, pad_id=ctx.tokenizer.pad_token_id, batch_size=ctx.ecfg.batch_size, device=ctx.device,
            vision_features=vf, memory_readout=readout,
        )  # fmt: skip
        memory_outcome = winoground_outcomes(with_memory.view(-1, 2, 2))
        metrics["with_memory"] = {f"{k}_score": float(v.float().mean()) for k, v in memory_outcome.items()}
    metrics["per_tag"] = {
        tag: {name: float(hits[idx].float().mean()) for name, hits in outcome.items()}
        for tag, idx in sorted(tags.items())
    }
    chance = {"text": 0.25, "image": 0.25, "group": 1 / 6}
    metrics["chance"] = chance
    return {
        "metrics": metrics,
        "headline": [
            {"metric": f"{name} score", "value": metrics[f"{name}_score"], "reference": chance[name]}
            for name in ("text", "image", "group")
        ]
        + [
            {
                "metric": f"{name} score with memory",
                "value": metrics["with_memory"][f"{name}_score"],
                "reference": metrics[f"{name}_score"],
            }
            for name in ("text", "image", "group")
            if "with_memory" in metrics
        ]
        + [
            {"metric": f"{name} score, PMI (extra)", "value": metrics[f"{name}_score_pmi"], "reference": chance[name]}
            for name in ("text", "image", "group")
            if f"{name}_score_pmi" in metrics
        ]
        + [
            {
                "metric": f"{name} score, image-text matching (extra)",
                "value": metrics[f"{name}_score_matching"],
                "reference": chance[name],
            }
            for name in ("text", "image", "group")
            if f"{name}_score_matching" in metrics
        ]
        + [
            {
                "metric": "binding: share of items with interaction > 0 (bounds any prior-corrected score)",
                "value": metrics["binding"]["interaction_positive"],
                "reference": 0.5,
                "higher_is_better": True,
            }
        ]
        + _swapped_word_rows(metrics["binding"].get("by_swapped_word")),  # fmt: skip
        "notes": [
            f"{len(records)} items; s(c, i) = log p(caption | image) (PMI rows: log p(c | i) - log p(c), an extra "
            "view); reference column = chance"
            + ("" if ctx.has_vision else " (no vision input: every image scores the same, so image/group fail)")
        ],
    }


# ----------------------------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------------------------


def multiple_choice_accuracy(scores: Tensor) -> Tensor:
    """scores (N, C) with the right answer in column 0 -> (N,) bool: strictly above every distractor (ties fail)."""
    return scores[:, 0] > scores[:, 1:].max(dim=1).values


def evaluate_vqa(ctx: EvalContext) -> dict[str, Any]:
    records = read_jsonl(ctx.eval_path(layout.VQA_FILE), ("question", "answer", "distractors", "image"))
    choices = {len(r["distractors"]) for r in records}
    if len(choices) != 1:
        raise EvaluationError(f"{ctx.eval_path(layout.VQA_FILE)}: every question needs the same number of distractors")
    n_choices = choices.pop() + 1
    rows = max(int(r["image"]) for r in records) + 1
    features = read_features(ctx.eval_path(VQA_FEATURES), ctx.cfg.model.vision_encoder_dim, rows)
    tok = ctx.tokenizer
    question_ids = sentence_token_ids(tok, [str(r["question"]) for r in records])
    seqs, starts, images = [], [], []
    for r, q_ids in zip(records, question_ids, strict=True):
        for answer in [r["answer"], *r["distractors"]]:
            a_ids = tok(" " + str(answer).strip(), add_special_tokens=False)["input_ids"]
            seqs.append([*q_ids, *a_ids])
            starts.append(len(q_ids))  # score the answer tokens only
            images.append(int(r["image"]))
    kw = {"pad_id": tok.pad_token_id, "batch_size": ctx.ecfg.batch_size, "device": ctx.device, "score_from": starts}
    blind, counts = score_sequences(ctx.model, seqs, **kw)
    with_memory = None
    if ctx.has_vision:
        vf = ctx.tensor(features[np.asarray(images)])
        seen, _ = score_sequences(ctx.model, seqs, vision_features=vf, **kw)
        readout = ctx.memory_readout(vf)  # support memory of training episodes (None: off)
        if readout is not None:
            with_memory, _ = score_sequences(ctx.model, seqs, vision_features=vf, memory_readout=readout, **kw)
    else:
        seen = blind
    shape = (len(records), n_choices)
    correct = multiple_choice_accuracy(seen.view(shape))
    correct_norm = multiple_choice_accuracy((seen / counts.clamp(min=1)).view(shape))
    correct_blind = multiple_choice_accuracy(blind.view(shape))
    correct_pmi = multiple_choice_accuracy((seen - blind).view(shape))
    types: dict[str, list[int]] = defaultdict(list)
    for n, r in enumerate(records):
        types[str(r.get("question_type", "all"))].append(n)
    metrics = {
        "questions": len(records),
        "choices": n_choices,
        "conditioned_on_image": ctx.has_vision,
        "accuracy": float(correct.float().mean()),
        "accuracy_per_token": float(correct_norm.float().mean()),
        "accuracy_no_image": float(correct_blind.float().mean()),
        "accuracy_pmi": float(correct_pmi.float().mean()) if ctx.has_vision else None,
        "chance": 1.0 / n_choices,
        "per_question_type": {t: float(correct[idx].float().mean()) for t, idx in sorted(types.items())},
    }
    headline = [
        {"metric": "accuracy", "value": metrics["accuracy"], "reference": metrics["chance"]},
        {"metric": "accuracy without image", "value": metrics["accuracy_no_image"], "reference": metrics["chance"]},
    ]
    if ctx.has_vision:
        headline.append(
            {"metric": "accuracy, PMI (extra)", "value": metrics["accuracy_pmi"], "reference": 1 / n_choices}
        )
    if with_memory is not None:
        metrics["accuracy_with_memory"] = float(multiple_choice_accuracy(with_memory.view(shape)).float().mean())
        headline.append(
            {
                "metric": "accuracy with memory",
                "value": metrics["accuracy_with_memory"],
                "reference": metrics["accuracy"],
            }
        )
    return {
        "metrics": metrics,
        "headline": headline,
        "notes": [
            f"{len(records)} questions, {n_choices} candidates; log p(answer | question, image); reference = chance"
        ],
    }

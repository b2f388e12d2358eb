"""Image-text retrieval over a held-out gallery: Recall@k in both directions.

The gallery is `evaluation.retrieval_gallery_size` items of the caption VALIDATION split (the split `build_data`
trains without), chosen with a fixed seed and with pairwise distinct captions. Ties count against the model (the true
item ranks below every item scoring the same).

BitMar has two retrieval experts, and the headline rows rank by their sum (`combined_scores`):
- contrastive: cos(z_t, z_v) / training.contrastive_temperature, the logit the contrastive loss trains (each caption's
  text latent z_t, each picture's vision latent z_v);
- decoder PMI: log p(c | i) - log p(c) of the captioning decoder (every caption scored under every picture, N^2
  sequences, and once without a picture), as generative retrieval does; the prior term removes each caption's own
  likelihood from the image->text ranking and does not change text->image.
Both are log-scale scores of how much caption and picture go together (each estimates their pointwise mutual
information up to a shift per query: InfoNCE's logit only up to it, and with tau = 0.07 it spans +-14); the headline
adds them with weight `evaluation.retrieval_decoder_weight` (default 1, fixed before measuring and not tuned; a
product of the two experts up to normalisation, as BLIP adds its matching head's score to the contrastive
similarity). tau is the run's own `training.contrastive_temperature`. Each expert alone is reported as an extra row:
they make different mistakes (the text latent is close to a bag of words; the decoder's ranking varies with the
seed), so on the sample world the sum beats either (docs/evaluation-and-ablations.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bitmar.evaluation.context import EvalContext, TaskSkipped, caption_token_ids, pad_sequences, score_sequences

RECALL_KS = (1, 5, 10)


def ranks_of_diagonal(scores: Tensor) -> Tensor:
    """scores (Q, G) with the correct item of query q at column q -> its 0-based rank (Q,), ties pessimistic.

    A NaN score counts as the lowest possible (-inf): NaN compares false with everything, so a NaN on the true item
    would otherwise rank it first."""
    if scores.dim() != 2 or scores.shape[0] > scores.shape[1]:
        raise ValueError(f"scores must be (Q, G) with Q <= G, got {tuple(scores.shape)}")
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    q = torch.arange(scores.shape[0])
    true = scores[q, q][:, None]  # (Q, 1)
    others = torch.ones_like(scores, dtype=torch.bool)
    others[q, q] = False
    return ((scores >= true) & others).sum(dim=1)  # (Q,)


def recall_at_k(scores: Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Share of queries whose correct item (column q of row q) is in the top k; plus the median rank (1-based)."""
    ranks = ranks_of_diagonal(scores.float().cpu())
    out = {f"R@{k}": float((ranks < k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.float().median()) + 1.0
    return out


@torch.no_grad()
def latents(ctx: EvalContext, captions: list[str], features: Tensor) -> tuple[Tensor, Tensor]:
    """Text latents (N, L) and vision latents (N, L) of paired captions and features."""
    model, bs = ctx.model, ctx.ecfg.batch_size
    seqs = caption_token_ids(ctx.tokenizer, captions, ctx.max_len)
    text = []
    for start in range(0, len(seqs), bs):
        ids, mask = pad_sequences(seqs[start : start + bs], ctx.tokenizer.pad_token_id)
        text.append(model.encode_text(ids.to(ctx.device), mask.to(ctx.device))[1].float())
    vision = [model.encode_vision(features[s : s + bs])[1].float() for s in range(0, features.shape[0], bs)]
    return torch.cat(text), torch.cat(vision)


@torch.no_grad()
def decoder_pmi_scores(ctx: EvalContext, captions: list[str], features: Tensor) -> Tensor:
    """(N captions, N images) log p(c_t | i_j) - log p(c_t) under the decoder (module docstring)."""
    seqs = caption_token_ids(ctx.tokenizer, captions, ctx.max_len)
    n = len(seqs)
    kwargs = {"pad_id": ctx.tokenizer.pad_token_id, "batch_size": ctx.ecfg.batch_size, "device": ctx.device}
    pairs = [seq for seq in seqs for _ in range(n)]  # caption-major: row t * n + j is caption t under image j
    conditional, _ = score_sequences(ctx.model, pairs, vision_features=features.repeat(n, 1), **kwargs)
    prior, _ = score_sequences(ctx.model, seqs, **kwargs)
    return conditional.view(n, n) - prior[:, None]


def combined_scores(contrastive_logits: Tensor, decoder_pmi: Tensor, decoder_weight: float) -> Tensor:
    """(N captions, N images) headline score: contrastive logit + decoder_weight x decoder PMI (module docstring)."""
    if decoder_weight == 0:  # 0 * a -inf PMI (a caption the decoder cannot produce) would be NaN
        return contrastive_logits
    return contrastive_logits + decoder_weight * decoder_pmi


def evaluate_retrieval(ctx: EvalContext) -> dict[str, Any]:
    if not ctx.has_vision:
        raise TaskSkipped("model.use_vision=false: the model has no vision latent to retrieve images with")
    split = ctx.captions()
    requested = ctx.ecfg.retrieval_gallery_size
    positions = split.subset(requested)
    n = int(positions.size)
    if n < 2:
        raise TaskSkipped(f"the validation split has {n} distinct caption(s); retrieval needs at least 2")
    captions, features = split.captions(positions), ctx.tensor(split.features(positions))
    text, vision = latents(ctx, captions, features)
    sim = F.normalize(text, dim=-1) @ F.normalize(vision, dim=-1).T  # (N texts, N images)
    pmi = decoder_pmi_scores(ctx, captions, features)  # (N texts, N images)
    weight = float(ctx.ecfg.retrieval_decoder_weight)
    score = combined_scores(sim / ctx.cfg.training.contrastive_temperature, pmi, weight)
    ks = [k for k in RECALL_KS if k <= n]
    experts = {  # metrics key -> (score, headline suffix)
        "": (score, ""),
        "_contrastive": (sim, ", contrastive cos (extra)"),
        "_decoder_pmi": (pmi, ", decoder PMI (extra)"),
    }
    chance = {f"R@{k}": k / n for k in ks}
    metrics: dict[str, Any] = {"gallery_size": n, "gallery_size_requested": requested, "decoder_weight": weight}
    headline = []
    for key, (scores, suffix) in experts.items():
        directions = (("image_to_text", "image→text", scores.T), ("text_to_image", "text→image", scores))
        for direction, name, scores_qg in directions:
            values = recall_at_k(scores_qg, ks)
            metrics[direction + key] = values
            headline.extend(
                {"metric": f"{name} R@{k}{suffix}", "value": values[f"R@{k}"], "reference": chance[f"R@{k}"]}
                for k in ks
            )
    metrics.update(
        chance=chance,
        mean_matched_cosine=float(sim.diagonal().mean()),
        mean_unmatched_cosine=float((sim.sum() - sim.diagonal().sum()) / (n * n - n)),
    )
    return {
        "metrics": metrics,
        "headline": headline,
        "notes": [
            f"gallery: {n} validation pairs with distinct captions; reference column = chance k/N",
            f"score: cos(z_t, z_v) / temperature + {weight:g} x decoder PMI (evaluation.retrieval_decoder_weight); "
            "each expert alone in the (extra) rows",
            "no with-memory column: neither score reads the memory",
        ],
    }

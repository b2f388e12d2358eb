"""Training losses. They live beside the trainer, not in the model (the model returns logits and latents)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    logits[:, t] predicts input_ids[:, t + 1]; padded targets are ignored. Computed in float32.
    """
    targets = input_ids[:, 1:]  # (B, T-1)
    pred = logits[:, :-1].float()  # (B, T-1, V)
    mask = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    nll = F.cross_entropy(pred.reshape(-1, pred.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)
    return (nll * mask).sum(), mask.sum()


def lm_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over non-padded targets."""
    total, count = token_nll(logits, input_ids, attention_mask)
    return total / count.clamp(min=1)


def sequence_log_probs(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Per-sequence summed log-probability of tokens 1.. given their prefix, float32. (B,)"""
    targets = input_ids[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if attention_mask is not None:
        logp = logp * attention_mask[:, 1:].to(logp.dtype)
    return logp.sum(dim=-1)


def contrastive_loss(
    text_latent: Tensor, vision_latent: Tensor, temperature: float, negative_text: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between matching (text, image) rows; returns (loss, in-batch retrieval accuracy).

    negative_text (H, D): hard-negative captions (NegCLIP, Yuksekgonul et al. 2023), word-swapped copies of some of
    the batch's captions. They join the image->text softmax of every image as extra columns
    (a caption that is false of every picture), so an image must prefer its caption over the same words in another
    order; the text->image direction is unchanged."""
    text = F.normalize(text_latent.float(), dim=-1)  # (B, D)
    vision = F.normalize(vision_latent.float(), dim=-1)  # (B, D)
    logits = text @ vision.T / temperature  # (B, B)
    labels = torch.arange(logits.size(0), device=logits.device)
    image_to_text = logits.T  # (B images, B texts)
    if negative_text is not None and negative_text.numel() > 0:
        negative = F.normalize(negative_text.float(), dim=-1)  # (H, D)
        image_to_text = torch.cat([image_to_text, vision @ negative.T / temperature], dim=1)  # (B, B + H)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(image_to_text, labels))
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy.detach()

"""The three-phase training objective as one nn.Module, so DDP sees every parameter use in a single forward.

Phase 1 (text): causal LM loss of the decoder + masked-token loss of the bidirectional encoder.
Phase 2 (alignment): caption loss conditioned on the image + symmetric InfoNCE between text and vision latents;
    text-only batches keep flowing (data.text_ratio).
Phase 3 (memory): Larimar's objective on top of phase 2. A batch's episodes are written into a fresh memory
    as (key = vision-only key, value = caption+image episode latent); they are read back with a *noisy* vision
    query, which holds no caption tokens, and the decoder must reconstruct the caption from the readout alone
    (no vision prefix). Autoencoding (decode the caption from its own episode latent) and beta * KL on the
    addressing weights complete Larimar's loss. Because the query lacks the answer and is perturbed, the
    memory has to retrieve, not echo its input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitmar.config import BitMarConfig
from bitmar.training.losses import contrastive_loss, lm_loss


def mask_tokens(
    input_ids: Tensor, attention_mask: Tensor, probability: float, mask_id: int, special_ids: list[int]
) -> tuple[Tensor, Tensor]:
    """BERT-style masking for the encoder: returns (masked ids, bool positions to predict)."""
    can_mask = attention_mask.bool()
    for special in special_ids:
        can_mask &= input_ids != special
    chosen = (torch.rand(input_ids.shape, device=input_ids.device) < probability) & can_mask  # (B, T)
    masked = input_ids.masked_fill(chosen, mask_id)
    return masked, chosen


def slot_nll(model: nn.Module, episodes: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean NLL of caption token i under episode slot i, over the caption positions that have a slot."""
    log_probs = model.slot_log_probs(episodes)  # (N, S, V)
    n = min(log_probs.shape[1], ids.shape[1])
    nll = -log_probs[:, :n].gather(-1, ids[:, :n, None]).squeeze(-1)  # (N, n)
    valid = mask[:, :n].to(nll.dtype)
    return (nll * valid).sum() / valid.sum().clamp(min=1.0)


class TrainingObjective(nn.Module):
    def __init__(self, model: nn.Module, cfg: BitMarConfig, mask_token_id: int, special_token_ids: list[int]) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.mask_token_id = mask_token_id
        self.special_token_ids = special_token_ids

    def forward(self, batch: dict[str, Tensor], phase: int) -> tuple[Tensor, dict[str, Tensor]]:
        if batch["kind"] == "text":
            return self._text_losses(batch, phase)
        return self._caption_losses(batch, phase)

    def _text_losses(self, batch: dict[str, Tensor], phase: int) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.cfg.training.loss_weights
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        out = self.model(ids, mask, return_latents=False)
        loss_lm = lm_loss(out.logits, ids, mask)
        metrics = {"Loss_lm": loss_lm.detach()}
        total = w.lm * loss_lm
        if w.encoder_mlm > 0:
            masked, chosen = mask_tokens(
                ids, mask, self.cfg.training.mlm_probability, self.mask_token_id, self.special_token_ids
            )
            tokens, _ = self.model.encode_text(masked, mask)  # (B, T, C)
            logits = self.model.lm_logits(tokens[chosen])  # (M, V)
            if logits.numel() > 0:
                loss_mlm = nn.functional.cross_entropy(logits.float(), ids[chosen])
            else:  # nothing masked in this batch: keep the graph connected, contribute zero
                loss_mlm = tokens.sum() * 0.0
            total = total + w.encoder_mlm * loss_mlm
            metrics["Loss_encoder_mlm"] = loss_mlm.detach()
        return total, metrics

    def _caption_losses(self, batch: dict[str, Tensor], phase: int) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.cfg.training.loss_weights
        ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
        if not self.cfg.model.use_vision:  # ablation without vision: captions are plain text
            out = self.model(ids, mask, return_latents=False)
            loss_caption = lm_loss(out.logits, ids, mask)
            return w.caption * loss_caption, {"Loss_caption": loss_caption.detach()}
        out = self.model(ids, mask, vision_features=features)
        loss_caption = lm_loss(out.logits, ids, mask)
        loss_contrastive, accuracy = contrastive_loss(
            out.text_latent, out.vision_latent, self.cfg.training.contrastive_temperature
        )
        total = w.caption * loss_caption + w.contrastive * loss_contrastive
        metrics = {
            "Loss_caption": loss_caption.detach(),
            "Loss_contrastive": loss_contrastive.detach(),
            "Contrastive_accuracy": accuracy,
        }
        if phase >= 3 and self.cfg.model.use_memory:
            memory_total, memory_metrics = self._memory_losses(
                ids, mask, features, out.vision_latent, out.multimodal_latent, batch
            )
            total = total + memory_total
            metrics.update(memory_metrics)
        return total, metrics

    def _memory_losses(
        self,
        ids: Tensor,
        mask: Tensor,
        features: Tensor,
        vision_latent: Tensor,
        episodes: Tensor,
        batch: dict[str, Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.cfg.training.loss_weights
        n = min(ids.size(0), self.cfg.training.memory_episodes_per_write)
        if "episode_input_ids" in batch:  # fast-mapping episodes: captions with a pseudo-word (data.pseudo_words)
            ids, mask = batch["episode_input_ids"], batch["episode_attention_mask"]  # (N, T')
            n = ids.size(0)
            features = features[:n]
            values = self.model.episode_latent(ids, mask, features)  # (N, R * E)
        else:
            ids, mask, features, values = ids[:n], mask[:n], features[:n], episodes[:n]  # values: (N, R * E)
        keys = self.model.vision_key(features, vision_latent[:n])  # (N, key width) from the image alone
        state = self.model.write_memory(keys, values)
        noise_scale = self.cfg.training.memory_query_noise * features.detach().float().std()
        query_features = features + noise_scale * torch.randn_like(features)
        readout, weights = self.model.read_memory(state, vision_features=query_features)  # (N, E), (N, K)
        recon = self.model(ids, mask, memory_readout=readout, return_latents=False)
        loss_recon = lm_loss(recon.logits, ids, mask)
        autoenc = self.model(ids, mask, memory_readout=values, return_latents=False)
        loss_ae = lm_loss(autoenc.logits, ids, mask)
        loss_kl = self.model.memory.kl_divergence(weights)
        total = w.memory_reconstruction * loss_recon + w.memory_autoencoding * loss_ae + w.memory_kl * loss_kl
        slot_metrics = {}
        if w.memory_slots > 0 and self.model.slot_log_scale is not None:
            # Each slot of the read-back episode (and of the written one) must name its caption token directly.
            loss_slots = 0.5 * (slot_nll(self.model, readout, ids, mask) + slot_nll(self.model, values, ids, mask))
            total = total + w.memory_slots * loss_slots
            slot_metrics["Loss_memory_slots"] = loss_slots.detach()
        metrics = {
            **slot_metrics,
            "Loss_memory_reconstruction": loss_recon.detach(),
            "Loss_memory_autoencoding": loss_ae.detach(),
            "Loss_memory_kl": loss_kl.detach(),
            "_memory_keys": keys.detach(),
            # the persistent store keeps the real experience (the caption as seen), not its renamed training copy
            "_memory_values": episodes[:n].detach(),
            "_memory_weights": weights.detach(),
        }
        return total, metrics

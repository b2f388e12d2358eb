"""The three-phase training objective as one nn.Module, so DDP sees every parameter use in a single forward.

Phase 1 (text): causal LM loss of the decoder + masked-token loss of the bidirectional encoder.
Phase 2 (alignment): caption loss conditioned on the image + symmetric InfoNCE between text and vision latents +
    visual words (the vision tokens predict the caption's content words, in order, through the tied LM head) and,
    optionally, a ranking of each caption above its word-swapped hard negative (`hard_negatives`) and the
    word-swapped captions as extra negatives of the contrastive softmax (NegCLIP,
    `training.contrastive_hard_negatives`); text-only batches keep flowing (data.text_ratio). Phase 3 keeps all of
    these.
Phase 3 (memory): Larimar's objective on top of phase 2. A batch's episodes are written into a fresh memory
    as (key = vision-only key, value = caption+image episode latent); they are read back with a *noisy* vision
    query, which holds no caption tokens, and the decoder must reconstruct the caption from the readout alone
    (no vision prefix). Autoencoding (decode the caption from its own episode latent) and beta * KL on the
    addressing weights complete Larimar's loss. Because the query lacks the answer and is perturbed, the
    memory has to retrieve, not echo its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitmar.config import BitMarConfig, TrainingConfig
from bitmar.training.hard_negatives import WordSwapper
from bitmar.training.losses import contrastive_loss, lm_loss, sequence_log_probs


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


def binding_loss(positive: Tensor, negative: Tensor) -> Tensor:
    """Sequence-level ranking of a caption over its word-swapped negative under the same picture:
    mean softplus(log p(c' | i) - log p(c | i)) = -log sigmoid of the margin, the Winoground text comparison."""
    return F.softplus(negative - positive).mean()


def word_order_alignment(is_word: Tensor, num_tokens: int) -> Tensor:
    """Which vision tokens predict which caption word, for the ordered visual-words term: (B, T) bool of the words
    that count -> (B, N, T) weights, each word's distribution over the N tokens. A word at relative position
    p = (rank + 0.5) / count among its caption's words goes to the tokens around it: weights proportional to
    exp(-(p - c_j)^2 / (2 s^2)) with token centres c_j = (j + 0.5) / N and width s = 1 / N. One token: all ones."""
    rank = torch.cumsum(is_word.float(), dim=1) - 1  # (B, T)
    count = is_word.float().sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
    position = (rank + 0.5) / count  # (B, T)
    centres = (torch.arange(num_tokens, device=is_word.device, dtype=position.dtype) + 0.5) / num_tokens  # (N,)
    width = 1.0 / num_tokens
    distance = position[:, None, :] - centres[None, :, None]  # (B, N, T)
    return torch.softmax(-(distance**2) / (2 * width**2), dim=1)


class TrainingObjective(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        training: TrainingConfig,
        mask_token_id: int,
        special_token_ids: list[int],
        swap_token_classes: list[list[int]] | None = None,
        *,
        use_vision: bool,
        use_memory: bool,
    ) -> None:
        """training: the loss weights and the settings of the masking, contrastive and memory terms; use_vision /
        use_memory: the model's flags (`model.use_vision` / `model.use_memory`; captions are plain text without
        vision, no memory terms without memory). swap_token_classes: token ids per swappable word class
        (`hard_negatives.swap_token_classes(tokenizer)`); without them (or with loss weight 0) captions get no hard
        negatives."""
        super().__init__()
        self.model = model
        self.training_cfg = training
        self.use_vision = use_vision
        self.use_memory = use_memory
        self.mask_token_id = mask_token_id
        self.special_token_ids = special_token_ids
        self.swapper = WordSwapper(swap_token_classes) if swap_token_classes else None

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        cfg: BitMarConfig,
        mask_token_id: int,
        special_token_ids: list[int],
        swap_token_classes: list[list[int]] | None = None,
    ) -> TrainingObjective:
        """The objective of a run's config: its `training` section and the model's two flags."""
        return cls(
            model, cfg.training, mask_token_id, special_token_ids, swap_token_classes,
            use_vision=cfg.model.use_vision, use_memory=cfg.model.use_memory,
        )  # fmt: skip

    def forward(self, batch: dict[str, Tensor], phase: int) -> tuple[Tensor, dict[str, Tensor]]:
        if batch["kind"] == "text":
            return self._text_losses(batch, phase)
        return self._caption_losses(batch, phase)

    def _text_losses(self, batch: dict[str, Tensor], phase: int) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.training_cfg.loss_weights
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
                ids, mask, self.training_cfg.mlm_probability, self.mask_token_id, self.special_token_ids
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
        w = self.training_cfg.loss_weights
        ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
        if not self.use_vision:  # ablation without vision: captions are plain text
            out = self.model(ids, mask, return_latents=False)
            loss_caption = lm_loss(out.logits, ids, mask)
            return w.caption * loss_caption, {"Loss_caption": loss_caption.detach()}
        out = self.model(ids, mask, vision_features=features)
        loss_caption = lm_loss(out.logits, ids, mask)
        negative_text = None
        if self.training_cfg.contrastive_hard_negatives and self.swapper is not None:
            negatives, has = self.swapper(ids, mask)  # (B, T), (B,)
            if bool(has.any()):
                negative_text = self.model.encode_text(negatives[has], mask[has])[1]  # (H, Lt)
        loss_contrastive, accuracy = contrastive_loss(
            out.text_latent, out.vision_latent, self.training_cfg.contrastive_temperature, negative_text
        )
        total = w.caption * loss_caption + w.contrastive * loss_contrastive
        metrics = {
            "Loss_caption": loss_caption.detach(),
            "Loss_contrastive": loss_contrastive.detach(),
            "Contrastive_accuracy": accuracy,
        }
        if w.visual_words > 0:
            loss_words = self._visual_words_loss(ids, mask, features)
            total = total + w.visual_words * loss_words
            metrics["Loss_visual_words"] = loss_words.detach()
        if w.hard_negative > 0 and self.swapper is not None:
            loss_binding, binding_accuracy = self._binding_loss(out.logits, ids, mask, features)
            total = total + w.hard_negative * loss_binding
            metrics["Loss_binding"] = loss_binding.detach()
            if binding_accuracy is not None:
                metrics["Binding_accuracy"] = binding_accuracy
        if phase >= 3 and self.use_memory:
            memory_total, memory_metrics = self._memory_losses(
                ids, mask, features, out.vision_latent, out.multimodal_latent, batch
            )
            total = total + memory_total
            metrics.update(memory_metrics)
        return total, metrics

    def _visual_words_loss(self, ids: Tensor, mask: Tensor, features: Tensor) -> Tensor:
        """The vision tokens, read through the tied LM head, predict the caption's words.

        Why: the caption loss alone teaches the decoder to read the picture very slowly, because most caption tokens
        are predictable from the text prefix; measured on the sample world, a tiny run's decoder predicted nouns
        barely better with the true picture than with a shuffled one (0.2 nats) and colours not at all, although
        both can be read off its vision tokens with a linear probe. This term gives the vision encoder a direct
        signal, in the decoder's own word-embedding space, for every word the picture determines (the tied table
        learns too: measured, detaching it halves the noun grounding of a 300-step phase-2 run). Words are
        weighted by their inverse document frequency within the batch, so words in every caption ("a", "the")
        weigh nothing and rare content words (nouns, colours, settings) carry the loss.

        `training.visual_words_alignment`: "ordered" (default) has vision token j predict the words near relative
        position j / N of the caption (`word_order_alignment`), so what a caption says first (its subject) and what
        it says later (the reference object) land in different tokens; patch-token features (B, P, D), whose tokens
        are image regions in raster order, always use the bag. "bag" has the mean of the tokens predict
        every word: measured, that made the decoder read a picture as a bag of nouns (docs/evaluation-and-ablations.md,
        Winoground: the interaction at an item's first swapped noun cancels the one at its second).
        """
        tokens, _ = self.model.encode_vision(features)  # (B, N, C)
        words = mask.bool().clone()  # (B, T)
        for special in self.special_token_ids:
            words &= ids != special
        vocab = torch.unique(ids[words])  # (W,) the words of this batch's captions
        # Patch tokens (B, P, D features) sit in raster order, which says nothing about caption order: they pool.
        if self.training_cfg.visual_words_alignment == "bag" or features.dim() == 3:
            tokens = tokens.mean(dim=1, keepdim=True)  # (B, 1, C)
        logits = self.model.lm_logits(tokens)[..., vocab].float()  # (B, N, W)
        if vocab.numel() == 0:
            return logits.sum() * 0.0
        column = torch.searchsorted(vocab, ids).clamp(max=vocab.numel() - 1)  # (B, T) each word's column
        counts = logits.new_zeros(ids.shape[0], vocab.numel()).scatter_add_(1, column, words.float())  # (B, W)
        idf = torch.log(ids.shape[0] / (counts > 0).sum(dim=0).clamp(min=1))  # (W,)
        informative = idf > 0  # a word that every caption holds says nothing about the picture
        if not bool(informative.any()):
            return logits.sum() * 0.0
        # The softmax runs over the batch's informative words only: the rest of the table (rare words, the BPE
        # pieces that pseudo-words are made of) gets no gradient, so the memory's copy-by-embedding keeps its geometry.
        log_probs = torch.log_softmax(logits.masked_fill(~informative, float("-inf")), dim=-1)  # (B, N, W)
        weight = idf[column] * words  # (B, T)
        scored = weight > 0
        per_token = log_probs.gather(2, column[:, None, :].expand(-1, log_probs.shape[1], -1))  # (B, N, T)
        per_token = per_token.masked_fill(~scored[:, None, :], 0.0)  # uninformative words may be -inf here
        picked = (word_order_alignment(scored, log_probs.shape[1]) * per_token).sum(dim=1)  # (B, T)
        per_caption = (picked * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-6)  # (B,)
        return -per_caption.mean()

    def _binding_loss(
        self, logits: Tensor, ids: Tensor, mask: Tensor, features: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """binding_loss of each caption against its word-swapped negative (`hard_negatives`), under its picture."""
        negatives, has = self.swapper(ids, mask)  # (B, T), (B,)
        if not bool(has.any()):  # no caption of this batch has a swappable pair: keep the graph connected
            return logits.sum() * 0.0, None
        neg = self.model(negatives[has], mask[has], vision_features=features[has], return_latents=False)
        positive = sequence_log_probs(logits[has], ids[has], mask[has])  # (H,)
        negative = sequence_log_probs(neg.logits, negatives[has], mask[has])  # (H,)
        return binding_loss(positive, negative), (positive > negative).float().mean().detach()

    def _memory_losses(
        self,
        ids: Tensor,
        mask: Tensor,
        features: Tensor,
        vision_latent: Tensor,
        episodes: Tensor,
        batch: dict[str, Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.training_cfg.loss_weights
        n = min(ids.size(0), self.training_cfg.memory_episodes_per_write)
        if "episode_input_ids" in batch:  # fast-mapping episodes: captions with a pseudo-word (data.pseudo_words)
            ids, mask = batch["episode_input_ids"], batch["episode_attention_mask"]  # (N, T')
            n = ids.size(0)
            features = features[:n]
            values = self.model.episode_latent(ids, mask, features)  # (N, R * E)
        else:
            ids, mask, features, values = ids[:n], mask[:n], features[:n], episodes[:n]  # values: (N, R * E)
        keys = self.model.vision_key(features, vision_latent[:n])  # (N, key width) from the image alone
        state = self.model.write_memory(keys, values)
        noise_scale = self.training_cfg.memory_query_noise * features.detach().float().std()
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

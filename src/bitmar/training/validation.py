"""Validation of a run: the losses on the validation split (text, captions with the true / no / a shuffled image,
in-batch retrieval, memory recall), and the fixed analysis batch the diagnostics and figures use.

Validation never touches training state: eval mode, fresh memory states, no optimizer, no random numbers drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from bitmar.config import BitMarConfig
from bitmar.data.datasets import BabyLMData, collate_captions, collate_text
from bitmar.model import BitMar
from bitmar.training.distributed import DistInfo, all_reduce_mean
from bitmar.training.losses import contrastive_loss, token_nll


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Validator:
    """`run(phase, epochs_done)` -> the Validation/* metrics, averaged over ranks."""

    def __init__(self, model: BitMar, data: BabyLMData, cfg: BitMarConfig, dist: DistInfo) -> None:
        self.model = model
        self.data = data
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device

    def analysis_batch(self, phase: int, size: int = 8) -> dict[str, Any]:
        """A fixed batch from the validation split (no RNG drawn): text for phase 1, captions later."""
        data = self.data
        if phase >= 2 and data.caption_val is not None and len(data.caption_val) > 0:
            items = data.caption_val.__getitems__(list(range(min(size, len(data.caption_val)))))
            batch = collate_captions(items, data.pad_id)
        else:
            batch = collate_text([data.text_val[i] for i in range(min(size, len(data.text_val)))])
        return to_device(batch, self.device)

    @torch.no_grad()
    def run(self, phase: int, epochs_done: int) -> dict[str, float]:
        self.model.eval()
        try:
            loaders = self.data.validation_loaders()
            metrics = self._text_metrics(loaders["text"]) | self._caption_metrics(loaders["caption"], phase)
        finally:
            self.model.train()
        metrics["Validation/loss"] = 0.5 * (metrics["Validation/Text_Loss"] + metrics["Validation/Caption_Loss"])
        metrics["Validation/Epoch"] = float(epochs_done)
        return {k: float(all_reduce_mean(torch.tensor(v, device=self.device), self.dist)) for k, v in metrics.items()}

    def _batches(self, loader: DataLoader | None) -> Iterator[dict[str, Any]]:
        limit = self.cfg.training.validation_batches
        for i, batch in enumerate(loader or []):
            if limit is not None and i >= limit:
                break
            yield to_device(batch, self.device)

    def _text_metrics(self, loader: DataLoader | None) -> dict[str, float]:
        text_nll = text_count = 0.0
        for batch in self._batches(loader):
            mask = batch.get("attention_mask")
            out = self.model(batch["input_ids"], mask, return_latents=False)
            total, count = token_nll(out.logits, batch["input_ids"], mask)
            text_nll += float(total)
            text_count += float(count)
        text_loss = text_nll / max(text_count, 1.0)
        return {"Validation/Text_Loss": text_loss, "Validation/Perplexity": math.exp(min(text_loss, 50.0))}

    def _caption_metrics(self, loader: DataLoader | None, phase: int) -> dict[str, float]:
        """Caption NLL with the true image, none and a shuffled one; in-batch retrieval; from phase 3 the caption
        NLL decoded from a fresh memory's readout alone."""
        model, m = self.model, self.cfg.model
        sums: dict[str, float] = defaultdict(float)
        caption_count = 0.0
        retrieval_hits = retrieval_total = 0.0
        for batch in self._batches(loader):
            ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
            variants = {"none": None}
            if m.use_vision:
                variants["true"] = features
                variants["shuffled"] = features.roll(1, dims=0)
            count = None
            for name, vf in variants.items():
                out = model(ids, mask, vision_features=vf, return_latents=name == "true")
                total, count = token_nll(out.logits, ids, mask)
                sums[name] += float(total)
                if name == "true" and ids.size(0) > 1:
                    _, accuracy = contrastive_loss(out.text_latent, out.vision_latent, 1.0)
                    retrieval_hits += float(accuracy) * ids.size(0)
                    retrieval_total += ids.size(0)
            if m.use_memory and m.use_vision and phase >= 3 and ids.size(0) > 1:
                n = min(ids.size(0), self.cfg.training.memory_episodes_per_write)
                values = model.episode_latent(ids[:n], mask[:n], features[:n])
                state = model.write_memory(model.memory_key(features[:n]), values)  # a fresh state
                readout, _ = model.read_memory(state, vision_features=features[:n])
                out = model(ids[:n], mask[:n], memory_readout=readout, return_latents=False)
                total, mem_count = token_nll(out.logits, ids[:n], mask[:n])
                sums["memory"] += float(total)
                sums["memory_count"] += float(mem_count)
            caption_count += float(count)
        metrics = {
            "Validation/Caption_Loss": sums["true" if m.use_vision else "none"] / max(caption_count, 1.0),
            "Validation/Caption_Loss_No_Image": sums["none"] / max(caption_count, 1.0),
        }
        if m.use_vision:
            metrics["Validation/Caption_Loss_Shuffled_Image"] = sums["shuffled"] / max(caption_count, 1.0)
            metrics["Validation/Retrieval_Accuracy_In_Batch"] = retrieval_hits / max(retrieval_total, 1.0)
        if sums["memory_count"] > 0:
            metrics["Validation/Memory_Recall_Loss"] = sums["memory"] / sums["memory_count"]
        return metrics

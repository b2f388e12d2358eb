"""The metrics a run logs besides its validation, by category, in one place (no IO: the trainer logs them).

At every `wandb.log_every_n_steps`-th optimizer step the trainer logs `Diagnostics.step_metrics`:
* Training/  the step's loss terms, learning rate, weight decay, epoch, step, phase, tokens/s, skipped steps;
  Training/Memory_KL_Addressing and Memory_Addressing_RMS from the step's memory reads (`addressing_kl`);
* Gradients/ L2 norm of the gradient per component (`gradient_norms`, `wandb.log_gradients`);
* Quantization/ ternary weight scales and zero shares, compression ratios (`wandb.log_quantization`);
* Memory/    slot usage of the window's memory writes and reads (`SlotUsageWindow`), the persistent store's slot
  similarity and norm (`wandb.log_memory`);
* Features/  text and vision latents of a fixed validation batch (`wandb.log_features`);
* Attention/ mean attention entropy per layer (`wandb.log_attention`, unless a hook logs Attention/* itself).
Validation/ comes from `bitmar.training.validation`, Summary/ from `bitmar.training.rundir.run_summary`.

Also here: the model's size in float32 against its packed (2-bit ternary) form, per component
(`model_size_by_component`): the whole-model compression ratio the evaluation reports, and the compression figure.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bitmar.bitnet import pack_model, quantization_stats
from bitmar.config import BitMarConfig
from bitmar.memory import EpisodicStore
from bitmar.model import BitMar

# A slot is "active" in a window when it received at least this share of the addressing mass of the window's most
# addressed slot. Least-squares addressing is dense (every slot gets some mass from every episode), so "any mass"
# would always be 100%; half of the busiest slot separates the slots the window's episodes lean on from the rest.
ACTIVE_SLOT_THRESHOLD = 0.5

COMPONENTS = ("text_encoder", "vision_encoder", "fusion", "decoder", "memory", "embeddings")
# Ternary projections that belong to the memory although their names do not say so: keys and episode token slots.
_MEMORY_PROJECTIONS = (
    "memory_key_proj",
    "text_key_proj",
    "episode_token_proj",
    "episode_context_gate",
    "slot_log_scale",
)


def component_of(name: str) -> str:
    """Component of a parameter / module name (dotted): one of COMPONENTS, or "other"."""
    first = name.split(".", 1)[0]
    if first in _MEMORY_PROJECTIONS or first == "memory":
        return "memory"
    if first == "embed_tokens":
        return "embeddings"
    if first in ("vision_pointer", "vision_copy_gate"):  # the decoder's copy path (model.vision_copy)
        return "decoder"
    for component in ("text_encoder", "vision_encoder", "fusion", "decoder"):
        if component in name:
            return component
    return "other"


@dataclass
class SlotUsage:
    usage: Tensor  # (K,) addressing mass of each slot relative to the most addressed slot, in [0, 1]
    usage_mean: float  # mean of usage: 1 when the window's addressing is spread evenly, -> 1/K when one slot has all
    active_pct: float  # % of slots with usage >= ACTIVE_SLOT_THRESHOLD
    top5_share: float  # share of the window's addressing mass on its five most addressed slots (uniform: 5/K)
    top5_slots: list[int]  # their indices, most addressed first
    episodes: int  # addressing rows (episodes written or read) in the window


def slot_usage(mass: Tensor, episodes: int = 0) -> SlotUsage:
    """Usage statistics of accumulated per-slot addressing mass (K,) (sum of |W| over the window's episodes)."""
    mass = mass.detach().double().cpu()
    peak = float(mass.max()) if mass.numel() else 0.0
    if peak <= 0.0:
        raise ValueError("slot_usage needs addressing mass: the window saw no memory write or read")
    usage = mass / peak  # (K,)
    k = min(5, mass.numel())
    top = mass.topk(k)
    return SlotUsage(
        usage=usage.float(),
        usage_mean=float(usage.mean()),
        active_pct=100.0 * float((usage >= ACTIVE_SLOT_THRESHOLD).double().mean()),
        top5_share=float(top.values.sum() / mass.sum()),
        top5_slots=[int(i) for i in top.indices.tolist()],
        episodes=episodes,
    )


class SlotUsageWindow:
    """Accumulates |W| per slot over the memory writes and reads of one logging window."""

    def __init__(self) -> None:
        self._mass: Tensor | None = None
        self._episodes = 0

    def add(self, weights: Tensor) -> None:
        """weights (..., K): addressing weights of episodes written or read (signed; their magnitude counts)."""
        w = weights.detach().reshape(-1, weights.shape[-1]).abs().double().sum(0).cpu()  # (K,)
        self._mass = w if self._mass is None else self._mass + w
        self._episodes += int(weights.reshape(-1, weights.shape[-1]).shape[0])

    def __bool__(self) -> bool:
        return self._mass is not None and bool(self._mass.max() > 0)

    def take(self) -> SlotUsage | None:
        """The window's statistics (None if it saw no addressing); starts a new window."""
        result = slot_usage(self._mass, self._episodes) if self else None
        self._mass, self._episodes = None, 0
        return result


def addressing_kl(weights: Tensor) -> tuple[float, float]:
    """(0.5 * mean over episodes of sum_k W_k^2, RMS of W) for addressing weights (N, K).

    With the fixed std s of q(W), KL(N(W, s^2 I) || N(0, I)) = 0.5 K (s^2 - 1 - log s^2) + 0.5 ||W||^2: the first
    part is a constant (no gradient), so this half is all the training can move. RMS compares W with the prior's 1.
    """
    w = weights.detach().reshape(-1, weights.shape[-1]).double()
    return float(0.5 * w.square().sum(-1).mean()), float(w.square().mean().sqrt())


def _state_bytes_by_component(module: nn.Module) -> dict[str, int]:
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:  # tied weights (embedding and LM head) count once
            continue
        seen.add(key)
        component = component_of(name)
        sizes[component] = sizes.get(component, 0) + tensor.numel() * tensor.element_size()
    return sizes


@torch.no_grad()
def model_size_by_component(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{component: (bytes as trained (float32 state), bytes packed for inference)} and "total".

    Packed = the model after `bitmar.bitnet.pack_model` (ternary layers at 2 bits plus their scales; everything
    else unchanged), measured on its state dict exactly as the evaluation's `model_size_ratio` (efficiency task).
    Depends on the architecture only, not on the weights' values, so a run computes it once.
    """
    unpacked = _state_bytes_by_component(model)
    packed = _state_bytes_by_component(pack_model(copy.deepcopy(model), cache_weights=False))
    sizes = {c: (unpacked.get(c, 0), packed.get(c, 0)) for c in sorted(set(unpacked) | set(packed))}
    sizes["total"] = (sum(unpacked.values()), sum(packed.values()))
    return sizes


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """Gradients/<Component>_Norm: L2 norm of the gradient per component and in total; 0.0 for a component whose
    parameters got none this step (e.g. the fusion before phase 3: its output is only the memory's episode value),
    so every series starts at step 1."""
    sums: dict[str, float] = defaultdict(float)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of(name)
        sums[component] += 0.0
        if param.grad is not None:
            value = float(param.grad.detach().float().pow(2).sum())
            sums[component] += value
            sums["total"] += value
    sums["total"] += 0.0
    norms = {f"Gradients/{k.title().replace('_', '')}_Norm": math.sqrt(v) for k, v in sums.items()}
    if "Gradients/TextEncoder_Norm" in norms:  # the original name of the text encoder's series
        norms["Gradients/Encoder_Norm"] = norms["Gradients/TextEncoder_Norm"]
    return norms


def attention_entropy_metrics(attentions: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean attention entropy (nats) per layer and attention type; lower = more concentrated heads."""
    names = {"encoder": "Encoder", "decoder": "Decoder", "cross_modal": "CrossModal", "vision": "Vision"}
    metrics = {}
    for kind, maps in attentions.items():
        for layer, weights in enumerate(maps):  # (B, H, Tq, Tk)
            p = weights.float().clamp(min=1e-12)
            entropy = -(p * p.log()).sum(-1).mean()
            metrics[f"Attention/{names.get(kind, kind)}_layer_{layer}_Entropy"] = float(entropy)
    return metrics


class Diagnostics:
    """The trainer's metrics processor: collects memory addressing between log steps and assembles the metrics of
    a log step (see the module docstring). Only the main rank computes diagnostics (the others log nothing).

    analysis_batch(phase, size): a fixed validation batch on the model's device (`Validator.analysis_batch`);
    attention_logged_elsewhere: a hook logs Attention/* from its own batch (one series per key), so this does not.
    """

    def __init__(
        self,
        model: BitMar,
        store: EpisodicStore | None,
        cfg: BitMarConfig,
        *,
        is_main: bool,
        analysis_batch: Callable[..., dict[str, Any]],
        attention_logged_elsewhere: bool,
    ) -> None:
        self.model = model
        self.store = store
        self.cfg = cfg
        self.is_main = is_main
        self.analysis_batch = analysis_batch
        self.attention_logged_elsewhere = attention_logged_elsewhere
        self.usage_window = SlotUsageWindow()  # memory addressing of the current logging window (Memory/ metrics)
        self._model_sizes: dict[str, tuple[int, int]] | None = None  # float32 vs packed bytes, computed once

    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.wandb.log_every_n_steps == 0

    @property
    def _watch_memory(self) -> bool:
        return self.is_main and self.cfg.wandb.log_memory

    def training_reads(self, weights: Tensor) -> dict[str, float]:
        """A micro-batch's memory reads (N, K) (mean of q(W)): into the usage window; their addressing KL part."""
        if not self._watch_memory:
            return {}
        self.usage_window.add(weights)
        kl_part, rms = addressing_kl(weights)
        return {"Memory_KL_Addressing": kl_part, "Memory_Addressing_RMS": rms}

    def store_writes(self, keys: Tensor) -> None:
        """Keys of episodes written into the persistent store: their addressing goes into the usage window."""
        if self._watch_memory:
            self.usage_window.add(self.model.memory.address(keys.to(self.model.memory.prior.dtype)))

    def step_metrics(self, phase: int, training: dict[str, float], grad_norms: dict[str, float]) -> dict[str, Any]:
        """A log step's metrics: Training/<training>, the gradient norms, then the diagnostics."""
        metrics: dict[str, Any] = {f"Training/{k}": v for k, v in training.items()}
        metrics.update(grad_norms)
        metrics.update(self._diagnostic_metrics(phase))
        return metrics

    def model_sizes(self) -> dict[str, tuple[int, int]]:
        """{component: (float32 bytes, packed bytes)} and "total" (architecture only, so computed once per run)."""
        if self._model_sizes is None:
            self._model_sizes = model_size_by_component(self.model)
        return self._model_sizes

    @torch.no_grad()
    def _diagnostic_metrics(self, phase: int) -> dict[str, Any]:
        if not self.is_main:
            return {}
        wb = self.cfg.wandb
        metrics: dict[str, Any] = {}
        if wb.log_quantization:
            metrics.update(self._quantization_metrics())
        usage = self.usage_window.take()  # the window ends at every log step, logged or not
        if wb.log_memory and usage is not None:
            # Addressing mass of the window's memory writes and reads (training memories and the persistent store)
            metrics["Memory/Usage_Mean"] = usage.usage_mean
            metrics["Memory/Active_Slots_Percentage"] = usage.active_pct
            metrics["Memory/Top_5_Slot_Access"] = usage.top5_share
            metrics["Memory/Window_Episodes"] = usage.episodes
            for rank, slot in enumerate(usage.top5_slots, start=1):
                metrics[f"Memory/Top_5_Slot_Index_{rank}"] = slot
        if wb.log_memory and self.store is not None and len(self.store) > 0:
            diag = self.model.memory.diagnostics(self.store.state)
            metrics["Memory/Analysis_Avg_Similarity"] = float(diag["mean_slot_cosine"])
            metrics["Memory/Memory_Norm"] = float(diag["memory_norm"])
            metrics["Memory/Episodes_Stored"] = len(self.store)
        log_attention = wb.log_attention and not self.attention_logged_elsewhere
        if (wb.log_features or wb.log_attention) and self.cfg.model.use_vision:
            batch = self.analysis_batch(max(phase, 2), size=16)
            self.model.eval()
            out = self.model(
                batch["input_ids"],
                batch["attention_mask"],
                vision_features=batch["vision_features"],
                output_attentions=log_attention,
            )
            self.model.train()
            if wb.log_features:
                metrics.update(_feature_metrics(out.text_latent, out.vision_latent))
            if log_attention and out.attentions:
                metrics.update(attention_entropy_metrics(out.attentions))
        return metrics

    def _quantization_metrics(self) -> dict[str, float]:
        stats = quantization_stats(self.model)
        layers = stats["layers"]
        metrics: dict[str, float] = {}
        if layers:
            metrics["Quantization/Weight_Scale_Mean"] = sum(s["scale"] for s in layers.values()) / len(layers)
            metrics["Quantization/Sparsity"] = sum(s["zero_fraction"] for s in layers.values()) / len(layers)
        for name, layer in layers.items():  # gamma and the share of zero weights of every ternary layer
            metrics[f"Quantization/WeightScale_{name}"] = layer["scale"]
            metrics[f"Quantization/Sparsity_{name}"] = layer["zero_fraction"]
        unpacked, packed = self.model_sizes()["total"]
        # The whole model (float32 as trained / packed for inference), as the evaluation's efficiency task reports it
        metrics["Quantization/Compression_Ratio"] = unpacked / packed
        metrics["Quantization/Ternary_Compression_Ratio"] = stats["compression_ratio"]  # the ternary layers alone
        metrics["Quantization/Ternary_Fraction"] = stats["ternary_fraction"]
        return metrics


def _feature_metrics(text_latent: Tensor, vision_latent: Tensor) -> dict[str, float]:
    metrics = {}
    for name, latent in (("Text", text_latent), ("Vision", vision_latent)):
        latent = latent.float()
        metrics[f"Features/{name}_Mean"] = float(latent.mean())
        metrics[f"Features/{name}_Std"] = float(latent.std())
        metrics[f"Features/{name}_Norm"] = float(latent.norm(dim=-1).mean())
    similarity = nn.functional.cosine_similarity(text_latent.float(), vision_latent.float(), dim=-1)
    metrics["Features/CrossModal_Similarity"] = float(similarity.mean())
    metrics["Features/Cross_Modal_Similarity"] = metrics["Features/CrossModal_Similarity"]  # earlier name
    return metrics

"""Numbers the trainer logs about the model and the memory (no IO: the trainer writes them).

* Slot usage of the episodic memory over a logging window (`SlotUsageWindow`, `slot_usage`).
* The model's size in float32 against its packed (2-bit ternary) form, per component (`model_size_by_component`):
  the whole-model compression ratio the evaluation reports, and the compression-ratio figure.
* The addressing part of the memory KL term (`addressing_kl`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    from bitmar.bitnet import pack_model

    unpacked = _state_bytes_by_component(model)
    packed = _state_bytes_by_component(pack_model(copy.deepcopy(model), cache_weights=False))
    sizes = {c: (unpacked.get(c, 0), packed.get(c, 0)) for c in sorted(set(unpacked) | set(packed))}
    sizes["total"] = (sum(unpacked.values()), sum(packed.values()))
    return sizes

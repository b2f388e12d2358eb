"""Tensors of a Hugging Face export: the checkpoint's model and config, model.safetensors, the episodic store."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from bitmar.bitnet import PackedBitLinear, pack_model
from bitmar.config import BitMarConfig as RunConfig
from bitmar.config import ConfigError, config_from_dict
from bitmar.export.errors import ExportError
from bitmar.memory import EpisodicMemory, EpisodicStore
from bitmar.model.bitmar import BitMar

WEIGHTS_NAME = "model.safetensors"
STORE_NAME = "episodic_store.safetensors"  # = EPISODIC_STORE_NAME of templates/modeling_bitmar.py


def checkpoint_config(payload: dict[str, Any], path: Path) -> RunConfig:
    if not isinstance(payload["config"], dict):
        raise ExportError(f"{path}: its 'config' entry is not a mapping; the checkpoint is not from train_bitmar.py")
    try:
        return config_from_dict(payload["config"])
    except ConfigError as err:
        raise ExportError(
            f"{path}: the config stored in the checkpoint does not load with this BitMar version ({err}); export "
            "it with the BitMar version that trained it"
        ) from None


def checkpoint_model(payload: dict[str, Any], cfg: RunConfig, path: Path) -> BitMar:
    model = BitMar(cfg.model)
    state = payload["model"]
    if not isinstance(state, dict):
        raise ExportError(f"{path}: its 'model' entry is not a state dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ExportError(
            f"{path}: the weights do not fit the model its config describes (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}); the checkpoint comes from different model code"
        )
    model.load_state_dict(state)
    return model.eval()


def export_state_dict(model: BitMar, backbone: nn.Module | None, dtype: torch.dtype, packed: bool) -> dict[str, Tensor]:
    """Tensors of model.safetensors. Packs `model` in place when `packed`.

    Full-precision tensors are cast to `dtype`; the packed layers' own tensors (RMSNorm gain, scale) stay float32,
    which the remote code computes in (they are a few kB), and so does the memory prior: episodes are addressed
    against it (keys M0^+), and a bfloat16 prior would read a stored episode back inexactly. The tied LM head is the
    embedding: stored once.
    """
    if packed:
        pack_model(model)
    kept = (PackedBitLinear, EpisodicMemory)
    fp32_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, kept))
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not key.startswith(fp32_prefixes):
            value = value.to(dtype)
        tensors[f"model.{key}"] = value.detach().contiguous()
    if backbone is not None:
        for key, value in _checkpoint_tensors(backbone).items():
            tensors[f"vision_backbone.{key}"] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return tensors


def _checkpoint_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors `model.save_pretrained` writes, under their on-disk names (which every transformers version loads).

    Not `state_dict()`: transformers 5.x renamed DINOv2's attention modules (`attention.q_proj`; 4.x:
    `attention.attention.query`) but still writes and reads the 4.x names on disk, converting on load, also for a
    DINOv2 nested in remote code. transformers 4.51.3 (BabyLM 2025 pipeline) knows only the 4.x names: with 5.x
    module names its backbone attention stayed randomly initialised.
    """
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        tensors: dict[str, Tensor] = {}
        for file in sorted(Path(scratch).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
    if not tensors:
        raise ExportError(f"{type(model).__name__}.save_pretrained wrote no safetensors file; cannot store it")
    return tensors


def checkpoint_store(payload: dict[str, Any], model: BitMar, path: Path) -> EpisodicStore | None:
    """The checkpoint's persistent store re-addressed against `model`'s memory prior, or None when it holds nothing.

    The trainer writes episodes into the store throughout phase 3 while the prior still learns, so an episode's
    stored addressing (key M0^+ with the prior of that step) no longer matches the final prior, and reading it with the
    final model would not give its value back. Every held episode (key, value) is written afresh, least recently used
    first, into a store over the final prior: the same episodes and eviction order, exact recall (ids become 0..N-1).
    """
    raw = payload.get("memory_store")
    if not raw or model.memory is None:
        return None
    saved = EpisodicStore(model.memory, device="cpu")
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"a {type(raw).__name__}, not a state dict")
        saved.load_state_dict(raw)
        if len(saved) == 0:
            return None
        order = sorted(range(len(saved)), key=lambda j: (int(raw["last_used"][j]), int(raw["written_at"][j])))
        store = EpisodicStore(model.memory, capacity=max(saved.capacity, len(saved)), device="cpu")
        for j in order:
            store.write(raw["keys"][j], raw["values"][j])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise ExportError(
            f"{path}: its persistent memory store ('memory_store') does not fit the model ({type(err).__name__}: "
            f"{err}); export without it: --no_store"
        ) from None
    return store


def holds_episodes(raw: Any) -> bool:
    """Whether a checkpoint's 'memory_store' entry holds at least one episode."""
    ids = raw.get("episode_ids") if isinstance(raw, dict) else None
    return isinstance(ids, Tensor) and ids.numel() > 0

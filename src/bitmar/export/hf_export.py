"""Hugging Face export of a BitMar checkpoint: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

An export directory holds
    config.json                 BitMarConfig (every ModelConfig field, packed flag, DINOv2 config) + auto_map
    configuration_bitmar.py     bitmar/model/model_config.py + templates/configuration_bitmar.py, flattened
    modeling_bitmar.py          file writes, packed CPU kernel (C++ source + loader), bitnet, memory and model sources +
                                templates/modeling_bitmar.py, flattened
    processing_bitmar.py        templates/processing_bitmar.py (tokenizer + DINOv2 image processor)
    model.safetensors           `model.*` (BitMar) and `vision_backbone.*` (optional frozen DINOv2)
    episodic_store.safetensors  the checkpoint's persistent episodic store (EpisodicStore.state_dict()), when it holds
                                episodes and --no_store is not given; the remote code loads it in from_pretrained
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    preprocessor_config.json, processor_config.json, generation_config.json, README.md (model card)

Parts: `flatten` (the remote code), `weights` (model.safetensors, the episodic store), `processor` (tokenizer, image
processor, DINOv2 backbone), `card` (README.md); this module checks the output directory and writes the export.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import GenerationConfig

from bitmar import fileio
from bitmar.bitnet import quantization_stats
from bitmar.export.card import find_evaluation, memory_card_line, model_card, vision_card_line
from bitmar.export.errors import ExportError
from bitmar.export.flatten import build_remote_code, flatten_sources, import_generated_module
from bitmar.export.processor import (
    PROCESSOR_AUTO_MAP,
    checkpoint_tokenizer,
    load_backbone,
    save_processor,
    save_tokenizer,
    write_json,
)
from bitmar.export.weights import (
    STORE_NAME,
    WEIGHTS_NAME,
    checkpoint_config,
    checkpoint_model,
    checkpoint_store,
    export_state_dict,
    holds_episodes,
)
from bitmar.fileio import check_writable_dir
from bitmar.infra.checkpoint import load_checkpoint

__all__ = [  # the public names of the export, wherever they are defined
    "DTYPES",
    "EXPORT_MANIFEST",
    "LEGACY_EXPORT_FILES",
    "STORE_NAME",
    "WEIGHTS_NAME",
    "ExportError",
    "build_remote_code",
    "export_checkpoint",
    "flatten_sources",
    "score_sentences",
]

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Lists the files an export wrote: a re-export replaces the directory only when it holds nothing else.
EXPORT_MANIFEST = "bitmar_export.json"
# What an export written before the manifest existed may hold (tokenizer files vary between transformers versions).
LEGACY_EXPORT_FILES = frozenset(
    {
        *(f"{name}.py" for name in ("configuration_bitmar", "modeling_bitmar", "processing_bitmar")),
        WEIGHTS_NAME,
        STORE_NAME,
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
    }
)
REGENERATED_FILES = frozenset({"__pycache__"})  # Python writes it when the remote code is imported from the folder

AUTO_MAP = {
    "AutoConfig": "configuration_bitmar.BitMarConfig",
    "AutoModel": "modeling_bitmar.BitMarModel",  # base model (last_hidden_state): the BabyLM fine-tuning path
    "AutoModelForCausalLM": "modeling_bitmar.BitMarForCausalLM",
    **PROCESSOR_AUTO_MAP,
}


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _export_files(output_dir: Path) -> frozenset[str]:
    """Names a previous export in `output_dir` owns: those its manifest lists, else every name an export may write."""
    manifest = _read_json(output_dir / EXPORT_MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return frozenset({*files, EXPORT_MANIFEST})
    return LEGACY_EXPORT_FILES


def _check_output_dir(output_dir: Path) -> None:
    """Refuse, before any work, a target that is not a directory, a non-empty directory that is not a previous
    BitMar export or holds files besides one (a re-export replaces the whole directory), or one we cannot write."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output_dir {output_dir} exists and is not a directory; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        config = _read_json(output_dir / "config.json")
        if not isinstance(config, dict) or config.get("model_type") != "bitmar":
            raise ExportError(
                f"--output_dir {output_dir} is not empty and holds no BitMar export; refusing to replace it — choose "
                "a new directory or empty this one"
            )
        foreign = sorted(
            p.name for p in output_dir.iterdir() if p.name not in _export_files(output_dir) | REGENERATED_FILES
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ExportError(
                f"--output_dir {output_dir} holds a BitMar export and files it did not write ({shown}); a re-export "
                "replaces the whole directory and would delete them; refusing — move them out or choose another "
                "--output_dir"
            )
    try:  # the parent gets the temporary directory; an existing export is renamed away (it needs write access too)
        check_writable_dir(output_dir.parent)
        if output_dir.is_dir():
            check_writable_dir(output_dir)
    except OSError as err:
        raise ExportError(
            f"cannot write the export to {output_dir}: {err}; choose an --output_dir you can write to"
        ) from None


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    packed: bool = False,
    vision_backbone: str | None = None,
    dtype: str = "bfloat16",
    store: bool = True,
) -> Path:
    """Write a Hugging Face export of a BitMar checkpoint into `output_dir` (atomically) and return its path.

    packed: store the ternary layers at 2 bits per weight (PackedBitLinear) instead of their float master weights.
    vision_backbone: DINOv2 hub id or local directory to store with the model, so `pixel_values` work.
    dtype: storage dtype of the full-precision parts ("bfloat16" or "float32").
    store: carry the checkpoint's persistent episodic store (episodic_store.safetensors) when it holds episodes.
    Raises CheckpointError (missing / corrupt checkpoint) or ExportError (anything else the user can fix).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    checkpoint_path, output_dir = Path(checkpoint_path), Path(output_dir)
    _check_output_dir(output_dir)
    payload = load_checkpoint(checkpoint_path)
    cfg = checkpoint_config(payload, checkpoint_path)
    model = checkpoint_model(payload, cfg, checkpoint_path)
    episodic_store = checkpoint_store(payload, model, checkpoint_path) if store else None
    tokenizer = checkpoint_tokenizer(payload, cfg, checkpoint_path)
    backbone, image_processor = load_backbone(vision_backbone, cfg) if vision_backbone else (None, None)
    remote_code = build_remote_code()
    stats = quantization_stats(model)  # before packing: counts the ternary master weights
    parameters = model.num_parameters()

    try:  # into a temporary sibling that replaces output_dir only once complete (renames only)
        with fileio.atomic_directory(output_dir) as tmp:
            for name, source in remote_code.items():
                (tmp / name).write_text(source, encoding="utf-8")
            tensors = export_state_dict(model, backbone, DTYPES[dtype], packed)
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            float32_bytes = sum(t.numel() * 4 for t in tensors.values() if t.is_floating_point())
            float32_bytes += 4 * stats["ternary_params"] if packed else 0
            del tensors
            store_info = None
            if episodic_store is not None:
                store_tensors = {k: v.detach().cpu().contiguous() for k, v in episodic_store.state_dict().items()}
                metadata = {"format": "pt", "episodes": str(len(episodic_store))}
                save_file(store_tensors, str(tmp / STORE_NAME), metadata=metadata)
                store_info = {"file": STORE_NAME, "episodes": len(episodic_store), "capacity": episodic_store.capacity}

            hf_config_class = import_generated_module(tmp / "configuration_bitmar.py").BitMarConfig
            hf_config = hf_config_class(
                **dataclasses.asdict(cfg.model),
                packed=packed,
                vision_backbone_config=backbone.config.to_dict() if backbone is not None else None,
                vision_backbone_name=vision_backbone,
                architectures=["BitMarForCausalLM"],
                auto_map=AUTO_MAP,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            hf_config.save_pretrained(str(tmp))
            config_json = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            config_json["dtype"] = config_json["torch_dtype"] = dtype  # 5.x reads `dtype`, 4.x `torch_dtype`
            write_json(tmp / "config.json", config_json)
            GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ).save_pretrained(str(tmp))

            save_tokenizer(tokenizer, tmp)
            save_processor(tmp, image_processor)

            card = model_card(
                {
                    "checkpoint": checkpoint_path.name,
                    "progress": ", ".join(f"{k} {v}" for k, v in dict(payload["progress"]).items()),
                    "vision": vision_card_line(vision_backbone, cfg.model.vision_encoder_dim),
                    "parameters": parameters,
                    "ternary_params": stats["ternary_params"],
                    "ternary_fraction": stats["ternary_fraction"],
                    "ternary_storage": "packed, 2 bits per weight (PackedBitLinear)"
                    if packed
                    else f"float master weights in {dtype}, ternarized on the fly (BitLinear)",
                    "dtype": dtype,
                    "weights_bytes": (tmp / WEIGHTS_NAME).stat().st_size,
                    "float32_bytes": float32_bytes,
                    "evaluation": find_evaluation(checkpoint_path),
                    "config_yaml": yaml.safe_dump(payload["config"], sort_keys=False),
                    "memory": memory_card_line(cfg, store_info, store, holds_episodes(payload.get("memory_store"))),
                }
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
            written = sorted(p.name for p in tmp.iterdir())
            manifest = {"format": 1, "files": sorted([*written, EXPORT_MANIFEST]), "episodic_store": store_info}
            write_json(tmp / EXPORT_MANIFEST, manifest)
    except OSError as err:  # e.g. the disk filled up: the half-written export is gone, the previous one in place
        raise ExportError(f"writing the export to {output_dir} failed ({err}); nothing was changed there") from err
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# Scoring (what BLiMP-style minimal-pair evaluation computes)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_sentences(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32) -> Tensor:
    """Summed log-probability (float32, (N,)) of each sentence's tokens after BOS, through an exported model.

    The tokenizer prepends BOS, as lm-eval's `prefix_token_id` and the BabyLM 2025 pipeline's causal backend do;
    a minimal pair is judged correct when the good sentence scores higher. Any padding side works: a token counts
    when it and the token before it are real. Equals `bitmar.training.losses.sequence_log_probs` on the same ids.
    """
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start : start + batch_size]), padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, T)
        first = ids.gather(1, mask.argmax(dim=1, keepdim=True)).squeeze(1)  # first real token of each row
        if bool((first != tokenizer.bos_token_id).any()):
            raise ValueError("score_sentences: the tokenizer does not prepend BOS; load the export's own tokenizer")
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        counted = (mask[:, 1:] * mask[:, :-1]).to(logp.dtype)  # (B, T-1)
        scores.append((logp * counted).sum(dim=-1).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)

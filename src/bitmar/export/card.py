"""Model card (README.md) of a Hugging Face export: usage, size, the run's evaluation numbers, its config."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from bitmar.config import BitMarConfig as RunConfig
from bitmar.export.weights import STORE_NAME


def _numeric_leaves(data: Any, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [(prefix, float(data))] if math.isfinite(data) else []
    if isinstance(data, dict):
        return [leaf for key, value in data.items() for leaf in _numeric_leaves(value, f"{prefix}/{key}".strip("/"))]
    return []


def find_evaluation(checkpoint_path: Path) -> tuple[Path, list[tuple[str, float]]] | None:
    """Numbers of the run's evaluation (`evaluation/results.json` of evaluate_bitmar.py, or `summary.json`), if any."""
    run_dir = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent
    for candidate in (run_dir / "evaluation" / "results.json", run_dir / "summary.json"):
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            warnings.warn(
                f"{candidate} is not valid JSON ({err}); the model card has no evaluation table", stacklevel=2
            )
            continue
        # evaluate_bitmar.py puts the headline numbers under "summary" ("task/metric": value); else take them all.
        headline = data.get("summary") if isinstance(data, dict) else None
        leaves = _numeric_leaves(headline if isinstance(headline, dict) else data)
        if leaves:
            return candidate, leaves
    return None


def _format_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n:,} bytes)"


def memory_card_line(cfg: RunConfig, store_info: dict[str, Any] | None, wanted: bool, had_store: bool) -> str:
    """The model card's paragraph on the episodic memory."""
    if not cfg.model.use_memory:
        return ""
    api = (
        "`model.memory_write(input_ids, vision_features=...)` stores an episode (caption + picture) in one shot, "
        "`model.memory_read(...)`, `memory_forget(ids)`, `memory_clear()`, and `generate(..., use_memory=True)` "
        "decodes from what a picture recalls."
    )
    if store_info is not None:
        held = f"This export carries the training run's store ({store_info['episodes']} episodes, `{STORE_NAME}`)."
    elif not wanted and had_store:
        held = "The training run's episodic store was left out (`--no_store`): the store starts empty."
    else:
        held = "The checkpoint had no stored episodes: the store starts empty."
    return f"Episodic memory: {held} {api}"


def model_card(info: dict[str, Any]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [bitmar, bitnet-b1.58, ternary, larimar, episodic-memory, babylm, multimodal, custom_code]",
        "---",
        "",
        "# BitMar",
        "",
        "BitNet b1.58 vision-language model with a Larimar episodic memory, trained from scratch for the BabyLM",
        f"multimodal track (text + DINOv2 image features). Exported from `{info['checkpoint']}` ({info['progress']}).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoProcessor",
        "",
        "model = AutoModelForCausalLM.from_pretrained(EXPORT_DIR, trust_remote_code=True)",
        "processor = AutoProcessor.from_pretrained(EXPORT_DIR, trust_remote_code=True)",
        'inputs = processor(text=["the cat sat on the mat"], return_tensors="pt")  # BOS is prepended',
        "logits = model(**inputs).logits  # logits[:, t] predicts input_ids[:, t + 1]",
        "```",
        "",
        "Pictures: " + info["vision"],
        "",
        *([info["memory"], ""] if info.get("memory") else []),
        "## Size",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {info['parameters']:,} |",
        f"| ternary parameters | {info['ternary_params']:,} ({100 * info['ternary_fraction']:.1f}% of all) |",
        f"| ternary storage | {info['ternary_storage']} |",
        f"| full-precision parts | {info['dtype']} |",
        f"| model.safetensors | {_format_bytes(info['weights_bytes'])} |",
        f"| same weights in float32 | {_format_bytes(info['float32_bytes'])} "
        f"({info['float32_bytes'] / max(info['weights_bytes'], 1):.2f}x larger) |",
        "",
    ]
    if info.get("evaluation"):
        source, leaves = info["evaluation"]
        lines += ["## Evaluation", "", f"From `{source}`.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in leaves[:80]]
        lines.append("")
    lines += ["## Training configuration", "", "```yaml", info["config_yaml"].rstrip("\n"), "```", ""]
    return "\n".join(lines)


def vision_card_line(vision_backbone: str | None, feature_dim: int) -> str:
    """The model card's sentence on pictures: through the stored backbone, or as precomputed features."""
    if vision_backbone:
        return (
            "`processor(images=...)` gives `pixel_values`; the stored frozen DINOv2 "
            f"(`{vision_backbone}`) turns them into the CLS feature (`pooler_output`) the model was trained on."
        )
    return (
        "this export has no vision backbone: pass precomputed DINOv2 CLS features as "
        f"`vision_features` (batch, {feature_dim}), or re-export with `--vision_backbone facebook/dinov2-base`."
    )

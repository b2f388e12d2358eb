"""Resuming a run: find its checkpoint, refuse one that does not fit (tokenizer, model shape), adopt its tokenizer.

The checkpoint file itself (format, atomic save, safe load, RNG states) is `bitmar.infra.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from bitmar.infra.checkpoint import CheckpointError

log = logging.getLogger("bitmar")


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from, loaded once (`bitmar.infra.checkpoint.load_checkpoint`, on the CPU)."""

    path: Path
    payload: dict[str, Any]


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """`--resume auto`: the run's last.pt if it exists."""
    candidate = Path(output_dir) / "checkpoints" / "last.pt"
    return candidate if candidate.is_file() else None


# ------------------------------------------------------------------------------------------------- resume checks
def _tokenizer_definition(text: str) -> dict[str, Any]:
    """The parts of a `tokenizers` JSON that decide the ids (a call with truncation/padding only edits the others)."""
    definition = json.loads(text)
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return definition


def tokenizer_mismatch(checkpoint_json: str, other_json: str) -> str | None:
    """None when both tokenizers map text to the same ids; otherwise a short description of the difference."""
    ours, theirs = _tokenizer_definition(checkpoint_json), _tokenizer_definition(other_json)
    if ours == theirs:
        return None
    vocab_a = ours.get("model", {}).get("vocab", {})
    vocab_b = theirs.get("model", {}).get("vocab", {})
    if isinstance(vocab_a, dict) and isinstance(vocab_b, dict) and vocab_a:
        kept = sum(1 for token, idx in vocab_a.items() if vocab_b.get(token) == idx)
        return f"{len(vocab_b)} tokens vs the checkpoint's {len(vocab_a)}; only {kept} of the checkpoint's ids are kept"
    return "a different tokenizer definition"


def adopt_checkpoint_tokenizer(payload: dict[str, Any], cfg: Any, output_dir: Path) -> None:
    """The checkpoint's tokenizer is the run's tokenizer: write it into `<output_dir>/tokenizer` when the run
    directory has none; refuse a different one there or at `data.tokenizer_path` (never retrain, never mix ids)."""
    from bitmar.data.text import file_lock
    from bitmar.data.tokenizer import load_tokenizer, save_tokenizer

    stored = payload.get("tokenizer")
    if not isinstance(stored, str) or not stored:
        return  # a checkpoint without a tokenizer: nothing to enforce (build_data finds or trains one)
    given = cfg.data.tokenizer_path
    if given is not None:
        file = Path(given) / "tokenizer.json" if Path(given).is_dir() else Path(given)
        if file.is_file():
            difference = tokenizer_mismatch(stored, load_tokenizer(file).backend_tokenizer.to_str())
            if difference is not None:
                raise CheckpointError(
                    f"data.tokenizer_path={given} is not the tokenizer this checkpoint was trained with "
                    f"({difference}); a resumed run must keep the checkpoint's tokenizer: drop the override or pass "
                    "--set data.tokenizer_path=null to use the one stored in the checkpoint"
                )
            return
        log.warning(
            "data.tokenizer_path=%s does not exist here; using the tokenizer stored in the checkpoint instead", given
        )
        cfg.data.tokenizer_path = None
    tok_dir = Path(output_dir) / "tokenizer"
    with file_lock(Path(output_dir) / ".tokenizer.lock"):
        existing = tok_dir / "tokenizer.json"
        if existing.is_file():
            difference = tokenizer_mismatch(stored, load_tokenizer(existing).backend_tokenizer.to_str())
            if difference is not None:
                raise CheckpointError(
                    f"{tok_dir} holds another tokenizer than the checkpoint's ({difference}); a resumed run must "
                    f"keep the checkpoint's tokenizer. Resume into a new --output_dir, or delete {tok_dir} and the "
                    "checkpoint's tokenizer will be restored there"
                )
            return
        with tempfile.TemporaryDirectory() as scratch:
            file = Path(scratch) / "tokenizer.json"
            file.write_text(stored, encoding="utf-8")
            save_tokenizer(load_tokenizer(file), tok_dir)
        log.info("restored the checkpoint's tokenizer into %s", tok_dir)


def model_shape_mismatches(expected: dict[str, Any], stored: dict[str, torch.Tensor]) -> list[str]:
    """Tensors whose name or shape differ between a model's state dict and a checkpoint's."""
    problems = [f"{k} missing from the checkpoint" for k in expected if k not in stored]
    problems += [f"{k} not in the model" for k in stored if k not in expected]
    problems += [
        f"{k}: checkpoint {tuple(stored[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in stored and tuple(stored[k].shape) != tuple(v.shape)
    ]
    return problems


def check_resumable_model(payload: dict[str, Any], cfg: Any) -> None:
    """Refuse overrides that change the model's shape before anything is built (a resumed run keeps its weights).

    The model of `cfg` is built on the meta device (no memory, no init cost) with the checkpoint's vocabulary (the
    tokenizer is the checkpoint's) and its tensors compared with the checkpoint's.
    """
    from bitmar.config import config_from_dict
    from bitmar.model import BitMar

    saved = config_from_dict(payload["config"])
    model_cfg = dataclasses.replace(cfg.model, vocab_size=saved.model.vocab_size)
    with torch.device("meta"):
        expected = BitMar(model_cfg).state_dict()
    problems = model_shape_mismatches(expected, payload["model"])
    if not problems:
        return
    changed = [
        f"model.{f.name}: {getattr(saved.model, f.name)!r} -> {getattr(model_cfg, f.name)!r}"
        for f in dataclasses.fields(model_cfg)
        if getattr(saved.model, f.name) != getattr(model_cfg, f.name)
    ]
    if not changed:
        raise CheckpointError(
            f"the checkpoint's model does not fit this version of BitMar's model ({'; '.join(problems[:3])}): it was "
            "written by another version of the code; resume it with that version, or start a new run"
        )
    raise CheckpointError(
        f"the overrides change the shape of the checkpoint's model, which a resumed run cannot load. Differing keys: "
        f"{'; '.join(changed)}. Drop those --set overrides to resume, or start a new run without --resume"
    )

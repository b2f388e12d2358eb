"""Tokenizer and image-processor files of a Hugging Face export, and the optional frozen DINOv2 backbone."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerFast

from bitmar.config import BitMarConfig as RunConfig
from bitmar.data.errors import DataError
from bitmar.data.tokenizer import load_tokenizer
from bitmar.export.errors import ExportError

PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_bitmar.BitMarProcessor"}
PROCESSOR_CONFIG = {"processor_class": "BitMarProcessor", "auto_map": PROCESSOR_AUTO_MAP}

# facebook/dinov2-base's preprocessor_config.json: resize the short side to 256 (bicubic), center crop 224,
# scale to [0, 1], normalize with the ImageNet mean/std. Used when the backbone directory has no such file.
DINOV2_IMAGE_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def checkpoint_tokenizer(payload: dict[str, Any], cfg: RunConfig, path: Path) -> PreTrainedTokenizerFast:
    text = payload.get("tokenizer")
    if not isinstance(text, str):
        raise ExportError(
            f"{path}: the checkpoint holds no tokenizer (key 'tokenizer'); re-save it with train_bitmar.py"
        )
    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "tokenizer.json"
        file.write_text(text, encoding="utf-8")
        try:
            tokenizer = load_tokenizer(file)  # checks the special tokens and that BOS is prepended
        except DataError as err:
            raise ExportError(f"{path}: its tokenizer is unusable ({err})") from None
    if len(tokenizer) > cfg.model.vocab_size:
        raise ExportError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    tokenizer.model_max_length = cfg.model.max_seq_len
    return tokenizer


def load_backbone(name_or_path: str, cfg: RunConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen DINOv2 (`Dinov2Model`) and its image processor settings."""
    from transformers import Dinov2Model  # only exports with a backbone need it

    if not cfg.model.use_vision:
        raise ExportError("--vision_backbone: this model was trained with model.use_vision=false; it takes no pictures")
    try:
        backbone = Dinov2Model.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ExportError(
            f"--vision_backbone {name_or_path}: cannot load a DINOv2 model ({str(err).splitlines()[0][:300]}); pass a "
            "local directory saved with Dinov2Model.save_pretrained, or a hub id this machine can download "
            "(facebook/dinov2-base)"
        ) from None
    if backbone.config.hidden_size != cfg.model.vision_encoder_dim:
        raise ExportError(
            f"--vision_backbone {name_or_path}: its features are {backbone.config.hidden_size}-d but the model was "
            f"trained on {cfg.model.vision_encoder_dim}-d DINOv2 features (model.vision_encoder_dim); use the DINOv2 "
            "size that made the training features (dinov2-base: 768)"
        )
    processor = dict(DINOV2_IMAGE_PROCESSOR)
    local = Path(name_or_path) / "preprocessor_config.json"
    if local.is_file():
        processor = json.loads(local.read_text(encoding="utf-8"))
    return backbone.eval(), processor


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a class every transformers version knows
    config["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids for a causal LM
    config["model_max_length"] = tokenizer.model_max_length
    config["padding_side"] = "right"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_processor(out: Path, image_processor: dict[str, Any] | None) -> None:
    """preprocessor_config.json (DINOv2's image processor, `DINOV2_IMAGE_PROCESSOR` without a backbone) and
    processor_config.json, both naming BitMarProcessor."""
    write_json(out / "preprocessor_config.json", {**(image_processor or DINOV2_IMAGE_PROCESSOR), **PROCESSOR_CONFIG})
    write_json(out / "processor_config.json", PROCESSOR_CONFIG)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

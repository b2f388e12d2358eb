"""Hugging Face configuration of an exported BitMar model (template appended to the flattened `ModelConfig`).

`bitmar.export` writes configuration_bitmar.py = the source of bitmar/model/model_config.py + this file, with the
`bitmar` imports removed, so `AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without the package.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from bitmar.model.model_config import ModelConfig


class BitMarConfig(PretrainedConfig):
    """Every `ModelConfig` field (same names and defaults), plus the export's storage and vision backbone.

    packed: ternary layers are stored at 2 bits per weight and run as `PackedBitLinear`.
    vision_backbone_config: `Dinov2Config.to_dict()` of the frozen DINOv2 stored with the weights (None: the export
        takes precomputed `vision_features` only). vision_backbone_name: where it came from (informational).
    """

    model_type = "bitmar"

    def __init__(
        self,
        packed: bool = False,
        vision_backbone_config: dict[str, Any] | None = None,
        vision_backbone_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        defaults = ModelConfig()
        for field in dataclasses.fields(ModelConfig):
            setattr(self, field.name, kwargs.pop(field.name, getattr(defaults, field.name)))
        self.model_config()  # fail now, with ModelConfig's message, on an unknown preset
        self.packed = bool(packed)
        self.vision_backbone_config = vision_backbone_config
        self.vision_backbone_name = vision_backbone_name
        # Harnesses (lm-eval) read the context length from here; the model was trained on max_seq_len text tokens.
        kwargs.setdefault("max_position_embeddings", self.max_seq_len)
        # The LM head reuses the embedding matrix inside BitMar itself: nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
        # Hugging Face names that harnesses read (hidden_size is a ModelConfig field already): the decoder's depth and
        # heads, derived from its preset so a stored value can never disagree with the weights.
        decoder = self.model_config()
        self.num_hidden_layers = decoder.decoder_layers
        self.num_attention_heads = decoder.decoder_heads

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` that `BitMar` is built from."""
        config = ModelConfig(**{field.name: getattr(self, field.name) for field in dataclasses.fields(ModelConfig)})
        config.preset(config.text_encoder)
        config.preset(config.text_decoder)
        return config

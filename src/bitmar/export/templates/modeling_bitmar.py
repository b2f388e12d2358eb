"""Hugging Face wrapper of BitMar (template appended to the flattened BitMar sources in modeling_bitmar.py).

`BitMarForCausalLM` is what `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` returns: the
BitMar network under `self.model` (state-dict keys `model.*`), optionally a frozen DINOv2 under
`self.vision_backbone` (keys `vision_backbone.*`) that turns `pixel_values` into the 768-d CLS feature BitMar was
trained on. `forward` returns next-token logits for the text positions only, so scoring code written for plain
causal LMs (BLiMP minimal pairs: summed log-probabilities after BOS) works unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from bitmar.bitnet import BitLinear, PackedBitLinear
from bitmar.model.bitmar import BitMar
from bitmar.model.layers import Attention

from .configuration_bitmar import BitMarConfig

NO_BACKBONE_MESSAGE = (
    "this export has no vision backbone; pass vision_features or re-export with --vision_backbone (e.g. "
    "facebook/dinov2-base or a local DINOv2 directory); vision_features are the precomputed DINOv2 CLS features, "
    "shape (batch, {dim})"
)

# Keyword arguments that harnesses and GenerationMixin pass to every causal LM; BitMar has no use for them
# (positions come from the attention mask, there is no external cache, no token types).
_IGNORED_KWARGS = frozenset(
    {
        "token_type_ids",
        "position_ids",
        "cache_position",
        "output_attentions",
        "output_hidden_states",
        "logits_to_keep",
        "num_logits_to_keep",
    }
)


def _packed_twin(layer: BitLinear) -> PackedBitLinear:
    """An empty PackedBitLinear shaped like `layer`, to be filled by `from_pretrained`.

    Its float state (RMSNorm gain, scale, bias) is float32 on purpose: transformers keeps a tensor in the dtype of
    the module's own tensor when that differs from the requested dtype, so the packed layers compute in float32
    (like training) even when the rest of the model is loaded in bfloat16.
    """
    packed = PackedBitLinear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        input_norm=layer.norm is not None,
        activation_bits=layer.activation_bits,
        device=layer.weight.device,
    )
    return packed.to(torch.float32)


def replace_with_packed(module: nn.Module) -> nn.Module:
    """Swap every quantized BitLinear of `module` for an empty PackedBitLinear twin (in place)."""
    twins: dict[int, PackedBitLinear] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear) and child.quantize:
                if id(child) not in twins:
                    twins[id(child)] = _packed_twin(child)
                setattr(parent, name, twins[id(child)])
    return module


def causal_lm_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; -100 and padded targets are ignored."""
    targets = labels[:, 1:].clone()  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class BitMarPreTrainedModel(PreTrainedModel):
    config_class = BitMarConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerBlock", "Dinov2Layer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # BitMar initialises its own parameters when built; loading fills them. Only the non-persistent per-head
        # gates are never in a checkpoint (transformers leaves them uninitialised after a meta-device build).
        if isinstance(module, Attention):
            module.head_gates.fill_(1.0)


class BitMarForCausalLM(BitMarPreTrainedModel, GenerationMixin):
    def __init__(self, config: BitMarConfig) -> None:
        super().__init__(config)
        self.model = BitMar(config.model_config())
        if config.packed:
            replace_with_packed(self.model)
        self.vision_backbone: Dinov2Model | None = None
        if config.vision_backbone_config is not None:
            self.vision_backbone = Dinov2Model(Dinov2Config.from_dict(config.vision_backbone_config))
            self.vision_backbone.requires_grad_(False)  # frozen: BitMar was trained on fixed DINOv2 features
        self.post_init()

    # ------------------------------------------------------------------ embeddings (tied inside BitMar)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.lm_head  # None when tied: BitMar multiplies by the embedding matrix directly

    # ------------------------------------------------------------------ vision

    def image_features(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, D)
        """DINOv2 CLS vector after the final layer norm (`pooler_output`): the feature BitMar was trained on."""
        if self.vision_backbone is None:
            raise ValueError(NO_BACKBONE_MESSAGE.format(dim=self.config.vision_encoder_dim))
        dtype = self.vision_backbone.embeddings.patch_embeddings.projection.weight.dtype
        return self.vision_backbone(pixel_values=pixel_values.to(dtype)).pooler_output

    def _vision_input(self, pixel_values: Tensor | None, vision_features: Tensor | None) -> Tensor | None:
        if pixel_values is None:
            return vision_features
        if vision_features is not None:
            raise ValueError("pass either pixel_values or vision_features, not both")
        return self.image_features(pixel_values)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor | None = None,  # (B, T), BOS first (the tokenizer adds it)
        attention_mask: Tensor | None = None,  # (B, T), 1 = real token; any padding side
        pixel_values: Tensor | None = None,  # (B, 3, H, W), through the stored DINOv2
        vision_features: Tensor | None = None,  # (B, D) precomputed DINOv2 CLS features
        labels: Tensor | None = None,  # (B, T), -100 = ignore
        past_key_values: Any = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        memory_readout: Tensor | None = None,  # (B, E) episodic-memory readout prefix (BitMar.read_memory)
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Tensor, ...]:
        """Logits (B, T, V) for the text positions: logits[:, t] predicts input_ids[:, t + 1].

        The model keeps no KV cache: `past_key_values` is ignored and every call recomputes the whole sequence
        (generation stays exact, just not incremental).
        """
        unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"BitMarForCausalLM.forward got unexpected arguments {unknown}")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("BitMarForCausalLM needs input_ids (inputs_embeds are not supported)")
        vision_features = self._vision_input(pixel_values, vision_features)
        out = self.model(
            input_ids,
            attention_mask,
            vision_features=vision_features,
            memory_readout=memory_readout,
            return_latents=False,
        )
        logits = out.logits  # (B, T, V)
        loss = causal_lm_loss(logits, labels, attention_mask) if labels is not None else None
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutputWithPast(loss=loss, logits=logits)  # no cache field: its name differs across versions

    # ------------------------------------------------------------------ generation

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a transformers cache: forward recomputes the whole sequence

    @torch.no_grad()
    def generate(
        self,
        inputs: Tensor | None = None,
        pixel_values: Tensor | None = None,
        vision_features: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate`; a picture goes through DINOv2 once, not at every step."""
        vision_features = self._vision_input(pixel_values, vision_features)
        if vision_features is not None:
            kwargs["vision_features"] = vision_features
        return super().generate(inputs, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values: Any = None,
        attention_mask: Tensor | None = None,
        vision_features: Tensor | None = None,
        memory_readout: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # The whole sequence every step, with the vision / memory prefix re-applied: exact, no cache to get wrong.
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "vision_features": vision_features,
            "memory_readout": memory_readout,
            "use_cache": False,
        }

"""Bidirectional BitNet text encoder: token states for cross-modal fusion and a pooled text latent z_t.

The encoder sees the whole text in both directions, so its outputs must never feed the causal decoder's
next-token prediction (docs/design.md §3): they go to the fusion module, the contrastive objective and memory keys.
"""

from __future__ import annotations

from torch import Tensor, nn

from bitmar.bitnet import BitLinear
from bitmar.model.layers import block_stack, key_padding_mask
from bitmar.model.model_config import ModelConfig


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:  # (B, T, C), (B, T) -> (B, C)
    """Mean over valid positions; an all-padding row pools to zeros instead of 0/0."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextEncoder(nn.Module):
    """`config.text_encoder` preset of bidirectional BitNet blocks with rotary positions.

    Takes token embeddings: the embedding table is shared with the decoder and owned by `BitMar`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.blocks = block_stack(config, config.encoder_layers, config.encoder_heads)
        self.norm = nn.RMSNorm(c, eps=1e-6)
        self.latent_proj = BitLinear(c, config.text_latent_size, quantize=config.quantize)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, text_embeds: Tensor, attention_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(B, T, C) token embeddings -> token states (B, T, C), latent (B, Lt), attention maps (B, H, T, T)."""
        x = self.dropout(text_embeds)  # (B, T, C)
        mask = key_padding_mask(attention_mask)
        attentions: list[Tensor] = []
        for block in self.blocks:
            x, weights = block(x, attn_mask=mask, need_weights=need_weights)
            if weights is not None:
                attentions.append(weights)
        tokens = self.norm(x)  # (B, T, C)
        latent = self.latent_proj(masked_mean(tokens, attention_mask))  # (B, Lt)
        return tokens, latent, attentions

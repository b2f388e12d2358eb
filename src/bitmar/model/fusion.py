"""Cross-modal fusion: text tokens cross-attend to vision tokens; pooled result is the multimodal latent z_m.

z_m is the episode value Larimar writes into memory, so it must carry both the caption and the picture:
the pooled vision tokens are added to the pooled fused text before the projection (this also keeps z_m
visual when `fusion_layers` is 0).
"""

from __future__ import annotations

from torch import Tensor, nn

from bitmar.bitnet import BitLinear
from bitmar.model.layers import block_stack
from bitmar.model.model_config import ModelConfig
from bitmar.model.text_encoder import masked_mean


class CrossModalFusion(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.blocks = block_stack(config, config.fusion_layers, config.encoder_heads, cross=True, rotary=False)
        self.norm = nn.RMSNorm(c, eps=1e-6)
        self.latent_proj = BitLinear(c, config.episode_dim, quantize=config.quantize)

    def forward(
        self,
        text_tokens: Tensor,  # (B, T, C)
        text_mask: Tensor | None,  # (B, T), 1 = real token
        vision_tokens: Tensor,  # (B, N, C)
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """-> fused text tokens (B, T, C), multimodal latent z_m (B, E), cross-attention maps (B, H, T, N)."""
        x = text_tokens
        attentions: list[Tensor] = []
        for block in self.blocks:
            x, weights = block(x, context=vision_tokens, need_weights=need_weights)
            if weights is not None:
                attentions.append(weights)
        fused = self.norm(x)  # (B, T, C)
        pooled = masked_mean(fused, text_mask) + vision_tokens.mean(dim=1)  # (B, C)
        return fused, self.latent_proj(pooled), attentions

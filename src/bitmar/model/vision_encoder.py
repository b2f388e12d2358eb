"""Quantized vision encoder over precomputed DINOv2 features.

A global DINOv2 vector (B, 768) is expanded into `vision_num_tokens` tokens by one ternary projection
(768 -> n*C, the ClipCap-style mapping: every token gets its own view of the vector) plus learned token
positions; patch tokens (B, P, 768) are projected one by one (DINOv2 already encodes patch positions).
`vision_layers` bidirectional BitNet blocks then mix the tokens; mean pooling + a ternary projection gives z_v.
`vision_quantization: false` (or `quantize: false`) builds the same module in full precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitmar.bitnet import BitLinear
from bitmar.model.layers import block_stack
from bitmar.model.model_config import ModelConfig


class VisionEncoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.hidden_size
        quantize = config.quantize and config.vision_quantization
        self.feature_dim = config.vision_encoder_dim
        self.num_tokens = config.vision_num_tokens
        self.hidden_size = c
        self.expand = BitLinear(config.vision_encoder_dim, self.num_tokens * c, quantize=quantize)
        self.patch_proj = BitLinear(config.vision_encoder_dim, c, quantize=quantize)
        self.token_pos = nn.Parameter(torch.zeros(self.num_tokens, c))  # (n, C), initialised by BitMar
        self.blocks = block_stack(config, config.vision_layers, config.encoder_heads, rotary=False, quantize=quantize)
        self.norm = nn.RMSNorm(c, eps=1e-6)
        self.latent_proj = BitLinear(c, config.vision_latent_size, quantize=quantize)
        self.dropout = nn.Dropout(config.dropout)

    def tokenize(self, features: Tensor) -> Tensor:
        """(B, D) global vectors -> (B, n, C); (B, P, D) patch tokens -> (B, P, C)."""
        if features.dim() not in (2, 3) or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"vision features must be (B, {self.feature_dim}) global vectors or (B, P, {self.feature_dim}) patch "
                f"tokens (model.vision_encoder_dim), got shape {tuple(features.shape)}"
            )
        features = features.to(self.token_pos.dtype)  # .npy features may be float16; a packed expand has no .weight
        if features.dim() == 2:
            tokens = self.expand(features).view(features.shape[0], self.num_tokens, self.hidden_size)
            return tokens + self.token_pos.to(tokens.dtype)
        return self.patch_proj(features)

    def forward(self, features: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Features -> vision tokens (B, N, C), pooled latent (B, Lv), per-layer attention maps (B, H, N, N)."""
        x = self.dropout(self.tokenize(features))  # (B, N, C)
        attentions: list[Tensor] = []
        for block in self.blocks:
            x, weights = block(x, need_weights=need_weights)
            if weights is not None:
                attentions.append(weights)
        tokens = self.norm(x)  # (B, N, C)
        latent = self.latent_proj(tokens.mean(dim=1))  # (B, Lv)
        return tokens, latent, attentions

"""GPT-style causal BitNet decoder over [memory readout tokens, vision tokens] + text tokens.

The whole sequence is causal (prefix tokens included), so a text position never sees a later text position
and incremental decoding with a KV cache computes exactly what the full sequence computes. Only the text
positions' hidden states are returned; the full-precision embedding table and LM head (BitNet keeps both
unquantized) live in `BitMar`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitmar.bitnet import BitLinear
from bitmar.model.layers import KVCache, block_stack
from bitmar.model.model_config import ModelConfig


def causal_attention_mask(
    key_mask: Tensor | None, num_queries: int, past: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """Mask for queries at positions [past, past + Tq) over keys [0, past + Tq): returns (attn_mask, is_causal).

    key_mask (B, past + Tq) marks real keys. Right padding (every pad after every real key) needs no mask:
    causality already keeps real positions off the later pads, so the fast `is_causal` kernel is used. Other
    layouts (left padding in batched generation) get an explicit (B, 1, Tq, Tk) mask; a query may always see
    itself, so no softmax row is empty.
    """
    total = past + num_queries
    if key_mask is not None:
        key_mask = key_mask.bool()
        if past == 0:
            full, right_padded = torch.stack([key_mask.all(), (key_mask[:, 1:] <= key_mask[:, :-1]).all()]).tolist()
            if full or right_padded:  # one host sync for both tests
                key_mask = None
        elif bool(key_mask.all()):  # decoding: only the padding test (one reduction per token)
            key_mask = None
    if key_mask is None:
        if past == 0:
            return None, True
        if num_queries == 1:
            return None, False
    q_idx = torch.arange(past, total, device=device)[:, None]  # (Tq, 1)
    k_idx = torch.arange(total, device=device)[None, :]  # (1, Tk)
    allowed = (k_idx <= q_idx)[None]  # (1, Tq, Tk)
    if key_mask is not None:
        allowed = (allowed & key_mask[:, None, :total]) | (k_idx == q_idx)[None]  # (B, Tq, Tk)
    return allowed[:, None], False


def decoder_layout(attention_mask: Tensor, prefix_length: int) -> tuple[Tensor, Tensor]:
    """Key mask (B, P + T) and rotary positions (B, P + T) of [prefix, text] for a text mask (B, T).

    Text positions count real tokens only (P + cumsum - 1), so a left-padded row is encoded exactly like the same
    row unpadded, distance to the prefix included; with right padding this equals plain 0..P+T-1 on real tokens.
    """
    bsz = attention_mask.shape[0]
    text_mask = attention_mask.bool()
    text_positions = prefix_length + (text_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    prefix_positions = torch.arange(prefix_length, device=attention_mask.device).expand(bsz, prefix_length)
    key_mask = torch.cat([text_mask.new_ones(bsz, prefix_length), text_mask], dim=1)
    return key_mask, torch.cat([prefix_positions, text_positions], dim=1)


class TextDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.hidden_size = c
        self.blocks = block_stack(config, config.decoder_layers, config.decoder_heads)
        self.norm = nn.RMSNorm(c, eps=1e-6)
        self.readout_tokens = config.memory_readout_tokens
        self.episode_tokens = config.episode_tokens
        self.episode_dim = config.episode_dim
        # Memory readout (B, R * E) -> R episode tokens (B, R, E) -> R * r prefix tokens (B, R * r, C).
        self.readout_proj = (
            BitLinear(config.episode_dim, config.memory_readout_tokens * c, quantize=config.quantize)
            if config.use_memory
            else None
        )
        self.dropout = nn.Dropout(config.dropout)

    def memory_prefix(self, readout: Tensor) -> Tensor:  # (B, R * E) -> (B, R * r, C)
        if self.readout_proj is None:
            raise ValueError("this model was built with model.use_memory=false: it takes no memory readout")
        episode = readout.view(readout.shape[0], self.episode_tokens, self.episode_dim)  # (B, R, E)
        tokens = self.readout_proj(episode.to(self.norm.weight.dtype))  # model dtype (memory reads are float32)
        return tokens.reshape(readout.shape[0], self.episode_tokens * self.readout_tokens, self.hidden_size)

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(len(self.blocks), max_length)

    def forward(
        self,
        text_embeds: Tensor,  # (B, T, C) token embeddings (BitMar owns the shared embedding table)
        prefix: Tensor | None = None,  # (B, P, C) readout + vision tokens
        key_mask: Tensor | None = None,  # (B, past + P + T) 1 = real key
        positions: Tensor | None = None,  # (B, P + T) rotary positions
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """-> final hidden states of the text positions (B, T, C) and per-layer attention maps (B, H, Tq, Tk)."""
        x = text_embeds
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, C)
        x = self.dropout(x)
        bsz, length, _ = x.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + length, device=x.device).expand(bsz, length)
        attn_mask, is_causal = causal_attention_mask(key_mask, length, past, x.device)
        # Every layer rotates by the same angles: compute them once (decoding pays this per token and layer).
        rotary = self.blocks[0].attn.rotary if len(self.blocks) else None
        rope = rotary(positions) if rotary is not None else None
        attentions: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, weights = block(
                x,
                attn_mask=attn_mask,
                is_causal=is_causal,
                positions=positions,
                cache=cache,
                layer=i,
                need_weights=need_weights,
                rope=rope,
            )
            if weights is not None:
                attentions.append(weights)
        if cache is not None:
            cache.advance(length)
        return self.norm(x[:, num_prefix:]), attentions

"""BitNet transformer building blocks: rotary positions, attention (self / cross, GQA, KV cache), ReLU² GLU MLP.

Norm placement. Every projection is a `BitLinear`, whose RMSNorm sits right before activation quantization.
The fused q/k/v projection and the fused gate/up projection therefore normalize the residual stream exactly
where a pre-norm would (one norm per sub-layer, as the projections are fused), and the norms inside the
output projection and the down projection are the SubLN norms that BitNet a4.8 / BitNet b1.58 2B4T place
before `o_proj` and `down_proj`. So each block carries the 2B4T set of four norms and no outer RMSNorm: the
Microsoft "training tips" reference (LLaMA block + BitLinear with its own norm) normalizes the q/k/v input twice.
Only the end of each stack has a plain full-precision RMSNorm (before the LM head, the pooling and the
cross-attention keys), because a residual stream leaves the stack there without entering a BitLinear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitmar.bitnet import BitLinear
from bitmar.model.model_config import ModelConfig


def mlp_hidden_size(dim: int, mlp_ratio: float) -> int:
    """GLU width with the parameter count of a plain `mlp_ratio` MLP (2/3 rule), rounded up to 64."""
    return 64 * math.ceil(2 * mlp_ratio * dim / 3 / 64)


def kv_heads(num_heads: int, group_size: int) -> int:
    """Key/value heads of grouped-query attention where `group_size` query heads share one key/value head."""
    if group_size < 1 or num_heads % group_size:
        raise ValueError(
            f"model.gqa_group_size={group_size} must be >= 1 and divide the head count {num_heads} of every "
            "attention stack (text_encoder / text_decoder presets); set it to 1 for plain multi-head attention"
        )
    return num_heads // group_size


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) for explicit integer positions, so caches and padding can offset them.

    The frequencies are recomputed in float32 at every call (D/2 values) rather than kept in a buffer, which
    `model.to(torch.bfloat16)` would round and so shift the angles of far positions.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.base = base

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:  # (B, T) -> cos, sin (B, 1, T, D)
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.base**exponents)  # (D/2,)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (B, H, T, D)
    """Rotate pairs (i, i + D/2) by the position angle; computed in float32, returned in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    Layers write the new keys/values at `length`; the caller advances `length` once after all layers ran.
    Buffers are allocated lazily at the first write, in the dtype the layer produces (bfloat16 under autocast).
    """

    def __init__(self, num_layers: int, max_length: int) -> None:
        self.num_layers = num_layers
        self.max_length = max_length
        self.length = 0
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:  # (B, Hkv, T, D) each
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} positions > max_length {self.max_length}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class Attention(nn.Module):
    """Multi-head attention with ternary projections; self-attention (fused q/k/v, rotary) or cross-attention.

    `num_kv_heads < num_heads` gives grouped-query attention (BitNet b1.58 2B4T): fewer key/value projections,
    a smaller KV cache. `head_gates` (H,) multiplies each head's output before the output projection: set a gate
    to 0 to switch a head off, or set `requires_grad` on the buffer to measure |dL/dg_h| (head importance).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        cross: bool = False,
        context_dim: int | None = None,
        rotary: bool = True,
        quantize: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} attention heads")
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} attention heads cannot be shared by {num_kv_heads} key/value heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.cross = cross
        self.dropout = dropout
        kv_width = num_kv_heads * self.head_dim
        if cross:
            self.q_proj = BitLinear(dim, dim, quantize=quantize)
            self.kv_proj = BitLinear(context_dim or dim, 2 * kv_width, quantize=quantize)
        else:
            self.qkv_proj = BitLinear(dim, dim + 2 * kv_width, quantize=quantize)
        self.o_proj = BitLinear(dim, dim, quantize=quantize)
        self.rotary = RotaryEmbedding(self.head_dim) if rotary and not cross else None
        self.register_buffer("head_gates", torch.ones(num_heads), persistent=False)

    def forward(
        self,
        x: Tensor,  # (B, Tq, C)
        context: Tensor | None = None,  # (B, Tk, Cctx), cross-attention only
        attn_mask: Tensor | None = None,  # bool (B|1, 1, Tq, Tk), True = may attend
        is_causal: bool = False,
        positions: Tensor | None = None,  # (B, Tq) integer positions for rotary
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,  # cos, sin (B, 1, Tq, D) of `positions`, computed once per stack
    ) -> tuple[Tensor, Tensor | None]:
        bsz, tq, _ = x.shape
        hd = self.head_dim
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context (the key/value tokens)")
            q = self.q_proj(x)
            k, v = self.kv_proj(context).split(self.num_kv_heads * hd, dim=-1)
        else:
            q, k, v = self.qkv_proj(x).split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], -1)
        q = q.view(bsz, tq, self.num_heads, hd).transpose(1, 2)  # (B, H, Tq, D)
        k = k.view(bsz, k.shape[1], self.num_kv_heads, hd).transpose(1, 2)  # (B, Hkv, Tk, D)
        v = v.view(bsz, v.shape[1], self.num_kv_heads, hd).transpose(1, 2)
        if self.rotary is not None:
            if rope is None:
                if positions is None:
                    positions = torch.arange(tq, device=x.device).expand(bsz, tq)
                rope = self.rotary(positions)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            # Explicit softmax path: the per-head attention map is what analysis wants, speed is secondary.
            group = self.num_heads // self.num_kv_heads
            k_full = k.repeat_interleave(group, dim=1)
            v_full = v.repeat_interleave(group, dim=1)
            scores = (q.float() @ k_full.float().transpose(-2, -1)) / math.sqrt(hd)  # (B, H, Tq, Tk)
            if is_causal:
                attn_mask = torch.ones(tq, k.shape[2], dtype=torch.bool, device=x.device).tril()[None, None]
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            probs = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
            out = probs.to(v_full.dtype) @ v_full  # (B, H, Tq, D)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal and attn_mask is None,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        out = out * self.head_gates.to(out.dtype).view(1, -1, 1, 1)
        out = out.transpose(1, 2).reshape(bsz, tq, self.num_heads * hd)  # (B, Tq, C)
        return self.o_proj(out), weights


class GluMLP(nn.Module):
    """ReLU² GLU (BitNet b1.58 2B4T): down(relu(gate(x))² * up(x)), gate and up fused into one ternary matrix."""

    def __init__(self, dim: int, hidden: int, quantize: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = BitLinear(dim, 2 * hidden, quantize=quantize)
        self.down = BitLinear(hidden, dim, quantize=quantize)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.relu(gate).square() * up)


class TransformerBlock(nn.Module):
    """Residual block: x + attn(x) [self or cross], then x + mlp(x). The pre-norms live inside the BitLinears."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        mlp_hidden: int,
        *,
        cross: bool = False,
        rotary: bool = True,
        quantize: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = Attention(
            dim, num_heads, num_kv_heads, cross=cross, rotary=rotary, quantize=quantize, dropout=dropout
        )
        self.mlp = GluMLP(dim, mlp_hidden, quantize=quantize)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,  # (B, T, C)
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        attn_out, weights = self.attn(x, context, attn_mask, is_causal, positions, cache, layer, need_weights, rope)
        x = x + self.resid_dropout(attn_out)
        x = x + self.resid_dropout(self.mlp(x))
        return x, weights


def block_stack(
    config: ModelConfig,
    num_layers: int,
    num_heads: int,
    *,
    cross: bool = False,
    rotary: bool = True,
    quantize: bool | None = None,
) -> nn.ModuleList:
    """`num_layers` TransformerBlocks of one stack (encoder, decoder, fusion, vision) at `config`'s width, GQA grouping,
    MLP ratio and dropout; `quantize` defaults to `config.quantize` (the vision stack passes its own flag)."""
    c = config.hidden_size
    return nn.ModuleList(
        TransformerBlock(
            c,
            num_heads,
            kv_heads(num_heads, config.gqa_group_size),
            mlp_hidden_size(c, config.mlp_ratio),
            cross=cross,
            rotary=rotary,
            quantize=config.quantize if quantize is None else quantize,
            dropout=config.dropout,
        )
        for _ in range(num_layers)
    )


def key_padding_mask(valid: Tensor | None) -> Tensor | None:
    """(B, Tk) validity -> bool (B, 1, 1, Tk) for bidirectional attention, or None when nothing is padded.

    A row with no valid key at all (an empty sequence) may attend everywhere: its output is ignored by the
    masked pooling, and an all-masked softmax would be NaN.
    """
    if valid is None:
        return None
    valid = valid.bool()
    if bool(valid.all()):
        return None
    valid = valid | ~valid.any(dim=-1, keepdim=True)
    return valid[:, None, None, :]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, std) for linear and embedding weights, zero biases, unit norm gains."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.RMSNorm) and module.weight is not None:
        nn.init.ones_(module.weight)


def scale_residual_projections(blocks: nn.ModuleList, std: float = 0.02) -> None:
    """Output projections of residual branches get std / sqrt(2 L) so the stream's variance stays bounded."""
    scaled = std / math.sqrt(2 * max(len(blocks), 1))
    for block in blocks:
        nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=scaled)
        nn.init.normal_(block.mlp.down.weight, mean=0.0, std=scaled)

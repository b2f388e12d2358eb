"""BitNet b1.58 reference quantizers: ternary weights (absmean scale), 8-bit activations (absmax per token),
straight-through fake quantization for training (the formulas of `bitmar.bitnet`'s docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_EPS = 1e-5
ACTIVATION_EPS = 1e-5


def check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in [2, 8] to fit int8, got {bits}")
    return 2 ** (bits - 1) - 1


# Up to this many rows |x| is materialised for the absmax (2 ops, the fewest dispatches for decoding); above it
# amax and amin avoid the (N, C) temporary (same value, bit for bit).
_SMALL_ROWS = 64


def absmax_scale(x32: Tensor, q_max: int) -> Tensor:  # (..., C) -> (..., 1)
    """Per-token scale max(max|x|, eps) / q_max."""
    if x32.numel() <= _SMALL_ROWS * x32.shape[-1]:
        absmax = x32.abs().amax(dim=-1, keepdim=True)
    else:
        absmax = torch.maximum(x32.amax(dim=-1, keepdim=True), x32.amin(dim=-1, keepdim=True).neg_())
    # The eps floor keeps an all-zero row at scale 1e-5/127 instead of 0 (0/0 wrote NaN into earlier models).
    return absmax.clamp_(min=ACTIVATION_EPS).div_(q_max)


def weight_scale(w32: Tensor) -> Tensor:  # 0-dim
    return w32.abs().mean().clamp(min=WEIGHT_EPS)


def quantize_weights(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization: returns (int8 tensor in {-1, 0, 1}, 0-dim float32 scale), w ~ w_t * scale."""
    w32 = w.detach().float()
    scale = weight_scale(w32)
    w_ternary = (w32 / scale).round_().clamp_(-1, 1).to(torch.int8)
    return w_ternary, scale


def quantize_activations(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Absmax per-token quantization over the last dim.

    Returns (int8 values, float32 scale of shape x.shape[:-1] + (1,)), x ~ x_int * scale.
    """
    q_max = check_bits(bits)
    x32 = x.detach().float()
    scale = absmax_scale(x32, q_max)
    x_int = (x32 / scale).round_().clamp_(-q_max - 1, q_max).to(torch.int8)
    return x_int, scale


def _straight_through(x: Tensor, x_deq: Tensor) -> Tensor:
    """Value x_deq exactly (x - x is 0 for finite x), gradient identity to x: the STE in every autograd mode."""
    return x_deq + (x - x.detach())


def dequantized_weights(w32: Tensor) -> Tensor:  # float32, same shape
    scale = weight_scale(w32)
    return (w32 / scale).round_().clamp_(-1, 1).mul_(scale)


def fake_quantize_weights(w: Tensor) -> Tensor:
    """Dequantized ternary weights in w's dtype, with straight-through gradients to w.

    The scale and the rounding are computed in float32 (like `quantize_weights`) whatever w's dtype.
    """
    w_deq = dequantized_weights(w.detach().float()).to(w.dtype)
    return _straight_through(w, w_deq)


def fake_quantize_activations(x: Tensor, bits: int = 8) -> Tensor:
    """Dequantized int8 activations in x's dtype, with straight-through gradients to x.

    Rounding happens in float32: bfloat16 cannot represent x / s precisely enough to round like the reference.
    """
    q_max = check_bits(bits)
    x32 = x.detach().float()
    scale = absmax_scale(x32, q_max)
    # |x / s| <= q_max by construction of s, so the reference clamp to [-q_max - 1, q_max] never changes a value.
    x_deq = (x32 / scale).round_().mul_(scale)
    return _straight_through(x, x_deq.to(x.dtype))

"""BitNet b1.58: ternary weights, 8-bit activations, straight-through training.

Reference definition (Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"):
- weights, one scale per matrix: gamma = max(mean|W|, 1e-5); W_t = clamp(round(W / gamma), -1, 1)
- activations, one scale per token: s = max(max|x|, 1e-5) / 127; x_q = clamp(round(x / s), -128, 127)
- straight-through estimator: the forward uses the dequantized values, gradients reach the full-precision
  master weights and inputs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHT_EPS = 1e-5
ACTIVATION_EPS = 1e-5


def quantize_weights(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization: returns (int8 tensor in {-1, 0, 1}, 0-dim float32 scale), w ~ w_t * scale."""
    w32 = w.detach().float()
    scale = w32.abs().mean().clamp(min=WEIGHT_EPS)
    w_ternary = (w32 / scale).round().clamp(-1, 1).to(torch.int8)
    return w_ternary, scale


def quantize_activations(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Absmax per-token quantization over the last dim: returns (int8 values, float32 scale of shape x.shape[:-1]+(1,))."""
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in [2, 8] to fit int8, got {bits}")
    q_max = 2 ** (bits - 1) - 1
    x32 = x.detach().float()
    # The eps floor keeps an all-zero row at scale 1e-5/127 instead of 0 (0/0 wrote NaN into earlier models).
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=ACTIVATION_EPS) / q_max
    x_int = (x32 / scale).round().clamp(-q_max - 1, q_max).to(torch.int8)
    return x_int, scale


def fake_quantize_weights(w: Tensor) -> Tensor:
    """Dequantized ternary weights in w's dtype, with straight-through gradients to w."""
    scale = w.detach().abs().mean().clamp(min=WEIGHT_EPS)
    w_deq = (w.detach() / scale).round().clamp(-1, 1) * scale
    return w + (w_deq - w.detach())


def fake_quantize_activations(x: Tensor, bits: int = 8) -> Tensor:
    """Dequantized int8 activations in x's dtype, with straight-through gradients to x."""
    q_max = 2 ** (bits - 1) - 1
    x_d = x.detach()
    if x_d.dtype != torch.float32:
        # Round in float32: bfloat16 cannot represent x / s precisely enough to round like the reference.
        x_int, scale = quantize_activations(x_d, bits)
        x_deq = (x_int.float() * scale).to(x.dtype)
    else:
        scale = x_d.abs().amax(dim=-1, keepdim=True).clamp(min=ACTIVATION_EPS) / q_max
        x_deq = (x_d / scale).round().clamp(-q_max - 1, q_max) * scale
    return x + (x_deq - x_d)


class BitLinear(nn.Linear):
    """Drop-in `nn.Linear` with BitNet b1.58 quantization (SubLN RMSNorm inside, before activation quantization).

    `quantize=False` keeps the same parameters and norm but skips quantization: the full-precision twin used
    for ablations and benchmarks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        input_norm: bool = True,
        quantize: bool = True,
        activation_bits: int = 8,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.norm = nn.RMSNorm(in_features, eps=1e-6, device=device, dtype=dtype) if input_norm else None
        self.quantize = quantize
        self.activation_bits = activation_bits

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if self.norm is not None:
            x = self.norm(x)
        if not self.quantize:
            return F.linear(x, self.weight, self.bias)
        return F.linear(fake_quantize_activations(x, self.activation_bits), fake_quantize_weights(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_norm={self.norm is not None}, quantize={self.quantize}"

"""BitLinear: the training layer (RMSNorm + ternary weight + int8 activations) with a fused float32 autograd
function and a quantized-weight cache kept between calls while the weight is unchanged."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bitmar.bitnet.int8_gemm import pack_int8_weight, ternary_matmul, use_int8_gemm
from bitmar.bitnet.quant import (
    WEIGHT_EPS,
    absmax_scale,
    check_bits,
    dequantized_weights,
    fake_quantize_activations,
    fake_quantize_weights,
    weight_scale,
)


def _ternary_weight(weight: Tensor) -> tuple[Tensor, Tensor]:  # (out, in) -> float32 W_t in {-1, 0, 1}, 0-dim gamma
    w32 = weight.detach().float()
    gamma = weight_scale(w32)
    return (w32 / gamma).round_().clamp_(-1, 1), gamma


def rms_norm_with_rstd(x2: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:  # (N, C) -> (N, C), (N, 1)
    """RMSNorm output bit-identical to `F.rms_norm` on CPU (same op order), plus the reciprocal RMS for the backward.

    One (N, C) allocation: the squares, then the output, share a buffer (fresh pages cost more than a pass on CPU).
    """
    y = torch.mul(x2, x2)  # (N, C); equals x2.pow(2)
    rstd = y.mean(dim=-1, keepdim=True).add_(eps).rsqrt_()  # (N, 1)
    if x2.device.type == "cpu":
        torch.mul(x2, rstd, out=y).mul_(weight)  # the CPU kernel's order: (x * rstd) * weight
    else:
        # Elsewhere the fused kernels may round differently: take the public op, rstd only feeds the backward.
        y = F.rms_norm(x2, (x2.shape[-1],), weight, eps)
    return y, rstd


def quantize_rows_(y: Tensor, q_max: int) -> tuple[Tensor, Tensor]:  # (N, C) -> (N, C), (N, 1); in place
    """Round a scratch tensor in place to its int8 codes round(y / s), as float (the reference clamp is a no-op)."""
    scale = absmax_scale(y, q_max)  # (N, 1)
    return y.div_(scale).round_(), scale


def activation_codes(
    x2: Tensor, norm_weight: Tensor | None, eps: float, q_max: int
) -> tuple[Tensor, Tensor, Tensor | None]:  # (N, C) -> codes (N, C), scale (N, 1), rstd (N, 1) or None
    if norm_weight is None:
        return (*quantize_rows_(x2.clone(), q_max), None)
    y, rstd = rms_norm_with_rstd(x2, norm_weight, eps)
    return (*quantize_rows_(y, q_max), rstd)


def _bitlinear_forward(
    x2: Tensor, norm_weight: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, q_max: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Shared forward: returns out (N, out), codes (N, in), s (N, 1), W_t (out, in), gamma, rstd (N, 1) | None."""
    codes, scale, rstd = activation_codes(x2, norm_weight, eps, q_max)
    w_t, gamma = _ternary_weight(weight)  # once per forward: O(out * in)
    packed = pack_int8_weight(w_t.to(torch.int8)) if use_int8_gemm(x2.device, x2.shape[0]) else None
    out = ternary_matmul(codes, w_t, scale * gamma, bias, packed)
    return out, codes, scale, w_t, gamma, rstd


class _QuantizedWeightCache:
    """A BitLinear's quantized weight, kept between calls while the weight is unchanged.

    Valid while the weight tensor is the same one with the same contents: the key holds its storage pointer, its
    autograd version counter (bumped by every in-place update: optimizer steps, `load_state_dict`, `copy_` under
    no_grad), device, dtype and shape. Edits through `.data` bypass the version counter, and so does torch's fused
    AdamW kernel (`fused=True`, torch 2.13; the trainer does not use it): after such updates call
    `layer.clear_weight_cache()` or `torch.autograd.graph.increment_version(params)`.

    In training the weight changes once per optimizer step, but one step may call a layer several times (phase 3
    runs the decoder three times) and every call used to quantize the weight afresh into newly allocated
    weight-sized tensors: fresh pages cost more than the arithmetic on CPU. After an optimizer step (same storage,
    new version) the buffers are refilled in place. A graph whose backward still needs the old buffers saved the
    weight itself, so autograd refuses that backward after the in-place update instead of using stale values.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.ternary: Tensor | None = None  # (out, in) float32 W_t in {-1, 0, 1} (fused path)
        self.gamma: Tensor | None = None  # 0-dim float32
        self.int8: Tensor | None = None  # prepacked oneDNN copy of W_t, built on the first large-batch call
        self.dequantized: Tensor | None = None  # (out, in) float32 W_t * gamma (fused backward)
        self.reference: Tensor | None = None  # (out, in) W_t * gamma in the weight's dtype (reference path, eval)
        self._spare: tuple[Tensor | None, Tensor | None] = (None, None)  # buffers to refill after an update

    @staticmethod
    def key_of(weight: Tensor) -> tuple[Any, ...]:
        return (weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape))

    def _sync(self, weight: Tensor) -> None:
        key = self.key_of(weight)
        if key == self.key:
            return
        # Same storage, dtype, device and shape: only the values changed, so the buffers can be refilled.
        refill = self.key is not None and key[0] == self.key[0] and key[2:] == self.key[2:]
        self._spare = (self.ternary, self.dequantized) if refill else (None, None)
        self.ternary = self.gamma = self.int8 = self.dequantized = self.reference = None
        self.key = key

    def ternary_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:  # float32 W_t (out, in), 0-dim gamma
        """Same values as `_ternary_weight(weight)` (same ops on the same data), without new weight-sized tensors."""
        self._sync(weight)
        if self.ternary is None:
            w32 = weight.detach().float()
            buf = self._spare[0] if self._spare[0] is not None else torch.empty_like(w32)
            gamma = torch.abs(w32, out=buf).mean().clamp(min=WEIGHT_EPS)  # = weight_scale(w32), bit for bit
            self.ternary, self.gamma = torch.div(w32, gamma, out=buf).round_().clamp_(-1, 1), gamma
            self._spare = (None, self._spare[1])
        return self.ternary, self.gamma

    def int8_weight(self, weight: Tensor) -> Tensor:
        w_t, _ = self.ternary_weight(weight)
        if self.int8 is None:
            self.int8 = pack_int8_weight(w_t.to(torch.int8))
        return self.int8

    def dequantized_weight(self, weight: Tensor) -> Tensor:  # float32 W_t * gamma, (out, in)
        w_t, gamma = self.ternary_weight(weight)
        if self.dequantized is None:
            buf = self._spare[1] if self._spare[1] is not None else torch.empty_like(w_t)
            self.dequantized = torch.mul(w_t, gamma, out=buf)
            self._spare = (self._spare[0], None)
        return self.dequantized

    def reference_weight(self, weight: Tensor) -> Tensor:  # fake-quantized weight in weight.dtype, no graph
        self._sync(weight)
        if self.reference is None:
            self.reference = dequantized_weights(weight.detach().float()).to(weight.dtype)
        return self.reference


class _BitLinearFunction(torch.autograd.Function):
    """RMSNorm -> int8 activations -> ternary linear as one autograd node (float32).

    Forward: the quantized operands are bit-identical to the reference (`nn.RMSNorm`, `quantize_activations`,
    `quantize_weights`) and their product is exact (int8 GEMM on CPU when available); the output matches the
    composition of fake quantizers and `F.linear` to float32 rounding (~1e-7 relative). Backward: the STE gradient
    in closed form, a plain linear backward at the dequantized operands followed by the RMSNorm backward, so no
    per-op autograd graph is built; the backward recycles the dequantized-input buffer.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,  # (..., C_in)
        norm_weight: Tensor | None,  # (C_in,)
        weight: Tensor,  # (C_out, C_in)
        bias: Tensor | None,  # (C_out,)
        eps: float,
        q_max: int,
        cache: _QuantizedWeightCache | None = None,
    ) -> Tensor:  # (..., C_out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, C_in)
        if cache is None:
            out, codes, scale, w_t, gamma, rstd = _bitlinear_forward(x2, norm_weight, weight, bias, eps, q_max)
            w_deq = w_t.mul_(gamma)  # dequantized in place
        else:
            codes, scale, rstd = activation_codes(x2, norm_weight, eps, q_max)
            w_t, gamma = cache.ternary_weight(weight)
            packed = cache.int8_weight(weight) if use_int8_gemm(x2.device, x2.shape[0]) else None
            out = ternary_matmul(codes, w_t, scale * gamma, bias, packed)
            w_deq = cache.dequantized_weight(weight)  # shared by every call until the weight changes
        # x itself, not the view x2, and the weight: autograd then reports in-place edits of either before backward
        ctx.save_for_backward(x, norm_weight, weight)
        # Intermediates live on ctx (not save_for_backward) so the backward may recycle x_deq's buffer.
        ctx.x_deq, ctx.rstd, ctx.w_deq = codes.mul_(scale), rstd, w_deq
        ctx.eps, ctx.q_max, ctx.has_bias, ctx.x_shape = eps, q_max, bias is not None, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, norm_weight, _ = ctx.saved_tensors  # unpacking checks that no input was modified in place
        x2 = x.reshape(-1, x.shape[-1])  # (N, C_in)
        x_deq, rstd, w_deq = ctx.x_deq, ctx.rstd, ctx.w_deq
        if x_deq is None:  # a second backward (retain_graph=True): the first one recycled the buffer
            codes, scale, rstd = activation_codes(x2, norm_weight, ctx.eps, ctx.q_max)
            x_deq = codes.mul_(scale)
        need_x, need_norm, need_w, need_b = ctx.needs_input_grad[:4]
        go = grad_out.reshape(-1, grad_out.shape[-1])  # (N, C_out)
        grad_x = grad_norm = grad_w = grad_b = None
        if need_w:
            grad_w = go.t().mm(x_deq)  # STE: the gradient at W_deq reaches the master weight unchanged
        if need_b and ctx.has_bias:
            grad_b = go.sum(0)
        if need_x or need_norm:
            grad_y = go.mm(w_deq)  # (N, C_in); STE: passes the activation quantizer unchanged
            if norm_weight is None:
                grad_x = grad_y
            else:
                # y = x * r * g with r = (mean(x^2) + eps)^-1/2:
                # dx = r * g * dy - x * r^3 / C * sum(dy * g * x);  dg = sum_tokens(dy * x * r)
                ctx.x_deq = None
                dy_x = torch.mul(grad_y, x2, out=x_deq)  # (N, C_in), recycles x_deq (no longer needed)
                if need_norm:
                    grad_norm = rstd.view(1, -1).mm(dy_x).view(-1)
                if need_x:
                    coeff = dy_x.mv(norm_weight).unsqueeze(-1)  # (N, 1)
                    coeff.mul_(rstd.pow(3)).div_(-x2.shape[-1])
                    grad_x = grad_y.mul_(norm_weight).mul_(rstd).addcmul_(x2, coeff)
            if grad_x is not None:
                grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_norm, grad_w, grad_b, None, None, None


def _compiling() -> bool:
    """Inside torch.compile tracing the Python-side weight cache is bypassed (it is state the tracer cannot follow)."""
    return torch.compiler.is_compiling()


def _cacheable(weight: Tensor) -> bool:
    """The weight cache needs real storage (its key is the storage pointer) and eager execution."""
    return not _compiling() and weight.device.type != "meta"


def check_width(x: Tensor, in_features: int, name: str) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        got = x.shape[-1] if x.dim() else "a scalar"
        raise ValueError(f"{name} expects inputs with last dim {in_features}, got {got}")


class BitLinear(nn.Linear):
    """Drop-in `nn.Linear` with BitNet b1.58 quantization (SubLN RMSNorm inside, before activation quantization).

    `quantize=False` keeps the same parameters and norm but skips quantization: the full-precision twin used
    for ablations and benchmarks. `fused=True` (default) runs float32 inputs outside autocast through one fused
    autograd node (`_BitLinearFunction`: same quantized operands, exact integer matmul, closed-form STE backward,
    int8 GEMM on CPU); other dtypes, autocast and `fused=False` use the reference composition of
    `fake_quantize_activations`, `fake_quantize_weights` and `F.linear` (equal to float32 rounding).
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
        fused: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_bits(activation_bits)
        self.norm = nn.RMSNorm(in_features, eps=1e-6, device=device, dtype=dtype) if input_norm else None
        self.quantize = quantize
        self.activation_bits = activation_bits
        self.fused = fused
        self._weight_cache: _QuantizedWeightCache | None = None  # quantized weight; never saved or moved

    def train(self, mode: bool = True) -> BitLinear:
        self._weight_cache = None  # switching modes frees the cached copies (eval ones can be large after packing)
        return super().train(mode)

    def clear_weight_cache(self) -> None:
        """Drop the cached quantized weight (needed only after editing the weight through `.data`)."""
        self._weight_cache = None

    def __getstate__(self) -> dict[str, Any]:
        # The cache never travels (the opaque oneDNN weight cannot be copied or pickled); it rebuilds on first use.
        state = dict(super().__getstate__())
        state["_weight_cache"] = None
        return state

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._weight_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def _cache(self) -> _QuantizedWeightCache:
        if self._weight_cache is None:
            self._weight_cache = _QuantizedWeightCache()
        return self._weight_cache

    def _quantized_weight(self) -> Tensor:
        """Fake-quantized weight for the reference path; cached in eval mode when no gradient reaches the weight."""
        if self.training or (torch.is_grad_enabled() and self.weight.requires_grad) or not _cacheable(self.weight):
            return fake_quantize_weights(self.weight)
        # Same value as fake_quantize_weights (its straight-through term adds w - w = 0), without the graph.
        return self._cache().reference_weight(self.weight)

    def _can_fuse(self, x: Tensor) -> bool:
        """The fused node covers float32 everywhere, outside autocast, with an affine norm (or none)."""
        f32 = torch.float32
        norm_ok = self.norm is None or (self.norm.weight is not None and self.norm.weight.dtype == f32)
        return (
            self.fused
            and norm_ok
            and x.dtype == f32
            and self.weight.dtype == f32
            and (self.bias is None or self.bias.dtype == f32)
            and not torch.is_autocast_enabled(x.device.type)
            and x.shape[-1] > 0
        )

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        check_width(x, self.in_features, "BitLinear")
        if not self.quantize:
            if self.norm is not None:
                x = self.norm(x)
            return F.linear(x, self.weight, self.bias)
        if self._can_fuse(x):
            norm_weight = self.norm.weight if self.norm is not None else None
            # nn.RMSNorm's eps=None means the dtype's machine epsilon (unused without a norm)
            eps = self.norm.eps if self.norm is not None and self.norm.eps is not None else torch.finfo(x.dtype).eps
            q_max = 2 ** (self.activation_bits - 1) - 1
            params = (self.weight, self.bias, norm_weight)
            cache = self._cache() if _cacheable(self.weight) else None  # quantized once per weight update
            if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
                return _BitLinearFunction.apply(x, norm_weight, self.weight, self.bias, eps, q_max, cache)
            with torch.no_grad():  # inference: no dequantized copies for a backward
                x2 = x.reshape(-1, x.shape[-1])  # (N, C_in)
                if cache is None:
                    out = _bitlinear_forward(x2, norm_weight, self.weight, self.bias, eps, q_max)[0]
                else:  # eval and no-grad calls: decoding calls every layer once per token
                    codes, scale, _ = activation_codes(x2, norm_weight, eps, q_max)
                    w_t, gamma = cache.ternary_weight(self.weight)
                    packed = cache.int8_weight(self.weight) if use_int8_gemm(x2.device, x2.shape[0]) else None
                    out = ternary_matmul(codes, w_t, scale * gamma, self.bias, packed)
            return out.view(*x.shape[:-1], self.out_features)
        if self.norm is not None:
            if self.norm.weight is not None and x.dtype != self.norm.weight.dtype:
                # Autocast hands bfloat16 activations to float32 norm weights: normalize in float32 (the
                # quantizer rounds in float32 anyway), F.linear then runs in the autocast dtype.
                x = F.rms_norm(x.float(), (self.in_features,), self.norm.weight.float(), self.norm.eps)
            else:
                x = self.norm(x)
        return F.linear(fake_quantize_activations(x, self.activation_bits), self._quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, input_norm={self.norm is not None}, quantize={self.quantize}, "
            f"activation_bits={self.activation_bits}"
        )

"""Inference from packed weights: PackedBitLinear (2-bit bytes, packed CPU kernel or exact pure torch), pack_model
(swap every quantized BitLinear), quantization_stats."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitmar.bitnet.int8_gemm import (
    onednn_int8_gemm,
    pack_int8_weight,
    scale_and_bias,
    ternary_matmul,
    use_int8_gemm,
)
from bitmar.bitnet.layer import BitLinear, activation_codes, check_width, quantize_rows_
from bitmar.bitnet.packing import pack_ternary, unpack_ternary
from bitmar.bitnet.quant import check_bits, quantize_weights
from bitmar.kernels.packed_cpu import packed_ternary_linear, packed_unpack_int8, use_packed_kernel


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear holding the ternary weight at 2 bits per weight.

    State: `packed_weight` (uint8, ceil(out*in/4) bytes), `weight_scale` (0-dim float32 gamma), `norm.weight`
    (RMSNorm gain) and `bias`. The forward quantizes activations to int8 like BitLinear (`quantize_activations`)
    and computes (x_int @ W_t^T) * (s * gamma) + bias with an exact integer product, exactly like BitLinear's fused
    forward: the outputs of a float32 BitLinear in eval mode are reproduced bit for bit.

    On CPU the product runs in the packed kernel (`bitmar.kernels.packed_cpu.packed_ternary_linear`) straight from
    the 2-bit bytes: no float or int8 copy of the weight exists, resident memory is the packed bytes plus the scale.
    Exception: calls of at least `INT8_GEMM_MIN_ROWS` rows (evaluation batches, not decoding) on a CPU where
    oneDNN's int8 GEMM was measured faster take that GEMM, with an int8 copy prepacked from the bytes at the first
    such call and kept (1 byte per weight; `cache_weights=False` keeps none and runs the kernel instead).
    Where that kernel is not used (not built, switched off with BITMAR_PACKED_KERNEL=off, other devices, inside
    torch.compile) the pure-torch path unpacks the weight: `cache_weights=None` (default) or True keeps the unpacked
    ternary matrix (and its prepacked int8 copy) after the first call outside the state dict (a non-persistent
    buffer): faster, but 5 bytes per weight while cached; `cache_weights=False` unpacks on every call.

    Inputs of any float dtype are computed in float32 and returned in the input dtype. A BitLinear with
    quantize=False cannot be packed (`from_bitlinear` raises; `pack_model` leaves it as it is).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        input_norm: bool = True,
        activation_bits: int = 8,
        cache_weights: bool | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_bits = activation_bits
        self.q_max = check_bits(activation_bits)
        self.cache_weights = cache_weights
        n_bytes = -(-in_features * out_features // 4)
        self.register_buffer("packed_weight", torch.full((n_bytes,), 0b01010101, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.norm = nn.RMSNorm(in_features, eps=1e-6, device=device) if input_norm else None
        if self.norm is not None:
            self.norm.requires_grad_(False)  # inference only
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("_weight_cache", None, persistent=False)
        self._int8_cache: Tensor | None = None  # opaque oneDNN weight: a plain attribute, never moved or saved
        self._cache_key: tuple[Any, ...] | None = None
        # With the packed kernel: oneDNN's prepacked int8 weight for large batches only (_kernel_int8_weight)
        self._int8_only: Tensor | None = None
        self._int8_only_key: tuple[Any, ...] | None = None

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, cache_weights: bool | None = None) -> PackedBitLinear:
        """Pack a trained BitLinear (quantize=True); float32 eval outputs are reproduced bit for bit."""
        if not isinstance(layer, BitLinear):
            raise TypeError(f"from_bitlinear expects a BitLinear, got {type(layer).__name__}")
        if not layer.quantize:
            raise ValueError(
                "cannot pack a BitLinear with quantize=False: its weights are full precision and ternary packing would "
                "change its outputs; keep it as BitLinear (pack_model leaves such layers unchanged)"
            )
        device = layer.weight.device
        packed = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            input_norm=layer.norm is not None,
            activation_bits=layer.activation_bits,
            cache_weights=cache_weights,
            device=device,
        )
        w_ternary, scale = quantize_weights(layer.weight)
        with torch.no_grad():
            packed.packed_weight.copy_(pack_ternary(w_ternary))
            packed.weight_scale.copy_(scale)
            if layer.norm is not None:
                packed.norm = nn.RMSNorm(
                    layer.in_features,
                    eps=layer.norm.eps,
                    elementwise_affine=layer.norm.weight is not None,
                    device=device,
                )
                packed.norm.load_state_dict(layer.norm.state_dict())
                packed.norm.requires_grad_(False)
            if layer.bias is not None:
                packed.bias = layer.bias.detach().float().clone()
        return packed

    def ternary_weight(self) -> Tensor:  # (out, in) int8
        return unpack_ternary(self.packed_weight, (self.out_features, self.in_features))

    def _matmul_weights(self, device: torch.device, rows: int) -> tuple[Tensor, Tensor | None]:
        """Float ternary matrix (out, in) and, when a CPU int8 GEMM pays off for `rows`, its prepacked int8 copy
        (both cached if asked; the int8 copy is built on the first call that uses it)."""
        use_int8 = use_int8_gemm(device, rows)
        key = (self.packed_weight.data_ptr(), self.packed_weight._version, device)
        if not (self.cache_weights is not False and self._weight_cache is not None and self._cache_key == key):
            w = self.ternary_weight().to(device).float()
            if self.cache_weights is False:
                return w, pack_int8_weight(w.to(torch.int8)) if use_int8 else None
            self._weight_cache, self._int8_cache, self._cache_key = w, None, key  # cache_weights None or True
        if use_int8 and self._int8_cache is None:
            self._int8_cache = pack_int8_weight(self._weight_cache.to(torch.int8))
        return self._weight_cache, self._int8_cache if use_int8 else None

    def _kernel_int8_weight(self) -> Tensor:  # prepacked oneDNN int8 weight, from the packed bytes (no float copy)
        key = (self.packed_weight.data_ptr(), self.packed_weight._version)
        if self._int8_only is None or self._int8_only_key != key:
            w = packed_unpack_int8(self.packed_weight, self.out_features, self.in_features)  # (out, in) int8
            self._int8_only, self._int8_only_key = pack_int8_weight(w), key
        return self._int8_only

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._weight_cache, self._int8_cache, self._cache_key = None, None, None
        self._int8_only, self._int8_only_key = None, None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Caches never travel: the opaque oneDNN weight cannot be copied or pickled, and both rebuild on first use.
        state = dict(super().__getstate__())
        state["_buffers"] = {**state["_buffers"], "_weight_cache": None}
        state["_int8_cache"], state["_cache_key"] = None, None
        state["_int8_only"], state["_int8_only_key"] = None, None
        return state

    def _codes(self, x32: Tensor) -> tuple[Tensor, Tensor]:  # (N, in) float32 -> codes (N, in), scale (N, 1)
        if self.norm is None:
            return quantize_rows_(x32.clone(), self.q_max)  # (N, in) integer-valued, (N, 1)
        if self.norm.weight is not None and self.norm.weight.dtype == torch.float32:
            # BitLinear's norm kernel: bit-identical to nn.RMSNorm on CPU with fewer temporaries (faster)
            eps = self.norm.eps if self.norm.eps is not None else torch.finfo(torch.float32).eps
            return activation_codes(x32, self.norm.weight, eps, self.q_max)[:2]
        return quantize_rows_(self.norm(x32), self.q_max)

    def _kernel_forward(self, x32: Tensor) -> Tensor:  # (N, in) float32 -> (N, out) float32
        """The packed kernel: it quantizes y like quantize_rows_ and multiplies from the packed bytes (same bits).

        Decoding calls every layer once per token, so this path keeps Python work low (one dict lookup per tensor)."""
        buffers, norm = self._buffers, self.norm
        if norm is None:
            y = x32
        elif norm.weight is not None and norm.weight.dtype == torch.float32:
            # One fused op: the same bits as rms_norm_with_rstd on CPU, which BitLinear eval uses
            # (tests/test_packed_kernel.py compares them on odd widths).
            eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
            y = F.rms_norm(x32, (self.in_features,), norm.weight, eps)
        else:
            y = norm(x32)
        bias, gamma = buffers["bias"], buffers["weight_scale"]
        bias = bias if bias is None or bias.dtype == torch.float32 else bias.float()
        gamma = gamma if gamma.dtype == torch.float32 else gamma.float()
        return packed_ternary_linear(y, buffers["packed_weight"], self.out_features, gamma, bias, self.q_max)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        check_width(x, self.in_features, "PackedBitLinear")
        # Norm and scales in float32 whatever the input dtype (the buffers are float32).
        x32 = x.reshape(-1, self.in_features).float()  # (N, in)
        kernel = use_packed_kernel(x32.device)
        if kernel and not (self.cache_weights is not False and use_int8_gemm(x32.device, x32.shape[0])):
            if torch.is_grad_enabled():  # inference only: no graph through the norm
                with torch.no_grad():
                    out = self._kernel_forward(x32)
            else:
                out = self._kernel_forward(x32)  # (N, out)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        with torch.no_grad():
            if kernel:
                # Large batches (evaluation) where oneDNN's int8 GEMM was measured faster (AMX / VNNI: ~3x the
                # packed kernel at 512 rows here): its prepacked int8 weight, built from the packed bytes at the
                # first such call and kept (prepacking costs more than the product: ~40 ms for 768 x 2048).
                codes, scale = self._codes(x32)
                acc = onednn_int8_gemm(codes.to(torch.int8), self._kernel_int8_weight(), self.out_features)
                out = scale_and_bias(acc, scale * self.weight_scale, self.bias)  # = ternary_matmul's int8 route
                return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
            codes, scale = self._codes(x32)
            w, w_int8 = self._matmul_weights(x.device, x32.shape[0])
            out = ternary_matmul(codes, w, scale * self.weight_scale, self.bias, w_int8)  # (N, out)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_norm={self.norm is not None}, activation_bits={self.activation_bits}, bits_per_weight=2"
        )


def pack_model(model: nn.Module, cache_weights: bool | None = None) -> nn.Module:
    """Replace every BitLinear with quantize=True by a PackedBitLinear, in place, for inference.

    On CPU the packed layers compute from their 2-bit bytes with the packed kernel; `cache_weights` applies only
    where the pure-torch path runs instead (see PackedBitLinear).

    BitLinear layers with quantize=False stay as they are (their weights are full precision). A layer shared by
    several parents is packed once and stays shared. Returns `model` (or the packed layer when `model` itself
    is a BitLinear).
    """
    if isinstance(model, BitLinear):
        return PackedBitLinear.from_bitlinear(model, cache_weights) if model.quantize else model
    packed: dict[int, PackedBitLinear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear) and child.quantize:
                if id(child) not in packed:
                    packed[id(child)] = PackedBitLinear.from_bitlinear(child, cache_weights)
                setattr(parent, name, packed[id(child)])
    return model


@torch.no_grad()
def quantization_stats(model: nn.Module) -> dict[str, Any]:
    """Ternary statistics of every quantized layer (BitLinear with quantize=True, PackedBitLinear).

    Returns {"layers": {dotted name: {"scale" (gamma), "zero_fraction", "num_neg", "num_zero", "num_pos", "numel",
    "packed"}}, "ternary_params", "total_params", "ternary_fraction", "float32_bytes", "packed_bytes",
    "compression_ratio"}. total_params counts parameters plus packed weights (buffers after `pack_model`);
    compression_ratio = float32 bytes of the ternary weights / their 2-bit packed bytes (1.0 without ternary layers).
    """
    layers: dict[str, dict[str, Any]] = {}
    ternary_params = packed_bytes = packed_only_params = 0
    for name, module in model.named_modules():
        if isinstance(module, BitLinear) and module.quantize:
            w_ternary, scale = quantize_weights(module.weight)
            is_packed = False
        elif isinstance(module, PackedBitLinear):
            w_ternary, scale = module.ternary_weight(), module.weight_scale
            is_packed = True
            packed_only_params += w_ternary.numel()
        else:
            continue
        counts = torch.bincount((w_ternary.reshape(-1) + 1).to(torch.int64), minlength=3).tolist()
        numel = w_ternary.numel()
        layers[name] = {
            "scale": float(scale),
            "zero_fraction": counts[1] / numel if numel else 0.0,
            "num_neg": counts[0],
            "num_zero": counts[1],
            "num_pos": counts[2],
            "numel": numel,
            "packed": is_packed,
        }
        ternary_params += numel
        packed_bytes += -(-numel // 4)
    total_params = sum(p.numel() for p in model.parameters()) + packed_only_params
    return {
        "layers": layers,
        "ternary_params": ternary_params,
        "total_params": total_params,
        "ternary_fraction": ternary_params / total_params if total_params else 0.0,
        "float32_bytes": 4 * ternary_params,
        "packed_bytes": packed_bytes,
        "compression_ratio": 4 * ternary_params / packed_bytes if packed_bytes else 1.0,
    }

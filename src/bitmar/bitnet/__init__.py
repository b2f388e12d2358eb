"""BitNet b1.58: ternary weights, 8-bit activations, straight-through training, packed storage.

Reference definition (Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"):
- weights, one scale per matrix: gamma = max(mean|W|, 1e-5); W_t = clamp(round(W / gamma), -1, 1)
- activations, one scale per token: s = max(max|x|, 1e-5) / 127; x_q = clamp(round(x / s), -128, 127)
- straight-through estimator: the forward uses the dequantized values, gradients reach the full-precision
  master weights and inputs unchanged.

Storage: ternary values pack at 2 bits per weight (`pack_ternary`, 4 per byte) or 1.6 bits per weight
(`pack_ternary_base3`, 5 trits per byte since 3^5 = 243 <= 256). `PackedBitLinear` keeps only the packed
bytes and runs inference with int8 activations; `pack_model` swaps every quantized BitLinear for one. On CPU its
product runs in a compiled kernel straight from the packed bytes (`bitmar.kernels.packed_cpu`: AVX-512 VNNI / AVX2,
exact, built at first use), falling back to its pure-torch path (`packed`) where the kernel cannot be built.

On CPU the ternary matmuls of both BitLinear and PackedBitLinear run as exact int8 GEMMs (oneDNN) when the
torch build has them (`int8_gemm_available()`), a short measurement at first use found them faster than float
GEMMs on this machine (`probe_int8_gemm`, `int8_gemm_decision`; `BITMAR_INT8_GEMM` / `set_int8_gemm` force a route)
and the input has enough rows to amortise oneDNN's fixed cost (`INT8_GEMM_MIN_ROWS`); float32 GEMMs of the integer
codes give the same bits elsewhere. A float32 BitLinear keeps its quantized weight between calls until the weight
changes (its version counter) or the mode switches, so KV-cache decoding does not re-quantize every matrix for every
token, and a training step that calls a layer several times quantizes it once (into reused buffers). The cache
costs 4 bytes per weight (8 in training, plus the int8 copy).

Modules: `quant` (the reference quantizers), `int8_gemm` (the exact ternary matmul and its CPU route), `layer`
(BitLinear), `packing` (2-bit and base-3 bytes), `packed` (PackedBitLinear, pack_model, quantization_stats).
"""

from __future__ import annotations

from bitmar.bitnet.int8_gemm import (
    INT8_GEMM_ENV,
    INT8_GEMM_MIN_ROWS,
    INT8_GEMM_MODES,
    PROBE_BUDGET_S,
    PROBE_CALL_CAP_S,
    PROBE_GUARD_FLOOR_S,
    PROBE_GUARD_RATIO,
    PROBE_GUARD_SHAPE,
    PROBE_REPEATS,
    PROBE_SHAPE,
    GemmRoute,
    describe_int8_gemm,
    int8_gemm_available,
    int8_gemm_decision,
    int8_gemm_mode,
    probe_int8_gemm,
    set_int8_gemm,
)
from bitmar.bitnet.layer import BitLinear
from bitmar.bitnet.packed import PackedBitLinear, pack_model, quantization_stats
from bitmar.bitnet.packing import (
    pack_ternary,
    pack_ternary_base3,
    packed_bits_per_weight,
    unpack_ternary,
    unpack_ternary_base3,
)
from bitmar.bitnet.quant import (
    ACTIVATION_EPS,
    WEIGHT_EPS,
    fake_quantize_activations,
    fake_quantize_weights,
    quantize_activations,
    quantize_weights,
)

__all__ = [
    "ACTIVATION_EPS",
    "INT8_GEMM_ENV",
    "INT8_GEMM_MIN_ROWS",
    "INT8_GEMM_MODES",
    "PROBE_BUDGET_S",
    "PROBE_CALL_CAP_S",
    "PROBE_GUARD_FLOOR_S",
    "PROBE_GUARD_RATIO",
    "PROBE_GUARD_SHAPE",
    "PROBE_REPEATS",
    "PROBE_SHAPE",
    "WEIGHT_EPS",
    "BitLinear",
    "GemmRoute",
    "PackedBitLinear",
    "describe_int8_gemm",
    "fake_quantize_activations",
    "fake_quantize_weights",
    "int8_gemm_available",
    "int8_gemm_decision",
    "int8_gemm_mode",
    "pack_model",
    "pack_ternary",
    "pack_ternary_base3",
    "packed_bits_per_weight",
    "probe_int8_gemm",
    "quantization_stats",
    "quantize_activations",
    "quantize_weights",
    "set_int8_gemm",
    "unpack_ternary",
    "unpack_ternary_base3",
]

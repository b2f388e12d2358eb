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
exact, built at first use), falling back to the pure-torch path below where the kernel cannot be built.

On CPU the ternary matmuls of both BitLinear and PackedBitLinear run as exact int8 GEMMs (oneDNN) when the
torch build has them (`int8_gemm_available()`), a short measurement at first use found them faster than float
GEMMs on this machine (`probe_int8_gemm`, `int8_gemm_decision`; `BITMAR_INT8_GEMM` / `set_int8_gemm` force a route)
and the input has enough rows to amortise oneDNN's fixed cost (`INT8_GEMM_MIN_ROWS`); float32 GEMMs of the integer
codes give the same bits elsewhere. A float32 BitLinear keeps its quantized weight between calls until the weight
changes (its version counter) or the mode switches, so KV-cache decoding does not re-quantize every matrix for every
token, and a training step that calls a layer several times quantizes it once (into reused buffers). The cache
costs 4 bytes per weight (8 in training, plus the int8 copy).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bitmar.kernels.packed_cpu import packed_ternary_linear, packed_unpack_int8, use_packed_kernel

WEIGHT_EPS = 1e-5
ACTIVATION_EPS = 1e-5

# ---------------------------------------------------------------------------------------------------------------
# Quantizers (reference formulas)
# ---------------------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in [2, 8] to fit int8, got {bits}")
    return 2 ** (bits - 1) - 1


# Up to this many rows |x| is materialised for the absmax (2 ops, the fewest dispatches for decoding); above it
# amax and amin avoid the (N, C) temporary (same value, bit for bit).
_SMALL_ROWS = 64


def _absmax_scale(x32: Tensor, q_max: int) -> Tensor:  # (..., C) -> (..., 1)
    """Per-token scale max(max|x|, eps) / q_max."""
    if x32.numel() <= _SMALL_ROWS * x32.shape[-1]:
        absmax = x32.abs().amax(dim=-1, keepdim=True)
    else:
        absmax = torch.maximum(x32.amax(dim=-1, keepdim=True), x32.amin(dim=-1, keepdim=True).neg_())
    # The eps floor keeps an all-zero row at scale 1e-5/127 instead of 0 (0/0 wrote NaN into earlier models).
    return absmax.clamp_(min=ACTIVATION_EPS).div_(q_max)


def _weight_scale(w32: Tensor) -> Tensor:  # 0-dim
    return w32.abs().mean().clamp(min=WEIGHT_EPS)


def quantize_weights(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization: returns (int8 tensor in {-1, 0, 1}, 0-dim float32 scale), w ~ w_t * scale."""
    w32 = w.detach().float()
    scale = _weight_scale(w32)
    w_ternary = (w32 / scale).round_().clamp_(-1, 1).to(torch.int8)
    return w_ternary, scale


def quantize_activations(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Absmax per-token quantization over the last dim.

    Returns (int8 values, float32 scale of shape x.shape[:-1] + (1,)), x ~ x_int * scale.
    """
    q_max = _check_bits(bits)
    x32 = x.detach().float()
    scale = _absmax_scale(x32, q_max)
    x_int = (x32 / scale).round_().clamp_(-q_max - 1, q_max).to(torch.int8)
    return x_int, scale


def _straight_through(x: Tensor, x_deq: Tensor) -> Tensor:
    """Value x_deq exactly (x - x is 0 for finite x), gradient identity to x: the STE in every autograd mode."""
    return x_deq + (x - x.detach())


def _dequantized_weights(w32: Tensor) -> Tensor:  # float32, same shape
    scale = _weight_scale(w32)
    return (w32 / scale).round_().clamp_(-1, 1).mul_(scale)


def fake_quantize_weights(w: Tensor) -> Tensor:
    """Dequantized ternary weights in w's dtype, with straight-through gradients to w.

    The scale and the rounding are computed in float32 (like `quantize_weights`) whatever w's dtype.
    """
    w_deq = _dequantized_weights(w.detach().float()).to(w.dtype)
    return _straight_through(w, w_deq)


def fake_quantize_activations(x: Tensor, bits: int = 8) -> Tensor:
    """Dequantized int8 activations in x's dtype, with straight-through gradients to x.

    Rounding happens in float32: bfloat16 cannot represent x / s precisely enough to round like the reference.
    """
    q_max = _check_bits(bits)
    x32 = x.detach().float()
    scale = _absmax_scale(x32, q_max)
    # |x / s| <= q_max by construction of s, so the reference clamp to [-q_max - 1, q_max] never changes a value.
    x_deq = (x32 / scale).round_().mul_(scale)
    return _straight_through(x, x_deq.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Ternary matmul (shared by BitLinear and PackedBitLinear) and the fused float32 BitLinear
# ---------------------------------------------------------------------------------------------------------------

# Below this many rows oneDNN's per-call cost (primitive set-up, weight reorder) outweighs its faster inner loop:
# measured on a 2-core AVX2 EPYC, float32 BLAS wins up to ~128 rows (3x at 16 rows for 768 x 4096), int8 wins 1.5-2x
# from 256 rows on. Decoding (1 row per sequence) and the memory projections (N episodes) take the float route.
INT8_GEMM_MIN_ROWS = 256
INT8_GEMM_ENV = "BITMAR_INT8_GEMM"  # auto (default: measured) | on | off
INT8_GEMM_MODES = ("auto", "on", "off")

# The measured choice (mode "auto"). oneDNN's int8 GEMM is exact everywhere but not fast everywhere: on AVX-512 (VNNI)
# AMD EPYCs it falls back to a reference kernel 130-430x slower than float32 BLAS (~12M multiply-adds/s). So at first
# use, once per process, both routes are timed on this machine:
# 1. a guard GEMM small enough that even such a kernel needs only ~45 ms (16 x 256 -> 128): int8's fastest call more
#    than PROBE_GUARD_RATIO x float's (and above PROBE_GUARD_FLOOR_S) is pathological -> float at once;
# 2. the int8 time of the representative GEMM, projected from the guard by multiply-adds, above PROBE_CALL_CAP_S
#    -> float (so no single timed call can take long);
# 3. the representative GEMM (512 x 768 -> 768: twice INT8_GEMM_MIN_ROWS, a 768-wide layer), the routes alternating,
#    one warm-up pair then up to PROBE_REPEATS pairs within PROBE_BUDGET_S: int8 only when its median is lower.
# About 0.1 s on a normal machine, ~0.1 s when the int8 kernel is pathological, under ~1 s in any case.
PROBE_GUARD_SHAPE = (16, 256, 128)  # rows, in, out
PROBE_SHAPE = (512, 768, 768)
PROBE_GUARD_RATIO = 30.0
PROBE_GUARD_FLOOR_S = 5e-4
PROBE_CALL_CAP_S = 0.5
PROBE_BUDGET_S = 0.3
PROBE_REPEATS = 5

_INT8_GEMM: dict[str, Any] = {
    "mode": None,  # set by set_int8_gemm; None: the BITMAR_INT8_GEMM environment variable (default auto)
    "min_rows": INT8_GEMM_MIN_ROWS,
    "checked": False,  # capability: oneDNN int8 linear present and exact (checked once)
    "available": False,
    "reason": "not checked yet",
    "use": None,  # the route decision (bool) for the current mode; None until first needed
    "decision": None,  # its description (int8_gemm_decision)
    "probe": None,  # the measurement (probe_int8_gemm), made once per process
}

# A route for the probe: given the ternary weight (out, in) float32, return the function computing codes @ W^T.
GemmRoute = Callable[[Tensor], Callable[[Tensor], Tensor]]


def _onednn_int8_gemm(q_int8: Tensor, w_packed: Tensor, out_features: int) -> Tensor:  # (N, in) -> (N, out) float32
    ones = torch.ones(out_features)
    zeros = torch.zeros(out_features, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        q_int8, 1.0, 0, w_packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def int8_gemm_available() -> bool:
    """Whether this torch build has an exact oneDNN int8 GEMM for ternary matmuls (checked once with a self-test).

    Integer products of int8 activations and ternary weights are exact in both int32 (oneDNN) and float32 (BLAS)
    accumulation, so the route changes speed only, never a value. Available is not fast: which route runs is
    `int8_gemm_decision()` (measured, or forced by `set_int8_gemm` / BITMAR_INT8_GEMM).
    """
    state = _INT8_GEMM
    if not state["checked"]:
        state["checked"] = True
        onednn = getattr(torch.ops, "onednn", None)
        if not torch.backends.mkldnn.is_available() or not hasattr(onednn, "qlinear_pointwise"):
            state["reason"] = "this torch build has no oneDNN int8 linear"
        else:
            gen = torch.Generator().manual_seed(0)
            q = torch.randint(-128, 128, (37, 70), generator=gen, dtype=torch.int8)
            w = torch.randint(-1, 2, (19, 70), generator=gen, dtype=torch.int8)
            try:  # a capability probe: any failure means "use float GEMMs", never a wrong result
                out = _onednn_int8_gemm(q, torch.ops.onednn.qlinear_prepack(w, None), 19)
                exact = torch.equal(out, q.float() @ w.float().t())
                state["available"] = exact
                state["reason"] = "ok" if exact else "oneDNN int8 linear is not exact on this machine"
            except (RuntimeError, NotImplementedError) as err:
                state["reason"] = f"oneDNN int8 linear failed: {str(err).splitlines()[0][:200]}"
    return bool(state["available"])


def _parse_mode(value: bool | str | None, what: str) -> str | None:
    if value is None or isinstance(value, bool):
        return None if value is None else ("auto" if value else "off")
    mode = str(value).strip().lower()
    if mode not in INT8_GEMM_MODES:
        raise ValueError(
            f"{what}={value!r} is not one of auto, on, off: auto measures both routes on this CPU and takes the faster "
            "(the default), on always takes oneDNN's int8 GEMM, off always float GEMMs (same results either way)"
        )
    return mode


def set_int8_gemm(enabled: bool | str | None, min_rows: int | None = None) -> None:
    """Choose the route of ternary matmuls on CPU: True or "auto" (default: measured, `probe_int8_gemm`), "on"
    (oneDNN's int8 GEMM wherever it is available, even if slow), False or "off" (float GEMMs), None (follow the
    BITMAR_INT8_GEMM environment variable again). Overrides the environment variable; results are the same bits.

    `min_rows`: smallest number of input rows that takes the int8 route (default `INT8_GEMM_MIN_ROWS`; 1 forces it
    for every call that int8 can take, e.g. to test that both routes agree bit for bit).
    """
    mode = _parse_mode(enabled, "set_int8_gemm")
    if min_rows is not None and min_rows < 1:
        raise ValueError(f"min_rows must be >= 1, got {min_rows}")
    _INT8_GEMM["mode"] = mode
    _INT8_GEMM["use"] = _INT8_GEMM["decision"] = None  # decided again at the next use (the probe is kept)
    if min_rows is not None:
        _INT8_GEMM["min_rows"] = int(min_rows)


@contextlib.contextmanager
def int8_gemm_mode(enabled: bool | str | None, min_rows: int | None = None) -> Iterator[None]:
    """`set_int8_gemm(enabled, min_rows)` inside the block; the previous mode and threshold afterwards."""
    saved = (_INT8_GEMM["mode"], _INT8_GEMM["min_rows"])
    set_int8_gemm(enabled, min_rows)
    try:
        yield
    finally:
        _INT8_GEMM["mode"], _INT8_GEMM["min_rows"] = saved
        _INT8_GEMM["use"] = _INT8_GEMM["decision"] = None


def _int8_route(w_ternary: Tensor) -> Callable[[Tensor], Tensor]:  # the weight is prepacked once, as when cached
    packed = _pack_int8_weight(w_ternary.to(torch.int8))
    return lambda q: _onednn_int8_gemm(q.to(torch.int8), packed, w_ternary.shape[0])


def _float_route(w_ternary: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda q: q.mm(w_ternary.t())


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def _ms_text(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def probe_int8_gemm(
    int8_route: GemmRoute = _int8_route,
    float_route: GemmRoute = _float_route,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Time the int8 and the float route of a ternary matmul on this machine (see the PROBE_* constants).

    Returns {"route": "int8" | "float", "reason", "int8_ms", "float_ms" (medians on PROBE_SHAPE, None when not
    reached), "guard_int8_ms", "guard_float_ms" (fastest guard calls), "shape", "pairs", "seconds", "threads"}.
    The routes and the clock are parameters so that tests can inject timings; the defaults are BitLinear's routes.
    """
    start = clock()
    gen = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {"int8_ms": None, "float_ms": None, "shape": "{}x{}->{}".format(*PROBE_SHAPE)}
    result["threads"] = torch.get_num_threads()

    def operands(rows: int, n_in: int, n_out: int) -> tuple[Tensor, Tensor]:  # codes (rows, in), W_t (out, in)
        q = torch.randint(-127, 128, (rows, n_in), generator=gen).float()
        return q, torch.randint(-1, 2, (n_out, n_in), generator=gen).float()

    def timed(fn: Callable[[Tensor], Tensor], q: Tensor) -> float:
        t0 = clock()
        fn(q)
        return clock() - t0

    def done(route: str, reason: str) -> dict[str, Any]:
        result.update(route=route, reason=reason, seconds=round(clock() - start, 4))
        return result

    with torch.no_grad():
        # 1. Guard: a shape on which even a reference kernel is quick. Background load only adds time, so the
        # question is whether even int8's fastest call is pathological; two such calls in a row end the guard early.
        q, w = operands(*PROBE_GUARD_SHAPE)
        f_fn, i_fn = float_route(w), int8_route(w)
        f_fn(q), i_fn(q)  # warm-up: oneDNN creates its primitive at the first call of a shape
        guard_f: list[float] = []
        guard_i: list[float] = []
        for _ in range(3):
            guard_f.append(timed(f_fn, q))
            guard_i.append(timed(i_fn, q))
            limit = max(PROBE_GUARD_RATIO * min(guard_f), PROBE_GUARD_FLOOR_S)
            if len(guard_i) >= 2 and min(guard_i) > 3 * limit:
                break
        t_f, t_i = min(guard_f), min(guard_i)
        result.update(guard_int8_ms=_ms(t_i), guard_float_ms=_ms(t_f), pairs=0)
        guard_text = "{}x{}->{}".format(*PROBE_GUARD_SHAPE)
        if t_i > limit:
            return done(
                "float",
                f"oneDNN's int8 GEMM is pathologically slow on this CPU ({_ms_text(t_i)} vs float {_ms_text(t_f)} on a "
                f"{guard_text} GEMM, {t_i / max(t_f, 1e-9):.0f}x): float GEMMs",
            )
        # 2. Projection: no timed call of the representative shape may take long.
        macs = math.prod(PROBE_SHAPE) / math.prod(PROBE_GUARD_SHAPE)
        if t_i * macs > PROBE_CALL_CAP_S:
            if t_i < t_f:  # a slow or busy machine, not a slow kernel: the guard's side-by-side comparison decides
                return done(
                    "int8",
                    f"int8 GEMM faster at the guard ({_ms_text(t_i)} vs float {_ms_text(t_f)} on a {guard_text} "
                    f"GEMM); the {result['shape']} shape would take ~{t_i * macs:.1f} s a call here, so it is not "
                    "timed: int8 GEMMs",
                )
            return done(
                "float",
                f"oneDNN's int8 GEMM is slow on this CPU ({_ms_text(t_i)} vs float {_ms_text(t_f)} on a {guard_text} "
                f"GEMM: ~{t_i * macs:.1f} s per {result['shape']} call): float GEMMs",
            )
        # 3. The representative shape, alternating (background load hits both alike); pair 0 is a warm-up.
        q, w = operands(*PROBE_SHAPE)
        f_fn, i_fn = float_route(w), int8_route(w)
        times_f: list[float] = []
        times_i: list[float] = []
        for k in range(PROBE_REPEATS + 1):
            if k % 2:
                times_i.append(timed(i_fn, q))
                times_f.append(timed(f_fn, q))
            else:
                times_f.append(timed(f_fn, q))
                times_i.append(timed(i_fn, q))
            if clock() - start > PROBE_BUDGET_S:
                break
        if len(times_f) > 1:  # drop the warm-up pair when another was measured
            times_f, times_i = times_f[1:], times_i[1:]
    t_f, t_i = statistics.median(times_f), statistics.median(times_i)
    result.update(int8_ms=_ms(t_i), float_ms=_ms(t_f), pairs=len(times_f))
    faster = "int8" if t_i < t_f else "float"
    return done(
        faster,
        f"measured int8 {_ms_text(t_i)} vs float {_ms_text(t_f)} per {result['shape']} GEMM "
        f"({len(times_f)} pair(s), {result['threads']} thread(s)): {faster} GEMMs are faster",
    )


def _resolve_mode() -> tuple[str, str]:
    """(mode, where it came from); a malformed BITMAR_INT8_GEMM raises ValueError with the accepted values."""
    if _INT8_GEMM["mode"] is not None:
        return _INT8_GEMM["mode"], "set_int8_gemm"
    raw = os.environ.get(INT8_GEMM_ENV, "")
    if not raw.strip():
        return "auto", "default"
    return str(_parse_mode(raw, INT8_GEMM_ENV)), INT8_GEMM_ENV


def int8_gemm_decision() -> dict[str, Any]:
    """Which route CPU ternary matmuls take, and why (deciding now if not yet decided: in mode auto the probe runs).

    Returns {"route": "int8" | "float", "reason", "mode", "mode_source" ("default", "BITMAR_INT8_GEMM" or
    "set_int8_gemm"), "int8_available", "int8_status", "min_rows", "probe" (probe_int8_gemm's result or None),
    "onednn_max_cpu_isa" (environment variable or None), "cpu_capability" (torch's)}. Raises ValueError for a
    malformed BITMAR_INT8_GEMM. Inputs with fewer than `min_rows` rows always take the float route.
    """
    state = _INT8_GEMM
    if state["decision"] is None:
        mode, source = _resolve_mode()
        available = int8_gemm_available()
        probe = None
        if mode == "off":
            use, reason = False, f"int8 GEMM switched off ({source})"
        elif not available:
            use, reason = False, f"no int8 GEMM: {state['reason']}"
        elif mode == "on":
            use, reason = True, f"int8 GEMM forced on ({source}), not measured"
        else:
            if state["probe"] is None:
                state["probe"] = probe_int8_gemm()
            probe = state["probe"]
            use, reason = probe["route"] == "int8", probe["reason"]
        capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")
        state["decision"] = {
            "route": "int8" if use else "float",
            "reason": reason,
            "mode": mode,
            "mode_source": source,
            "int8_available": available,
            "int8_status": state["reason"],
            "min_rows": state["min_rows"],
            "probe": dict(probe) if probe is not None else None,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "cpu_capability": capability(),
        }
        state["use"] = use
    return dict(state["decision"])


def describe_int8_gemm() -> str:
    """One line for start-up logs: the route of CPU ternary matmuls, why, and the switches that chose it."""
    d = int8_gemm_decision()
    route = (
        f"int8 GEMM (oneDNN) from {d['min_rows']} rows, float GEMM below"
        if d["route"] == "int8"
        else "float GEMM (BLAS)"
    )
    mode = f"{INT8_GEMM_ENV}={d['mode']}" + (f" ({d['mode_source']})" if d["mode_source"] != INT8_GEMM_ENV else "")
    return (
        f"CPU ternary matmuls: {route}; {d['reason']}; {mode}, "
        f"ONEDNN_MAX_CPU_ISA={d['onednn_max_cpu_isa'] or 'unset'}, CPU capability {d['cpu_capability']}"
    )


def _use_int8_gemm(device: torch.device, rows: int) -> bool:
    if device.type != "cpu" or rows < _INT8_GEMM["min_rows"]:
        return False
    use = _INT8_GEMM["use"]
    if use is None:
        if torch.compiler.is_compiling():  # no timing inside a trace: float until an eager call decides
            return False
        use = int8_gemm_decision()["route"] == "int8"
    return bool(use)


def _pack_int8_weight(w_ternary: Tensor) -> Tensor:  # (out, in) int8 -> opaque oneDNN weight
    return torch.ops.onednn.qlinear_prepack(w_ternary.contiguous(), None)


def _ternary_matmul(
    q: Tensor,  # (N, in) float32, integer values in [-128, 127]
    w_ternary: Tensor,  # (out, in) float32 in {-1, 0, 1}
    row_scale: Tensor,  # (N, 1) float32: s * gamma
    bias: Tensor | None,  # (out,)
    w_int8_packed: Tensor | None = None,  # prepacked int8 copy of w_ternary (CPU int8 GEMM)
) -> Tensor:  # (N, out) float32
    """(q @ W_t^T) * (s * gamma) + bias, with the integer product computed exactly.

    |q . w| <= 128 * in < 2^24 for any in < 131072, so float32 BLAS accumulates the integer sums exactly, like
    the int8 GEMM: both routes give bit-identical outputs, BitLinear and PackedBitLinear agree bit for bit.
    """
    if w_int8_packed is not None:
        acc = _onednn_int8_gemm(q.to(torch.int8), w_int8_packed, w_ternary.shape[0])
    else:
        acc = q.mm(w_ternary.t())
    return _scale_and_bias(acc, row_scale, bias)


def _scale_and_bias(acc: Tensor, row_scale: Tensor, bias: Tensor | None) -> Tensor:  # in place: acc * s + bias
    acc.mul_(row_scale)
    if bias is not None:
        acc.add_(bias)
    return acc


def _ternary_weight(weight: Tensor) -> tuple[Tensor, Tensor]:  # (out, in) -> float32 W_t in {-1, 0, 1}, 0-dim gamma
    w32 = weight.detach().float()
    gamma = _weight_scale(w32)
    return (w32 / gamma).round_().clamp_(-1, 1), gamma


def _rms_norm_with_rstd(x2: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:  # (N, C) -> (N, C), (N, 1)
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


def _quantize_rows_(y: Tensor, q_max: int) -> tuple[Tensor, Tensor]:  # (N, C) -> (N, C), (N, 1); in place
    """Round a scratch tensor in place to its int8 codes round(y / s), as float (the reference clamp is a no-op)."""
    scale = _absmax_scale(y, q_max)  # (N, 1)
    return y.div_(scale).round_(), scale


def _activation_codes(
    x2: Tensor, norm_weight: Tensor | None, eps: float, q_max: int
) -> tuple[Tensor, Tensor, Tensor | None]:  # (N, C) -> codes (N, C), scale (N, 1), rstd (N, 1) or None
    if norm_weight is None:
        return (*_quantize_rows_(x2.clone(), q_max), None)
    y, rstd = _rms_norm_with_rstd(x2, norm_weight, eps)
    return (*_quantize_rows_(y, q_max), rstd)


def _bitlinear_forward(
    x2: Tensor, norm_weight: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, q_max: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Shared forward: returns out (N, out), codes (N, in), s (N, 1), W_t (out, in), gamma, rstd (N, 1) | None."""
    codes, scale, rstd = _activation_codes(x2, norm_weight, eps, q_max)
    w_t, gamma = _ternary_weight(weight)  # once per forward: O(out * in)
    packed = _pack_int8_weight(w_t.to(torch.int8)) if _use_int8_gemm(x2.device, x2.shape[0]) else None
    out = _ternary_matmul(codes, w_t, scale * gamma, bias, packed)
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
            gamma = torch.abs(w32, out=buf).mean().clamp(min=WEIGHT_EPS)  # = _weight_scale(w32), bit for bit
            self.ternary, self.gamma = torch.div(w32, gamma, out=buf).round_().clamp_(-1, 1), gamma
            self._spare = (None, self._spare[1])
        return self.ternary, self.gamma

    def int8_weight(self, weight: Tensor) -> Tensor:
        w_t, _ = self.ternary_weight(weight)
        if self.int8 is None:
            self.int8 = _pack_int8_weight(w_t.to(torch.int8))
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
            self.reference = _dequantized_weights(weight.detach().float()).to(weight.dtype)
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
            codes, scale, rstd = _activation_codes(x2, norm_weight, eps, q_max)
            w_t, gamma = cache.ternary_weight(weight)
            packed = cache.int8_weight(weight) if _use_int8_gemm(x2.device, x2.shape[0]) else None
            out = _ternary_matmul(codes, w_t, scale * gamma, bias, packed)
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
            codes, scale, rstd = _activation_codes(x2, norm_weight, ctx.eps, ctx.q_max)
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


def _check_width(x: Tensor, in_features: int, name: str) -> None:
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
        _check_bits(activation_bits)
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
        _check_width(x, self.in_features, "BitLinear")
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
                    codes, scale, _ = _activation_codes(x2, norm_weight, eps, q_max)
                    w_t, gamma = cache.ternary_weight(self.weight)
                    packed = cache.int8_weight(self.weight) if _use_int8_gemm(x2.device, x2.shape[0]) else None
                    out = _ternary_matmul(codes, w_t, scale * gamma, self.bias, packed)
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


# ---------------------------------------------------------------------------------------------------------------
# Packed storage: 2 bits per weight (4 per byte) and base 3 (5 trits per byte, 1.6 bits per weight)
# ---------------------------------------------------------------------------------------------------------------

_BITS_PLACE = (1, 4, 16, 64)  # 2-bit code of element i of a group of 4 sits at bits 2i..2i+1
_TRITS_PLACE = (1, 3, 9, 27, 81)  # base-3 digit i of a group of 5
_TRITS_MAX_BYTE = 3**5 - 1  # 242: bytes above this never come out of pack_ternary_base3


def _ternary_codes(t: Tensor) -> Tensor:  # any shape -> (n,) uint8 codes in {0, 1, 2} (= t + 1)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"pack_ternary expects a real tensor with values in {{-1, 0, 1}}, got dtype {t.dtype}")
    flat = t.detach().reshape(-1)
    if flat.numel() and not bool(((flat == -1) | (flat == 0) | (flat == 1)).all()):
        bad = flat[~((flat == -1) | (flat == 0) | (flat == 1))][:3].tolist()
        raise ValueError(
            f"pack_ternary expects values in {{-1, 0, 1}}, found e.g. {bad}; quantize first with quantize_weights()"
        )
    return (flat.to(torch.int8) + 1).to(torch.uint8)


def _padded_groups(codes: Tensor, group: int) -> Tensor:  # (n,) -> (ceil(n / group), group), padded with code 1 (= 0)
    pad = (-codes.numel()) % group
    if pad:
        codes = torch.cat([codes, codes.new_ones(pad)])
    return codes.view(-1, group)


def _check_packed(packed: Tensor, shape: Sequence[int], per_byte: int, fmt: str) -> int:
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"{fmt}: packed bytes must be a 1-d uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    numel = math.prod(int(s) for s in shape)
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"{fmt}: invalid shape {tuple(shape)}")
    expected = -(-numel // per_byte)
    if packed.numel() != expected:
        raise ValueError(
            f"{fmt}: {packed.numel()} bytes cannot hold shape {tuple(shape)} ({numel} values need {expected} bytes);"
            " pass the shape the tensor was packed with"
        )
    return numel


def pack_ternary(t: Tensor) -> Tensor:  # any shape -> (ceil(numel / 4),) uint8
    """Pack ternary values {-1, 0, 1} at 2 bits each (4 per byte, code = t + 1), in row-major order.

    The shape is not stored: pass it to `unpack_ternary`. Any element count works (the last byte is padded).
    """
    groups = _padded_groups(_ternary_codes(t), 4)  # (B, 4)
    place = torch.tensor(_BITS_PLACE, dtype=torch.uint8, device=groups.device)
    return (groups * place).sum(dim=1, dtype=torch.uint8)


def unpack_ternary(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:  # (B,) uint8 -> shape, int8
    """Inverse of `pack_ternary`: int8 tensor of `shape` with values in {-1, 0, 1}."""
    shape = tuple(int(s) for s in shape)
    numel = _check_packed(packed, shape, 4, "unpack_ternary")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & 3  # (B, 4)
    if bool((codes == 3).any()):
        raise ValueError("unpack_ternary: byte holds the unused code 3; the data was not written by pack_ternary")
    return (codes.view(-1)[:numel].to(torch.int8) - 1).view(shape)


def pack_ternary_base3(t: Tensor) -> Tensor:  # any shape -> (ceil(numel / 5),) uint8
    """Pack ternary values at 1.6 bits each: 5 base-3 digits (t + 1) per byte, 3^5 = 243 <= 256.

    The shape is not stored: pass it to `unpack_ternary_base3`. Any element count works.
    """
    groups = _padded_groups(_ternary_codes(t), 5)  # (B, 5)
    place = torch.tensor(_TRITS_PLACE, dtype=torch.uint8, device=groups.device)
    return (groups * place).sum(dim=1, dtype=torch.uint8)  # at most 2 * 121 = 242: no overflow


def unpack_ternary_base3(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:  # (B,) uint8 -> shape, int8
    """Inverse of `pack_ternary_base3`: int8 tensor of `shape` with values in {-1, 0, 1}."""
    shape = tuple(int(s) for s in shape)
    numel = _check_packed(packed, shape, 5, "unpack_ternary_base3")
    if packed.numel() and int(packed.max()) > _TRITS_MAX_BYTE:
        raise ValueError(f"unpack_ternary_base3: byte {int(packed.max())} > 242 was not written by pack_ternary_base3")
    place = torch.tensor(_TRITS_PLACE, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) // place) % 3  # (B, 5)
    return (codes.view(-1)[:numel].to(torch.int8) - 1).view(shape)


def packed_bits_per_weight(numel: int, base3: bool = False) -> float:
    """Storage cost of `numel` ternary weights in bits per weight (2.0 or 1.6 up to the last partial byte)."""
    if numel <= 0:
        raise ValueError(f"numel must be > 0, got {numel}")
    return 8 * -(-numel // (5 if base3 else 4)) / numel


# ---------------------------------------------------------------------------------------------------------------
# Inference: PackedBitLinear, pack_model, quantization_stats
# ---------------------------------------------------------------------------------------------------------------


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
        self.q_max = _check_bits(activation_bits)
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
        use_int8 = _use_int8_gemm(device, rows)
        key = (self.packed_weight.data_ptr(), self.packed_weight._version, device)
        if not (self.cache_weights is not False and self._weight_cache is not None and self._cache_key == key):
            w = self.ternary_weight().to(device).float()
            if self.cache_weights is False:
                return w, _pack_int8_weight(w.to(torch.int8)) if use_int8 else None
            self._weight_cache, self._int8_cache, self._cache_key = w, None, key  # cache_weights None or True
        if use_int8 and self._int8_cache is None:
            self._int8_cache = _pack_int8_weight(self._weight_cache.to(torch.int8))
        return self._weight_cache, self._int8_cache if use_int8 else None

    def _kernel_int8_weight(self) -> Tensor:  # prepacked oneDNN int8 weight, from the packed bytes (no float copy)
        key = (self.packed_weight.data_ptr(), self.packed_weight._version)
        if self._int8_only is None or self._int8_only_key != key:
            w = packed_unpack_int8(self.packed_weight, self.out_features, self.in_features)  # (out, in) int8
            self._int8_only, self._int8_only_key = _pack_int8_weight(w), key
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
            return _quantize_rows_(x32.clone(), self.q_max)  # (N, in) integer-valued, (N, 1)
        if self.norm.weight is not None and self.norm.weight.dtype == torch.float32:
            # BitLinear's norm kernel: bit-identical to nn.RMSNorm on CPU with fewer temporaries (faster)
            eps = self.norm.eps if self.norm.eps is not None else torch.finfo(torch.float32).eps
            return _activation_codes(x32, self.norm.weight, eps, self.q_max)[:2]
        return _quantize_rows_(self.norm(x32), self.q_max)

    def _kernel_forward(self, x32: Tensor) -> Tensor:  # (N, in) float32 -> (N, out) float32
        """The packed kernel: it quantizes y like _quantize_rows_ and multiplies from the packed bytes (same bits).

        Decoding calls every layer once per token, so this path keeps Python work low (one dict lookup per tensor)."""
        buffers, norm = self._buffers, self.norm
        if norm is None:
            y = x32
        elif norm.weight is not None and norm.weight.dtype == torch.float32:
            # One fused op: the same bits as _rms_norm_with_rstd on CPU, which BitLinear eval uses
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
        _check_width(x, self.in_features, "PackedBitLinear")
        # Norm and scales in float32 whatever the input dtype (the buffers are float32).
        x32 = x.reshape(-1, self.in_features).float()  # (N, in)
        kernel = use_packed_kernel(x32.device)
        if kernel and not (self.cache_weights is not False and _use_int8_gemm(x32.device, x32.shape[0])):
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
                acc = _onednn_int8_gemm(codes.to(torch.int8), self._kernel_int8_weight(), self.out_features)
                out = _scale_and_bias(acc, scale * self.weight_scale, self.bias)  # = _ternary_matmul's int8 route
                return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
            codes, scale = self._codes(x32)
            w, w_int8 = self._matmul_weights(x.device, x32.shape[0])
            out = _ternary_matmul(codes, w, scale * self.weight_scale, self.bias, w_int8)  # (N, out)
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

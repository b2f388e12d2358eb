"""The exact ternary matmul shared by BitLinear and PackedBitLinear and its CPU route: oneDNN's int8 GEMM or float32
BLAS, chosen by a short measurement once per process (`probe_int8_gemm`, `int8_gemm_decision`) or forced
(`BITMAR_INT8_GEMM`, `set_int8_gemm`)."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

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


def onednn_int8_gemm(q_int8: Tensor, w_packed: Tensor, out_features: int) -> Tensor:  # (N, in) -> (N, out) float32
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
                out = onednn_int8_gemm(q, torch.ops.onednn.qlinear_prepack(w, None), 19)
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
    packed = pack_int8_weight(w_ternary.to(torch.int8))
    return lambda q: onednn_int8_gemm(q.to(torch.int8), packed, w_ternary.shape[0])


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


def use_int8_gemm(device: torch.device, rows: int) -> bool:
    if device.type != "cpu" or rows < _INT8_GEMM["min_rows"]:
        return False
    use = _INT8_GEMM["use"]
    if use is None:
        if torch.compiler.is_compiling():  # no timing inside a trace: float until an eager call decides
            return False
        use = int8_gemm_decision()["route"] == "int8"
    return bool(use)


def pack_int8_weight(w_ternary: Tensor) -> Tensor:  # (out, in) int8 -> opaque oneDNN weight
    return torch.ops.onednn.qlinear_prepack(w_ternary.contiguous(), None)


def ternary_matmul(
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
        acc = onednn_int8_gemm(q.to(torch.int8), w_int8_packed, w_ternary.shape[0])
    else:
        acc = q.mm(w_ternary.t())
    return scale_and_bias(acc, row_scale, bias)


def scale_and_bias(acc: Tensor, row_scale: Tensor, bias: Tensor | None) -> Tensor:  # in place: acc * s + bias
    acc.mul_(row_scale)
    if bias is not None:
        acc.add_(bias)
    return acc

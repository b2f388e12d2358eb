"""BitNet b1.58 quantizers, BitLinear (fused and reference paths), ternary packing and PackedBitLinear."""

from __future__ import annotations

import copy
import json
import math
import pickle
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitmar.bitnet as bitnet
import bitmar.bitnet.int8_gemm as bitnet_gemm
import bitmar.bitnet.packed as bitnet_packed
from bitmar.bench import bitlinear as bench
from bitmar.bitnet import (
    INT8_GEMM_MIN_ROWS,
    BitLinear,
    PackedBitLinear,
    describe_int8_gemm,
    fake_quantize_activations,
    fake_quantize_weights,
    int8_gemm_available,
    int8_gemm_decision,
    int8_gemm_mode,
    pack_model,
    pack_ternary,
    pack_ternary_base3,
    packed_bits_per_weight,
    probe_int8_gemm,
    quantization_stats,
    quantize_activations,
    quantize_weights,
    set_int8_gemm,
    unpack_ternary,
    unpack_ternary_base3,
)
from bitmar.kernels.packed_cpu import packed_kernel_mode

# docs/design.md §2 worked example (Hugging Face blog).
W_EXAMPLE = [[0.8, -0.5, 1.2], [-1.5, 0.4, -0.9], [1.3, -0.7, 0.2]]
W_T_EXAMPLE = [[1, -1, 1], [-1, 0, -1], [1, -1, 0]]
X_EXAMPLE = [[1, -0.6, 0.7], [-0.9, 0.4, -1.2], [0.8, -0.5, 0.3]]
X_Q_EXAMPLE = [[127, -76, 89], [-95, 42, -127], [127, -79, 48]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a norm-wise relative error that ignores near-zero entries."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def exact_bitlinear(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """BitLinear's forward from the public quantizers: exact integer product, then (s * gamma) and the bias."""
    y = layer.norm(x) if layer.norm is not None else x
    x_int, s = quantize_activations(y, layer.activation_bits)  # (..., in), (..., 1)
    w_t, gamma = quantize_weights(layer.weight)
    out = (x_int.double() @ w_t.double().T).float() * (s * gamma)  # integer sums are exact in float64 and float32
    return out + layer.bias if layer.bias is not None else out


# ---------------------------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------------------------


def test_design_worked_example() -> None:
    w_t, gamma = quantize_weights(torch.tensor(W_EXAMPLE))
    assert gamma.item() == pytest.approx(7.5 / 9, rel=1e-6)  # 0.8333...
    assert w_t.dtype == torch.int8 and w_t.tolist() == W_T_EXAMPLE
    x_q, s = quantize_activations(torch.tensor(X_EXAMPLE))
    assert x_q.dtype == torch.int8 and x_q.tolist() == X_Q_EXAMPLE
    assert s.flatten().tolist() == pytest.approx([1 / 127, 1.2 / 127, 0.8 / 127], rel=1e-6)
    # The fake quantizers give the dequantized values of the same example.
    assert torch.allclose(fake_quantize_weights(torch.tensor(W_EXAMPLE)), torch.tensor(W_T_EXAMPLE) * gamma)
    assert torch.allclose(fake_quantize_activations(torch.tensor(X_EXAMPLE)), x_q.float() * s)


def test_int8_and_float_gemm_routes_give_the_same_bits() -> None:
    layer, _ = _layer_pair(64, 48, seed=11, bias=True)
    x = torch.randn(3, 17, 64) * 3
    packed = PackedBitLinear.from_bitlinear(layer)
    outputs = []
    for mode in ("on", "off"):  # forced both ways, whatever the measurement says is faster
        with int8_gemm_mode(mode, min_rows=1):  # 51 rows: below the default threshold the int8 route never runs
            with torch.no_grad():
                outputs += [layer(x), packed(x)]
            outputs.append(layer(x.requires_grad_(True)).detach())
            assert int8_gemm_decision()["route"] == ("int8" if mode == "on" and int8_gemm_available() else "float")
    assert all(torch.equal(o, outputs[0]) for o in outputs[1:])
    assert isinstance(int8_gemm_available(), bool) and bitnet_gemm._INT8_GEMM["min_rows"] == INT8_GEMM_MIN_ROWS


# ---------------------------------------------------------------------------------------------------------------
# The measured route: int8 only where it is faster (oneDNN's reference kernel is 130-430x slower on AVX-512 EPYCs)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_route(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The route state as at start-up (nothing decided or measured, BITMAR_INT8_GEMM unset); restored afterwards."""
    int8_gemm_available()  # the capability self-test (once per process) is not part of any test's count
    saved = dict(bitnet_gemm._INT8_GEMM)
    monkeypatch.delenv(bitnet.INT8_GEMM_ENV, raising=False)
    bitnet_gemm._INT8_GEMM.update(mode=None, use=None, decision=None, probe=None)
    yield bitnet_gemm._INT8_GEMM
    bitnet_gemm._INT8_GEMM.clear()
    bitnet_gemm._INT8_GEMM.update(saved)


class FakeMachine:
    """Both GEMM routes on a virtual clock: each call costs overhead + seconds per multiply-add, and is recorded."""

    def __init__(self, int8_per_mac: float, int8_overhead: float = 0.0, float_per_mac: float = 1e-10) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, int]] = []  # (route, rows)
        self.int8 = self._route("int8", int8_per_mac, int8_overhead)
        self.float = self._route("float", float_per_mac, 0.0)

    def clock(self) -> float:
        return self.now

    def _route(self, name: str, per_mac: float, overhead: float) -> bitnet.GemmRoute:
        def prepare(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            def call(q: torch.Tensor) -> torch.Tensor:
                self.calls.append((name, q.shape[0]))
                self.now += overhead + per_mac * q.shape[0] * w.numel()
                return q.new_zeros(q.shape[0], w.shape[0])

            return call

        return prepare

    def probe(self) -> dict[str, Any]:
        return probe_int8_gemm(int8_route=self.int8, float_route=self.float, clock=self.clock)


GUARD_ROWS, PROBE_ROWS = bitnet.PROBE_GUARD_SHAPE[0], bitnet.PROBE_SHAPE[0]


def test_probe_picks_float_at_once_when_int8_is_400x_slower() -> None:
    machine = FakeMachine(int8_per_mac=400e-10)  # the AVX-512 EPYC report: 25.9 s against 0.19 s
    result = machine.probe()
    assert result["route"] == "float" and "pathologically slow" in result["reason"]
    assert result["int8_ms"] is None and result["guard_int8_ms"] == pytest.approx(
        400 * result["guard_float_ms"], rel=1e-3
    )
    # Only the guard shape ran (a representative int8 call would cost 12 s here), 3 int8 calls: ~60 ms in all.
    assert {rows for _, rows in machine.calls} == {GUARD_ROWS} and machine.calls.count(("int8", GUARD_ROWS)) == 3
    assert result["seconds"] < 0.1


def test_probe_picks_int8_when_it_is_faster() -> None:
    machine = FakeMachine(int8_per_mac=0.6e-10, int8_overhead=50e-6)  # like AVX2: per-call cost, faster loop
    result = machine.probe()
    assert result["route"] == "int8" and "int8 GEMMs are faster" in result["reason"]
    macs = math.prod(bitnet.PROBE_SHAPE)
    assert result["int8_ms"] == pytest.approx(1e3 * (50e-6 + 0.6e-10 * macs), rel=1e-3)
    assert result["float_ms"] == pytest.approx(1e3 * 1e-10 * macs, rel=1e-3)
    assert result["pairs"] == bitnet.PROBE_REPEATS and result["seconds"] < bitnet.PROBE_BUDGET_S


@pytest.mark.parametrize(
    ("int8_per_mac", "reason", "representative_calls"),
    [
        (1.2e-10, "float GEMMs are faster", True),  # a bit slower: measured, float wins
        (20e-10, "per 512x768->768 call", False),  # 20x: passes the guard, its projection stops the probe
    ],
)
def test_probe_picks_float_when_int8_is_slower(int8_per_mac: float, reason: str, representative_calls: bool) -> None:
    machine = FakeMachine(int8_per_mac=int8_per_mac)
    result = machine.probe()
    assert result["route"] == "float" and reason in result["reason"]
    assert (("int8", PROBE_ROWS) in machine.calls) is representative_calls
    assert result["seconds"] < 1.0


def test_probe_on_a_busy_machine_trusts_the_guard_when_int8_is_the_faster_route() -> None:
    # Background load makes every call ~600x slower: the full shape would take seconds either way, so it is not
    # timed; int8 beat float side by side at the guard, so int8 it is (a first version picked float here).
    machine = FakeMachine(int8_per_mac=3e-8, float_per_mac=6e-8)
    result = machine.probe()
    assert result["route"] == "int8" and "not timed" in result["reason"]
    assert ("int8", PROBE_ROWS) not in machine.calls and ("float", PROBE_ROWS) not in machine.calls


def test_probe_stays_short_in_real_time_when_the_int8_kernel_is_pathological() -> None:
    def reference_kernel(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(q: torch.Tensor) -> torch.Tensor:  # the right result at ~12M multiply-adds/s, like the report
            time.sleep(q.shape[0] * w.numel() / 12e6)
            return q.mm(w.t())

        return call

    start = time.perf_counter()
    result = probe_int8_gemm(int8_route=reference_kernel)
    elapsed = time.perf_counter() - start
    assert result["route"] == "float" and "pathologically slow" in result["reason"], result
    assert elapsed < 1.0  # one int8 call of the representative shape alone would sleep 2.5 s


def test_the_real_probe_is_short_and_complete() -> None:
    start = time.perf_counter()
    result = probe_int8_gemm()
    assert time.perf_counter() - start < 2.0 and result["route"] in ("int8", "float")
    assert result["guard_int8_ms"] > 0 and result["threads"] == torch.get_num_threads()


def test_switches_env_and_set_int8_gemm_override_the_measurement(
    fresh_route: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[str] = []

    def fake_probe() -> dict[str, Any]:  # measured once per process, whatever the switches do afterwards
        probes.append("probe")
        return {"route": "float", "reason": "injected: int8 400x slower", "int8_ms": None}

    monkeypatch.setattr(bitnet_gemm, "probe_int8_gemm", fake_probe)
    cpu, available = torch.device("cpu"), int8_gemm_available()
    decision = int8_gemm_decision()
    assert decision["route"] == "float" and decision["mode"] == "auto" and decision["mode_source"] == "default"
    assert decision["reason"] == (
        "injected: int8 400x slower" if available else f"no int8 GEMM: {decision['int8_status']}"
    )
    assert not bitnet_gemm.use_int8_gemm(cpu, 4096)
    line = describe_int8_gemm()
    assert line.startswith("CPU ternary matmuls: float GEMM") and "BITMAR_INT8_GEMM=auto (default)" in line
    assert "ONEDNN_MAX_CPU_ISA=" in line

    monkeypatch.setenv(bitnet.INT8_GEMM_ENV, "on")
    set_int8_gemm(None)  # follow the environment again: decided anew at the next use
    decision = int8_gemm_decision()
    assert decision["mode"] == "on" and decision["mode_source"] == bitnet.INT8_GEMM_ENV
    assert bitnet_gemm.use_int8_gemm(cpu, 4096) is available
    assert not bitnet_gemm.use_int8_gemm(cpu, INT8_GEMM_MIN_ROWS - 1)
    with int8_gemm_mode("off"):  # set_int8_gemm beats the environment
        assert int8_gemm_decision()["mode_source"] == "set_int8_gemm" and not bitnet_gemm.use_int8_gemm(cpu, 4096)
    assert bitnet_gemm.use_int8_gemm(cpu, 4096) is available  # the environment's "on" again after the block

    monkeypatch.setenv(bitnet.INT8_GEMM_ENV, " OFF ")
    set_int8_gemm(None)
    assert int8_gemm_decision()["reason"] == "int8 GEMM switched off (BITMAR_INT8_GEMM)"
    set_int8_gemm(True)  # True is "auto": the measurement (float here)
    assert int8_gemm_decision()["mode"] == "auto" and not bitnet_gemm.use_int8_gemm(cpu, 4096)
    assert len(probes) == (1 if available else 0)

    monkeypatch.setenv(bitnet.INT8_GEMM_ENV, "fast")
    set_int8_gemm(None)
    with pytest.raises(ValueError, match=r"BITMAR_INT8_GEMM='fast' is not one of auto, on, off"):
        int8_gemm_decision()
    with pytest.raises(ValueError, match="set_int8_gemm='sometimes' is not one of auto, on, off"):
        set_int8_gemm("sometimes")


def test_evaluation_logs_the_route_once_and_refuses_a_malformed_switch(
    fresh_route: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bitmar.evaluation import runner

    argv = ["--checkpoint", str(tmp_path / "missing.pt"), "--device", "cpu"]
    monkeypatch.setenv(bitnet.INT8_GEMM_ENV, "off")
    assert runner.main(argv) == 2  # the missing checkpoint, after the start-up line
    err = capsys.readouterr().err
    assert err.count("CPU ternary matmuls: float GEMM (BLAS); int8 GEMM switched off (BITMAR_INT8_GEMM)") == 1
    monkeypatch.setenv(bitnet.INT8_GEMM_ENV, "yes")
    set_int8_gemm(None)
    assert runner.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: BITMAR_INT8_GEMM='yes' is not one of auto, on, off" in err and "Traceback" not in err


@pytest.mark.parametrize("route", ["int8", "float"])
def test_layers_take_the_decided_route(
    route: str, fresh_route: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_gemm = bitnet_gemm.onednn_int8_gemm

    def counting_gemm(q: torch.Tensor, w: torch.Tensor, out_features: int) -> torch.Tensor:
        calls.append(q.shape[0])
        return real_gemm(q, w, out_features)

    for module in (bitnet_gemm, bitnet_packed):  # ternary_matmul's GEMM and PackedBitLinear's kernel route
        monkeypatch.setattr(module, "onednn_int8_gemm", counting_gemm)
    monkeypatch.setattr(bitnet_gemm, "probe_int8_gemm", lambda: {"route": route, "reason": f"injected: {route} faster"})
    torch.manual_seed(3)
    layer = BitLinear(32, 16)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(300, 32, requires_grad=True)
    out = layer(x)  # training forward (fused autograd node)
    out.sum().backward()
    with torch.no_grad(), packed_kernel_mode("off"):  # the route of PackedBitLinear's pure-torch path
        assert torch.equal(layer.eval()(x), out) and torch.equal(packed(x), out)
    used = route == "int8" and int8_gemm_available()
    assert calls == ([300] * 3 if used else [])
    assert int8_gemm_decision()["route"] == ("int8" if used else "float")


def test_the_chosen_route_is_not_much_slower_than_the_other() -> None:
    """Measured here, side by side: the route the probe chose against the other one, on inputs of the row threshold.

    Choosing by exactness alone took oneDNN's reference kernel on AVX-512 EPYCs, 130-430x slower than float.
    """
    with int8_gemm_mode("auto"):  # the measurement, whatever BITMAR_INT8_GEMM says
        decision = int8_gemm_decision()
    chosen = decision["route"]
    if not decision["int8_available"]:
        assert chosen == "float"  # one route only: nothing to compare
        return
    torch.manual_seed(0)
    layer = BitLinear(256, 256).eval()
    x = torch.randn(INT8_GEMM_MIN_ROWS, 256)

    def seconds(route: str) -> float:
        with int8_gemm_mode("on" if route == "int8" else "off"), torch.no_grad():
            start = time.perf_counter()
            layer(x)
            return time.perf_counter() - start

    other = "float" if chosen == "int8" else "int8"
    seconds(chosen), seconds(other)  # warm-up: weight caches, oneDNN's primitive
    times: dict[str, list[float]] = {chosen: [], other: []}
    for k in range(9):
        for route in (chosen, other) if k % 2 == 0 else (other, chosen):
            times[route].append(seconds(route))
        if min(times[other]) > 3 * statistics.median(times[chosen]):
            break  # the other route is clearly the slow one (on a reference kernel each call takes seconds)
    t_chosen, t_other = statistics.median(times[chosen]), statistics.median(times[other])
    assert t_chosen <= 3 * t_other, (
        f"the {chosen} route was chosen ({decision['reason']}) but takes {t_chosen * 1e3:.2f} ms against "
        f"{t_other * 1e3:.2f} ms for the {other} route"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (4, 7), (2, 3, 16), (3, 1, 2, 33)])
def test_fake_quantizers_follow_the_formulas(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    # Activations: s = max(max|x|, 1e-5) / 127 per token, codes round(x / s) in [-128, 127], computed in float32.
    x32 = x.float()
    s = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
    codes = (x32 / s).round().clamp(-128, 127)
    out = fake_quantize_activations(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, (codes * s).to(dtype))
    x_int, scale = quantize_activations(x)
    assert torch.equal(x_int, codes.to(torch.int8)) and torch.equal(scale, s)
    assert int(x_int.abs().amax()) == 127  # the largest entry of each token maps to +-127

    # Weights: gamma = max(mean|W|, 1e-5) over the whole matrix, codes clamp(round(W / gamma), -1, 1).
    gamma = w.float().abs().mean().clamp(min=1e-5)
    w_codes = (w.float() / gamma).round().clamp(-1, 1)
    out_w = fake_quantize_weights(w)
    assert out_w.dtype == dtype
    assert torch.equal(out_w, (w_codes * gamma).to(dtype))
    w_t, g = quantize_weights(w)
    assert torch.equal(w_t, w_codes.to(torch.int8)) and torch.equal(g, gamma)
    assert set(w_t.unique().tolist()) <= {-1, 0, 1}


def test_lower_activation_bits_and_validation() -> None:
    x = torch.randn(4, 9)
    x_int, s = quantize_activations(x, bits=4)
    assert int(x_int.abs().max()) == 7 and torch.allclose(s, x.abs().amax(-1, keepdim=True) / 7)
    with pytest.raises(ValueError, match=r"activation bits must be in \[2, 8\]"):
        quantize_activations(x, bits=9)
    with pytest.raises(ValueError, match="activation bits"):
        BitLinear(4, 4, activation_bits=1)
    fused, reference = _layer_pair(9, 5, seed=12, activation_bits=4)
    assert torch.equal(fused(x), exact_bitlinear(fused, x)) and rel_err(fused(x), reference(x)) < 1e-6


def test_fake_quantizers_pass_gradients_straight_through() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(3, 8)
    (fake_quantize_activations(x) * g).sum().backward()
    (fake_quantize_weights(w) * 2).sum().backward()
    assert torch.equal(x.grad, g)
    assert torch.equal(w.grad, torch.full_like(w, 2.0))


# ---------------------------------------------------------------------------------------------------------------
# BitLinear
# ---------------------------------------------------------------------------------------------------------------


def _layer_pair(d_in: int, d_out: int, seed: int, **kwargs) -> tuple[BitLinear, BitLinear]:
    torch.manual_seed(seed)
    fused = BitLinear(d_in, d_out, **kwargs)
    with torch.no_grad():
        if fused.norm is not None:
            fused.norm.weight.uniform_(0.5, 1.5)  # a non-trivial gain so its gradient path is tested
        if fused.bias is not None:
            fused.bias.normal_()
    reference = BitLinear(d_in, d_out, fused=False, **kwargs)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_norm", [True, False])
@pytest.mark.parametrize("shape", [(37, 24), (2, 5, 24), (24,)])
def test_fused_path_matches_reference(shape: tuple[int, ...], input_norm: bool, bias: bool) -> None:
    fused, reference = _layer_pair(24, 10, seed=len(shape), bias=bias, input_norm=input_norm)
    x = (torch.randn(shape) * 2).requires_grad_(True)
    out_f = fused(x)
    assert out_f.shape == (*shape[:-1], 10)
    assert torch.equal(out_f, exact_bitlinear(fused, x.detach()))  # same quantized operands, bit for bit
    out_r = reference(x)  # fake quantizers + F.linear: float accumulation of the same dequantized operands
    assert rel_err(out_f, out_r) < 1e-6
    with torch.no_grad():  # the inference route (no autograd node) gives the same bits
        assert torch.equal(fused(x), out_f)
    grad = torch.randn_like(out_f)
    grads_f = torch.autograd.grad(out_f, [x, *fused.parameters()], grad)
    grads_r = torch.autograd.grad(out_r, [x, *reference.parameters()], grad)
    for g_f, g_r in zip(grads_f, grads_r, strict=True):
        assert g_f.shape == g_r.shape
        assert rel_err(g_f, g_r) < 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_ste_gradients_equal_plain_linear_at_dequantized_operands(fused: bool) -> None:
    torch.manual_seed(1)
    layer = BitLinear(16, 12, bias=True, fused=fused)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 16, requires_grad=True)
    grad = torch.randn(6, 12)
    layer(x).backward(grad)

    # STE: the same loss as a plain linear layer at W_deq, fed the dequantized normalized input.
    w_t, gamma = quantize_weights(layer.weight)
    w_deq = (w_t.float() * gamma).requires_grad_(True)
    x_leaf = x.detach().clone().requires_grad_(True)
    norm_w = layer.norm.weight.detach().clone().requires_grad_(True)
    y = F.rms_norm(x_leaf, (16,), norm_w, layer.norm.eps)
    x_int, s = quantize_activations(y)
    y_deq = y + (x_int.float() * s - y).detach()  # identity gradient through the activation quantizer
    bias = layer.bias.detach().clone().requires_grad_(True)
    F.linear(y_deq, w_deq, bias).backward(grad)

    assert rel_err(layer.weight.grad, w_deq.grad) < 1e-6
    assert rel_err(layer.bias.grad, bias.grad) < 1e-6
    assert rel_err(layer.norm.weight.grad, norm_w.grad) < 1e-5
    assert rel_err(x.grad, x_leaf.grad) < 1e-5


def test_fused_backward_survives_retain_graph_and_detects_input_mutation() -> None:
    layer, _ = _layer_pair(16, 8, seed=2)
    x = torch.randn(5, 16, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, [x, layer.weight, layer.norm.weight], grad, retain_graph=True)
    second = torch.autograd.grad(out, [x, layer.weight, layer.norm.weight], grad)  # recomputes recycled buffers
    for a, b in zip(first, second, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    x2 = torch.randn(5, 16, requires_grad=True)
    y = x2 * 1.0
    out2 = layer(y)
    with torch.no_grad():
        y.add_(1.0)  # the saved input changed: autograd must refuse instead of returning wrong gradients
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out2.sum().backward()


@pytest.mark.parametrize("fused", [True, False])
def test_zero_rows_stay_finite_in_train_and_eval(fused: bool) -> None:
    torch.manual_seed(3)
    layer = BitLinear(8, 5, bias=True, fused=fused)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, 8)
    x[1] = 0.0
    x[3] = 0.0
    x.requires_grad_(True)
    layer.train()
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], layer.bias.detach()) and torch.equal(out[3], layer.bias.detach())
    out.sum().backward()
    assert all(torch.isfinite(t).all() for t in (x.grad, layer.weight.grad, layer.norm.weight.grad, layer.bias.grad))
    layer.eval()
    with torch.no_grad():
        out_eval = layer(torch.zeros(2, 3, 8))
    assert torch.isfinite(out_eval).all() and torch.equal(out_eval, layer.bias.expand(2, 3, 5))
    # An all-zero weight matrix hits the gamma floor instead of dividing by zero.
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.isfinite(layer(torch.randn(2, 8))).all()


def test_bfloat16_and_autocast_use_the_reference_path() -> None:
    fused, reference = _layer_pair(16, 8, seed=4)
    fused.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    out = fused(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference(x))
    out.float().sum().backward()
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(fused.weight.grad.float()).all()

    fused32, reference32 = _layer_pair(16, 8, seed=5)
    x32 = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a = fused32(x32)
        out_b = reference32(x32)
    assert out_a.dtype == torch.bfloat16 and torch.equal(out_a, out_b)
    out_a.float().sum().backward()
    assert fused32.weight.grad.dtype == torch.float32 and torch.isfinite(fused32.weight.grad).all()


def test_quantize_false_is_the_full_precision_twin() -> None:
    torch.manual_seed(6)
    layer = BitLinear(12, 6, quantize=False)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), F.linear(layer.norm(x), layer.weight))
    assert "quantize=False" in repr(layer)


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------

PACK_SHAPES = [(), (1,), (2,), (3,), (4,), (5,), (7,), (0,), (0, 3), (3, 5), (4, 4), (2, 3, 7), (1001,), (17, 13)]


@pytest.mark.parametrize("shape", PACK_SHAPES)
@pytest.mark.parametrize(
    ("pack", "unpack", "per_byte"),
    [(pack_ternary, unpack_ternary, 4), (pack_ternary_base3, unpack_ternary_base3, 5)],
    ids=["2bit", "base3"],
)
def test_pack_round_trip(shape: tuple[int, ...], pack, unpack, per_byte: int) -> None:
    gen = torch.Generator().manual_seed(math.prod(shape) + len(shape))
    t = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    packed = pack(t)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == -(-t.numel() // per_byte)  # no header: the shape travels separately
    restored = unpack(packed, t.shape)
    assert restored.dtype == torch.int8 and restored.shape == t.shape
    assert torch.equal(restored, t)
    # Float and int64 ternary tensors pack to the same bytes.
    assert torch.equal(pack(t.float()), packed) and torch.equal(pack(t.long()), packed)


def test_pack_known_bytes() -> None:
    # codes t + 1, element i of a group at bits 2i (2-bit) / digit i in base 3
    t = torch.tensor([-1, 0, 1, 1, 0])
    assert pack_ternary(t).tolist() == [0 + 1 * 4 + 2 * 16 + 2 * 64, 1 + 1 * 4 + 1 * 16 + 1 * 64]
    assert pack_ternary_base3(t).tolist() == [0 + 1 * 3 + 2 * 9 + 2 * 27 + 1 * 81]
    assert pack_ternary_base3(torch.ones(5)).tolist() == [242]  # the largest byte base 3 ever writes


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"values in \{-1, 0, 1\}.*quantize_weights"):
        pack_ternary(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="values in"):
        pack_ternary_base3(torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="cannot hold shape"):
        unpack_ternary(pack_ternary(torch.zeros(8)), (3, 4))
    with pytest.raises(ValueError, match="1-d uint8"):
        unpack_ternary(torch.zeros(2, dtype=torch.int8), (8,))
    with pytest.raises(ValueError, match="unused code 3"):
        unpack_ternary(torch.tensor([255], dtype=torch.uint8), (4,))
    with pytest.raises(ValueError, match="> 242"):
        unpack_ternary_base3(torch.tensor([243], dtype=torch.uint8), (5,))


def test_bits_per_weight() -> None:
    for n in (4, 400, 4096 * 768):
        assert packed_bits_per_weight(n) == 2.0
        assert 8 * pack_ternary(torch.zeros(n)).numel() / n == 2.0
    for n in (5, 500, 5 * 10**5):
        assert packed_bits_per_weight(n, base3=True) == pytest.approx(1.6)
    for n in (1, 3, 7, 1001, 10**6 + 1):  # any count: at most one partial byte on top
        assert packed_bits_per_weight(n) <= 2 + 8 / n
        assert packed_bits_per_weight(n, base3=True) <= 1.6 + 8 / n
    assert packed_bits_per_weight(10**6 + 1, base3=True) < 1.6 + 1e-5
    assert math.log2(3) < 1.6  # base 3 sits just above the information limit


# ---------------------------------------------------------------------------------------------------------------
# PackedBitLinear, pack_model, quantization_stats
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_weights", [True, False])
@pytest.mark.parametrize(("bias", "input_norm"), [(False, True), (True, True), (True, False)])
def test_packed_bitlinear_matches_bitlinear_eval(bias: bool, input_norm: bool, cache_weights: bool) -> None:
    layer, _ = _layer_pair(48, 20, seed=7, bias=bias, input_norm=input_norm)
    layer.eval()
    packed = PackedBitLinear.from_bitlinear(layer, cache_weights=cache_weights)
    for shape in [(9, 48), (2, 3, 48), (48,)]:
        x = torch.randn(shape) * 4
        with torch.no_grad():
            expected = layer(x)
        out = packed(x)
        assert out.shape == expected.shape and out.dtype == torch.float32
        assert rel_err(out, expected) < 1e-5  # the bound; in fact the two agree bit for bit:
        assert torch.equal(out, expected)
    assert torch.equal(packed.ternary_weight(), quantize_weights(layer.weight)[0])
    assert packed.weight_scale.item() == quantize_weights(layer.weight)[1].item()


def test_packed_state_dict_holds_packed_bytes_only() -> None:
    layer, _ = _layer_pair(30, 7, seed=8, bias=True)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(4, 30)
    out = packed(x)  # fills the weight cache, which must stay out of the state dict
    state = packed.state_dict()
    assert set(state) == {"packed_weight", "weight_scale", "norm.weight", "bias"}
    assert state["packed_weight"].dtype == torch.uint8
    assert state["packed_weight"].numel() == math.ceil(30 * 7 / 4)
    assert all(v.numel() < 30 * 7 for v in state.values())  # no unpacked copy of the weight anywhere
    assert not any(p.requires_grad for p in packed.parameters())

    fresh = PackedBitLinear(30, 7, bias=True)
    fresh(x)  # a stale cache from the default (all-zero) weight must not survive loading
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), out)


def test_packed_layer_copies_and_pickles_after_use(tmp_path) -> None:
    layer, _ = _layer_pair(20, 6, seed=13, bias=True)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(3, 20)
    out = packed(x)  # fills the caches (an opaque oneDNN weight on CPU), which must not break copying
    assert torch.equal(copy.deepcopy(packed)(x), out)
    assert torch.equal(pickle.loads(pickle.dumps(packed))(x), out)
    assert torch.equal(packed(x), out)  # the original keeps working


def test_packed_refuses_full_precision_layers() -> None:
    with pytest.raises(ValueError, match="quantize=False.*keep it as BitLinear"):
        PackedBitLinear.from_bitlinear(BitLinear(8, 8, quantize=False))
    with pytest.raises(TypeError, match="expects a BitLinear"):
        PackedBitLinear.from_bitlinear(nn.Linear(8, 8))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = BitLinear(16, 32, bias=True)
        self.down = BitLinear(32, 16)
        self.full = BitLinear(16, 16, quantize=False)
        self.head = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.full(self.down(F.gelu(self.up(x)))))


def test_pack_model_replaces_layers_and_keeps_outputs() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(_Block(), _Block())
    shared = BitLinear(4, 4)
    model.add_module("shared_a", nn.Sequential(shared))
    model.add_module("shared_b", nn.Sequential(shared))
    model = nn.ModuleDict({"body": model})
    x = torch.randn(3, 5, 16)
    model.eval()
    with torch.no_grad():
        expected = model["body"][1](model["body"][0](x))
    assert pack_model(model) is model
    body = model["body"]
    for block in (body[0], body[1]):
        assert isinstance(block.up, PackedBitLinear) and isinstance(block.down, PackedBitLinear)
        assert type(block.full) is BitLinear and isinstance(block.head, nn.Linear)
    assert body.shared_a[0] is body.shared_b[0] and isinstance(body.shared_a[0], PackedBitLinear)
    assert not any(isinstance(m, BitLinear) and m.quantize for m in model.modules())
    with torch.no_grad():
        out = body[1](body[0](x))
    assert rel_err(out, expected) < 1e-5
    single = BitLinear(8, 8)
    assert isinstance(pack_model(single), PackedBitLinear)


def test_wrong_input_width_fails_clearly() -> None:
    with pytest.raises(ValueError, match="expects inputs with last dim 8, got 5"):
        BitLinear(8, 4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="expects inputs with last dim 8, got 5"):
        PackedBitLinear.from_bitlinear(BitLinear(8, 4))(torch.randn(2, 5))


def test_quantization_stats_on_a_hand_made_layer() -> None:
    layer = BitLinear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W_EXAMPLE))
    model = nn.Sequential(layer, nn.Linear(3, 2))  # 9 ternary + 3 norm + 8 full-precision parameters
    stats = quantization_stats(model)
    assert set(stats["layers"]) == {"0"}
    entry = stats["layers"]["0"]
    assert (entry["num_neg"], entry["num_zero"], entry["num_pos"], entry["numel"]) == (4, 2, 3, 9)
    assert entry["zero_fraction"] == pytest.approx(2 / 9)
    assert entry["scale"] == pytest.approx(7.5 / 9, rel=1e-6)
    assert entry["packed"] is False
    assert stats["ternary_params"] == 9 and stats["total_params"] == 20
    assert stats["ternary_fraction"] == pytest.approx(9 / 20)
    assert stats["float32_bytes"] == 36 and stats["packed_bytes"] == 3  # ceil(9 / 4)
    assert stats["compression_ratio"] == pytest.approx(12.0)
    assert layer.weight.grad is None

    pack_model(model)
    packed_stats = quantization_stats(model)
    assert packed_stats["layers"]["0"]["packed"] is True
    for key in ("num_neg", "num_zero", "num_pos", "numel", "scale"):
        assert packed_stats["layers"]["0"][key] == pytest.approx(entry[key])
    for key in ("ternary_params", "total_params", "packed_bytes", "compression_ratio"):
        assert packed_stats[key] == pytest.approx(stats[key])

    nested = nn.ModuleDict({"enc": nn.Sequential(BitLinear(64, 64), BitLinear(64, 64, quantize=False))})
    nested_stats = quantization_stats(nested)
    assert set(nested_stats["layers"]) == {"enc.0"}
    assert nested_stats["compression_ratio"] == pytest.approx(16.0)
    assert quantization_stats(nn.Linear(3, 3))["compression_ratio"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Benchmark plumbing (structure only: performance numbers come from `python -m bitmar.bench.bitlinear`)
# ---------------------------------------------------------------------------------------------------------------


def test_benchmark_functions_return_complete_dicts(tmp_path, capsys) -> None:
    result = bench.run_benchmark(tokens=16, repeats=2, dims=(8,))
    (train,) = result["train"]
    assert set(train["variants"]) == set(bench.TRAIN_VARIANTS)
    assert train["variants"]["nn.Linear"]["ratio"] == 1.0
    assert all(v["median_ms"] > 0 for v in train["variants"].values())
    (inference,) = result["inference"]
    assert set(inference["variants"]) == set(bench.INFERENCE_VARIANTS)
    assert inference["max_rel_err_vs_bitlinear"] < 1e-5
    (storage,) = result["storage"]
    assert storage["packed_2bit_bytes"] == 16 and storage["packed_base3_bytes"] == 13
    assert "| 8 | BitLinear |" in bench.format_report(result)

    out_json = tmp_path / "bench.json"
    assert bench.main(["--tokens", "8", "--repeats", "1", "--dims", "4", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["config"]["tokens"] == 8
    assert "Weight storage" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--tokens", "0"])

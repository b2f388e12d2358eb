"""Packed ternary CPU kernel (issue 15): exact against BitLinear eval on every ISA, switches, build fallback, memory."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from bitmar.bitnet import BitLinear, PackedBitLinear, int8_gemm_available, int8_gemm_mode, pack_model
from bitmar.kernels import packed_cpu
from bitmar.kernels.packed_cpu import (
    PACKED_GEMM_MIN_ROWS,
    describe_packed_kernel,
    packed_kernel_available,
    packed_kernel_decision,
    packed_kernel_mode,
    packed_supported_isas,
    set_packed_kernel,
)

COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None


@pytest.fixture(autouse=True)
def _fresh_decision(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test decides from its own switches; the build (once per process) and the probe are kept."""
    monkeypatch.delenv(packed_cpu.PACKED_KERNEL_ENV, raising=False)
    monkeypatch.delenv(packed_cpu.PACKED_ISA_ENV, raising=False)
    set_packed_kernel(None)
    yield
    set_packed_kernel(None)


def _isas() -> list[str]:
    return packed_supported_isas() if packed_kernel_available() else []


# Odd shapes: widths not a multiple of 4 (rows start mid-byte) or of a vector block, 1 output, long rows.
SHAPES = [(37, 19), (5, 3), (130, 67), (257, 9), (1, 1), (768, 96), (2051, 33)]


def _layer(n_in: int, n_out: int, bias: bool, norm: bool, seed: int, bits: int = 8) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear(n_in, n_out, bias=bias, input_norm=norm, activation_bits=bits).eval()
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) * 2)  # uneven magnitudes: all three ternary values occur
        if norm:
            layer.norm.weight.uniform_(0.5, 1.5)
        if bias:
            layer.bias.normal_()
    return layer


def _inputs(n_in: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    x = torch.randn(*shape, n_in, generator=torch.Generator().manual_seed(seed)) * 3
    flat = x.view(-1, n_in)
    flat[0] = 0  # an all-zero row: the eps floor of the scale, output = bias
    if flat.shape[0] > 2:
        flat[1, : max(1, n_in // 2)] *= 1e4  # a row whose absmax is far above the rest
    return x


@pytest.mark.skipif(not COMPILER, reason="no C++ compiler or ninja: the kernel cannot build here")
def test_kernel_builds_and_reports_its_isas() -> None:
    assert packed_kernel_available(), packed_cpu._PACKED["load_error"]
    isas = packed_supported_isas()
    assert "scalar" in isas and isas == [isa for isa in packed_cpu.PACKED_ISAS if isa in isas]
    if sys.platform == "linux" and "avx2" in open("/proc/cpuinfo").read():
        assert "avx2" in isas  # the AVX2 path runs on every x86 machine the project uses
    decision = packed_kernel_decision()
    assert decision["available"] and decision["isa"] in isas + [None] and decision["excluded"] == {}


@pytest.mark.parametrize("isa", packed_cpu.PACKED_ISAS)
def test_every_isa_is_bit_identical_to_bitlinear_eval(isa: str) -> None:
    if isa not in _isas():
        pytest.skip(f"{isa} is not supported by this CPU / compiler (or the kernel did not build)")
    with packed_kernel_mode("on", isa):
        for k, (n_in, n_out) in enumerate(SHAPES):
            for bias, norm in ((False, True), (True, True), (True, False)):
                layer = _layer(n_in, n_out, bias, norm, seed=k)
                packed = PackedBitLinear.from_bitlinear(layer)
                # batch 1 (decoding), batch > 1 (B, T, C), and enough rows for the tiled GEMM path
                for shape in ((1,), (3, 5), (PACKED_GEMM_MIN_ROWS + 7,)):
                    x = _inputs(n_in, shape, seed=k)
                    with torch.no_grad():
                        ref, out = layer(x), packed(x)
                    assert torch.equal(out, ref), (isa, n_in, n_out, bias, norm, shape)
        assert packed_kernel_decision()["isa"] == isa and packed._weight_cache is None  # never unpacked


def test_low_bit_activations_and_non_finite_rows_match() -> None:
    isas = _isas()
    if not isas:
        pytest.skip("the kernel did not build")
    with packed_kernel_mode("on", isas[0]):
        layer = _layer(130, 67, bias=True, norm=True, seed=3, bits=4)  # q_max 7: codes in [-8, 7]
        packed = PackedBitLinear.from_bitlinear(layer)
        x = _inputs(130, (9,), seed=3)
        x[4, 7], x[5, 2] = float("nan"), float("inf")
        with torch.no_grad():
            ref, out = layer(x), packed(x)
    assert torch.equal(out.isnan(), ref.isnan()) and bool(out[4:6].isnan().all())
    finite = ~ref.isnan()
    assert torch.equal(out[finite], ref[finite])


def test_off_switch_takes_the_exact_pure_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(130, 67, bias=True, norm=True, seed=4)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = _inputs(130, (2, 3), seed=4)
    monkeypatch.setenv(packed_cpu.PACKED_KERNEL_ENV, "off")
    with torch.no_grad():
        out = packed(x)
    decision = packed_kernel_decision()
    assert not decision["use"] and decision["mode"] == "off" and decision["source"] == "environment"
    assert packed._weight_cache is not None  # the pure-torch path cached the unpacked weight (cache_weights=None)
    with torch.no_grad():
        assert torch.equal(out, layer(x))
    assert "BITMAR_PACKED_KERNEL=off" in describe_packed_kernel()


def test_malformed_or_unsupported_switches_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packed_cpu.PACKED_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="BITMAR_PACKED_KERNEL='fast' is not one of auto, on, off"):
        packed_kernel_decision()
    monkeypatch.setenv(packed_cpu.PACKED_KERNEL_ENV, "auto")
    monkeypatch.setenv(packed_cpu.PACKED_ISA_ENV, "neon")
    with pytest.raises(ValueError, match="BITMAR_PACKED_ISA='neon'"):
        packed_kernel_decision()
    if not _isas():
        return
    monkeypatch.setattr(packed_cpu, "packed_supported_isas", lambda: ["avx2", "scalar"])  # an AVX2-only machine
    monkeypatch.setenv(packed_cpu.PACKED_ISA_ENV, "avx512")
    with pytest.raises(ValueError, match="avx512 is not supported by this CPU or compiler"):
        packed_kernel_decision()


def test_auto_checks_exactness_and_measures_against_pure_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    isas = _isas()
    if not isas:
        pytest.skip("the kernel did not build")
    decision = packed_kernel_decision()
    probe = decision["probe"]
    assert decision["mode"] == "auto" and probe is not None and probe["seconds"] < 2
    assert set(probe["ms"]) == {"torch", *[i for i in isas if i != "scalar"]}
    assert decision["use"] is (probe["isa"] is not None)
    if decision["use"]:
        assert probe["ms"][decision["isa"]] < probe["ms"]["torch"]
    # an ISA that is not exact on this machine is excluded before timing
    real = packed_cpu._packed_self_test
    broken = isas[0]
    monkeypatch.setattr(
        packed_cpu,
        "_packed_self_test",
        lambda code: "wrong" if code == packed_cpu._PACKED_ISA_CODES[broken] else real(code),
    )
    set_packed_kernel("auto")
    decision = packed_kernel_decision()
    assert decision["excluded"] == {broken: "wrong"} and decision["isa"] != broken


def test_build_failure_falls_back_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    """No compiler: the pure-torch path runs (exact), one warning says why; BITMAR_PACKED_KERNEL=on refuses."""

    def no_compiler(build_dir: object, name: str) -> None:
        raise RuntimeError("Error building extension 'bitmar_packed': c++: command not found")

    state = dict(packed_cpu._PACKED)
    monkeypatch.setattr(packed_cpu, "_packed_compile", no_compiler)
    monkeypatch.setattr(packed_cpu, "_packed_registered", lambda: False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    packed_cpu._PACKED.update(loaded=None, load_error="", logged=False, decision=None, use=None)
    try:
        layer = _layer(37, 19, bias=True, norm=True, seed=5)
        packed = PackedBitLinear.from_bitlinear(layer)
        x = _inputs(37, (4,), seed=5)
        with caplog.at_level(logging.INFO, logger="bitmar.kernels"), torch.no_grad():
            out = packed(x)
            packed(x)
        assert torch.equal(out, layer(x))
        lines = [r for r in caplog.records if r.name == "bitmar.kernels"]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert "pure torch" in lines[0].getMessage() and "c++: command not found" in lines[0].getMessage()
        assert not packed_kernel_available() and packed_supported_isas() == []
        set_packed_kernel("on")
        with pytest.raises(RuntimeError, match="BITMAR_PACKED_KERNEL=on but the packed CPU kernel could not be built"):
            packed_kernel_decision()
    finally:
        packed_cpu._PACKED.update(state)


@pytest.mark.skipif(not COMPILER, reason="no C++ compiler or ninja: the kernel cannot build here")
def test_packed_model_holds_only_packed_bytes_and_scales() -> None:
    """pack_model: after decoding-like calls no unpacked copy exists; tensors = packed bytes + scales + norms."""
    torch.manual_seed(0)
    model = nn.Sequential(BitLinear(96, 160), nn.GELU(), BitLinear(160, 96, bias=True)).eval()
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        ref = model(x)
        pack_model(model)
        out = model(x)
    assert torch.equal(out, ref)
    for layer in (model[0], model[2]):
        assert isinstance(layer, PackedBitLinear) and layer._weight_cache is None and layer._int8_cache is None
        assert layer.packed_weight.numel() == -(-layer.in_features * layer.out_features // 4)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    packed_bytes = (96 * 160 + 160 * 96) // 4
    assert held == packed_bytes + 4 * (2 + 96 + 160 + 96)  # + 2 scales, 2 norm gains, 1 bias (float32)


@pytest.mark.skipif(not COMPILER, reason="no C++ compiler or ninja: the kernel cannot build here")
def test_a_fresh_process_loads_the_cached_kernel_without_compiling(tmp_path: object) -> None:
    """The second process finds the build in the cache: no compiler is needed (CXX=/bin/false) and no log warns."""
    code = (
        "import torch\n"
        "from bitmar.kernels import packed_cpu as k\n"
        "d = k.packed_kernel_decision()\n"
        "assert d['available'] and d['library'], d\n"
        "print('isa', d['isa'])\n"
    )
    env = dict(os.environ, CXX="/bin/false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "isa" in proc.stdout, proc.stderr[-2000:]


def test_large_batches_on_an_int8_fast_cpu_keep_only_an_int8_copy() -> None:
    """Where oneDNN's int8 GEMM was measured faster (large batches), the packed layer prepacks an int8 copy from its
    bytes once (no float copy); cache_weights=False keeps nothing and runs the kernel. Same bits either way."""
    isas = _isas()
    if not isas or not int8_gemm_available():
        pytest.skip("needs the kernel and oneDNN's int8 GEMM")
    layer = _layer(130, 67, bias=True, norm=True, seed=6)
    lean, keeps = PackedBitLinear.from_bitlinear(layer, cache_weights=False), PackedBitLinear.from_bitlinear(layer)
    x = _inputs(130, (40,), seed=6)
    with torch.no_grad(), packed_kernel_mode("on", isas[0]), int8_gemm_mode("on", min_rows=16):
        ref = layer(x)
        assert torch.equal(keeps(x), ref) and torch.equal(lean(x), ref)
        assert torch.equal(keeps(x[:3]), ref[:3])  # below min_rows: the kernel
    assert keeps._int8_only is not None and keeps._weight_cache is None and keeps._int8_cache is None
    assert lean._int8_only is None and lean._weight_cache is None

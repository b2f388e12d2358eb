"""Benchmark suite: the "no difference" rule, the FLOP counter, BitLinear's weight cache, and the quick run's table.

Numbers are never asserted here (performance claims live in `python -m bitmar.bench`); the end-to-end test checks
the table's shape only.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bitmar.bitnet as bitnet
import bitmar.bitnet.int8_gemm as bitnet_gemm
import bitmar.bitnet.layer as bitnet_layer
from bitmar.bench import suite
from bitmar.bench.__main__ import main as bench_main
from bitmar.bench.generation import ternary_weight_bytes
from bitmar.bench.rows import NO_DIFFERENCE, Goal, Row, Settings, per_repeat_ratios, ratio_row, value_row, verdict
from bitmar.bench.timing import train_step
from bitmar.bench.training import attention_flops, count_flops, linear_flops
from bitmar.bitnet import BitLinear, PackedBitLinear, int8_gemm_decision, int8_gemm_mode, pack_model, set_int8_gemm
from bitmar.model import BitMar
from bitmar.model.layers import Attention, mlp_hidden_size
from bitmar.model.model_config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------- the rules


def test_no_difference_when_the_distance_from_one_is_within_the_spread() -> None:
    at_most = Goal("<=", 1.2, "<= 1.2x")
    at_least = Goal(">=", 3.0, ">= 3x")
    assert verdict(1.05, 0.95, 1.10, at_most) == NO_DIFFERENCE  # |0.05| < 0.15
    assert verdict(0.97, 0.90, 1.00, None) == NO_DIFFERENCE
    assert verdict(1.10, 1.08, 1.12, at_most) == "yes"  # a real slowdown, within the goal
    assert verdict(1.30, 1.25, 1.35, at_most) == "no"
    assert verdict(1.10, 1.00, 1.10, at_most) == "yes"  # |0.10| == spread: strict, so a difference
    assert verdict(1.30, 1.25, 1.35, None) == "-"
    assert verdict(3.5, 3.5, 3.5, at_least) == "yes"  # no spread (exact measurement): the median decides
    # Measured values are not compared with 1: only their goal counts.
    assert verdict(1.0, 0.5, 1.5, Goal(">=", 2.0, ">= 2"), is_ratio=False) == "no"
    with pytest.raises(ValueError, match="non-finite"):
        verdict(float("nan"), 1.0, 1.0, None)


def test_a_row_without_a_measurable_difference_is_judged_as_ratio_one() -> None:
    def row(goal: Goal) -> Row:
        return ratio_row("t", "r", "A", "B", "time A / time B", [1.1, 0.9, 1.2, 0.8], [1.0] * 4, goal)

    faster_goal, slower_ok = Goal(">=", 3.0, ">= 3x"), Goal("<=", 1.2, "<= 1.2x")
    assert row(slower_ok).verdict == NO_DIFFERENCE and row(slower_ok).goal_met is True
    assert row(faster_goal).verdict == NO_DIFFERENCE and row(faster_goal).goal_met is False
    d = row(slower_ok).to_dict()
    assert d["no_difference"] is True and d["spread"] == pytest.approx(d["p75"] - d["p25"])


def test_ratios_are_taken_per_repeat() -> None:
    median, p25, p75 = per_repeat_ratios([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])  # ratios 2, 2, 3
    assert (median, p25, p75) == (2.0, 2.0, 2.5)
    with pytest.raises(ValueError, match="same positive number of repeats"):
        per_repeat_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="must be"):
        Goal("<", 1.0, "bad")


# --------------------------------------------------------------------------------------------------- FLOPs


def test_flop_counter_on_a_hand_computed_case() -> None:
    linear = nn.Linear(4, 3)
    with count_flops(linear) as flops:
        linear(torch.randn(2, 5, 4))
    assert flops.matmul == 2 * 10 * 4 * 3 == 240 and flops.attention == 0

    # dim 8, 2 query heads sharing 1 key/value head (head_dim 4), 5 tokens:
    #   qkv_proj 8 -> 8 + 2*4 = 16: 2*5*8*16 = 1280; o_proj 8 -> 8: 2*5*8*8 = 640
    #   scores and values: 4 * B(1) * H(2) * Tq(5) * Tk(5) * d(4) = 800
    attn = Attention(8, 2, 1)
    with count_flops(attn) as flops:
        attn(torch.randn(1, 5, 8))
    assert (flops.matmul, flops.attention) == (1920, 800)
    assert flops.forward == 2720 and flops.training == 3 * 2720  # backward = 2 x forward: 6 N T + attention
    assert linear_flops(5, 8, 16) == 1280 and attention_flops(1, 2, 5, 5, 4) == 800


def test_flop_counter_covers_every_decoder_layer_and_the_tied_lm_head() -> None:
    cfg = ModelConfig(text_encoder="bitnet-tiny", text_decoder="bitnet-tiny", vocab_size=50, hidden_size=16,
                      use_vision=False, use_memory=False, gqa_group_size=2, max_seq_len=16)  # fmt: skip
    model = BitMar(cfg)
    b, t, c, layers, heads = 2, 6, 16, cfg.decoder_layers, cfg.decoder_heads
    hd, kv = c // heads, heads // 2
    hidden = mlp_hidden_size(c, cfg.mlp_ratio)
    per_layer = c * (c + 2 * kv * hd) + c * c + c * 2 * hidden + hidden * c  # qkv, o, gate_up, down
    expected_matmul = 2 * b * t * (layers * per_layer + c * cfg.vocab_size)  # + tied LM head
    with torch.no_grad(), count_flops(model) as flops:
        model(torch.randint(0, 50, (b, t)), return_latents=False)
    assert flops.matmul == expected_matmul
    assert flops.attention == layers * 4 * b * heads * t * t * hd
    assert "lm_logits" not in vars(model)  # the counting wrapper is removed afterwards


def test_packed_weight_bytes_by_hand() -> None:
    layer = nn.Sequential(BitLinear(8, 8))
    assert ternary_weight_bytes(layer) == 8 * 8 * 4  # float32 master weights
    packed = pack_model(copy.deepcopy(layer))
    assert ternary_weight_bytes(packed) == 8 * 8 // 4 + 4  # 2 bits per weight + the float32 scale
    assert ternary_weight_bytes(nn.Sequential(BitLinear(8, 8, quantize=False))) == 0  # not a ternary layer


# --------------------------------------------------------------------------------------------------- BitLinear cache


def _uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    # The compile path bypasses the cache and quantizes at every call: the reference for the cached path.
    monkeypatch.setattr(bitnet_layer, "_compiling", lambda: True)


def _train_steps(layer: BitLinear, rows: int, steps: int = 3) -> list[torch.Tensor]:
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(rows)
    out = []
    for _ in range(steps):
        x = torch.randn(rows, layer.in_features, generator=gen, requires_grad=True)
        y1, y2 = layer(x), layer(0.5 * x)  # two calls per step, as phase 3 runs the decoder three times
        (y1.square().sum() + y2.sum()).backward()
        out += [y1.detach(), y2.detach(), x.grad, *(p.grad.clone() for p in layer.parameters())]
        optimizer.step()
        optimizer.zero_grad()
    return out


@pytest.mark.parametrize("rows", [5, 300])  # float GEMM route and (above INT8_GEMM_MIN_ROWS) the int8 route
def test_cached_training_path_is_bit_identical_to_quantizing_every_call(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = BitLinear(24, 40, bias=True)
    reference = copy.deepcopy(layer)
    cached = _train_steps(layer, rows)
    assert layer._weight_cache is not None and layer._weight_cache.ternary is not None
    _uncached(monkeypatch)
    expected = _train_steps(reference, rows)
    assert all(torch.equal(a, b) for a, b in zip(cached, expected, strict=True))


def test_eval_cache_is_reused_and_invalidated_by_weight_updates_and_train() -> None:
    torch.manual_seed(1)
    layer = BitLinear(16, 12).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer(x)
        cache = layer._weight_cache
        assert torch.equal(layer(x), first) and layer._weight_cache is cache and cache.ternary is not None
        layer.weight.neg_()  # in-place update: new version, the cache refills
        assert torch.equal(layer(x), -first)
    layer.train()
    assert layer._weight_cache is None
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.weight.data.neg_()  # .data bypasses the version counter ...
        layer.clear_weight_cache()  # ... so it needs an explicit clear
        assert torch.equal(layer(x), first)
    copy.deepcopy(layer), pickle.dumps(layer)  # the cache (with an opaque oneDNN weight) never travels


def test_stale_backward_after_an_in_place_update_is_refused() -> None:
    layer = BitLinear(8, 8)
    y = layer(torch.randn(3, 8, requires_grad=True))
    with torch.no_grad():
        layer.weight.add_(1.0)  # the cached buffers are refilled at the next call; this graph must not use them
    layer(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_int8_route_threshold_changes_speed_only() -> None:
    torch.manual_seed(2)
    layer = BitLinear(32, 24, bias=True).eval()
    packed = PackedBitLinear.from_bitlinear(layer)
    outputs = []
    for min_rows in (bitnet.INT8_GEMM_MIN_ROWS, 1):
        with int8_gemm_mode("on", min_rows=min_rows):  # forced: the measured route may be float on this CPU
            for rows in (3, 300):
                x = torch.randn(rows, 32, generator=torch.Generator().manual_seed(rows))
                with torch.no_grad():
                    outputs.append((layer(x), packed(x)))
    assert bitnet_gemm._INT8_GEMM["min_rows"] == bitnet.INT8_GEMM_MIN_ROWS and bitnet_gemm._INT8_GEMM["mode"] is None
    for (a, b), (c, d) in zip(outputs[:2], outputs[2:], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(c, d)
    with pytest.raises(ValueError, match="min_rows"):
        set_int8_gemm(True, min_rows=0)


# --------------------------------------------------------------------------------------------------- command line


def test_cuda_request_without_a_gpu_fails_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--device", "cuda", "--only", "gpu_training"])
    assert exit_info.value.code == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gpu_training needs a CUDA GPU"):
        from bitmar.bench.training import gpu_training_rows

        gpu_training_rows(Settings(device="cuda"))


def test_gpu_training_logic_runs_on_cpu_with_compile_forced_eager() -> None:
    """The body of `--device cuda` (bf16 steps, eager vs torch.compile, FLOPs, MFU) on CPU, tiny config: a GPU session
    should not be the first to run it. Compilation itself is skipped (force_eager): on CPU it takes minutes."""
    from bitmar.bench.training import TINY_CONFIG, compiled_training_rows

    seconds: list[float] = []

    def cpu_timer(step, device: torch.device) -> tuple[float, float]:
        assert device.type == "cpu"
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        return seconds[-1], 0.5

    with torch.compiler.set_stance("force_eager"):
        rows = compiled_training_rows(TINY_CONFIG, torch.device("cpu"), 2, 2, 1, 790.0, cpu_timer)
    assert len(seconds) == 2 * (1 + 2) * 2  # 2 phases x (1 warm-up + 2 repeats) x 2 variants
    per_phase = ["tokens/s A / tokens/s B"] + ["model FLOPs utilisation", "torch.cuda.max_memory_allocated"] * 2
    assert [r.metric for r in rows] == per_phase * 2
    assert all(math.isfinite(r.median) and r.median > 0 for r in rows)
    mfu = [r for r in rows if r.metric == "model FLOPs utilisation"]
    assert [r.variant_a for r in mfu] == ["eager", "torch.compile"] * 2 and all(r.goal is not None for r in mfu)
    # Phase 2's calls: warm-up (eager, compile), repeat 0 (eager, compile), repeat 1 (compile, eager).
    eager_s = [seconds[2], seconds[5]]
    flops = rows[0].details["train_flops_per_step"]
    assert flops > 0
    expected = statistics.median(100 * flops / s / 790e12 for s in eager_s)
    assert mfu[0].median == pytest.approx(expected)
    assert [r.median for r in rows if r.metric == "torch.cuda.max_memory_allocated"] == [0.5] * 4


def test_bad_selection_fails_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_main(["--only", "bitlinaer"])
    assert "unknown benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["--only", "gpu_training"])  # a CUDA-only benchmark on the default CPU device
    assert "do not run on --device cpu" in capsys.readouterr().err


def test_the_bench_reports_the_route_of_the_ternary_matmuls() -> None:
    route = int8_gemm_decision()
    machine = suite.machine_info(Settings(quick=True))
    assert machine["ternary_matmul_route"] == route and route["route"] in ("int8", "float")
    header = suite.format_table({"machine": machine, "rows": [], "unavailable": []})
    assert f"ternary matmuls on CPU (BitLinear, PackedBitLinear): {route['route']} GEMM, {route['reason']}" in header
    # The BitLinear benchmark: the route in its JSON config and report; its float variant is forced float.
    from bitmar.bench import bitlinear

    result = bitlinear.run_benchmark(tokens=8, repeats=1, dims=(8,), warmup=0)
    assert result["config"]["route"] == route["route"] and result["config"]["route_decision"] == route
    assert f"Route of the ternary matmuls (variant BitLinear): {route['route']} GEMM" in bitlinear.format_report(result)
    layer, x = BitLinear(4, 4), torch.randn(3, 4, requires_grad=True)
    with int8_gemm_mode("on"):
        train_step(layer, x, torch.ones(3, 4), int8_gemm=False)  # the forced float variant ...
        assert bitnet_gemm._INT8_GEMM["mode"] == "on"  # ... gives back the mode in force (it used to leave "allowed")
    assert bitnet_gemm._INT8_GEMM["mode"] is None


def test_outputs_are_written_as_json_and_markdown(tmp_path: Path) -> None:
    row = ratio_row("t", "some ratio", "A", "B", "time A / time B", [2.0, 2.2], [1.0, 1.0],
                          Goal("<=", 1.2, "<= 1.2x"))  # fmt: skip
    value = value_row("t", "some value", "A", "samples/s", [5.0, 7.0], None, "samples/s")
    result = {
        "machine": suite.machine_info(Settings(quick=True)),
        "seconds": {"t": 1.0},
        "rows": [row.to_dict(), value.to_dict()],
        "unavailable": [{"benchmark": "t", "name": "other", "reason": "not installed"}],
    }
    json_path, md_path = suite.write_outputs(result, tmp_path / "out" / "bench.json")
    assert json.loads(json_path.read_text())["rows"][0]["verdict"] == "no"
    table = md_path.read_text()
    assert "| some ratio | A | B |" in table and "2.1x" in table and "unavailable: not installed" in table
    assert "goals missed: some ratio" in table
    assert not list(json_path.parent.glob(".*tmp"))  # atomic writes leave no temporary files


# --------------------------------------------------------------------------------------------- packed decoding


def test_packed_decoding_loads_without_float_weights_and_decodes_like_pack_model(tmp_path: Path) -> None:
    """The decoding benchmark's packed variant: built from the packed state file (no float ternary weight is ever
    allocated: the BitLinear layers start on the meta device), it decodes the same tokens as pack_model's model."""
    from bitmar.bench import packed_decoding
    from bitmar.bench.training import TINY_CONFIG
    from bitmar.config import load_config

    state = tmp_path / "packed.pt"
    packed_decoding.save_packed_state(TINY_CONFIG, state, seed=3)
    loaded = packed_decoding.load_packed_model(TINY_CONFIG, state)
    torch.manual_seed(3)
    reference = pack_model(BitMar(load_config(TINY_CONFIG).model).eval())
    assert not any(isinstance(m, BitLinear) and m.quantize for m in loaded.modules())
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ids = torch.randint(4, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    feats = torch.randn(2, loaded.config.vision_encoder_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = loaded.generate(ids, vision_features=feats, max_new_tokens=6)
        assert torch.equal(got, reference.generate(ids, vision_features=feats, max_new_tokens=6))
    result = packed_decoding.run_variant("packed", str(TINY_CONFIG), 1, torch.get_num_threads(), 3, 1, str(state))
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0 and "use" in result["kernel"]


# --------------------------------------------------------------------------------------------------- end to end

EXPECTED_ROWS = {  # benchmark -> rows (+ unavailable entries) a quick CPU run produces
    "bitlinear": 4,
    "packed": 2,
    "memory": 3,
    "loader": 4,
    "training": 3,  # quick: tiny phases 2 and 3, full phase 3
    "distributed": 1,
    "generation": 3,
    "attention": 1,
    "decoding": 3,  # quick: tiny config, batch 1, 1 thread: packed vs twin, packed vs BitLinear (tokens/s), peak RSS
}


@pytest.mark.slow
def test_quick_suite_prints_the_whole_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bitmar.bench", "--quick", "--threads", "1", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == set(EXPECTED_ROWS) == set(suite.benchmark_names("cpu"))
    for name, count in EXPECTED_ROWS.items():
        rows = [r for r in result["rows"] if r["benchmark"] == name]
        missing = [u for u in result["unavailable"] if u["benchmark"] == name]
        assert len(rows) + len(missing) == count, (name, rows, missing)
        assert rows, f"{name} produced no measurement"
    for r in result["rows"]:
        values = (r["median"], r["p25"], r["p75"])
        assert all(math.isfinite(v) for v in values) and r["p25"] <= r["median"] <= r["p75"], r
        if r["is_ratio"]:
            assert min(values) > 0 and r["spread"] == pytest.approx(r["p75"] - r["p25"]), r
        assert r["verdict"] in ("yes", "no", NO_DIFFERENCE, "-")
        assert r["repeats"] >= 1 and r["variant_a"] and r["variant_b"]
    machine = result["machine"]
    assert machine["quick"] is True and machine["torch"] == torch.__version__ and machine["cpu"]
    route = machine["ternary_matmul_route"]["route"]  # which GEMM the ternary matmuls of this run took
    assert {r["variant_a"] for r in result["rows"] if r["benchmark"] == "bitlinear"} == {f"BitLinear ({route} GEMM)"}
    table = out.with_suffix(".md").read_text()
    assert proc.stdout.strip().startswith("BitMar benchmarks (--quick)")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| benchmark | A | B | metric | median | p25-p75 | n | goal | met? |")
    assert len(lines) == 1 + len(result["rows"]) + len(result["unavailable"])
    assert all(r["name"] in table for r in result["rows"])

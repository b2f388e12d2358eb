"""BitLinear cost next to nn.Linear, packed storage, and PackedBitLinear inference latency.

    python -m bitmar.bench.bitlinear [--tokens 8192] [--repeats 15] [--dims 256 768] [--quick] [--json out.json]

Variants run interleaved (the order rotates every repeat), so background load hits them alike; ratios are
taken per repeat against the nn.Linear run of the same repeat and summarised by median and quartiles.
The baseline is nn.Linear(d, d, bias=False) (no norm, BitLinear's default bias setting); every variant
gets the same float32 input (tokens, d) with requires_grad=True, as inside a network.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitmar.bench.rows import NOT_SLOWER, TIME_RATIO, Goal, Row, Settings, Unavailable, ratio_row
from bitmar.bench.timing import quartiles, time_interleaved, train_step
from bitmar.bitnet import (
    BitLinear,
    PackedBitLinear,
    int8_gemm_available,
    int8_gemm_decision,
    pack_ternary,
    pack_ternary_base3,
    packed_bits_per_weight,
    quantize_weights,
)
from bitmar.cli_args import positive_int
from bitmar.fileio import atomic_write_text

TRAIN_VARIANTS = (
    "nn.Linear",
    "BitLinear",
    "BitLinear, float GEMM",
    "BitLinear(quantize=False)",
    "BitLinear(fused=False)",
)
INFERENCE_VARIANTS = ("BitLinear eval", "PackedBitLinear", "PackedBitLinear(cache_weights=False)", "nn.Linear eval")


def summarize(times: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, float]]:
    """Median and quartiles (ms) per variant, per-repeat wall-time ratios to `baseline` (median, quartiles) and the
    median per-repeat CPU-time ratio."""
    out = {}
    wall, cpu = times["wall"], times["cpu"]
    for name, ts in wall.items():
        q1, med, q3 = quartiles([t * 1e3 for t in ts])
        r1, rmed, r3 = quartiles([t / b for t, b in zip(ts, wall[baseline], strict=True)])
        cpu_ratio = statistics.median(t / max(b, 1e-9) for t, b in zip(cpu[name], cpu[baseline], strict=True))
        out[name] = {
            "median_ms": med,
            "p25_ms": q1,
            "p75_ms": q3,
            "ratio": rmed,
            "ratio_p25": r1,
            "ratio_p75": r3,
            "cpu_ratio": cpu_ratio,
        }
    return out


def _train_modules(d: int, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    bit = BitLinear(d, d)
    modules: dict[str, nn.Module] = {
        "nn.Linear": nn.Linear(d, d, bias=False),
        "BitLinear": bit,
        "BitLinear, float GEMM": BitLinear(d, d),
        "BitLinear(quantize=False)": BitLinear(d, d, quantize=False),
        "BitLinear(fused=False)": BitLinear(d, d, fused=False),
    }
    for module in modules.values():
        module.weight.data.copy_(bit.weight.data)
    return modules


def time_train_step(d: int, tokens: int = 8192, repeats: int = 15, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Forward+backward time of BitLinear variants and nn.Linear at width d on (tokens, d) float32 inputs."""
    modules = _train_modules(d, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=generator).requires_grad_(True)  # (N, d)
    grad = torch.randn(tokens, d, generator=generator)  # (N, d)
    fns = {
        name: (lambda m=m, name=name: train_step(m, x, grad, int8_gemm=name != "BitLinear, float GEMM"))
        for name, m in modules.items()
    }
    times = time_interleaved(fns, repeats, warmup)
    return {"d": d, "tokens": tokens, "repeats": repeats, "variants": summarize(times, baseline="nn.Linear")}


def time_inference(d: int, tokens: int = 8192, repeats: int = 15, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Eval forward latency: PackedBitLinear (default: an int8 copy for batches this large where oneDNN's int8 GEMM
    was measured faster, else the packed kernel; cache_weights=False: the packed kernel at every size, or unpacking
    each call where the kernel is not built) vs BitLinear eval vs nn.Linear."""
    torch.manual_seed(seed)
    bit = BitLinear(d, d).eval()
    linear = nn.Linear(d, d, bias=False).eval()
    modules: dict[str, nn.Module] = {
        "BitLinear eval": bit,
        "PackedBitLinear": PackedBitLinear.from_bitlinear(bit),
        "PackedBitLinear(cache_weights=False)": PackedBitLinear.from_bitlinear(bit, cache_weights=False),
        "nn.Linear eval": linear,
    }
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))  # (N, d)

    def call(module: nn.Module) -> None:
        with torch.no_grad():
            module(x)

    fns = {name: (lambda m=m: call(m)) for name, m in modules.items()}
    times = time_interleaved(fns, repeats, warmup)
    with torch.no_grad():
        ref, packed = bit(x), modules["PackedBitLinear"](x)
    max_rel_err = float((packed - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    return {
        "d": d,
        "tokens": tokens,
        "repeats": repeats,
        "max_rel_err_vs_bitlinear": max_rel_err,
        "variants": summarize(times, baseline="BitLinear eval"),
    }


def storage_report(dims: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """Bytes of a d x d ternary weight in float32, 2-bit and base-3 packing (measured on packed tensors)."""
    rows = []
    for d in dims:
        torch.manual_seed(seed)
        w_ternary, _ = quantize_weights(BitLinear(d, d).weight)
        numel = w_ternary.numel()
        bytes_2bit = pack_ternary(w_ternary).numel()
        bytes_base3 = pack_ternary_base3(w_ternary).numel()
        rows.append(
            {
                "d": d,
                "weights": numel,
                "float32_bytes": 4 * numel,
                "packed_2bit_bytes": bytes_2bit,
                "packed_base3_bytes": bytes_base3,
                "bits_per_weight_2bit": 8 * bytes_2bit / numel,
                "bits_per_weight_base3": 8 * bytes_base3 / numel,
                "bits_per_weight_2bit_formula": packed_bits_per_weight(numel),
                "compression_2bit": 4 * numel / bytes_2bit,
                "compression_base3": 4 * numel / bytes_base3,
            }
        )
    return rows


def run_benchmark(
    tokens: int = 8192, repeats: int = 15, dims: Sequence[int] = (256, 768), warmup: int = 2
) -> dict[str, Any]:
    """All BitLinear measurements as one dict (what `python -m bitmar.bench` collects).

    "config" says which route the ternary matmuls took: "route" ("int8" or "float" GEMM, the variant "BitLinear";
    "BitLinear, float GEMM" always takes float) and "route_decision" (`int8_gemm_decision()`: measured times, reason).
    """
    decision = int8_gemm_decision()
    return {
        "config": {
            "tokens": tokens,
            "repeats": repeats,
            "dims": list(dims),
            "threads": torch.get_num_threads(),
            "int8_gemm": int8_gemm_available(),
            "int8_gemm_status": decision["int8_status"],
            "route": decision["route"],
            "route_decision": decision,
            "torch": torch.__version__,
        },
        "train": [time_train_step(d, tokens, repeats, warmup) for d in dims],
        "inference": [time_inference(d, tokens, repeats, warmup) for d in dims],
        "storage": storage_report(dims),
    }


def format_report(result: dict[str, Any]) -> str:
    """Markdown tables of a `run_benchmark` result."""
    cfg = result["config"]
    lines = [
        f"BitLinear benchmark: {cfg['tokens']} tokens, {cfg['repeats']} repeats, {cfg['threads']} CPU threads, "
        f"float32, torch {cfg['torch']}, int8 GEMM: {'yes' if cfg['int8_gemm'] else 'no'} ({cfg['int8_gemm_status']})",
        f"Route of the ternary matmuls (variant BitLinear): {cfg['route']} GEMM ({cfg['route_decision']['reason']}; "
        f"mode {cfg['route_decision']['mode']})",
        "",
        "Forward+backward, ratio to nn.Linear(d, d, bias=False) (per-repeat wall-time ratio: median, [p25, p75]):",
        "",
        "| d | variant | median ms | ratio | ratio p25-p75 | CPU-time ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["train"]:
        for name, v in row["variants"].items():
            lines.append(
                f"| {row['d']} | {name} | {v['median_ms']:.1f} | {v['ratio']:.3f} | "
                f"{v['ratio_p25']:.3f}-{v['ratio_p75']:.3f} | {v['cpu_ratio']:.3f} |"
            )
    lines += [
        "",
        "Inference forward (no_grad), ratio to BitLinear eval:",
        "",
        "| d | variant | median ms | ratio | ratio p25-p75 | CPU-time ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["inference"]:
        for name, v in row["variants"].items():
            lines.append(
                f"| {row['d']} | {name} | {v['median_ms']:.2f} | {v['ratio']:.3f} | "
                f"{v['ratio_p25']:.3f}-{v['ratio_p75']:.3f} | {v['cpu_ratio']:.3f} |"
            )
    errs = ", ".join(f"d={row['d']}: {row['max_rel_err_vs_bitlinear']:.1e}" for row in result["inference"])
    lines += [
        "",
        f"PackedBitLinear vs BitLinear eval, max |diff| / max |out|: {errs}",
        "",
        "Weight storage of a d x d layer:",
        "",
        "| d | float32 bytes | 2-bit bytes | bits/weight | base-3 bytes | bits/weight | compression 2-bit / base-3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["storage"]:
        lines.append(
            f"| {row['d']} | {row['float32_bytes']} | {row['packed_2bit_bytes']} | {row['bits_per_weight_2bit']:.3f} | "
            f"{row['packed_base3_bytes']} | {row['bits_per_weight_base3']:.3f} | "
            f"{row['compression_2bit']:.1f}x / {row['compression_base3']:.1f}x |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Rows of `python -m bitmar.bench`
# ---------------------------------------------------------------------------------------------------------------

# The cost of quantization: the norm and quantizer passes around the GEMM weigh more when the GEMM is small.
BITLINEAR_GOALS = {256: Goal("<=", 1.10, "<= 1.10x"), 768: Goal("<=", 1.05, "<= 1.05x")}


def _auto_bitlinear(d: int) -> tuple[nn.Module | None, str]:
    """transformers' AutoBitLinear in online (training-time) quantization mode with RMSNorm, or why not."""
    try:
        from transformers.integrations.bitnet import AutoBitLinear
    except ImportError as err:
        return None, f"transformers.integrations.bitnet.AutoBitLinear cannot be imported: {err}"
    params = inspect.signature(AutoBitLinear.__init__).parameters
    if "online_quant" not in params:
        return None, "this transformers' AutoBitLinear has no online_quant argument (training-time quantization)"
    kwargs = {"use_rms_norm": True} if "use_rms_norm" in params else {}
    return AutoBitLinear(d, d, bias=False, online_quant=True, **kwargs), "ok"


def bitlinear_rows(settings: Settings) -> list[Row | Unavailable]:
    """Forward+backward at d = 256 and 768 on (tokens, d) float32 inputs: BitLinear against nn.Linear (the cost of
    quantization) and against AutoBitLinear(online_quant=True, use_rms_norm=True) (the same computation in
    transformers: RMSNorm, absmax int8 activations, absmean ternary weights, straight-through backward; its quantizers
    are torch.compile'd, so the full run includes compilation in the warm-up; --quick runs them eagerly)."""
    tokens, repeats, warmup = (2048, 5, 1) if settings.quick else (8192, 15, 2)
    out: list[Row | Unavailable] = []
    for d in (256, 768):
        torch.manual_seed(0)
        bit = BitLinear(d, d)
        linear = nn.Linear(d, d, bias=False)
        auto, reason = _auto_bitlinear(d)
        modules: dict[str, nn.Module] = {"nn.Linear": linear, "BitLinear": bit}
        for m in (linear, auto):
            if m is not None:
                with torch.no_grad():
                    m.weight.copy_(bit.weight)
        generator = torch.Generator().manual_seed(d)
        x = torch.randn(tokens, d, generator=generator).requires_grad_(True)  # (N, d)
        grad = torch.randn(tokens, d, generator=generator)  # (N, d)
        stance = torch.compiler.set_stance("force_eager") if settings.quick else contextlib.nullcontext()
        auto_label = "AutoBitLinear(online_quant)" + (" eager" if settings.quick else ", compiled")
        if auto is not None:
            try:  # capability probe: torch.compile needs a working C++ toolchain on CPU
                with stance:
                    train_step(auto, x, grad)
                modules[auto_label] = auto
            except Exception as err:  # noqa: BLE001 - any failure of the probe means "not available here"
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                auto = None
        fns = {name: functools.partial(train_step, m, x, grad) for name, m in modules.items()}
        with stance:
            times = time_interleaved(fns, repeats, warmup)["wall"]
        name = f"BitLinear fwd+bwd, d={d}, {tokens} tokens"
        route = int8_gemm_decision()["route"]  # BitLinear's ternary matmul: int8 or float GEMM
        details = {"median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}, "route": route}
        out.append(
            ratio_row(
                "bitlinear",
                name,
                f"BitLinear ({route} GEMM)",
                "nn.Linear",
                TIME_RATIO,
                times["BitLinear"],
                times["nn.Linear"],
                BITLINEAR_GOALS[d],
                details,
            )
        )
        if auto is None:
            out.append(Unavailable("bitlinear", f"{name}: BitLinear vs AutoBitLinear", reason))
        else:
            out.append(
                ratio_row(
                    "bitlinear",
                    name,
                    f"BitLinear ({route} GEMM)",
                    auto_label,
                    TIME_RATIO,
                    times["BitLinear"],
                    times[auto_label],
                    NOT_SLOWER,
                    details,
                )
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitmar.bench.bitlinear", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=None, help="rows of the input (default 8192)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per variant (default 15)")
    parser.add_argument("--dims", type=positive_int, nargs="+", default=[256, 768], help="layer widths d")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small run (< 20 s): 512 tokens, 3 repeats, 1 warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokens = args.tokens or (512 if args.quick else 8192)
    repeats = args.repeats or (3 if args.quick else 15)
    result = run_benchmark(tokens, repeats, args.dims, warmup=1 if args.quick else 2)
    print(format_report(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

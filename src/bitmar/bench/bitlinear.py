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
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitmar.bitnet import (
    BitLinear,
    PackedBitLinear,
    int8_gemm_available,
    int8_gemm_decision,
    int8_gemm_mode,
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


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function, run round-robin with a rotating order (fair under background load).

    Returns {"wall": {name: [s, ...]}, "cpu": {name: [s, ...]}}: wall-clock time and process CPU time (the CPU
    time of a single-threaded run ignores time lost to other processes on a shared machine).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {"wall": wall, "cpu": cpu}


def summarize(times: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, float]]:
    """Median and quartiles (ms) per variant, per-repeat wall-time ratios to `baseline` (median, quartiles) and the
    median per-repeat CPU-time ratio."""
    out = {}
    wall, cpu = times["wall"], times["cpu"]
    for name, ts in wall.items():
        q1, med, q3 = _quartiles([t * 1e3 for t in ts])
        r1, rmed, r3 = _quartiles([t / b for t, b in zip(ts, wall[baseline], strict=True)])
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


def _train_step(module: nn.Module, x: Tensor, grad: Tensor, int8_gemm: bool = True) -> None:
    """One forward+backward; `int8_gemm=False` forces float GEMMs, True keeps the route in force (measured by
    default: a forced int8 route could run oneDNN's reference kernel, hundreds of times slower, on some CPUs)."""
    x.grad = None
    for p in module.parameters():
        p.grad = None
    with contextlib.nullcontext() if int8_gemm else int8_gemm_mode("off"):
        module(x).backward(grad)


def time_train_step(d: int, tokens: int = 8192, repeats: int = 15, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Forward+backward time of BitLinear variants and nn.Linear at width d on (tokens, d) float32 inputs."""
    modules = _train_modules(d, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=generator).requires_grad_(True)  # (N, d)
    grad = torch.randn(tokens, d, generator=generator)  # (N, d)
    fns = {
        name: (lambda m=m, name=name: _train_step(m, x, grad, int8_gemm=name != "BitLinear, float GEMM"))
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

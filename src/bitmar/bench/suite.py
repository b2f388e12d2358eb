"""`python -m bitmar.bench`: every benchmark in one run, one table of side-by-side ratios.

Each benchmark module returns `Row`s (and `Unavailable` entries) built with `bitmar.bench.rows`, which also states
the "no difference" rule; this module only collects them.

Registry: `_registry()` maps a name (`--only NAME`, `benchmark_names()`) to the function that runs it and the devices
it runs on; `run_suite` runs a selection and returns a JSON-ready dict; `format_table` renders it as Markdown.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from bitmar.bench.rows import NO_DIFFERENCE, Row, Settings, Unavailable
from bitmar.bitnet import int8_gemm_decision
from bitmar.fileio import atomic_write_text
from bitmar.kernels.packed_cpu import packed_kernel_decision

# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[[Settings], list[Row | Unavailable]]
    devices: tuple[str, ...] = ("cpu",)


def _registry() -> dict[str, Benchmark]:
    # Imported here: each benchmark module pulls in the model, data and training code.
    from bitmar.bench import bitlinear, distributed, generation, loader, memory, packed_decoding, training

    entries = [
        Benchmark(
            "bitlinear", "BitLinear fwd+bwd vs nn.Linear and transformers' AutoBitLinear", bitlinear.bitlinear_rows
        ),
        Benchmark("packed", "packed ternary inference vs BitLinear eval on the tiny model", generation.packed_rows),
        Benchmark("memory", "episodic memory write+read vs one full-config training step", memory.memory_rows),
        Benchmark("loader", "feature loader samples/s and RSS on a memory-mapped file", loader.loader_rows),
        Benchmark("training", "training step time, BitMar vs its full-precision twin", training.training_rows),
        Benchmark("distributed", "torchrun 2 processes vs 1 on CPU (gloo)", distributed.distributed_rows),
        Benchmark(
            "generation",
            "generation tokens/s with vs without the KV cache",
            generation.generation_rows,
            devices=("cpu", "cuda"),
        ),
        Benchmark(
            "decoding",
            "greedy decoding from packed ternary weights vs the fp32 twin and BitLinear eval: tokens/s, peak RSS",
            packed_decoding.decoding_rows,
        ),
        Benchmark("attention", "attention-head analysis overhead on training", _attention_rows),
        Benchmark(
            "gpu_training",
            "full config bf16 on CUDA: eager vs torch.compile, peak memory, MFU",
            training.gpu_training_rows,
            devices=("cuda",),
        ),
    ]
    return {b.name: b for b in entries}


def _attention_rows(settings: Settings) -> list[Row | Unavailable]:
    """`bench.attention.attention_rows`, or an Unavailable entry when the analysis cannot be imported here."""
    try:
        from bitmar.bench import attention
    except ImportError as err:
        return [Unavailable("attention", "attention-head analysis overhead", f"bitmar.bench.attention: {err}")]
    return attention.attention_rows(settings)


def benchmark_names(device: str | None = None) -> list[str]:
    """Registered benchmark names (those that run on `device`, when given), in run order."""
    return [name for name, b in _registry().items() if device is None or device in b.devices]


def select(names: Sequence[str] | None, device: str) -> list[Benchmark]:
    registry = _registry()
    if names:
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(registry)}")
        chosen = [registry[n] for n in names]
        wrong = [b.name for b in chosen if device not in b.devices]
        if wrong:
            raise ValueError(
                f"benchmark(s) {wrong} do not run on --device {device}; "
                + "; ".join(f"{b.name}: {', '.join(b.devices)}" for b in chosen if b.name in wrong)
            )
        return chosen
    return [b for b in registry.values() if device in b.devices]


# ---------------------------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(settings: Settings) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": settings.threads or torch.get_num_threads(),
        "device": settings.device,
        "quick": settings.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["peak_tflops"] = settings.peak_tflops
    else:  # the route every CPU ternary matmul of this run takes (measured once per process, or forced)
        info["ternary_matmul_route"] = int8_gemm_decision()
        info["packed_kernel"] = packed_kernel_decision()  # PackedBitLinear's route (packed CPU kernel or pure torch)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Running, formatting, writing
# ---------------------------------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: no CUDA GPU is visible to torch {torch.__version__} "
            f"(built with CUDA: {torch.version.cuda or 'no'}); run on a GPU machine or use --device cpu"
        )


def run_suite(
    settings: Settings, names: Sequence[str] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the selected benchmarks (all for the device by default).

    Returns {"machine", "seconds" (per benchmark), "rows" (Row.to_dict()), "unavailable" ({benchmark, name, reason})}.
    """
    check_device(settings.device)
    benchmarks = select(names, settings.device)
    machine = machine_info(settings)
    rows: list[Row] = []
    unavailable: list[Unavailable] = []
    seconds: dict[str, float] = {}
    for bench in benchmarks:
        if progress is not None:
            progress(f"[bench] {bench.name}: {bench.description} ...")
        start = time.perf_counter()
        results = bench.run(settings)
        seconds[bench.name] = round(time.perf_counter() - start, 1)
        for item in results:
            if isinstance(item, Unavailable):
                unavailable.append(item)
                continue
            values = (item.median, item.p25, item.p75)
            if not all(math.isfinite(v) and (v > 0 if item.is_ratio else v >= 0) for v in values):
                raise RuntimeError(f"benchmark {bench.name!r}, row {item.name!r}: invalid measurement {values}")
            rows.append(item)
        if progress is not None:
            progress(f"[bench] {bench.name}: done in {seconds[bench.name]:.0f}s")
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "machine": machine,
        "seconds": seconds,
        "rows": [r.to_dict() for r in rows],
        "unavailable": [asdict(u) for u in unavailable],
    }


def _number(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3g}x" if value < 100 else f"{value:.0f}x"
    if unit == "%":
        return f"{value:.2f}%"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def _range(low: float, high: float, unit: str) -> str:
    a, b = _number(low, unit), _number(high, unit)
    suffix = f" {unit}" if unit != "x" and a.endswith(f" {unit}") and b.endswith(f" {unit}") else ""
    if suffix:
        a, b = a[: -len(suffix)], b[: -len(suffix)]
    return f"{a}-{b}{suffix}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown: header with the machine, then one table of all rows."""
    m = result["machine"]
    header = [
        f"BitMar benchmarks ({'--quick' if m['quick'] else 'full run'}), {m['date']}",
        f"machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cores']} logical), {m['memory_gb']} GB RAM; "
        f"torch {m['torch']} ({m['torch_threads']} thread(s)), transformers {m['transformers']}, device {m['device']}"
        + (f" ({m['gpu']}, peak {m['peak_tflops']} TFLOP/s)" if m.get("gpu") else ""),
        f"load average at start {m['load_average_start']}, at end {m.get('load_average_end', '?')} "
        "(1/5/15 min; above the core count means other processes shared the CPUs)",
        *_route_lines(m),
        "",
        "Ratios are per-repeat A/B (A and B interleaved in the same run): median and p25-p75 over repeats. "
        "'no difference': |median - 1| < p75 - p25.",
        "",
        "| benchmark | A | B | metric | median | p25-p75 | n | goal | met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines = []
    for r in result["rows"]:
        goal = r["goal"]["text"] if r["goal"] else "-"
        met = r["verdict"]
        if met == NO_DIFFERENCE and r["goal"] is not None:
            met = f"{NO_DIFFERENCE} ({'met' if r['goal_met'] else 'missed'})"
        lines.append(
            f"| {r['name']} | {r['variant_a']} | {r['variant_b']} | {r['metric']} | {_number(r['median'], r['unit'])} "
            f"| {_range(r['p25'], r['p75'], r['unit'])} | {r['repeats']} | {goal} | {met} |"
        )
    for u in result.get("unavailable", []):
        lines.append(f"| {u['name']} | unavailable: {u['reason']} | | | | | | | |")
    missed = [r["name"] for r in result["rows"] if r["goal_met"] is False]
    footer = ["", f"goals missed: {'; '.join(missed) if missed else 'none'}"]
    return "\n".join(header + lines + footer)


def _route_lines(machine: dict[str, Any]) -> list[str]:
    route = machine.get("ternary_matmul_route")
    if not route:
        return []
    lines = [
        f"ternary matmuls on CPU (BitLinear, PackedBitLinear): {route['route']} GEMM, {route['reason']} "
        f"(mode {route['mode']}, ONEDNN_MAX_CPU_ISA={route['onednn_max_cpu_isa'] or 'unset'})"
    ]
    kernel = machine.get("packed_kernel")
    if kernel:
        used = f"packed {kernel['isa']} kernel" if kernel["use"] else "pure torch"
        lines.append(f"PackedBitLinear below 256 rows (decoding): {used}, {kernel['reason']}")
    return lines


def write_outputs(result: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """JSON at `path` and the Markdown table beside it (same stem, .md); each written atomically."""
    md_path = path.with_suffix(".md") if path.suffix != ".md" else path.with_suffix(".table.md")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, format_table(result) + "\n")
    return path, md_path

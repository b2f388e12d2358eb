"""`python -m bitmar.bench`: every benchmark in one run, one table of side-by-side ratios.

Each benchmark returns `Row`s. A row compares variant A with variant B, measured side by side in the same run
(interleaved, the order rotating every repeat, so background load hits both alike): the ratio is taken per repeat
(A's repeat i against B's repeat i) and summarised by its median and quartiles. A difference smaller than the
spread (|median - 1| < p75 - p25) is reported as "no difference"; otherwise the goal, if the row has one, is met or
missed by the median. A few rows report a measured value instead of a ratio (e.g. loader samples/s); they carry
their unit and are judged by their goal alone.

Registry: `_registry()` maps a name (`--only NAME`, `benchmark_names()`) to the function that runs it and the devices
it runs on; `run_suite` runs a selection and returns a JSON-ready dict; `format_table` renders it as Markdown.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from bitmar.bench.bitlinear import _quartiles
from bitmar.bitnet import BitLinear, int8_gemm_decision
from bitmar.fileio import atomic_write_text
from bitmar.kernels.packed_cpu import packed_kernel_decision

NO_DIFFERENCE = "no difference"
H200_BF16_PEAK_TFLOPS = 790.0  # measured dense bf16 matmul ceiling of an H200 (the datasheet says 989)


# ---------------------------------------------------------------------------------------------------------------
# Rows, goals and the "no difference" rule
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """`value op threshold`, e.g. Goal("<=", 1.2, "<= 1.2x time") for a time ratio."""

    op: str  # "<=" or ">="
    threshold: float
    text: str

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Goal.op must be '<=' or '>=', got {self.op!r}")

    def met_by(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold


@dataclass
class Row:
    """One line of the table: A against B (or a measured value when `is_ratio` is False)."""

    benchmark: str  # registry name
    name: str  # what is measured, e.g. "BitLinear fwd+bwd, d=256, 8192 tokens"
    variant_a: str
    variant_b: str
    metric: str  # what the number is, e.g. "time A / time B"
    median: float
    p25: float
    p75: float
    goal: Goal | None = None
    is_ratio: bool = True
    unit: str = "x"
    repeats: int = 1
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def spread(self) -> float:
        return self.p75 - self.p25

    @property
    def no_difference(self) -> bool:
        return self.is_ratio and no_difference(self.median, self.p25, self.p75)

    @property
    def goal_met(self) -> bool | None:
        """None without a goal; a ratio indistinguishable from 1 is judged as 1 (no measurable difference)."""
        if self.goal is None:
            return None
        return self.goal.met_by(1.0 if self.no_difference else self.median)

    @property
    def verdict(self) -> str:
        """The table's "met?" column: "yes", "no", "no difference", or "-" (no goal, a real difference)."""
        return verdict(self.median, self.p25, self.p75, self.goal, self.is_ratio)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(spread=self.spread, no_difference=self.no_difference, goal_met=self.goal_met, verdict=self.verdict)
        return d


@dataclass
class Unavailable:
    """A comparison that could not run on this machine, with the reason (listed under the table)."""

    benchmark: str
    name: str
    reason: str


def no_difference(median: float, p25: float, p75: float) -> bool:
    """A ratio whose distance from 1 is smaller than its spread (interquartile range) shows no difference."""
    return abs(median - 1.0) < (p75 - p25)


def verdict(median: float, p25: float, p75: float, goal: Goal | None, is_ratio: bool = True) -> str:
    if not all(math.isfinite(v) for v in (median, p25, p75)):
        raise ValueError(f"non-finite measurement: median {median}, p25 {p25}, p75 {p75}")
    if is_ratio and no_difference(median, p25, p75):
        return NO_DIFFERENCE
    if goal is None:
        return "-"
    return "yes" if goal.met_by(median) else "no"


def per_repeat_ratios(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Median, p25, p75 of a[i] / b[i] (the repeats of A and B ran side by side)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same positive number of repeats for A and B, got {len(a)} and {len(b)}")
    q1, q2, q3 = _quartiles([x / y for x, y in zip(a, b, strict=True)])
    return q2, q1, q3


def value_row(
    benchmark: str,
    name: str,
    variant: str,
    metric: str,
    values: Sequence[float],
    goal: Goal | None,
    unit: str,
    details: dict[str, Any] | None = None,
) -> Row:
    """A row holding a measured value (median and quartiles over repeats), judged by its goal alone."""
    q1, q2, q3 = _quartiles(list(values))
    return Row(
        benchmark,
        name,
        variant,
        "-",
        metric,
        q2,
        q1,
        q3,
        goal,
        is_ratio=False,
        unit=unit,
        repeats=len(values),
        details=details or {},
    )


def ratio_row(
    benchmark: str,
    name: str,
    variant_a: str,
    variant_b: str,
    metric: str,
    a: Sequence[float],
    b: Sequence[float],
    goal: Goal | None,
    details: dict[str, Any] | None = None,
) -> Row:
    """A row from side-by-side repeats of A and B: the ratio a[i] / b[i] per repeat."""
    med, q1, q3 = per_repeat_ratios(a, b)
    return Row(benchmark, name, variant_a, variant_b, metric, med, q1, q3, goal, repeats=len(a), details=details or {})


# ---------------------------------------------------------------------------------------------------------------
# Settings and registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool = False
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads the run used (recorded in the header)
    peak_tflops: float = H200_BF16_PEAK_TFLOPS
    tmp_dir: str | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[[Settings], list[Row | Unavailable]]
    devices: tuple[str, ...] = ("cpu",)


def _registry() -> dict[str, Benchmark]:
    # Imported here: each benchmark module pulls in the model, data and training code.
    from bitmar.bench import distributed, generation, memory, packed_decoding, training

    entries = [
        Benchmark("bitlinear", "BitLinear fwd+bwd vs nn.Linear and transformers' AutoBitLinear", bitlinear_rows),
        Benchmark("packed", "packed ternary inference vs BitLinear eval on the tiny model", generation.packed_rows),
        Benchmark("memory", "episodic memory write+read vs one full-config training step", memory.memory_rows),
        Benchmark("loader", "feature loader samples/s and RSS on a memory-mapped file", loader_rows),
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
        Benchmark("attention", "attention-head analysis overhead on training", attention_rows),
        Benchmark(
            "gpu_training",
            "full config bf16 on CUDA: eager vs torch.compile, peak memory, MFU",
            training.gpu_training_rows,
            devices=("cuda",),
        ),
    ]
    return {b.name: b for b in entries}


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


# ---------------------------------------------------------------------------------------------------------------
# Adapters over the benchmark modules that predate the suite (bitlinear, loader, attention)
# ---------------------------------------------------------------------------------------------------------------

TIME_RATIO = "time A / time B"
NOT_SLOWER = Goal("<=", 1.0, "<= 1x (not slower)")
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
    from bitmar.bench.bitlinear import _train_step, time_interleaved

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
                    _train_step(auto, x, grad)
                modules[auto_label] = auto
            except Exception as err:  # noqa: BLE001 - any failure of the probe means "not available here"
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                auto = None
        fns = {name: functools.partial(_train_step, m, x, grad) for name, m in modules.items()}
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


def loader_rows(settings: Settings) -> list[Row | Unavailable]:
    """`bench.loader.run_loader_benchmark` repeated (each repeat writes a fresh CC3M-like float16 feature file and
    runs its three loader variants one after the other): batched `os.preadv` reads (the shipped path) against
    per-item memmap rows and against batched memmap fancy-indexing; samples/s and RSS growth of the shipped path."""
    from bitmar.bench.loader import GOAL_RSS_MB, GOAL_SAMPLES_PER_S, run_loader_benchmark

    n_rows, batches, compare, repeats = (40_000, 60, 30, 2) if settings.quick else (1_000_000, 600, 300, 3)
    runs = [
        run_loader_benchmark(rows=n_rows, batches=batches, workers=1, compare_batches=compare, tmp_dir=settings.tmp_dir)
        for _ in range(repeats)
    ]

    def values(variant: str, key: str) -> list[float]:
        return [r["variants"][variant][key] for r in runs]

    batched = values("batched", "samples_per_s")
    name = f"loader, {n_rows:,} x 768 float16 ({runs[0]['file_gb']:.2f} GB), batch 256, 1 worker"
    metric = "samples/s A / samples/s B"
    details = {"runs": runs}
    return [
        ratio_row(
            "loader",
            name,
            "batched preadv",
            "per-item memmap",
            metric,
            batched,
            values("per-item", "samples_per_s"),
            None,
            details,
        ),
        ratio_row(
            "loader", name, "batched preadv", "batched memmap", metric, batched, values("memmap", "samples_per_s"), None
        ),
        value_row(
            "loader",
            f"{name}: throughput",
            "batched preadv",
            "samples/s",
            batched,
            Goal(">=", GOAL_SAMPLES_PER_S, f">= {GOAL_SAMPLES_PER_S:,} samples/s"),
            "samples/s",
        ),
        value_row(
            "loader",
            f"{name}: RSS growth",
            "batched preadv",
            "MB (main + worker)",
            values("batched", "rss_growth_mb"),
            Goal("<=", GOAL_RSS_MB, f"<= {GOAL_RSS_MB} MB"),
            "MB",
        ),
    ]


def attention_rows(settings: Settings) -> list[Row | Unavailable]:
    """The attention-head analysis benchmark (`bench.attention`, tiny config): blocks of `log_every_n_steps` training
    steps with and without one analysis, alternating; the ratio is per block pair. Its amortised overhead (median
    analysis time / (interval x median step)) is in the details."""
    try:
        from bitmar.bench import attention
    except ImportError as err:
        return [Unavailable("attention", "attention-head analysis overhead", f"bitmar.bench.attention: {err}")]
    phases, pairs = ([2], 1) if settings.quick else ([1, 2, 3], 3)
    result = attention.run_benchmark(phases=phases, pairs=pairs)
    budget = float(result["config"].get("budget", 0.10))
    out: list[Row | Unavailable] = []
    for r in result["phases"]:
        out.append(
            ratio_row(
                "attention",
                f"attention analysis every {r['interval']} steps, phase {r['phase']} (tiny, batch {r['batch_size']})",
                "training + analysis",
                "training",
                f"block time A / B (amortised overhead {100 * r['amortised_overhead']:.1f}%)",
                r["block_s"]["on"],
                r["block_s"]["off"],
                Goal("<=", 1.0 + budget, f"<= {1 + budget:.2f}x"),
                {k: v for k, v in r.items() if k not in ("block_s", "block_cpu_s")},
            )
        )
    return out

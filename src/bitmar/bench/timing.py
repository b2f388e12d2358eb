"""Timing helpers shared by the benchmarks: interleaved repeats, quartiles, and one forward+backward of a layer."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from bitmar.bitnet import int8_gemm_mode


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p25, median, p75) of `values` (inclusive method); one value is all three."""
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


def train_step(module: nn.Module, x: Tensor, grad: Tensor, int8_gemm: bool = True) -> None:
    """One forward+backward; `int8_gemm=False` forces float GEMMs, True keeps the route in force (measured by
    default: a forced int8 route could run oneDNN's reference kernel, hundreds of times slower, on some CPUs)."""
    x.grad = None
    for p in module.parameters():
        p.grad = None
    with contextlib.nullcontext() if int8_gemm else int8_gemm_mode("off"):
        module(x).backward(grad)

"""Rows, goals and the "no difference" rule of the benchmark suite: what every benchmark module returns.

A row compares variant A with variant B, measured side by side in the same run (interleaved, the order rotating
every repeat, so background load hits both alike): the ratio is taken per repeat (A's repeat i against B's repeat i)
and summarised by its median and quartiles. A difference smaller than the spread (|median - 1| < p75 - p25) is
reported as "no difference"; otherwise the goal, if the row has one, is met or missed by the median. A few rows
report a measured value instead of a ratio (e.g. loader samples/s); they carry their unit and are judged by their
goal alone. `bitmar.bench.suite` collects the rows of every benchmark into one table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bitmar.bench.timing import quartiles

NO_DIFFERENCE = "no difference"
H200_BF16_PEAK_TFLOPS = 790.0  # measured dense bf16 matmul ceiling of an H200 (the datasheet says 989)
TIME_RATIO = "time A / time B"


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
    q1, q2, q3 = quartiles([x / y for x, y in zip(a, b, strict=True)])
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
    q1, q2, q3 = quartiles(list(values))
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


NOT_SLOWER = Goal("<=", 1.0, "<= 1x (not slower)")


@dataclass
class Settings:
    """What `python -m bitmar.bench` passes to every benchmark's rows function."""

    quick: bool = False
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads the run used (recorded in the header)
    peak_tflops: float = H200_BF16_PEAK_TFLOPS
    tmp_dir: str | None = None

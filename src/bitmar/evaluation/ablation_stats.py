"""Statistics of the ablation table: the 95% confidence interval of a mean over seeds (Student t), the paired
difference full − variant, and which direction of a metric is better (used by `bitmar.evaluation.ablations`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

CONFIDENCE = 0.95


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df: the closed forms of Abramowitz & Stegun 26.7.3 (odd df) and
    26.7.4 (even df), exact up to rounding."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term = total = math.cos(theta)
        for k in range(1, (df - 1) // 2):  # cos θ, (2/3) cos³θ, (2·4)/(3·5) cos⁵θ, ... up to cos^(df-2) θ
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0
    for k in range(1, df // 2):  # 1, (1/2) cos²θ, (1·3)/(2·4) cos⁴θ, ... up to cos^(df-2) θ
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with df >= 1 degrees of freedom, e.g. t_quantile(0.975, 2) =
    4.303. Bisection on the exact distribution function; beyond 1000 degrees of freedom the normal quantile (the
    difference is below 1e-3)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    if df > 1000:
        return statistics.NormalDist().inv_cdf(p)
    target = 2.0 * p - 1.0
    low, high = 0.0, 1.0
    while _t_central_probability(high, df) < target:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _t_central_probability(mid, df) < target:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return 0.5 * (low + high)


def _number(value: Any) -> Any:
    """Results files store non-finite floats as "nan" / "inf" strings (JSON has no such numbers): read them back."""
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """n, mean, sample std (n - 1), half-width of the confidence interval of the mean (t with n - 1 df) and its
    bounds; std and the interval are None for n < 2 (one value says nothing about the spread)."""
    n = len(values)
    mean = statistics.fmean(values) if n else None
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None, "low": None, "high": None}
    std = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": half, "low": mean - half, "high": mean + half}


def summarize(values: Sequence[Any]) -> dict[str, Any] | None:
    """Aggregate one metric of one variant over its seeds (None when no seed has it).

    Numbers: kind "numeric" with `mean_ci` of the finite ones ("non_finite" counts the others); booleans: kind
    "share_true" (n, true, share); anything else: kind "values" (the distinct values)."""
    values = [_number(v) for v in values if v is not None]
    if not values:
        return None
    if all(isinstance(v, bool) for v in values):
        true = sum(values)
        return {"kind": "share_true", "n": len(values), "true": true, "share": true / len(values)}
    if all(isinstance(v, (int, float)) for v in values):
        finite = [float(v) for v in values if math.isfinite(v)]
        return {"kind": "numeric", **mean_ci(finite), "non_finite": len(values) - len(finite)}
    return {"kind": "values", "n": len(values), "values": sorted({str(v) for v in values})}


def paired_difference(full: dict[int, Any], other: dict[int, Any]) -> dict[str, Any] | None:
    """full − other over the seeds both have as finite numbers (pairs share the seed, so seed-to-seed variation
    common to both cancels): `mean_ci` of the per-seed differences, plus the seeds used. None without a pair."""
    seeds = sorted(
        s for s in full.keys() & other.keys() if all(_finite_number(v) for v in (_number(full[s]), _number(other[s])))
    )
    if not seeds:
        return None
    diffs = [float(_number(full[s])) - float(_number(other[s])) for s in seeds]
    return {"pairing": "paired by seed", "seeds": seeds, **mean_ci(diffs)}


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Words that make a metric a control condition (what is "good" depends on the claim): no verdict.
_CONTROL_WORDS = ("forgotten", "without image", "no image", "empty memory", "shuffled image")
_LOWER_IS_BETTER = ("loss", "nll", "error", "perplexity")
_HIGHER_IS_BETTER = ("accuracy", "recall", "r@", "bleu", "rouge", "match", "gain")
# Tasks whose every headline row is a score where more is better (Winoground text/image/group, BLiMP UIDs).
_HIGHER_IS_BETTER_TASKS = ("minimal_pairs", "winoground")


def better_direction(task: str, metric: str, hint: Any = None) -> bool | None:
    """True if higher is better, False if lower is, None if unknown. A boolean `higher_is_better` hint of the
    headline row wins; otherwise the metric name decides, conservatively (control rows and unknown names: None)."""
    if isinstance(hint, bool):
        return hint
    name = metric.lower()
    if any(word in name for word in _CONTROL_WORDS):
        return None
    if any(word in name for word in _LOWER_IS_BETTER):
        return False
    if any(word in name for word in _HIGHER_IS_BETTER) or task in _HIGHER_IS_BETTER_TASKS:
        return True
    return None


def verdict(difference: dict[str, Any] | None, higher_is_better: bool | None) -> str:
    """'full better' / 'full worse' when the 95% CI of full − other excludes 0, 'no difference (CI includes 0)' when
    it does not; blank when the better direction is unknown or there are fewer than 2 pairs (no CI)."""
    if difference is None or higher_is_better is None:
        return ""
    if difference["ci95"] is None:
        return f"n={difference['n']}: no CI"
    if difference["low"] <= 0.0 <= difference["high"]:
        return "no difference (CI includes 0)"
    full_higher = difference["mean"] > 0
    return "full better" if full_higher == higher_is_better else "full worse"

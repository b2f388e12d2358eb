"""Train the tiny model and its ablations over several seeds, evaluate each, and report mean ± 95% CI per metric.

    python -m bitmar.evaluation.ablations [--output_root outputs/ablations] [--quick] [--seeds 3] [--seed_base 0]
        [--jobs 2] [--runs full no_memory no_vision full_precision] [--retrain] [--device cpu] [--set KEY=VALUE]

Variants: `full` is configs/bitmar_tiny.yaml; every other variant is the same config plus its one switch
(no_memory: model.use_memory=false, no_vision: model.use_vision=false, full_precision: model.quantize=false), so
nothing but the ablated switch can differ between columns. Each variant trains once per seed s in
seed_base .. seed_base + seeds - 1 (`--set training.seed=<s>`; data, tokenizer and pseudo-words stay fixed) into
<output_root>/<variant>/seed_<s>/ (log: ablation_train.log), then is evaluated by `evaluate_bitmar.py` in its own
process (<run>/evaluation/results.{json,md}, log: ablation_eval.log). A finished run (checkpoints/last.pt and
summary.json) is reused unless --retrain; one stopped half-way is resumed; one trained with other settings is refused
(exit 2) rather than mixed into the table. `--jobs` runs that many trainings/evaluations at once, each process with
OMP_NUM_THREADS=1.

Per (task, headline metric) and variant the report gives the mean over seeds, the sample standard deviation, n and
the 95% confidence interval of the mean (Student t with n - 1 degrees of freedom); booleans give the share of True.
"full vs <variant>" rows give the mean of the per-seed differences (paired by seed: both runs of a pair share the
seed) with its 95% CI and a verdict where the better direction is known. Output: stdout, <output_root>/ablations.md
and ablations.json (per-seed values, aggregates, comparisons, wall time). `--quick` caps every epoch at
training.max_steps_per_epoch=10 steps (numbers are then only a smoke test). A run whose training or evaluation fails
is reported with its log; the others still run (exit status 1 at the end). Bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitmar.cli_args import positive_int
from bitmar.config import MAX_SEED, ConfigError, config_to_dict, load_config
from bitmar.evaluation.context import EvaluationError
from bitmar.evaluation.runner import _device, format_value, md_cell
from bitmar.fileio import atomic_write_text, check_writable_dir

REPO_ROOT = Path(__file__).resolve().parents[3]
BASE_CONFIG = "configs/bitmar_tiny.yaml"
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_memory": ["model.use_memory=false"],
    "no_vision": ["model.use_vision=false"],
    "full_precision": ["model.quantize=false"],
}
QUICK_OVERRIDES = ["training.max_steps_per_epoch=10", "training.validation_batches=2"]
# Evaluation runs once, in its own process after training (also for reused runs), not again inside the trainer;
# attention-head analysis and plots are diagnostics the table does not use.
TRAIN_FIXED = ["evaluation.run_after_training=false", "attention_analysis.enabled=false", "wandb.create_plots=false"]
RECORD = "ablation_run.json"  # what a run directory was trained with: reuse only what matches the request
_NOT_TRAINING = ("evaluation", "wandb", "attention_analysis", "export")  # config sections that do not shape training
_TRAIN_ENTRY = "import sys; from bitmar.pipeline import main; sys.exit(main())"
_EVAL_ENTRY = "import sys; from bitmar.evaluation.runner import main; sys.exit(main())"
CONFIDENCE = 0.95

# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]  # the --set values after the variant's switch, the seed included
    config: dict[str, Any] | None = field(default=None, compare=False)  # resolved training sections (reuse check)

    @property
    def label(self) -> str:
        return f"{self.variant}/seed_{self.seed}"

    @property
    def training_overrides(self) -> list[str]:
        return [*VARIANTS[self.variant], *self.overrides]


def training_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved base config with `overrides`, without the sections that do not change the trained weights; a
    bad key or value raises ConfigError here, before any run starts."""
    resolved = config_to_dict(load_config(REPO_ROOT / BASE_CONFIG, list(overrides)))
    return {k: v for k, v in resolved.items() if k not in _NOT_TRAINING}


def plan_runs(
    root: Path, variants: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], resolve: bool = False
) -> list[RunSpec]:
    """One run per (variant, seed), seeds interleaved so that the first results cover every variant; with `resolve`
    each spec carries its resolved training config."""
    specs = []
    for s in seeds:
        for v in variants:
            extra = (*TRAIN_FIXED, *overrides, f"training.seed={s}")
            config = training_config([*VARIANTS[v], *extra]) if resolve else None
            specs.append(RunSpec(v, s, root / v / f"seed_{s}", extra, config))
    return specs


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def _finished(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "summary.json").is_file()


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_reusable(spec: RunSpec, retrain: bool) -> None:
    """ConfigError when the run directory holds a run trained with other settings (it would be reused or resumed
    and its numbers mixed into the table); checked for every run before any training starts."""
    if retrain:
        return
    record = _read_record(spec.run_dir)
    if record is None:
        return
    now = spec.training_overrides
    before = record.get("overrides") or []
    differ = [f"-{o}" for o in before if o not in now] + [f"+{o}" for o in now if o not in before]
    if before != now and not differ:
        differ = ["same overrides, other order"]
    if not differ and spec.config is not None and record.get("config") is not None:
        old, new = _flat(record["config"]), _flat(json.loads(json.dumps(spec.config)))  # JSON: tuples become lists
        keys = [k.rstrip(".") for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        differ = [f"{BASE_CONFIG} changed: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"] if keys else []
    if differ:
        raise ConfigError(
            f"{spec.run_dir} was trained with other settings ({', '.join(differ)}); "
            "pass --retrain to train it again with these settings, or choose another --output_root"
        )


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """The environment of a training/evaluation process: `threads` intra-op threads (1 by default: parallel jobs on
    a small machine would otherwise fight over the same cores)."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def _tail(log_path: Path, lines: int = 3) -> list[str]:
    try:
        return log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return []


def train_run(
    name: str,
    run_dir: Path,
    overrides: Sequence[str],
    device: str,
    retrain: bool,
    env: dict[str, str] | None = None,
    label: str | None = None,
    resolved: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train variant `name` in a subprocess (or reuse a finished run, or resume one that stopped half-way); returns
    {"status": trained|reused|failed, "seconds", "log", ...}. `overrides` are the --set values after the variant's
    switch; `resolved` (the resolved training sections) is recorded beside them for the next reuse check."""
    label = label or name
    config = REPO_ROOT / BASE_CONFIG
    if not config.is_file():
        raise ConfigError(f"{config} does not exist: run the ablations from a source checkout of BitMar")
    overrides = [*VARIANTS[name], *overrides]
    log_path = run_dir / "ablation_train.log"
    if _finished(run_dir) and not retrain:
        return {"status": "reused", "seconds": None, "log": str(log_path)}
    record = _read_record(run_dir)
    resume = not retrain and record is not None and record.get("overrides") == overrides
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)  # a stale summary must not mark a failed retrain as done
    written = {"variant": name, "overrides": overrides, **({"config": resolved} if resolved is not None else {})}
    atomic_write_text(run_dir / RECORD, json.dumps(written, indent=2) + "\n")
    command = [
        sys.executable, "-c", _TRAIN_ENTRY, "--config", str(config), "--output_dir", str(run_dir),
        "--wandb", "disabled", "--device", device, *(["--resume", "auto"] if resume else []),
        *[a for o in overrides for a in ("--set", o)],
    ]  # fmt: skip
    print(f"[{label}] training{' (resuming)' if resume else ''}  (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "a" if resume else "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command[3:]) + "\n")
        log.flush()
        code = subprocess.run(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    seconds = time.perf_counter() - start
    if code != 0 or not _finished(run_dir):
        tail = _tail(log_path)
        print(f"[{label}] training FAILED (exit {code}); last lines of {log_path}:\n  " + "\n  ".join(tail), flush=True)
        return {"status": "failed", "exit_code": code, "seconds": seconds, "log": str(log_path), "error": tail}
    print(f"[{label}] trained in {seconds / 60:.1f} min", flush=True)
    return {"status": "trained", "seconds": seconds, "log": str(log_path)}


def evaluate_run(
    run_dir: Path,
    device: str,
    overrides: Sequence[str] = (),
    env: dict[str, str] | None = None,
    label: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Evaluate checkpoints/last.pt with evaluate_bitmar.py in a subprocess (cwd = repository root, as in training,
    so a relative data.data_dir means the same directory); `overrides` are evaluation.* keys applied on top of the
    checkpoint's config. Returns ({"status": ok|failed, "seconds", "log", ...}, results or None)."""
    label = label or run_dir.name
    log_path = run_dir / "ablation_eval.log"
    results_path = run_dir / "evaluation" / "results.json"
    results_path.unlink(missing_ok=True)  # a failed evaluation must not leave the previous numbers looking current
    command = [
        sys.executable, "-c", _EVAL_ENTRY, "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
        "--output", str(results_path), "--wandb", "disabled", "--device", device,
        *[a for o in overrides for a in ("--set", o)],
    ]  # fmt: skip
    print(f"[{label}] evaluating  (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command[3:]) + "\n")
        log.flush()
        code = subprocess.run(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    seconds = time.perf_counter() - start
    results, tail = None, _tail(log_path)
    if code == 0:
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            tail = [f"cannot read {results_path}: {err}"]
    if results is None:
        print(
            f"[{label}] evaluation FAILED (exit {code}); last lines of {log_path}:\n  " + "\n  ".join(tail), flush=True
        )
        return {"status": "failed", "exit_code": code, "seconds": seconds, "log": str(log_path), "error": tail}, None
    print(f"[{label}] evaluated in {seconds / 60:.1f} min", flush=True)
    return {"status": "ok", "seconds": seconds, "log": str(log_path)}, results


def run_one(spec: RunSpec, device: str, retrain: bool, eval_overrides: Sequence[str]) -> dict[str, Any]:
    """Train (or reuse) and evaluate one (variant, seed): {"training", "evaluation", "summary", "results", ...}."""
    env = subprocess_env(1)
    training = train_run(
        spec.variant, spec.run_dir, spec.overrides, device, retrain, env=env, label=spec.label, resolved=spec.config
    )
    run: dict[str, Any] = {"variant": spec.variant, "seed": spec.seed, "run_dir": str(spec.run_dir)}
    run["training"] = training
    if training["status"] == "failed":
        return run
    try:
        run["summary"] = json.loads((spec.run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run["summary"] = None
    run["evaluation"], run["results"] = evaluate_run(spec.run_dir, device, eval_overrides, env=env, label=spec.label)
    return run


def run_all(
    specs: Sequence[RunSpec], jobs: int, device: str, retrain: bool, eval_overrides: Sequence[str]
) -> dict[str, dict[int, dict[str, Any]]]:
    """Every spec, `jobs` at a time (threads that each wait on their subprocesses): runs[variant][seed]."""
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(run_one, s, device, retrain, eval_overrides) for s in specs]
        done = [f.result() for f in futures]
    except BaseException:  # Ctrl-C: start nothing new, let the running processes save their checkpoints and exit
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for spec, run in zip(specs, done, strict=True):
        runs.setdefault(spec.variant, {})[spec.seed] = run
    return runs


def failed(run: dict[str, Any]) -> bool:
    return run["training"]["status"] == "failed" or run.get("evaluation", {}).get("status") == "failed"


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------

# Timings inside a metric's name ("... (0.52 s vs memory write 0.003 s)") differ per run: dropped from the row key.
_TIMING = re.compile(r"\s*\([^()]*\d\s*(?:s|ms|min)\b[^()]*\)")


def metric_key(metric: str) -> str:
    return _TIMING.sub("", metric).strip()


def _seed_rows(run: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    """(task, metric, value, reference, higher_is_better hint) of one run: every headline row of its evaluated
    tasks, and the final validation loss of its training."""
    rows = []
    for task, result in ((run.get("results") or {}).get("tasks") or {}).items():
        if result.get("status") != "ok":
            continue
        for h in result.get("headline", []):
            rows.append((task, metric_key(h["metric"]), h.get("value"), h.get("reference"), h.get("higher_is_better")))
    summary = run.get("summary") or {}
    if "final_validation_loss" in summary:
        rows.append(("training", "final validation loss", summary["final_validation_loss"], None, False))
    return rows


def aggregate(runs: dict[str, dict[int, dict[str, Any]]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (task, metric), in first-seen order: per-seed values, per-variant aggregates and, for every
    variant other than `full`, the paired difference full − variant with its verdict."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for variant in variants:
        for seed, run in sorted(runs.get(variant, {}).items()):
            for task, metric, value, reference, hint in _seed_rows(run):
                row = rows.setdefault(
                    (task, metric),
                    {"task": task, "metric": metric, "hint": None, "references": {}, "per_seed": {}},
                )
                if isinstance(hint, bool):
                    row["hint"] = hint
                row["per_seed"].setdefault(variant, {})[seed] = value
                row["references"].setdefault(variant, {})[seed] = reference
    table = []
    for row in rows.values():
        higher = better_direction(row["task"], row["metric"], row["hint"])
        aggregates = {v: summarize(list(row["per_seed"].get(v, {}).values())) for v in variants}
        # the reference column (chance, blind model, empty memory) of `full`, else of the first variant with the row
        references = row["references"].get("full") or next(iter(row["references"].values()))
        reference = summarize(list(references.values()))
        comparisons = {}
        full = row["per_seed"].get("full")
        if full is not None and (aggregates["full"] or {}).get("kind") == "numeric":
            for v in variants:
                if v == "full" or v not in row["per_seed"]:
                    continue
                diff = paired_difference(full, row["per_seed"][v])
                if diff is not None:
                    comparisons[v] = {**diff, "verdict": verdict(diff, higher)}
        table.append(
            {
                "task": row["task"],
                "metric": row["metric"],
                "higher_is_better": higher,
                "per_seed": {v: {str(s): x for s, x in vals.items()} for v, vals in row["per_seed"].items()},
                "aggregate": aggregates,
                "reference": reference,
                "comparisons": comparisons,
            }
        )
    return table


def format_aggregate(agg: dict[str, Any] | None) -> str:
    """'mean ± CI95 (n)' for numbers ('mean (1)' for one seed), '67% true (3)' for booleans, '—' when missing."""
    if agg is None:
        return "—"
    if agg["kind"] == "share_true":
        return f"{agg['share']:.0%} true ({agg['n']})"
    if agg["kind"] == "values":
        return md_cell(" / ".join(agg["values"])) + f" ({agg['n']})"
    if agg["mean"] is None:
        return f"non-finite ({agg['non_finite']})"
    text = format_value(agg["mean"])
    if agg["ci95"] is not None:
        text += f" ± {format_value(agg['ci95'])}"
    text += f" ({agg['n']}" + (f", {agg['non_finite']} non-finite" if agg["non_finite"] else "") + ")"
    return text


def format_difference(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "—"
    sign = "+" if diff["mean"] > 0 else ""
    text = sign + format_value(diff["mean"])
    if diff["ci95"] is not None:
        text += f" ± {format_value(diff['ci95'])}"
    return text + f" ({diff['n']})"


def _reference_cell(ref: dict[str, Any] | None) -> str:
    """The reference column: its mean over full's seeds (chance, blind model, empty memory...), yes/no for booleans."""
    if ref is None or ref["kind"] == "values" or (ref["kind"] == "numeric" and ref["mean"] is None):
        return ""
    if ref["kind"] == "share_true":
        return {1.0: "yes", 0.0: "no"}.get(ref["share"], f"{ref['share']:.0%} yes")
    return format_value(ref["mean"])


def _minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds else ""


def markdown_table(
    runs: dict[str, dict[int, dict[str, Any]]],
    variants: Sequence[str],
    seeds: Sequence[int],
    quick: bool,
    wall_seconds: float | None = None,
    jobs: int | None = None,
) -> str:
    table = aggregate(runs, variants)
    others = [v for v in variants if v != "full"]
    lines = [
        "# BitMar ablations" + (" (quick: 10 steps per epoch, smoke-test numbers)" if quick else ""),
        "",
        f"Seeds {', '.join(map(str, seeds))} (`--set training.seed=<s>`; data, tokenizer and pseudo-words fixed). "
        "Cells: mean ± half-width of the 95% confidence interval of the mean (Student t, n − 1 degrees of freedom) "
        "(n seeds); booleans: share of seeds where true; —: not measured (task skipped or run failed).",
        "",
        "| Task | Metric | " + " | ".join(variants) + " | Reference (full) |",
        "|---|---|" + "---:|" * (len(variants) + 1),
    ]
    for row in table:
        cells = [format_aggregate(row["aggregate"][v]) for v in variants]
        ref_cell = _reference_cell(row["reference"])
        lines.append(f"| {row['task']} | {md_cell(row['metric'])} | " + " | ".join(cells) + f" | {ref_cell} |")
    if "full" in variants and others:
        lines += [
            "",
            "## full vs each variant",
            "",
            "full − variant, paired by seed: mean of the per-seed differences ± half-width of its 95% CI (n pairs). "
            "Verdict only where the better direction is known (↑ higher, ↓ lower is better); 'no difference' when the "
            "CI includes 0.",
            "",
            "| Task | Metric | Better | " + " | ".join(f"full − {v} | verdict" for v in others) + " |",
            "|---|---|:-:|" + "---:|---|" * len(others),
        ]
        for row in table:
            if not row["comparisons"]:
                continue
            better = {True: "↑", False: "↓", None: ""}[row["higher_is_better"]]
            cells = []
            for v in others:
                diff = row["comparisons"].get(v)
                cells += [format_difference(diff), diff["verdict"] if diff else ""]
            lines.append(f"| {row['task']} | {md_cell(row['metric'])} | {better} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Runs",
        "",
        "| Variant | Seed | Training | Train time | Evaluation | Eval time | Final validation loss |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for variant in variants:
        for seed, run in sorted(runs.get(variant, {}).items()):
            train, evaluation = run["training"], run.get("evaluation") or {}
            loss = format_value((run.get("summary") or {}).get("final_validation_loss"))
            lines.append(
                f"| {variant} | {seed} | {train['status']} | {_minutes(train.get('seconds'))} "
                f"| {evaluation.get('status', '')} | {_minutes(evaluation.get('seconds'))} | {loss} |"
            )
    if wall_seconds is not None:
        count = sum(len(r) for r in runs.values())
        lines += ["", f"Wall time: {wall_seconds / 60:.1f} min for {count} runs, {jobs} at a time."]
    problems = []
    for variant in variants:
        for seed, run in sorted(runs.get(variant, {}).items()):
            for stage in ("training", "evaluation"):
                outcome = run.get(stage) or {}
                if outcome.get("status") == "failed":
                    error = " / ".join(outcome.get("error") or [])
                    problems.append(
                        f"- **{variant}/seed_{seed}** {stage} failed: `{md_cell(error)[-300:]}` (log: {outcome['log']})"
                    )
    if problems:
        lines += ["", *problems]
    reasons = sorted(
        {
            f"- {task} skipped for {variant}: {result.get('reason', '')}"
            for variant in variants
            for run in runs.get(variant, {}).values()
            for task, result in ((run.get("results") or {}).get("tasks") or {}).items()
            if result.get("status") == "skipped"
        }
    )
    if reasons:
        lines += ["", *reasons]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bitmar.evaluation.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_root", default="outputs/ablations", help="<variant>/seed_<s>/ run directories here")
    parser.add_argument("--quick", action="store_true", help="training.max_steps_per_epoch=10: minutes, smoke numbers")
    parser.add_argument(
        "--runs", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which variants (default all)"
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="training seeds per variant (default 3)")
    parser.add_argument("--seed_base", type=int, default=0, help="first training seed (seeds seed_base .. +seeds-1)")
    parser.add_argument(
        "--jobs", type=positive_int, default=min(2, os.cpu_count() or 1),
        help="trainings/evaluations at once, one thread each (default min(2, CPU cores))",
    )  # fmt: skip
    parser.add_argument("--retrain", action="store_true", help="train again even if a finished run is there")
    parser.add_argument("--device", default="cpu", help="training and evaluation device (cpu, cuda, auto)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="extra training override for every run, e.g. --set training.max_epochs=5 (evaluation.* keys also "
        "apply when a finished run is evaluated again)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.seed_base <= MAX_SEED - args.seeds + 1:
        parser.error(f"--seed_base {args.seed_base}: seeds must lie in 0..{MAX_SEED} (2**32 - 1)")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. --set training.max_epochs=5")
    if any(o.split("=", 1)[0].strip() == "training.seed" for o in args.overrides):
        parser.error("--set training.seed=...: the seeds come from --seeds / --seed_base")
    variants = list(dict.fromkeys(args.runs))
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    root = Path(args.output_root).resolve()
    overrides = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    eval_overrides = [o for o in args.overrides if o.strip().startswith("evaluation.")]
    try:
        device = str(_device(args.device))
        if not (REPO_ROOT / BASE_CONFIG).is_file():
            raise ConfigError(f"{REPO_ROOT / BASE_CONFIG} does not exist: run the ablations from a source checkout")
        try:
            check_writable_dir(root)
        except OSError as err:
            raise ConfigError(f"--output_root {root}: {err}; choose a directory you can write to") from None
        specs = plan_runs(root, variants, seeds, overrides, resolve=True)
        for spec in specs:
            check_reusable(spec, args.retrain)
    except (ConfigError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = min(args.jobs, len(specs))
    print(f"{len(specs)} runs ({', '.join(variants)} × seeds {seeds[0]}..{seeds[-1]}), {jobs} at a time", flush=True)
    start = time.perf_counter()
    try:
        runs = run_all(specs, jobs, device, args.retrain, eval_overrides)
    except KeyboardInterrupt:  # the trainings got the signal too: each saved its checkpoint
        print("interrupted: finished runs are reused and stopped ones resumed by the same command", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    table = markdown_table(runs, variants, seeds, args.quick, wall, jobs)
    record = {
        "quick": args.quick,
        "base_config": BASE_CONFIG,
        "variants": {v: VARIANTS[v] for v in variants},
        "overrides": overrides,
        "seeds": seeds,
        "jobs": jobs,
        "device": device,
        "wall_seconds": wall,
        "confidence": CONFIDENCE,
        "comparison": "full − variant, paired by seed; CI: Student t with n − 1 degrees of freedom",
        "runs": {
            v: {str(s): {k: x for k, x in r.items() if k != "results"} for s, r in sorted(by_seed.items())}
            for v, by_seed in runs.items()
        },
        "table": aggregate(runs, variants),
    }
    atomic_write_text(root / "ablations.md", table)
    atomic_write_text(root / "ablations.json", json.dumps(record, indent=2, default=str) + "\n")
    print(table)
    print(f"written: {root / 'ablations.md'} and {root / 'ablations.json'}")
    return 1 if any(failed(r) for by_seed in runs.values() for r in by_seed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

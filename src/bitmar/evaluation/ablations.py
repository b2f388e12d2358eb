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

This module plans, trains and evaluates the runs and is the command line; the statistics are in
`bitmar.evaluation.ablation_stats`, the table (aggregation over seeds, Markdown) in `bitmar.evaluation.ablation_table`.
"""

from __future__ import annotations

import argparse
import json
import os
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
from bitmar.evaluation.ablation_stats import (
    CONFIDENCE,
    better_direction,
    mean_ci,
    paired_difference,
    summarize,
    t_quantile,
    verdict,
)
from bitmar.evaluation.ablation_table import aggregate, format_aggregate, markdown_table, metric_key
from bitmar.evaluation.context import EvaluationError
from bitmar.evaluation.runner import _device
from bitmar.fileio import atomic_write_text, check_writable_dir

__all__ = [  # the statistics and table functions are re-exported: `from bitmar.evaluation.ablations import ...`
    "BASE_CONFIG", "CONFIDENCE", "QUICK_OVERRIDES", "RECORD", "REPO_ROOT", "TRAIN_FIXED", "VARIANTS", "RunSpec",
    "aggregate", "better_direction", "build_parser", "check_reusable", "evaluate_run", "failed", "format_aggregate",
    "main", "markdown_table", "mean_ci", "metric_key", "paired_difference", "plan_runs", "run_all", "run_one",
    "subprocess_env", "summarize", "t_quantile", "train_run", "training_config", "verdict",
]  # fmt: skip

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

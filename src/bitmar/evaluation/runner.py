"""Task registry, running, result files (JSON + Markdown), wandb logging and the `evaluate_bitmar.py` command line.

    python evaluate_bitmar.py --checkpoint RUN_DIR/checkpoints/last.pt [--data_dir DIR] [--tasks t1 t2 ...]
        [--output FILE] [--wandb disabled|offline|online|auto] [--device auto|cpu|cuda] [--set evaluation.key=value]

Results go to `<run_dir>/evaluation/results.json` (default) and `results.md` next to it, both written atomically.
User mistakes (missing checkpoint, unknown task, missing data, a device that is not there, an output directory that
cannot be written: checked before any task runs) print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitmar.bitnet import describe_int8_gemm
from bitmar.config import BitMarConfig, ConfigError, config_from_dict, config_to_dict
from bitmar.data.errors import DataError
from bitmar.data.tokenizer import load_tokenizer
from bitmar.evaluation.captioning import evaluate_captioning, evaluate_grounding
from bitmar.evaluation.context import CaptionSplit, EvalContext, EvaluationError, TaskSkipped
from bitmar.evaluation.efficiency import evaluate_efficiency
from bitmar.evaluation.recall import evaluate_episodic_recall
from bitmar.evaluation.retrieval import evaluate_retrieval
from bitmar.evaluation.scoring import evaluate_minimal_pairs, evaluate_vqa, evaluate_winoground
from bitmar.fileio import atomic_write_text, check_writable_dir
from bitmar.infra.checkpoint import CheckpointError, load_checkpoint
from bitmar.model import BitMar

log = logging.getLogger("bitmar")

RESULTS_FORMAT = 1


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[EvalContext], dict[str, Any]]
    title: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("retrieval", evaluate_retrieval, "Image-text retrieval (validation gallery)"),
        Task("captioning", evaluate_captioning, "Captioning (greedy, validation images)"),
        Task("grounding", evaluate_grounding, "Grounding: caption NLL with true / shuffled / no image"),
        Task("minimal_pairs", evaluate_minimal_pairs, "Minimal pairs (BLiMP format)"),
        Task("winoground", evaluate_winoground, "Winoground"),
        Task("vqa", evaluate_vqa, "VQA (1 answer among 8)"),
        Task("episodic_recall", evaluate_episodic_recall, "One-shot episodic recall of novel-word episodes"),
        Task("efficiency", evaluate_efficiency, "Efficiency"),
    )
}


def check_task_names(names: Sequence[str]) -> list[str]:
    """The names in order without repeats; an unknown name raises EvaluationError listing the valid tasks."""
    out: list[str] = []
    for name in names:
        if name not in TASKS:
            close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise EvaluationError(f"unknown task '{name}'{hint} (valid tasks: {', '.join(TASKS)})")
        if name not in out:
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading a run
# ----------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A .pt file, or a run directory (-> checkpoints/last.pt: the final model, the one trained on all phases)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path} is a directory without checkpoints/last.pt; pass a .pt file written by training")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file such as RUN_DIR/checkpoints/last.pt")
    return path


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _tokenizer_from_payload(payload: dict[str, Any], checkpoint: Path) -> Any:
    text = payload.get("tokenizer")
    if not text:
        fallback = run_dir_of(checkpoint) / "tokenizer"
        if not (fallback / "tokenizer.json").is_file():
            raise CheckpointError(f"{checkpoint} holds no tokenizer and {fallback} does not exist")
        return load_tokenizer(fallback)
    with tempfile.TemporaryDirectory(prefix="bitmar-eval-tok-") as tmp:
        (Path(tmp) / "tokenizer.json").write_text(text, encoding="utf-8")
        try:
            return load_tokenizer(tmp)  # the same wrapper and checks (special tokens, BOS) as training
        except DataError as err:
            raise CheckpointError(f"{checkpoint}: its tokenizer cannot be loaded ({err})") from None


def load_run(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", overrides: Sequence[str] = ()
) -> tuple[BitMar, Any, BitMarConfig, dict[str, Any]]:
    """(model in eval mode on `device`, tokenizer, config, checkpoint payload) of a training checkpoint."""
    path = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(path, map_location="cpu")
    cfg = config_from_dict(payload["config"], list(overrides))
    tokenizer = _tokenizer_from_payload(payload, path)
    if len(tokenizer) != cfg.model.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    model = BitMar(cfg.model)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the config it carries ({str(err)[:300]})") from None
    return model.to(device).eval(), tokenizer, cfg, payload


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def run_evaluation(
    model: nn.Module,
    tokenizer: Any,
    cfg: BitMarConfig,
    *,
    data_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    caption_split: CaptionSplit | None = None,
    strict: bool = False,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `tasks` (default `cfg.evaluation.tasks`) and return the results dict (nothing is written).

    A task that does not apply (no vision encoder, no eval file) is recorded as skipped with its reason; with
    `strict` a missing eval file is an EvaluationError instead. The model's train/eval mode is restored afterwards;
    no training state (memory store, RNG, optimizer) is touched: memories are fresh states built here."""
    names = check_task_names(list(tasks) if tasks is not None else list(cfg.evaluation.tasks))
    device = next(model.parameters()).device
    ctx = EvalContext(
        model=model,
        tokenizer=tokenizer,
        cfg=cfg,
        data_dir=Path(data_dir if data_dir is not None else cfg.data.data_dir),
        device=device,
        caption_split=caption_split,
    )
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        **(info or {}),
        "data_dir": str(ctx.data_dir),
        "device": str(device),
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "use_vision": cfg.model.use_vision,
            "use_memory": cfg.model.use_memory,
            "quantize": cfg.model.quantize,
            "hidden_size": cfg.model.hidden_size,
            "memory_size": cfg.model.memory_size,
        },
        "tasks": {},
    }
    was_training = model.training
    model.eval()
    try:
        for name in names:
            start = time.perf_counter()
            log.info("evaluation: %s", name)
            try:
                with torch.no_grad():
                    outcome = TASKS[name].run(ctx)
            except TaskSkipped as skip:
                if strict and skip.missing_data:
                    raise EvaluationError(f"task {name}: {skip}") from None
                log.warning("evaluation: %s skipped: %s", name, skip)
                results["tasks"][name] = {"status": "skipped", "reason": str(skip)}
                continue
            results["tasks"][name] = {"status": "ok", "seconds": time.perf_counter() - start, **outcome}
    finally:
        model.train(was_training)
    results["summary"] = {
        f"{name}/{h['metric'].strip()}": h["value"]
        for name, r in results["tasks"].items()
        if r["status"] == "ok"
        for h in r["headline"]
    }
    return results


def evaluate_after_training(
    model: nn.Module,
    tokenizer: Any,
    cfg: BitMarConfig,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    caption_val: Any = None,
    run_logger: Any = None,
    step: int | None = None,
) -> dict[str, Any] | None:
    """The trainer's final step (rank 0 only): run `cfg.evaluation.tasks` when `evaluation.run_after_training`, write
    `<output_dir>/evaluation/results.{json,md}` and log the numbers through `run_logger.log_metrics` (the training
    run's wandb). `caption_val` is `BabyLMData.caption_val` (the validation split the run trained without)."""
    if not cfg.evaluation.run_after_training:
        return None
    json_path = Path(output_dir) / "evaluation" / "results.json"
    check_results_writable(json_path, "make the run directory writable and run evaluate_bitmar.py on the checkpoint")
    split = CaptionSplit.from_dataset(caption_val) if caption_val is not None else None
    results = run_evaluation(
        model, tokenizer, cfg, data_dir=data_dir, caption_split=split, info={"output_dir": str(output_dir)}
    )
    path = write_results(results, json_path)
    log.info("evaluation results: %s (and %s)", path, path.with_suffix(".md"))
    if run_logger is not None:
        run_logger.log_metrics(flat_metrics(results), step=step or 0)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def flat_metrics(results: dict[str, Any], prefix: str = "Evaluation") -> dict[str, float]:
    """Every finite number of the task results as {"Evaluation/<task>/<path>": value} (for wandb / metrics.jsonl)."""
    flat: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, bool):
            flat[key] = float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                flat[key] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, list) and value and isinstance(value[0], dict) and "written" in value[0]:
            for item in value:  # recall sizes: keyed by N, not by position
                kept = {k: v for k, v in item.items() if k not in ("requested", "resolved")}
                walk(kept, f"{key}/N={item['written']}")

    for name, task in results["tasks"].items():
        if task["status"] == "ok":
            walk(task["metrics"], f"{prefix}/{name}")
    return flat


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0.0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_report(results: dict[str, Any]) -> str:
    lines = ["# BitMar evaluation", ""]
    if results.get("checkpoint"):
        lines.append(f"Checkpoint: `{results['checkpoint']}`  ")
    m = results["model"]
    lines += [
        f"Data: `{results['data_dir']}`; device {results['device']}; {m['parameters']:,} parameters; "
        f"vision={m['use_vision']}, memory={m['use_memory']}, ternary={m['quantize']}",
        "",
        "| Task | Metric | Value | Reference |",
        "|---|---|---:|---:|",
    ]
    skipped, notes = [], []
    for name, task in results["tasks"].items():
        if task["status"] != "ok":
            skipped.append(f"- **{name}** skipped: {task['reason']}")
            continue
        for h in task["headline"]:
            lines.append(
                f"| {name} | {md_cell(h['metric'])} | {format_value(h['value'])} | {format_value(h.get('reference'))} |"
            )
        notes += [f"- **{name}**: {md_cell(n)}" for n in task.get("notes", [])]
    if skipped:
        lines += ["", *skipped]
    if notes:
        lines += ["", "What the reference column holds:", "", *notes]
    captioning = results["tasks"].get("captioning", {})
    if captioning.get("status") == "ok" and captioning["metrics"]["examples"]:
        lines += ["", "## Caption examples", "", "| Reference | Generated | Generated without image |", "|---|---|---|"]
        for ex in captioning["metrics"]["examples"]:
            cells = (md_cell(ex["reference"]), md_cell(ex["generated"]), md_cell(ex["generated_no_image"]))
            lines.append("| " + " | ".join(cells) + " |")
    recall = results["tasks"].get("episodic_recall", {})
    if recall.get("status") == "ok" and recall["metrics"].get("examples"):
        lines += [
            "",
            "## Episodic recall examples (largest N)",
            "",
            "| Episode caption | From memory | Empty memory | Vision only |",
            "|---|---|---|---|",
        ]
        for ex in recall["metrics"].get("examples", []):
            lines.append(
                f"| {md_cell(ex['caption'])} | {md_cell(ex['memory'])} | {md_cell(ex['empty_memory'])} "
                f"| {md_cell(ex['vision_only'])} |"
            )
    seconds = {n: t["seconds"] for n, t in results["tasks"].items() if t["status"] == "ok"}
    if seconds:
        lines += ["", "Time per task: " + ", ".join(f"{n} {s:.1f} s" for n, s in seconds.items())]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_results(results: dict[str, Any], json_path: str | os.PathLike) -> Path:
    """`json_path` (JSON) and the same name with `.md` (Markdown report), each written atomically."""
    json_path = Path(json_path)
    atomic_write_text(json_path, json.dumps(_jsonable(results), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(json_path.with_suffix(".md"), markdown_report(results))
    recall = results.get("tasks", {}).get("episodic_recall", {})
    if recall.get("status") == "ok" and recall["metrics"].get("sizes"):  # the no-memory ablation has no curve
        from bitmar.evaluation.figures import recall_curve

        recall_curve(recall["metrics"], json_path.with_name("recall_curve.png"))
    return json_path


def log_to_wandb(results: dict[str, Any], cfg: BitMarConfig, mode: str, output_dir: Path, name: str) -> None:
    """Log the flat metrics to a new wandb run (offline/online); any wandb failure only warns (RunLogger)."""
    if mode == "disabled":
        return
    from bitmar.infra.run_logger import RunLogger

    logger = RunLogger(
        output_dir,
        enabled=True,
        wandb_mode=mode,
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        config=config_to_dict(cfg),
        run_name=name,
    )
    logger.log_metrics(flat_metrics(results), step=0)
    logger.log_summary(results["summary"])
    logger.close()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate_bitmar.py",
        description="Evaluate a BitMar checkpoint: retrieval, captioning, grounding, minimal pairs, Winoground, VQA, "
        "one-shot episodic recall, efficiency.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt file (e.g. RUN/checkpoints/last.pt) or a run dir")
    parser.add_argument("--data_dir", help="data directory (default: data.data_dir of the checkpoint's config)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help=f"tasks to run (default: all of {', '.join(TASKS)})")
    parser.add_argument("--output", help="results JSON path (default: <run_dir>/evaluation/results.json; .md beside)")
    parser.add_argument("--wandb", default="disabled", choices=("auto", "online", "offline", "disabled"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key of the checkpoint, e.g. --set evaluation.retrieval_gallery_size=100",
    )  # fmt: skip
    return parser


def _device(name: str) -> torch.device:
    """--device as a torch.device; EvaluationError (exit 2) for a name torch does not know or a device not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usage = "use --device auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvaluationError(f"--device {name!r} is not a device name; {usage}") from None
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    if device.type not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {name}: BitMar evaluates on CPU or CUDA GPUs, not {device.type}; {usage}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvaluationError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvaluationError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def check_results_writable(json_path: str | os.PathLike, hint: str) -> None:
    """EvaluationError unless the results (`json_path` and its `.md`) can be written: checked before the tasks run,
    so a read-only run directory costs no evaluation time."""
    try:
        check_writable_dir(Path(json_path).parent)
    except OSError as err:
        raise EvaluationError(f"cannot write the evaluation results to {json_path}: {err}; {hint}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bitmar.infra.run_logger import setup_text_logging

    setup_text_logging(None, 0)
    try:
        tasks = check_task_names(args.tasks) if args.tasks else None
        device = _device(args.device)
        if device.type == "cpu":  # the ternary matmul route, measured once per process (docs/performance.md)
            try:
                log.info("%s", describe_int8_gemm())
            except ValueError as err:  # a malformed BITMAR_INT8_GEMM
                raise ConfigError(str(err)) from None
        checkpoint = resolve_checkpoint(args.checkpoint)
        output = Path(args.output) if args.output else run_dir_of(checkpoint) / "evaluation" / "results.json"
        if output.suffix != ".json":
            raise EvaluationError(f"--output {output} must end in .json (the Markdown report goes beside it as .md)")
        check_results_writable(output, "pass --output PATH.json in a directory you can write to")
        model, tokenizer, cfg, payload = load_run(checkpoint, device, args.overrides)
        data_dir = Path(args.data_dir) if args.data_dir else Path(cfg.data.data_dir)
        if not data_dir.is_dir():
            where = "--data_dir" if args.data_dir else f"data.data_dir of the checkpoint's config (cwd {Path.cwd()})"
            raise EvaluationError(f"data directory {data_dir} ({where}) does not exist; pass --data_dir DIR")
        progress = payload.get("progress", {})
        info = {
            "checkpoint": str(checkpoint),
            "training": {k: progress.get(k) for k in ("global_step", "epochs_done", "tokens_seen") if k in progress},
        }
        results = run_evaluation(
            model, tokenizer, cfg, data_dir=data_dir, tasks=tasks, strict=tasks is not None, info=info
        )
    except (ConfigError, CheckpointError, EvaluationError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        write_results(results, output)
    except OSError as err:  # the directory changed since the check, or the disk is full: keep the numbers on screen
        print(markdown_report(results))
        print(
            f"error: cannot write the evaluation results to {output} ({err}); the report is printed above",
            file=sys.stderr,
        )
        return 2
    log_to_wandb(results, cfg, args.wandb, output.parent, f"eval-{run_dir_of(checkpoint).name}")
    print(markdown_report(results))
    print(f"results: {output} and {output.with_suffix('.md')}")
    return 0

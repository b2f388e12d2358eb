"""BitMar evaluation suite: retrieval, captioning, grounding, BabyLM-style zero-shot scoring (minimal pairs,
Winoground, VQA), one-shot episodic recall, efficiency; a command line (`evaluate_bitmar.py`) and ablations."""

from bitmar.evaluation.context import CaptionSplit, EvalContext, EvaluationError, TaskSkipped
from bitmar.evaluation.runner import (
    TASKS,
    evaluate_after_training,
    load_run,
    markdown_report,
    run_evaluation,
    write_results,
)

__all__ = [
    "TASKS",
    "CaptionSplit",
    "EvalContext",
    "EvaluationError",
    "TaskSkipped",
    "evaluate_after_training",
    "load_run",
    "markdown_report",
    "run_evaluation",
    "write_results",
]

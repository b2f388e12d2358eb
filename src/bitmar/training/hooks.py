"""What a caller plugs into the Trainer: work that is not training but must run at its step, epoch and end
boundaries (attention-head analysis, the post-training evaluation and export). The training package stands below
analysis, evaluation and export: `bitmar.pipeline` builds these hooks, the trainer only calls them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from bitmar.config import BitMarConfig
from bitmar.data.datasets import BabyLMData
from bitmar.infra.run_logger import RunLogger
from bitmar.training.progress import Progress


class TrainerView(Protocol):
    """What a hook may read of the trainer (`bitmar.training.trainer.Trainer`), never change."""

    cfg: BitMarConfig  # the run's resolved config
    output_dir: Path
    model: nn.Module
    objective: nn.Module  # the model with the three-phase losses (`TrainingObjective`)
    data: BabyLMData
    progress: Progress
    logger: RunLogger

    def analysis_batch(self, phase: int, size: int = 8) -> dict[str, Any]:
        """A fixed batch of the validation split, on the model's device."""
        ...


class PostTrainingError(RuntimeError):
    """The post-training work (`TrainingHook.after_training`) could not finish, e.g. it cannot write its results;
    training itself finished and its checkpoint and summary are saved."""


class TrainingHook:
    """Every method is a no-op here; a hook overrides those it needs. Each gets the trainer (`TrainerView`)."""

    # True: the hook logs the Attention/* series itself, so the trainer's diagnostics leave them out
    logs_attention: bool = False

    def attach(self, trainer: TrainerView) -> None:
        """The trainer is built (model, objective, logger); called once, at the end of `Trainer.__init__`."""

    def after_step(self, trainer: TrainerView, phase: int, step: int) -> None:
        """After optimizer step `step` (before its metrics are logged and its checkpoint written); every rank."""

    def after_epoch(self, trainer: TrainerView, step: int) -> None:
        """After an epoch's validation and checkpoints (`trainer.progress.epochs_done` counts it); every rank."""

    def after_training(self, trainer: TrainerView) -> None:
        """Rank 0 only, after the final checkpoint and summary.json: a signal stops this at once (nothing is left to
        save). Raise PostTrainingError for a failure the user can fix and redo on the saved checkpoint."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """Every rank, after `after_training`, before the run logger closes."""

"""The run of train_bitmar.py: train (`bitmar.training`), then evaluate (`bitmar.evaluation`) and export
(`bitmar.export`), with the attention-head analysis (`bitmar.analysis`) measured during training.

This module stands above all four: it builds the hooks the trainer calls (`bitmar.training.hooks`), so the training
package never imports the layers that use its results. `main` is the command line of train_bitmar.py (flags:
`bitmar.training.cli.build_parser`). The analysis, evaluation and export code loads once a run starts, not when
this module loads: `--help` and a refused config answer without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bitmar.config import BitMarConfig, ConfigError
from bitmar.fileio import check_writable_dir
from bitmar.training import cli
from bitmar.training.hooks import PostTrainingError, TrainerView, TrainingHook

if TYPE_CHECKING:
    from bitmar.analysis.heads import HeadImportanceTracker


def main(argv: list[str] | None = None) -> int:
    """train_bitmar.py: train with the hooks of `pipeline_hooks`; returns the exit code (see `bitmar.training.cli`)."""
    return cli.main(argv, make_hooks=pipeline_hooks)


def pipeline_hooks(cfg: BitMarConfig, output_dir: Path) -> list[TrainingHook]:
    """The hooks of a train_bitmar.py run; refuses (ConfigError) a run directory the final step cannot write."""
    check_end_of_run_outputs(cfg, output_dir)  # before hours of training, not after
    hooks: list[TrainingHook] = []
    if cfg.attention_analysis.enabled:
        hooks.append(HeadAnalysis(cfg, output_dir))
    hooks.append(EvaluateAndExport())
    return hooks


class HeadAnalysis(TrainingHook):
    """Attention-head importance during training (`HeadImportanceTracker`): measured every
    `attention_analysis.log_every_n_steps` optimizer steps, figures at epoch ends and at the end."""

    logs_attention = True  # the tracker logs Attention/* from its own batch

    def __init__(self, cfg: BitMarConfig, output_dir: Path) -> None:
        self.cfg = cfg.attention_analysis
        self.output_dir = Path(output_dir) / "attention_analysis"
        self.log_metrics = cfg.wandb.log_attention  # files are written either way; Attention/* only when on
        self.tracker: HeadImportanceTracker | None = None

    def attach(self, trainer: TrainerView) -> None:
        from bitmar.analysis.heads import HeadImportanceTracker

        self.tracker = HeadImportanceTracker(trainer.model, self.cfg, self.output_dir, log_metrics=self.log_metrics)

    def after_step(self, trainer: TrainerView, phase: int, step: int) -> None:
        if step % self.cfg.log_every_n_steps == 0:
            self.tracker.measure(trainer.objective, trainer.analysis_batch(phase), phase, step, trainer.logger)

    def after_epoch(self, trainer: TrainerView, step: int) -> None:
        self.tracker.on_epoch_end(trainer.progress.epochs_done, step, trainer.logger)

    def on_train_end(self, trainer: TrainerView) -> None:
        self.tracker.on_train_end(trainer.progress.global_step, trainer.logger)


class EvaluateAndExport(TrainingHook):
    """Rank 0, after the final checkpoint: the default evaluation on the validation split (fresh memory states,
    training state untouched; `evaluation.run_after_training`), then the optional Hugging Face export
    (`export.after_training`)."""

    def __init__(self) -> None:
        # Loaded when a run starts (not when train_bitmar.py loads), so an import error shows before training.
        from bitmar import evaluation, export

        self.evaluation, self.export = evaluation, export

    def after_training(self, trainer: TrainerView) -> None:
        cfg, output_dir = trainer.cfg, trainer.output_dir
        try:
            self.evaluation.evaluate_after_training(
                trainer.model,
                trainer.data.tokenizer,
                cfg,
                cfg.data.data_dir,
                output_dir,
                caption_val=trainer.data.caption_val,
                run_logger=trainer.logger,
                step=trainer.progress.global_step,
            )
            if cfg.export.after_training:
                self.export.export_checkpoint(
                    output_dir / "checkpoints" / "last.pt",
                    output_dir / "hf_export",
                    packed=cfg.export.packed,
                    vision_backbone=cfg.export.vision_backbone,
                    dtype=cfg.export.dtype,
                )
        except (self.evaluation.EvaluationError, self.export.ExportError) as err:  # e.g. cannot write (disk full)
            raise PostTrainingError(str(err)) from err


def check_end_of_run_outputs(cfg: BitMarConfig, output_dir: Path) -> None:
    """ConfigError unless the post-training evaluation results and the export can be written into the run
    directory: found at the end, a read-only directory would cost the whole training run its last step."""
    targets = []
    if cfg.evaluation.run_after_training:
        targets.append(output_dir / "evaluation")
    if cfg.export.after_training:
        targets.append(output_dir / "hf_export")
    for target in targets:
        try:
            check_writable_dir(target)
        except OSError as err:
            raise ConfigError(
                f"{err}: the post-training step writes into {target}; make the run directory writable, choose "
                "another --output_dir, or turn the step off (evaluation.run_after_training=false / "
                "export.after_training=false)"
            ) from None

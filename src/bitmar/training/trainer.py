"""The BitMar training loop: three phases, exact resume, DDP.

The trainer owns everything stateful about a run (optimizer, schedule, counters, RNG, persistent memory) and the
loop; the model only computes. It reads top to bottom as the run: set-up (`__init__`), the phases with their epochs
and optimizer steps (`train`), the end (`_finish`). Around the loop it delegates to units with small interfaces:
`Validator` (validation), `Diagnostics` (the metrics of a log step), `RunFigures` (plots), `RunFiles` (config,
checkpoints, summary), `StopSignals` (SIGTERM/SIGINT) and the caller's `TrainingHook`s. One Trainer runs on one
process or on each rank under torchrun.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from bitmar.bitnet import describe_int8_gemm
from bitmar.config import BitMarConfig, ConfigError, TrainingConfig, config_to_dict
from bitmar.data.datasets import BabyLMData
from bitmar.data.pseudowords import augment_episode_ids, fast_mapping_augmenter
from bitmar.infra.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from bitmar.infra.run_logger import RunLogger
from bitmar.memory import EpisodicStore
from bitmar.model import BitMar
from bitmar.training.diagnostics import Diagnostics, gradient_norms
from bitmar.training.distributed import DistInfo, barrier, broadcast_tensors, replicas_identical
from bitmar.training.hard_negatives import requested_swap_classes
from bitmar.training.hooks import TrainingHook
from bitmar.training.objective import TrainingObjective
from bitmar.training.plots import RunFigures
from bitmar.training.progress import PHASE_NAMES, Progress, effective_phase_epochs, epoch_fraction
from bitmar.training.resume import ResumePoint, model_shape_mismatches, tokenizer_mismatch
from bitmar.training.rundir import RunFiles, run_summary
from bitmar.training.schedule import TwoStageSchedule
from bitmar.training.signals import StopSignals, TrainingInterrupted
from bitmar.training.validation import Validator, to_device

log = logging.getLogger("bitmar")

PERSISTENT_EPISODES_PER_STEP = 4  # training episodes copied into the persistent store per phase-3 step


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. repeated non-finite losses); a checkpoint was written first."""


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices of linear layers; norms, biases, embeddings and the memory prior never decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "embed" not in name and "memory" not in name else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]


def make_optimizer(model: nn.Module, t: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over `_param_groups`, torch's default (per-parameter) implementation.

    Not `fused=True`, although its CPU kernel steps the tiny model 3x faster (3 vs 11 ms): it writes the parameters
    without bumping their autograd version counters (torch 2.13), which BitLinear's weight cache keys on, and it
    rounds differently, which moves the short runs the evaluation tests are calibrated on.
    """
    groups = _param_groups(model, t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.betas), eps=1e-8)


class Trainer:
    def __init__(
        self,
        cfg: BitMarConfig,
        output_dir: Path,
        dist_info: DistInfo,
        data: BabyLMData,
        *,
        start_phase: int | None = None,
        resume: ResumePoint | None = None,
        wandb_mode: str | None = None,
        stop_after_steps: int | None = None,
        hooks: Sequence[TrainingHook] = (),
    ) -> None:
        """cfg: settled for `data` (model.vocab_size = len(data.tokenizer), `settle_vocab_size`). resume: the
        checkpoint to continue exactly, or with `start_phase` to start that phase from its weights. hooks: work of
        the layers above training (attention analysis, evaluation, export; `bitmar.pipeline`)."""
        if cfg.model.vocab_size != len(data.tokenizer):
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} but the run's tokenizer has {len(data.tokenizer)} tokens; "
                "settle it before building the Trainer: bitmar.training.trainer.settle_vocab_size(cfg, data.tokenizer)"
            )
        self.cfg = cfg
        self.output_dir = output_dir
        self.dist = dist_info
        self.device = dist_info.device
        self.data = data
        self.stop_after_steps = stop_after_steps
        self.progress = Progress(phase=start_phase or 1)
        self.signals = StopSignals()
        self.hooks = list(hooks)
        self.files = RunFiles(output_dir, dist_info)

        tokenizer = data.tokenizer
        torch.manual_seed(cfg.training.seed)
        self.model = BitMar(cfg.model).to(self.device)
        # The persistent store of training episodes (None for the ablation without memory).
        self.store = (
            EpisodicStore(self.model.memory, device=self.device, alpha=cfg.model.memory_alpha)
            if self.model.memory is not None
            else None
        )
        mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        special = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
        swaps = requested_swap_classes(tokenizer, cfg.training)
        self.objective = TrainingObjective.from_config(self.model, cfg, mask_id, special, swaps)
        self.augmenter = fast_mapping_augmenter(cfg) if cfg.model.use_memory and cfg.model.use_vision else None
        t = cfg.training
        self.optimizer = make_optimizer(self.model, t)
        self.phase_epochs = effective_phase_epochs(cfg, start_phase or 1)
        self.epoch_fraction = epoch_fraction(cfg, start_phase or 1)
        if self.epoch_fraction < 1.0:
            log.info(
                "training.max_epochs=%d is below the %d enabled phases: each phase runs %.0f%% of an epoch",
                cfg.training.max_epochs,
                len(self.phase_epochs),
                100 * self.epoch_fraction,
            )
        self.schedule = TwoStageSchedule(
            self.optimizer,
            total_steps=self._planned_steps(),
            peak_lr=t.learning_rate,
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            min_lr_ratio=t.min_learning_rate_ratio,
        )
        # After building, before wrapping: weights are kept. With start_phase too, only the weights are taken.
        if resume is not None:
            self._restore(resume, start_phase)
        self.train_module: nn.Module = self.objective
        if dist_info.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Gradients as views of the all-reduce buckets: no per-step copy into the buckets and back.
            self.train_module = DistributedDataParallel(
                self.objective, device_ids=device_ids, find_unused_parameters=True, gradient_as_bucket_view=True
            )
        if t.compile:
            self.train_module = torch.compile(self.train_module)
        self.autocast_dtype = self._autocast_dtype()
        if self.device.type == "cpu":  # the ternary matmuls' route, measured once per process (docs/performance.md)
            try:
                log.info("%s", describe_int8_gemm())
            except ValueError as err:  # a malformed BITMAR_INT8_GEMM
                raise ConfigError(str(err)) from None

        self.logger = RunLogger(
            output_dir,
            enabled=dist_info.is_main,
            wandb_mode=wandb_mode or cfg.wandb.mode,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            config=config_to_dict(cfg),
            resume_id=resume.payload.get("wandb_run_id") if resume is not None else None,
        )
        self.files.write_config(cfg)
        self.validator = Validator(self.model, data, cfg, dist_info)
        self.diagnostics = Diagnostics(
            self.model,
            self.store,
            cfg,
            is_main=dist_info.is_main,
            analysis_batch=self.analysis_batch,
            attention_logged_elsewhere=any(hook.logs_attention for hook in self.hooks),
        )
        self.figures = RunFigures(
            self.model,
            self.store,
            cfg,
            self.logger,
            output_dir / "plots",
            analysis_batch=self.analysis_batch,
            model_sizes=self.diagnostics.model_sizes,
        )
        for hook in self.hooks:
            hook.attach(self)

    # ----------------------------------------------------------------------------------------------- the run
    def train(self) -> dict[str, Any]:
        """Initial validation, the phases, the end (summary, post-training hooks); returns the summary."""
        try:
            with self.signals.deferred():  # a signal stops the run at the next step boundary, after a checkpoint
                if self.progress.initial_val_loss is None:
                    initial = self.validator.run(self.progress.phase, self.progress.epochs_done)
                    self.progress.initial_val_loss = initial["Validation/loss"]
                    self.logger.log_metrics(initial, step=self.progress.global_step)
                for phase in sorted(self.phase_epochs):
                    if phase < self.progress.phase:
                        continue
                    if phase > self.progress.phase:
                        self.progress.phase, self.progress.epoch, self.progress.batch = phase, 0, 0
                    self._run_phase(phase)
                summary = self._finish()
                for hook in self.hooks:
                    hook.on_train_end(self)
                return summary
        finally:
            self.logger.close()

    def _run_phase(self, phase: int) -> None:
        epochs = self.phase_epochs[phase]
        log.info("phase %d (%s): %d epoch(s)", phase, PHASE_NAMES[phase], epochs)
        while self.progress.epoch < epochs:
            self._run_epoch(phase, self.progress.epoch)
            self.progress.epoch += 1
            self.progress.epochs_done += 1
            self.progress.batch = 0
            self._end_of_epoch(phase)

    def _run_epoch(self, phase: int, epoch: int) -> None:
        t = self.cfg.training
        accum = t.gradient_accumulation_steps
        total_batches = self._batches_in_epoch(phase)
        loader = self.data.loader(phase, epoch, start_batch=self.progress.batch)
        self.train_module.train()
        bar = tqdm(
            total=total_batches,
            initial=self.progress.batch,
            desc=f"phase {phase} epoch {epoch + 1}/{self.phase_epochs[phase]}",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
        )
        step_metrics: dict[str, float] = defaultdict(float)
        window_tokens, window_start = 0, time.perf_counter()
        micro = 0
        for batch in loader:
            if self.progress.batch >= total_batches:
                break
            batch = to_device(self._with_fast_mapping_episodes(batch, phase, epoch), self.device)
            loss, metrics = self._forward(batch, phase)
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            window_tokens += tokens * self.dist.world_size
            self.progress.tokens_seen += tokens * self.dist.world_size
            finite = bool(torch.isfinite(loss.detach()))
            if finite:
                (loss / accum).backward()
            step_metrics["Loss"] += float(loss.detach()) / accum if finite else math.nan
            for key, value in metrics.items():
                if not key.startswith("_"):
                    step_metrics[key] += float(value) / accum
            if "_memory_weights" in metrics:  # (N, K) the training reads' addressing (mean of q(W))
                for key, value in self.diagnostics.training_reads(metrics["_memory_weights"]).items():
                    step_metrics[key] += value / accum
            micro += 1
            self.progress.batch += 1
            bar.update(1)
            if micro % accum != 0:
                continue
            self._optimizer_step(step_metrics, phase, bar, window_tokens, window_start, metrics)
            step_metrics = defaultdict(float)
            if self.diagnostics.is_log_step(self.progress.global_step):
                window_tokens, window_start = 0, time.perf_counter()
            self._maybe_stop_mid_epoch()
        if micro % accum != 0:
            # The epoch ended inside an accumulation: step on those micro-batches, as their mean (each backward was
            # scaled by 1/accum), so no gradient leaks into the next epoch or phase and an epoch checkpoint holds the
            # whole state. Steps only ever happen at these boundaries, so a resume stays aligned.
            scale = accum / (micro % accum)
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
            step_metrics = defaultdict(float, {k: v * scale for k, v in step_metrics.items()})
            self._optimizer_step(step_metrics, phase, bar, window_tokens, window_start, metrics)
            self._maybe_stop_mid_epoch()
        bar.close()

    def _optimizer_step(
        self,
        step_metrics: dict[str, float],
        phase: int,
        bar: tqdm,
        window_tokens: int,
        window_start: float,
        last_metrics: dict[str, torch.Tensor],
    ) -> None:
        t = self.cfg.training
        loss_value = step_metrics["Loss"]
        finite = math.isfinite(loss_value)
        grad_norms: dict[str, float] = {}
        if finite:
            if self.cfg.wandb.log_gradients and self.diagnostics.is_log_step(self.progress.global_step + 1):
                grad_norms = gradient_norms(self.model)
            total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.gradient_clip or float("inf"))
            finite = bool(torch.isfinite(total_norm))
        if not finite:
            self._skip_nonfinite_step(phase)
            return
        self.progress.consecutive_nonfinite = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.progress.global_step += 1
        if phase >= 3:
            self._feed_persistent_store(last_metrics)
        step = self.progress.global_step
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{self.schedule.current_lr:.2e}")
        for hook in self.hooks:
            hook.after_step(self, phase, step)
        if self.diagnostics.is_log_step(step):
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            training = {
                **step_metrics,
                "Learning_Rate": self.schedule.current_lr,
                "Weight_Decay": self.schedule.weight_decay_at(self.schedule.step_count),
                # epochs of data: an epoch of a run with epoch_fraction < 1 covers that share of the data
                "Epoch": self.epoch_fraction
                * (self.progress.epochs_done + self.progress.batch / self._batches_in_epoch(phase)),
                "Step": step,
                "Phase": phase,
                "Tokens_per_s": window_tokens / elapsed,
                "Skipped_Nonfinite": self.progress.skipped_nonfinite,
            }
            self.logger.log_metrics(self.diagnostics.step_metrics(phase, training, grad_norms), step=step)
        if t.checkpoint_every_n_steps and step % t.checkpoint_every_n_steps == 0:
            self.save("last.pt")

    def _skip_nonfinite_step(self, phase: int) -> None:
        """A non-finite loss or gradient: drop the step; too many in a row save last.pt and stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.skipped_nonfinite += 1
        self.progress.consecutive_nonfinite += 1
        log.warning(
            "non-finite loss or gradient at step %d (%d in a row); step skipped",
            self.progress.global_step,
            self.progress.consecutive_nonfinite,
        )
        if self.progress.consecutive_nonfinite >= self.cfg.training.max_consecutive_nonfinite:
            self.save("last.pt")
            raise TrainingError(
                f"{self.progress.consecutive_nonfinite} non-finite losses in a row at step "
                f"{self.progress.global_step} (phase {phase}); saved checkpoints/last.pt. Lower "
                "training.learning_rate, check the data with test_dataset_compatibility.py, or raise "
                "training.max_consecutive_nonfinite"
            )

    def _maybe_stop_mid_epoch(self) -> None:
        if self.signals.received is not None:
            self.save("last.pt")
            self.signals.raise_if_received()
        if self.stop_after_steps is not None and self.progress.global_step >= self.stop_after_steps:
            self.save("last.pt")
            raise TrainingInterrupted(0)

    def _end_of_epoch(self, phase: int) -> None:
        metrics = self.validator.run(phase, self.progress.epochs_done)
        step = self.progress.global_step
        self.logger.log_metrics(metrics, step=step)
        for key in ("Validation/loss", "Validation/Caption_Loss", "Validation/Text_Loss"):
            self.progress.history.setdefault(key, []).append(metrics[key])
        log.info(
            "phase %d epoch %d: validation loss %.4f (text %.4f, caption %.4f)",
            phase,
            self.progress.epoch,
            metrics["Validation/loss"],
            metrics["Validation/Text_Loss"],
            metrics["Validation/Caption_Loss"],
        )
        names = [f"bitmar_epoch_{self.progress.epochs_done}.pt", "last.pt"]
        if metrics["Validation/loss"] < self.progress.best_val_loss:
            self.progress.best_val_loss = metrics["Validation/loss"]
            names.append("best.pt")
        self.save(*names)
        for hook in self.hooks:
            hook.after_epoch(self, step)
        viz_every = self.cfg.attention_analysis.viz_every_n_epochs
        if self.dist.is_main and self.cfg.wandb.create_plots and self.progress.epochs_done % viz_every == 0:
            self.figures.draw(phase, step)
        self.signals.raise_if_received()

    def _finish(self) -> dict[str, Any]:
        """Final validation, last.pt, summary.json; then (rank 0) the hooks' post-training work."""
        final = self.validator.run(max(self.phase_epochs), self.progress.epochs_done)
        summary = run_summary(
            final,
            self.progress,
            self.model,
            self.diagnostics.model_sizes(),
            use_vision=self.cfg.model.use_vision,
            ranks_agree=self._ranks_agree() if self.dist.distributed else None,
        )
        self.save("last.pt")
        if self.dist.is_main:
            self.logger.log_metrics(
                {f"Summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))},
                step=self.progress.global_step,
            )
            self.logger.log_summary(summary)
            self.files.write_summary(summary)
        self.signals.raise_if_received(training_done=True)  # arrived during the final validation: stop here
        if self.dist.is_main:
            with self.signals.stop_at_once():
                for hook in self.hooks:
                    hook.after_training(self)
        barrier(self.dist)
        return summary

    # ---------------------------------------------------------------------------------------------- the steps
    def _forward(self, batch: dict[str, Any], phase: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            return self.train_module(batch, phase)

    def _with_fast_mapping_episodes(self, batch: dict[str, Any], phase: int, epoch: int) -> dict[str, Any]:
        """Phase 3: the memory episodes get captions with a pseudo-word (data.pseudo_words); deterministic in
        (seed, phase, epoch, batch, rank), so a resumed run sees the same words."""
        if phase < 3 or self.augmenter is None or batch.get("kind") != "caption":
            return batch
        pw = self.cfg.data.pseudo_words
        n = min(batch["input_ids"].size(0), self.cfg.training.memory_episodes_per_write)
        t = self.cfg.training
        rng = np.random.default_rng([t.seed, pw.seed, phase, epoch, self.progress.batch, self.dist.rank])
        ids, mask, _ = augment_episode_ids(
            self.data.tokenizer, self.augmenter, batch["input_ids"][:n], batch["attention_mask"][:n],
            pw.probability, rng, self.cfg.data.max_caption_length,
        )  # fmt: skip
        return {**batch, "episode_input_ids": ids, "episode_attention_mask": mask}

    def _feed_persistent_store(self, metrics: dict[str, torch.Tensor]) -> None:
        """Copy a few training episodes into the persistent store, identically on every rank."""
        if "_memory_keys" not in metrics or self.store is None:
            return
        count = min(PERSISTENT_EPISODES_PER_STEP, metrics["_memory_keys"].size(0))
        keys = metrics["_memory_keys"][:count].float().contiguous()
        values = metrics["_memory_values"][:count].float().contiguous()
        broadcast_tensors([keys, values], self.dist)
        for key, value in zip(keys, values, strict=True):
            self.store.write(key, value)
        self.diagnostics.store_writes(keys)

    def analysis_batch(self, phase: int, size: int = 8) -> dict[str, Any]:
        """A fixed batch of the validation split on the model's device (diagnostics, figures, hooks)."""
        return self.validator.analysis_batch(phase, size)

    # ------------------------------------------------------------------------------------------- the budget
    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.cfg.training.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _planned_steps(self) -> int:
        return max(1, sum(self._steps_in_epoch(phase) * epochs for phase, epochs in self.phase_epochs.items()))

    def _batches_in_epoch(self, phase: int) -> int:
        batches = len(self.data.loader(phase, 0))
        if self.epoch_fraction < 1.0:  # a budget below one epoch per phase (epoch_fraction)
            batches = max(1, int(batches * self.epoch_fraction))
        cap = self.cfg.training.max_steps_per_epoch
        if cap is not None:
            batches = min(batches, cap * self.cfg.training.gradient_accumulation_steps)
        return batches

    def _steps_in_epoch(self, phase: int) -> int:
        # A last partial accumulation of an epoch is a step of its own (see _run_epoch).
        return max(1, math.ceil(self._batches_in_epoch(phase) / self.cfg.training.gradient_accumulation_steps))

    # ------------------------------------------------------------------------------------- checkpoints, resume
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "progress": self.progress.as_dict(),
            "phase_epochs": {str(k): v for k, v in self.phase_epochs.items()},
            "epoch_fraction": self.epoch_fraction,
            "rng": capture_rng_state(),
            "memory_store": self.store.state_dict() if self.store is not None else {},
            "config": config_to_dict(self.cfg),
            "tokenizer": self.data.tokenizer.backend_tokenizer.to_str(),
            "wandb_run_id": self.logger.wandb_run_id,
        }

    def save(self, *names: str) -> None:
        """checkpoints/<name> for each name (rank 0 writes; every rank waits)."""
        self.files.save_checkpoint(self.checkpoint_payload, *names)

    def _restore(self, resume: ResumePoint, start_phase: int | None) -> None:
        """Continue a run exactly; with `start_phase`, start that phase from the checkpoint's weights instead."""
        path, payload = resume.path, resume.payload
        stored_tokenizer = payload.get("tokenizer")
        if isinstance(stored_tokenizer, str) and stored_tokenizer:
            difference = tokenizer_mismatch(stored_tokenizer, self.data.tokenizer.backend_tokenizer.to_str())
            if difference is not None:
                raise CheckpointError(
                    f"the run's tokenizer ({self.data.tokenizer_dir}) is not the one {path} was trained with "
                    f"({difference}); resume with the checkpoint's tokenizer (train_bitmar.py restores it into a new "
                    "--output_dir)"
                )
        problems = model_shape_mismatches(self.model.state_dict(), payload["model"])
        if problems:
            raise CheckpointError(
                f"{path} does not fit this model ({'; '.join(problems[:5])}); resume without overrides of model.*"
            )
        self.model.load_state_dict(payload["model"])
        if start_phase is not None:
            self._start_phase_from(payload, path, start_phase)
            return
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["schedule"])
        self.progress = Progress(**payload["progress"])
        self.phase_epochs = {int(k): int(v) for k, v in payload["phase_epochs"].items()}
        self.epoch_fraction = float(payload.get("epoch_fraction", 1.0))
        if payload.get("memory_store") and self.store is not None:
            self.store.load_state_dict(payload["memory_store"])
        restore_rng_state(payload["rng"])
        log.info(
            "resumed from %s: phase %d, epoch %d, batch %d, step %d",
            path,
            self.progress.phase,
            self.progress.epoch,
            self.progress.batch,
            self.progress.global_step,
        )

    def _start_phase_from(self, payload: dict[str, Any], path: Path, phase: int) -> None:
        """`--phase N --resume PATH`: the weights are loaded; optimizer, schedule (warm-up again, planned over phases
        N..3), position, initial validation and the persistent memory store start fresh. The counters that name
        files and log steps (global step, epochs done, tokens, best validation loss) continue, so a restart in the
        same run directory never overwrites an epoch checkpoint or logs a step twice."""
        old = Progress(**payload["progress"])
        self.progress = Progress(
            phase=phase,
            global_step=old.global_step,
            epochs_done=old.epochs_done,
            tokens_seen=old.tokens_seen,
            best_val_loss=old.best_val_loss,
            skipped_nonfinite=old.skipped_nonfinite,
            history=old.history,
        )
        log.info(
            "--phase %d with --resume: starting phase %d from the weights of %s (saved at phase %d, epoch %d, step "
            "%d) with a fresh optimizer, LR schedule and memory store; drop --phase to continue that run exactly",
            phase,
            phase,
            path,
            old.phase,
            old.epoch,
            old.global_step,
        )

    def _ranks_agree(self) -> bool:
        """DDP keeps replicas identical; verify it (parameters and the persistent memory) before saving."""
        tensors = list(self.model.parameters())
        if self.store is not None and len(self.store) > 0:
            tensors.append(self.store.state.memory)
        ok = replicas_identical(tensors, self.dist)
        if ok:
            log.info("parameters and memory identical on %d ranks", self.dist.world_size)
        else:
            log.error("parameters differ between ranks: DDP synchronisation failed")
        return ok


def settle_vocab_size(cfg: BitMarConfig, tokenizer: Any) -> None:
    """The tokenizer decides the vocabulary: set model.vocab_size to its size once, after the data is built and
    before any model is (the Trainer refuses a config that disagrees with its data's tokenizer)."""
    cfg.model.vocab_size = len(tokenizer)

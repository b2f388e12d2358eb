"""The BitMar training loop: three phases, exact resume, logging, plots, DDP.

The trainer owns everything stateful about a run (optimizer, schedule, counters, RNG, persistent memory,
files); the model only computes. One Trainer runs on one process or on each rank under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from bitmar.bitnet import BitLinear, describe_int8_gemm, quantization_stats
from bitmar.config import BitMarConfig, ConfigError, TrainingConfig, config_to_dict, save_config
from bitmar.data.datasets import collate_captions, collate_text
from bitmar.data.pseudowords import augment_episode_ids, fast_mapping_augmenter
from bitmar.fileio import atomic_write_text
from bitmar.infra.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from bitmar.infra.figures import safe_plot
from bitmar.infra.run_logger import RunLogger
from bitmar.memory import EpisodicStore
from bitmar.model import BitMar
from bitmar.training import plots
from bitmar.training.diagnostics import (
    SlotUsageWindow,
    addressing_kl,
    component_of,
    model_size_by_component,
)
from bitmar.training.distributed import DistInfo, all_reduce_mean, barrier, broadcast_tensors
from bitmar.training.hard_negatives import swap_token_classes
from bitmar.training.hooks import TrainingHook
from bitmar.training.losses import contrastive_loss, token_nll
from bitmar.training.objective import TrainingObjective
from bitmar.training.progress import PHASE_NAMES, Progress, effective_phase_epochs, epoch_fraction
from bitmar.training.resume import find_resume_checkpoint, model_shape_mismatches, tokenizer_mismatch
from bitmar.training.schedule import TwoStageSchedule

log = logging.getLogger("bitmar")

PERSISTENT_EPISODES_PER_STEP = 4  # training episodes copied into the persistent store per phase-3 step


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. repeated non-finite losses); a checkpoint was written first."""


class TrainingInterrupted(BaseException):
    """SIGTERM/SIGINT arrived; the trainer saved last.pt and stopped at a step boundary, or (`training_done`) stopped
    the post-training evaluation/export after the final checkpoint was written.

    A BaseException (like KeyboardInterrupt): raised from the signal handler during evaluation, it must not be
    swallowed by an `except Exception` in the code it interrupts.
    """

    def __init__(self, signum: int, training_done: bool = False) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.training_done = training_done


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
        data: Any,
        *,
        start_phase: int | None = None,
        resume_from: str | None = None,
        wandb_mode: str | None = None,
        stop_after_steps: int | None = None,
        hooks: Sequence[TrainingHook] = (),
    ) -> None:
        """hooks: work of the layers above training (attention analysis, evaluation, export; `bitmar.pipeline`)."""
        self.cfg = cfg
        self.output_dir = output_dir
        self.dist = dist_info
        self.device = dist_info.device
        self.data = data
        self.stop_after_steps = stop_after_steps
        self.progress = Progress(phase=start_phase or 1)
        self._signal_received: int | None = None

        tokenizer = data.tokenizer
        cfg.model.vocab_size = len(tokenizer)
        torch.manual_seed(cfg.training.seed)
        self.model = BitMar(cfg.model).to(self.device)
        # The persistent store of training episodes (None for the ablation without memory).
        self.store = (
            EpisodicStore(self.model.memory, device=self.device, alpha=cfg.model.memory_alpha)
            if self.model.memory is not None
            else None
        )
        self.usage_window = SlotUsageWindow()  # memory addressing of the current logging window (Memory/ metrics)
        self._model_sizes: dict[str, tuple[int, int]] | None = None  # float32 vs packed bytes, computed once
        mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        special = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
        swaps = swap_token_classes(tokenizer) if cfg.training.loss_weights.hard_negative > 0 else None
        self.objective = TrainingObjective(self.model, cfg, mask_id, special, swaps)
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
        resume_payload = self._load_resume(resume_from, start_phase)
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
        if self.device.type == "cpu":  # the route of the ternary matmuls, measured here once per process (README)
            try:
                log.info("%s", describe_int8_gemm())
            except ValueError as err:  # a malformed BITMAR_INT8_GEMM
                raise ConfigError(str(err)) from None

        config_dict = config_to_dict(cfg)
        self.logger = RunLogger(
            output_dir,
            enabled=dist_info.is_main,
            wandb_mode=wandb_mode or cfg.wandb.mode,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            config=config_dict,
            resume_id=resume_payload.get("wandb_run_id") if resume_payload else None,
        )
        if dist_info.is_main:
            save_config(cfg, output_dir / "config.yaml")
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.attach(self)

    # ----------------------------------------------------------------------------------------------- set-up
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

    def _load_resume(self, resume_from: str | None, start_phase: int | None = None) -> dict[str, Any] | None:
        """Continue a run exactly; with `start_phase`, start that phase from the checkpoint's weights instead."""
        if resume_from is None:
            return None
        path = find_resume_checkpoint(self.output_dir) if resume_from == "auto" else Path(resume_from)
        if path is None:
            log.info("--resume auto: no checkpoint in %s/checkpoints yet, starting a new run", self.output_dir)
            return None
        payload = load_checkpoint(path, map_location=self.device)
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
            return self._start_phase_from(payload, path, start_phase)
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
        return payload

    def _start_phase_from(self, payload: dict[str, Any], path: Path, phase: int) -> dict[str, Any]:
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
        return payload

    # ----------------------------------------------------------------------------------------- checkpoints
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
        """Rank 0 writes; every rank waits so nobody races ahead of a checkpoint."""
        if self.dist.is_main:
            payload = self.checkpoint_payload()
            for name in names:
                save_checkpoint(payload, self.output_dir / "checkpoints" / name)
        barrier(self.dist)

    # -------------------------------------------------------------------------------------------- signals
    @contextlib.contextmanager
    def _signals_stop_at_once(self) -> Iterator[None]:
        """After the final checkpoint (post-training evaluation/export): a signal stops the work at once, since
        nothing is left to save. Outside, the handler only sets a flag honoured at the next step boundary."""
        if self._signal_received is not None:
            raise TrainingInterrupted(self._signal_received, training_done=True)

        def handler(signum: int, _frame: Any) -> None:
            self._signal_received = signum
            raise TrainingInterrupted(signum, training_done=True)

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread
                pass
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous = {}

        def handler(signum: int, _frame: Any) -> None:
            self._signal_received = signum

        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread (e.g. some notebook runners): keep default behaviour
                pass
        return previous

    # ---------------------------------------------------------------------------------------------- steps
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

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

    def _forward(self, batch: dict[str, Any], phase: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            return self.train_module(batch, phase)

    def _gradient_norms(self) -> dict[str, float]:
        """L2 norm of the gradient per component; 0.0 for a component whose parameters got none this step (e.g. the
        fusion before phase 3: its output is only the memory's episode value), so every series starts at step 1."""
        sums: dict[str, float] = defaultdict(float)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            component = component_of(name)
            sums[component] += 0.0
            if param.grad is not None:
                value = float(param.grad.detach().float().pow(2).sum())
                sums[component] += value
                sums["total"] += value
        sums["total"] += 0.0
        norms = {f"Gradients/{k.title().replace('_', '')}_Norm": math.sqrt(v) for k, v in sums.items()}
        if "Gradients/TextEncoder_Norm" in norms:  # the original name of the text encoder's series
            norms["Gradients/Encoder_Norm"] = norms["Gradients/TextEncoder_Norm"]
        return norms

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
        if self.dist.is_main and self.cfg.wandb.log_memory:
            self.usage_window.add(self.model.memory.address(keys.to(self.model.memory.prior.dtype)))

    def train(self) -> dict[str, Any]:
        previous_handlers = self._install_signal_handlers()
        try:
            if self.progress.initial_val_loss is None:
                initial = self.validate(phase=self.progress.phase)
                self.progress.initial_val_loss = initial["Validation/loss"]
                self.logger.log_metrics(initial, step=self.progress.global_step)
            for phase in sorted(self.phase_epochs):
                if phase < self.progress.phase:
                    continue
                if phase > self.progress.phase:
                    self.progress.phase, self.progress.epoch, self.progress.batch = phase, 0, 0
                self._run_phase(phase)
            summary = self.final_summary()
            for hook in self.hooks:
                hook.on_train_end(self)
            return summary
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
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
            batch = self._to_device(self._with_fast_mapping_episodes(batch, phase, epoch))
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
            if "_memory_weights" in metrics and self.dist.is_main and self.cfg.wandb.log_memory:
                weights = metrics["_memory_weights"]  # (N, K) the training reads' addressing (mean of q(W))
                self.usage_window.add(weights)
                kl_part, rms = addressing_kl(weights)
                step_metrics["Memory_KL_Addressing"] += kl_part / accum
                step_metrics["Memory_Addressing_RMS"] += rms / accum
            micro += 1
            self.progress.batch += 1
            bar.update(1)
            if micro % accum != 0:
                continue
            self._optimizer_step(step_metrics, phase, epoch, bar, window_tokens, window_start, metrics)
            step_metrics = defaultdict(float)
            if self.progress.global_step % self.cfg.wandb.log_every_n_steps == 0:
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
            self._optimizer_step(step_metrics, phase, epoch, bar, window_tokens, window_start, metrics)
            self._maybe_stop_mid_epoch()
        bar.close()

    def _optimizer_step(
        self,
        step_metrics: dict[str, float],
        phase: int,
        epoch: int,
        bar: Any,
        window_tokens: int,
        window_start: float,
        last_metrics: dict[str, torch.Tensor],
    ) -> None:
        t = self.cfg.training
        loss_value = step_metrics["Loss"]
        finite = math.isfinite(loss_value)
        grad_norms: dict[str, float] = {}
        if finite:
            if self.cfg.wandb.log_gradients and self._is_log_step(self.progress.global_step + 1):
                grad_norms = self._gradient_norms()
            total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.gradient_clip or float("inf"))
            finite = bool(torch.isfinite(total_norm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped_nonfinite += 1
            self.progress.consecutive_nonfinite += 1
            log.warning(
                "non-finite loss or gradient at step %d (%d in a row); step skipped",
                self.progress.global_step,
                self.progress.consecutive_nonfinite,
            )
            if self.progress.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                self.save("last.pt")
                raise TrainingError(
                    f"{self.progress.consecutive_nonfinite} non-finite losses in a row at step "
                    f"{self.progress.global_step} (phase {phase}); saved checkpoints/last.pt. Lower "
                    "training.learning_rate, check the data with test_dataset_compatibility.py, or raise "
                    "training.max_consecutive_nonfinite"
                )
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
        if self._is_log_step(step):
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics = {f"Training/{k}": v for k, v in step_metrics.items()}
            metrics.update(
                {
                    "Training/Learning_Rate": self.schedule.current_lr,
                    "Training/Weight_Decay": self.schedule.weight_decay_at(self.schedule.step_count),
                    # epochs of data: an epoch of a run with epoch_fraction < 1 covers that share of the data
                    "Training/Epoch": self.epoch_fraction
                    * (self.progress.epochs_done + self.progress.batch / self._batches_in_epoch(phase)),
                    "Training/Step": step,
                    "Training/Phase": phase,
                    "Training/Tokens_per_s": window_tokens / elapsed,
                    "Training/Skipped_Nonfinite": self.progress.skipped_nonfinite,
                }
            )
            metrics.update(grad_norms)
            metrics.update(self._diagnostic_metrics(phase, last_metrics))
            self.logger.log_metrics(metrics, step=step)
        if t.checkpoint_every_n_steps and step % t.checkpoint_every_n_steps == 0:
            self.save("last.pt")

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.wandb.log_every_n_steps == 0

    def _maybe_stop_mid_epoch(self) -> None:
        if self._signal_received is not None:
            self.save("last.pt")
            raise TrainingInterrupted(self._signal_received)
        if self.stop_after_steps is not None and self.progress.global_step >= self.stop_after_steps:
            self.save("last.pt")
            raise TrainingInterrupted(0)

    # ------------------------------------------------------------------------------------- diagnostics
    def analysis_batch(self, phase: int, size: int = 8) -> dict[str, Any]:
        """A fixed batch from the validation split (no RNG drawn): text for phase 1, captions later."""
        if phase >= 2 and self.data.caption_val is not None and len(self.data.caption_val) > 0:
            items = self.data.caption_val.__getitems__(list(range(min(size, len(self.data.caption_val)))))
            batch = collate_captions(items, self.data.pad_id)
        else:
            batch = collate_text([self.data.text_val[i] for i in range(min(size, len(self.data.text_val)))])
        return self._to_device(batch)

    @torch.no_grad()
    def _diagnostic_metrics(self, phase: int, last_metrics: dict[str, torch.Tensor]) -> dict[str, Any]:
        if not self.dist.is_main:
            return {}
        wb = self.cfg.wandb
        metrics: dict[str, Any] = {}
        if wb.log_quantization:
            metrics.update(self._quantization_metrics())
        usage = self.usage_window.take()  # the window ends at every log step, logged or not
        if wb.log_memory and usage is not None:
            # Addressing mass of the window's memory writes and reads (training memories and the persistent store)
            metrics["Memory/Usage_Mean"] = usage.usage_mean
            metrics["Memory/Active_Slots_Percentage"] = usage.active_pct
            metrics["Memory/Top_5_Slot_Access"] = usage.top5_share
            metrics["Memory/Window_Episodes"] = usage.episodes
            for rank, slot in enumerate(usage.top5_slots, start=1):
                metrics[f"Memory/Top_5_Slot_Index_{rank}"] = slot
        if wb.log_memory and self.store is not None and len(self.store) > 0:
            diag = self.model.memory.diagnostics(self.store.state)
            metrics["Memory/Analysis_Avg_Similarity"] = float(diag["mean_slot_cosine"])
            metrics["Memory/Memory_Norm"] = float(diag["memory_norm"])
            metrics["Memory/Episodes_Stored"] = len(self.store)
        hook_logs_attention = any(hook.logs_attention for hook in self.hooks)
        if (wb.log_features or wb.log_attention) and self.cfg.model.use_vision:
            batch = self.analysis_batch(max(phase, 2), size=16)
            self.model.eval()
            out = self.model(
                batch["input_ids"],
                batch["attention_mask"],
                vision_features=batch["vision_features"],
                output_attentions=wb.log_attention and not hook_logs_attention,
            )
            self.model.train()
            if wb.log_features:
                for name, latent in (("Text", out.text_latent), ("Vision", out.vision_latent)):
                    latent = latent.float()
                    metrics[f"Features/{name}_Mean"] = float(latent.mean())
                    metrics[f"Features/{name}_Std"] = float(latent.std())
                    metrics[f"Features/{name}_Norm"] = float(latent.norm(dim=-1).mean())
                similarity = nn.functional.cosine_similarity(out.text_latent.float(), out.vision_latent.float(), dim=-1)
                metrics["Features/CrossModal_Similarity"] = float(similarity.mean())
                metrics["Features/Cross_Modal_Similarity"] = metrics["Features/CrossModal_Similarity"]  # earlier name
            if wb.log_attention and out.attentions and not hook_logs_attention:
                # With attention analysis on, its hook logs these keys from its own batch (one series per key).
                metrics.update(attention_entropy_metrics(out.attentions))
        return metrics

    def model_sizes(self) -> dict[str, tuple[int, int]]:
        """{component: (float32 bytes, packed bytes)} and "total" (architecture only, so computed once per run)."""
        if self._model_sizes is None:
            self._model_sizes = model_size_by_component(self.model)
        return self._model_sizes

    def _quantization_metrics(self) -> dict[str, float]:
        stats = quantization_stats(self.model)
        layers = stats["layers"]
        metrics: dict[str, float] = {}
        if layers:
            metrics["Quantization/Weight_Scale_Mean"] = sum(s["scale"] for s in layers.values()) / len(layers)
            metrics["Quantization/Sparsity"] = sum(s["zero_fraction"] for s in layers.values()) / len(layers)
        for name, layer in layers.items():  # gamma and the share of zero weights of every ternary layer
            metrics[f"Quantization/WeightScale_{name}"] = layer["scale"]
            metrics[f"Quantization/Sparsity_{name}"] = layer["zero_fraction"]
        unpacked, packed = self.model_sizes()["total"]
        # The whole model (float32 as trained / packed for inference), as the evaluation's efficiency task reports it
        metrics["Quantization/Compression_Ratio"] = unpacked / packed
        metrics["Quantization/Ternary_Compression_Ratio"] = stats["compression_ratio"]  # the ternary layers alone
        metrics["Quantization/Ternary_Fraction"] = stats["ternary_fraction"]
        return metrics

    # --------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, phase: int) -> dict[str, float]:
        """Validation never touches training state: eval mode, fresh memory states, no optimizer."""
        self.model.eval()
        limit = self.cfg.training.validation_batches
        text_nll = text_count = 0.0
        loaders = self.data.validation_loaders()
        for i, batch in enumerate(loaders["text"] or []):
            if limit is not None and i >= limit:
                break
            batch = self._to_device(batch)
            mask = batch.get("attention_mask")
            out = self.model(batch["input_ids"], mask, return_latents=False)
            total, count = token_nll(out.logits, batch["input_ids"], mask)
            text_nll += float(total)
            text_count += float(count)
        sums: dict[str, float] = defaultdict(float)
        caption_count = 0.0
        retrieval_hits = retrieval_total = 0.0
        for i, batch in enumerate(loaders["caption"] or []):
            if limit is not None and i >= limit:
                break
            batch = self._to_device(batch)
            ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
            variants = {"none": None}
            if self.cfg.model.use_vision:
                variants["true"] = features
                variants["shuffled"] = features.roll(1, dims=0)
            count = None
            for name, vf in variants.items():
                out = self.model(ids, mask, vision_features=vf, return_latents=name == "true")
                total, count = token_nll(out.logits, ids, mask)
                sums[name] += float(total)
                if name == "true" and ids.size(0) > 1:
                    _, accuracy = contrastive_loss(out.text_latent, out.vision_latent, 1.0)
                    retrieval_hits += float(accuracy) * ids.size(0)
                    retrieval_total += ids.size(0)
            if self.cfg.model.use_memory and self.cfg.model.use_vision and phase >= 3 and ids.size(0) > 1:
                n = min(ids.size(0), self.cfg.training.memory_episodes_per_write)
                values = self.model.episode_latent(ids[:n], mask[:n], features[:n])
                state = self.model.write_memory(self.model.memory_key(features[:n]), values)  # a fresh state
                readout, _ = self.model.read_memory(state, vision_features=features[:n])
                out = self.model(ids[:n], mask[:n], memory_readout=readout, return_latents=False)
                total, mem_count = token_nll(out.logits, ids[:n], mask[:n])
                sums["memory"] += float(total)
                sums["memory_count"] += float(mem_count)
            caption_count += float(count)
        self.model.train()
        metrics: dict[str, float] = {}
        text_loss = text_nll / max(text_count, 1.0)
        metrics["Validation/Text_Loss"] = text_loss
        metrics["Validation/Perplexity"] = math.exp(min(text_loss, 50.0))
        caption_key = "true" if self.cfg.model.use_vision else "none"
        caption_loss = sums[caption_key] / max(caption_count, 1.0)
        metrics["Validation/Caption_Loss"] = caption_loss
        metrics["Validation/Caption_Loss_No_Image"] = sums["none"] / max(caption_count, 1.0)
        if self.cfg.model.use_vision:
            metrics["Validation/Caption_Loss_Shuffled_Image"] = sums["shuffled"] / max(caption_count, 1.0)
            metrics["Validation/Retrieval_Accuracy_In_Batch"] = retrieval_hits / max(retrieval_total, 1.0)
        if sums["memory_count"] > 0:
            metrics["Validation/Memory_Recall_Loss"] = sums["memory"] / sums["memory_count"]
        metrics["Validation/loss"] = 0.5 * (text_loss + caption_loss)
        metrics["Validation/Epoch"] = float(self.progress.epochs_done)
        return {k: float(all_reduce_mean(torch.tensor(v, device=self.device), self.dist)) for k, v in metrics.items()}

    def _end_of_epoch(self, phase: int) -> None:
        metrics = self.validate(phase)
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
            self.make_plots(phase)
        if self._signal_received is not None:
            raise TrainingInterrupted(self._signal_received)

    def make_plots(self, phase: int) -> list[Path]:
        wb, step = self.cfg.wandb, self.progress.global_step
        plot_dir = self.output_dir / "plots"
        written: list[Path | None] = []
        if wb.plot_memory_usage and self.store is not None:
            state = self.store.state if len(self.store) > 0 else self.model.memory.empty_state()
            mass = state.usage.detach().float()  # (K,) addressing mass of the held episodes
            usage = mass / mass.max() if bool(mass.max() > 0) else mass  # relative to the busiest slot, as logged
            written.append(
                safe_plot(
                    plots.plot_memory_slots,
                    usage.cpu().numpy(),
                    state.age.float().cpu().numpy(),
                    plot_dir / f"memory_slots_step_{step}.png",
                    step,
                )
            )
        if wb.plot_quantization_dist:
            latent: dict[str, dict[str, np.ndarray]] = {}  # component -> layer -> W / gamma
            for name, module in self.model.named_modules():
                if isinstance(module, BitLinear) and module.quantize:
                    weight = module.weight.detach().float()
                    scaled = (weight / weight.abs().mean().clamp(min=1e-5)).cpu().numpy()
                    latent.setdefault(component_of(name), {})[name] = scaled
            if latent:  # none in the full-precision ablation
                written.append(
                    safe_plot(plots.plot_quantization, latent, plot_dir / f"quantization_step_{step}.png", step)
                )
            written.append(
                safe_plot(plots.plot_compression, self.model_sizes(), plot_dir / "compression_ratio.png", step)
            )
        if wb.plot_attention_heatmaps and self.cfg.model.use_vision:
            batch = self.analysis_batch(max(phase, 2), size=2)
            with torch.no_grad():
                self.model.eval()
                out = self.model(
                    batch["input_ids"],
                    batch["attention_mask"],
                    vision_features=batch["vision_features"],
                    output_attentions=True,
                )
                self.model.train()
            for kind in ("decoder", "cross_modal"):
                maps = out.attentions.get(kind) if out.attentions else None
                if maps:
                    written.append(
                        safe_plot(
                            plots.plot_attention_heatmap,
                            maps[-1][0].float().cpu().numpy(),
                            plot_dir / f"attention_{kind}_step_{step}.png",
                            f"{kind} attention, last layer, step {step}",
                        )
                    )
        records = plots.read_metrics(self.logger.metrics_path)
        loss_keys = sorted({k for r in records for k in r if k.startswith("Training/Loss")})
        written.append(safe_plot(plots.plot_loss_panels, records, loss_keys, plot_dir / "loss_curves.png"))
        grad_keys = sorted({k for r in records for k in r if k.startswith("Gradients/")})
        if grad_keys:
            written.append(
                safe_plot(
                    plots.plot_curves, records, grad_keys, plot_dir / "gradient_norms.png", "Gradient norms", "L2 norm"
                )
            )
        paths = [p for p in written if p is not None]
        for path in paths:
            self.logger.log_figure(f"Plots/{path.stem.split('_step_')[0]}", path, step)
        return paths

    # ------------------------------------------------------------------------------------------- summary
    def final_summary(self) -> dict[str, Any]:
        final = self.validate(phase=max(self.phase_epochs))
        summary: dict[str, Any] = {
            "initial_validation_loss": self.progress.initial_val_loss,
            "final_validation_loss": final["Validation/loss"],
            "best_validation_loss": self.progress.best_val_loss,
            "final_text_loss": final["Validation/Text_Loss"],
            "final_perplexity": final["Validation/Perplexity"],
            "caption_loss_true_image": final["Validation/Caption_Loss"],
            "caption_loss_no_image": final["Validation/Caption_Loss_No_Image"],
            "optimizer_steps": self.progress.global_step,
            "tokens_seen": self.progress.tokens_seen,
            "skipped_nonfinite_steps": self.progress.skipped_nonfinite,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
        if self.cfg.model.use_vision:
            summary["caption_loss_shuffled_image"] = final["Validation/Caption_Loss_Shuffled_Image"]
            summary["grounding_gain"] = summary["caption_loss_shuffled_image"] - summary["caption_loss_true_image"]
        if "Validation/Memory_Recall_Loss" in final:
            summary["memory_recall_loss"] = final["Validation/Memory_Recall_Loss"]
        if self.dist.distributed:
            summary["ranks_agree"] = self._ranks_agree()
        stats = quantization_stats(self.model)
        summary["ternary_fraction"] = stats["ternary_fraction"]
        unpacked, packed = self.model_sizes()["total"]
        summary["compression_ratio"] = unpacked / packed  # whole model, float32 / packed (as the evaluation reports)
        summary["ternary_compression_ratio"] = stats["compression_ratio"]
        self.save("last.pt")
        if self.dist.is_main:
            self.logger.log_metrics(
                {f"Summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))},
                step=self.progress.global_step,
            )
            self.logger.log_summary(summary)
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self._signal_received is not None:  # arrived during the final validation: stop before evaluating
            raise TrainingInterrupted(self._signal_received, training_done=True)
        if self.dist.is_main:
            with self._signals_stop_at_once():
                for hook in self.hooks:
                    hook.after_training(self)
        barrier(self.dist)
        return summary

    def _ranks_agree(self) -> bool:
        """DDP keeps replicas identical; verify it (parameters and the persistent memory) before saving."""
        with torch.no_grad():
            vector = torch.cat([p.detach().float().flatten() for p in self.model.parameters()])
            if self.store is not None and len(self.store) > 0:
                vector = torch.cat([vector, self.store.state.memory.detach().float().flatten()])
            checksum = torch.stack([vector.sum(), (vector * torch.arange(vector.numel(), device=vector.device)).sum()])
            reference = checksum.clone()
            broadcast_tensors([reference], self.dist)
            agree = torch.tensor(float(torch.allclose(checksum, reference, rtol=1e-6, atol=0)), device=self.device)
            agree = all_reduce_mean(agree, self.dist)
        ok = bool(agree.item() == 1.0)
        if ok:
            log.info("parameters and memory identical on %d ranks", self.dist.world_size)
        else:
            log.error("parameters differ between ranks: DDP synchronisation failed")
        return ok


def attention_entropy_metrics(attentions: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean attention entropy (nats) per layer and attention type; lower = more concentrated heads."""
    names = {"encoder": "Encoder", "decoder": "Decoder", "cross_modal": "CrossModal", "vision": "Vision"}
    metrics = {}
    for kind, maps in attentions.items():
        for layer, weights in enumerate(maps):  # (B, H, Tq, Tk)
            p = weights.float().clamp(min=1e-12)
            entropy = -(p * p.log()).sum(-1).mean()
            metrics[f"Attention/{names.get(kind, kind)}_layer_{layer}_Entropy"] = float(entropy)
    return metrics

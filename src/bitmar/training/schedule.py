"""BitNet b1.58 two-stage schedule: linear warm-up, LR drop at the midpoint, weight decay 0.1 -> 0.

Training tips (Microsoft, "The Era of 1-bit LLMs"): ternary models tolerate a high peak LR early; lowering it
and switching weight decay off halfway lets the latent weights settle on stable ternary values.
"""

from __future__ import annotations

import math

import torch


class TwoStageSchedule:
    """Per-step learning rate and weight decay, written into the optimizer's param groups by `step()`."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        peak_lr: float,
        warmup_steps: int,
        weight_decay: float,
        min_lr_ratio: float = 0.1,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.peak_lr = peak_lr
        self.warmup_steps = min(warmup_steps, max(total_steps // 2, 1))
        self.weight_decay = weight_decay
        self.min_lr_ratio = min_lr_ratio
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        midpoint = self.total_steps // 2
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < midpoint:  # stage 1: cosine from the peak to half of it
            progress = (step - self.warmup_steps) / max(midpoint - self.warmup_steps, 1)
            high, low = self.peak_lr, 0.5 * self.peak_lr
            return low + 0.5 * (high - low) * (1 + math.cos(math.pi * progress))
        # stage 2: the drop; cosine from the floor to a tenth of it
        progress = (step - midpoint) / max(self.total_steps - midpoint, 1)
        high = self.peak_lr * self.min_lr_ratio
        return 0.1 * high + 0.5 * 0.9 * high * (1 + math.cos(math.pi * min(progress, 1.0)))

    def weight_decay_at(self, step: int) -> float:
        return self.weight_decay if step < self.total_steps // 2 else 0.0

    def _apply(self) -> None:
        lr, wd = self.lr_at(self.step_count), self.weight_decay_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            # groups built with decay=False (norms, biases, embeddings) never decay
            group["weight_decay"] = wd if group.get("decay", True) else 0.0

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
        self._apply()

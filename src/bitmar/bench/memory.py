"""Episodic memory cost: one write + read of N episodes against one training step of the full configuration.

    python -m bitmar.bench --only memory [--quick]

The memory operation is what phase 3 adds per batch, with gradients: `write_kv(keys, values)` (addressing against
the prior, least-squares solve), `read_kv` with noisy keys (training mode adds addressing noise), the KL term, and
the backward into keys, values and the prior. K = 512 slots, C = 768 (the full configuration), N = 16, 64, 256.
The reference is one phase-3 training step of the full configuration (bench.training's step: forward, backward,
clipping, AdamW) on a CPU-sized caption batch; both alternate in one run. Goal: at most 5% of a step.
A smaller reference batch makes the step cheaper and the fraction larger, so a CPU-sized batch overstates the
memory's share of a real (64 x 64) step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bitmar.bench.rows import Goal, Row, Settings, Unavailable, ratio_row
from bitmar.bench.timing import time_interleaved
from bitmar.bench.training import FULL_CONFIG, build_objective, make_step, synthetic_batch
from bitmar.config import load_config
from bitmar.memory import EpisodicMemory

MEMORY_GOAL = Goal("<=", 0.05, "<= 0.05 (5% of a step)")
EPISODE_COUNTS = (16, 64, 256)


def memory_step(memory: EpisodicMemory, keys: torch.Tensor, values: torch.Tensor, noise: torch.Tensor) -> None:
    """Write N key-value episodes, read them back with noisy keys, KL on the addressing, backward."""
    memory.zero_grad(set_to_none=True)
    keys.grad = values.grad = None
    state = memory.write_kv(keys, values)
    readout, weights = memory.read_kv(keys + noise, state)  # (N, C), (N, K)
    loss = (readout - values).square().mean() + memory.kl_divergence(weights)
    loss.backward()


def memory_inputs(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, dim, generator=g).requires_grad_(True)  # (N, C)
    values = torch.randn(n, dim, generator=g).requires_grad_(True)  # (N, C)
    noise = 0.1 * torch.randn(n, dim, generator=g)  # (N, C)
    return keys, values, noise


def memory_rows(settings: Settings) -> list[Row | Unavailable]:
    # --quick: one repeat, no warm-up (a full-configuration step costs seconds; the quick run only checks that it runs)
    batch_size, length, repeats, warmup = (2, 32, 1, 0) if settings.quick else (8, 64, 5, 1)
    cfg = load_config(FULL_CONFIG)
    m = cfg.model
    batch = synthetic_batch(3, batch_size, length, m.vocab_size, m.vision_encoder_dim)
    objective = build_objective(cfg, quantize=True)
    fns: dict[str, Any] = {"step": make_step(objective, objective.model, cfg, batch, 3)}
    torch.manual_seed(0)
    memory = EpisodicMemory(m.memory_size, m.episode_dim, addressing_noise_std=m.addressing_noise_std).train()
    for n in EPISODE_COUNTS:
        fns[f"N={n}"] = functools.partial(memory_step, memory, *memory_inputs(n, m.episode_dim, seed=n))
    times = time_interleaved(fns, repeats, warmup)["wall"]
    step_ms = 1e3 * sorted(times["step"])[len(times["step"]) // 2]
    return [
        ratio_row(
            "memory",
            f"memory write_kv+read_kv fwd+bwd, K={m.memory_size}, C={m.episode_dim}, N={n}",
            f"memory, N={n}",
            f"training step (full, phase 3, {batch_size} x {length})",
            "time A / time B",
            times[f"N={n}"],
            times["step"],
            MEMORY_GOAL,
            {"memory_ms": [1e3 * t for t in times[f"N={n}"]], "step_ms_median": step_ms},
        )
        for n in EPISODE_COUNTS
    ]

"""Training-step cost of the attention-head analysis: analysis on vs off, at the configured interval.

    python -m bitmar.bench.attention [--quick] [--phases 1 2 3] [--pairs 3] [--threads N] [--json out.json]

The tiny configuration (configs/bitmar_tiny.yaml) trains on a fixed batch of its batch size: TrainingObjective
forward + backward + AdamW step. One block is `attention_analysis.log_every_n_steps` such steps; an "on" block
adds one `HeadImportanceTracker.measure` on an 8-example analysis batch (as the trainer does), writing its files
and metrics.jsonl into a temporary run. Off and on blocks alternate (the order flips every pair), so background
load hits both alike. The overhead is the amortised cost median(measure) / (interval x median(step)), with the
step time from the off blocks; budget: at most 10 %. The block ratio median(on) / median(off) - 1 is printed beside
it, in wall time and in this process's CPU time: it includes the same cost, but on a shared machine a block of 25
steps varies by more than one measurement costs, so it is a cross-check, not the verdict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bitmar.analysis.heads import HeadImportanceTracker
from bitmar.bench.rows import Goal, Row, Settings, Unavailable, ratio_row
from bitmar.cli_args import positive_int
from bitmar.config import load_config
from bitmar.fileio import atomic_write_text
from bitmar.infra.run_logger import RunLogger
from bitmar.model import BitMar
from bitmar.training.objective import TrainingObjective
from bitmar.training.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = ROOT / "configs" / "bitmar_tiny.yaml"
OVERHEAD_BUDGET = 0.10
ANALYSIS_BATCH = 8  # the trainer's analysis batch size


def _batch(kind: str, size: int, length: int, vocab: int, feature_dim: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (size, length), generator=g)  # (B, T)
    mask = torch.ones(size, length, dtype=torch.long)
    batch: dict[str, Any] = {"kind": kind, "input_ids": ids, "attention_mask": mask}
    if kind == "caption":
        for b in range(size):  # right-padded captions of varied length, as the loader makes them
            mask[b, max(2, length - (b % 8) * 3) :] = 0
        batch["vision_features"] = torch.randn(size, feature_dim, generator=g)  # (B, D)
    return batch


def time_phase(phase: int, pairs: int, config_path: Path = DEFAULT_CONFIG, seed: int = 0) -> dict[str, Any]:
    """Alternating off/on blocks of `interval` training steps for one phase -> timings and overheads."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    cfg = load_config(config_path)
    interval = cfg.attention_analysis.log_every_n_steps
    torch.manual_seed(seed)
    model = BitMar(cfg.model)
    objective = TrainingObjective.from_config(model, cfg, mask_token_id=3, special_token_ids=[0, 1, 2])
    t = cfg.training
    optimizer = make_optimizer(model, t)  # the trainer's AdamW
    kind = "text" if phase == 1 else "caption"
    length = cfg.data.text_block_length if kind == "text" else cfg.data.max_caption_length
    args = (cfg.model.vocab_size, cfg.model.vision_encoder_dim)
    train_batch = _batch(kind, t.batch_size, length, *args, seed=seed + 1)
    analysis_batch = _batch(kind, ANALYSIS_BATCH, length, *args, seed=seed + 2)

    def train_step() -> None:
        loss, _ = objective(train_batch, phase)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    block_s: dict[str, list[float]] = {"off": [], "on": []}
    block_cpu_s: dict[str, list[float]] = {"off": [], "on": []}
    measure_s: list[float] = []
    measure_cpu_s: list[float] = []
    step = 0
    with tempfile.TemporaryDirectory(prefix="bitmar_bench_attention_") as tmp:
        logger = RunLogger(Path(tmp), enabled=True, wandb_mode="disabled", project="bench", entity=None, config={})
        tracker = HeadImportanceTracker(model, cfg.attention_analysis, Path(tmp) / "attention_analysis")
        objective.train()
        train_step()  # warm-up: allocator, lazy imports
        tracker.measure(objective, analysis_batch, phase, 0, logger)
        for pair in range(pairs):
            for variant in ("off", "on") if pair % 2 == 0 else ("on", "off"):
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(interval):
                    train_step()
                    step += 1
                if variant == "on":
                    m_start, m_cpu_start = time.perf_counter(), time.process_time()
                    tracker.measure(objective, analysis_batch, phase, step, logger)
                    measure_s.append(time.perf_counter() - m_start)
                    measure_cpu_s.append(time.process_time() - m_cpu_start)
                block_s[variant].append(time.perf_counter() - start)
                block_cpu_s[variant].append(time.process_time() - cpu_start)
        logger.close()
    off, on = statistics.median(block_s["off"]), statistics.median(block_s["on"])
    cpu_off, cpu_on = statistics.median(block_cpu_s["off"]), statistics.median(block_cpu_s["on"])
    step_s = off / interval
    measure = statistics.median(measure_s)
    return {
        "phase": phase,
        "batch_kind": kind,
        "batch_size": t.batch_size,
        "interval": interval,
        "pairs": pairs,
        "step_ms_off": 1e3 * step_s,
        "step_ms_on": 1e3 * on / interval,
        "measure_ms": 1e3 * measure,
        "amortised_overhead": measure / (interval * step_s),
        "amortised_overhead_cpu": statistics.median(measure_cpu_s) / cpu_off,  # cpu_off = interval CPU steps
        "block_overhead": on / off - 1.0,
        "block_overhead_cpu": cpu_on / cpu_off - 1.0,
        "block_s": block_s,
        "block_cpu_s": block_cpu_s,
    }


def run_benchmark(
    phases: Sequence[int] = (1, 2, 3), pairs: int = 3, config_path: Path = DEFAULT_CONFIG
) -> dict[str, Any]:
    """All phases as one dict (what `python -m bitmar.bench` collects)."""
    rows = [time_phase(phase, pairs, config_path) for phase in phases]
    worst = max(r["amortised_overhead"] for r in rows)
    return {
        "config": {
            "config_file": str(config_path),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "analysis_batch": ANALYSIS_BATCH,
            "budget": OVERHEAD_BUDGET,
        },
        "phases": rows,
        "worst_overhead": worst,
        "within_budget": worst <= OVERHEAD_BUDGET,
    }


def format_report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"Attention-head analysis overhead: {Path(cfg['config_file']).name}, {cfg['threads']} CPU threads, "
        f"torch {cfg['torch']}, analysis batch {cfg['analysis_batch']}",
        "",
        "| phase | batch | interval | step ms (off) | step ms (on) | measure ms | overhead (amortised) "
        "| amortised, CPU time | block ratio - 1 | block ratio - 1, CPU time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["phases"]:
        lines.append(
            f"| {r['phase']} | {r['batch_size']} {r['batch_kind']} | {r['interval']} | {r['step_ms_off']:.1f} | "
            f"{r['step_ms_on']:.1f} | {r['measure_ms']:.1f} | {100 * r['amortised_overhead']:.1f}% | "
            f"{100 * r['amortised_overhead_cpu']:.1f}% | {100 * r['block_overhead']:+.1f}% | "
            f"{100 * r['block_overhead_cpu']:+.1f}% |"
        )
    verdict = "within" if result["within_budget"] else "OVER"
    lines += [
        "",
        f"worst amortised overhead {100 * result['worst_overhead']:.1f}%: {verdict} the "
        f"{100 * cfg['budget']:.0f}% budget. Amortised = median(measure) / ({result['phases'][0]['interval']} x "
        "median(step)); the block ratios (alternating off/on blocks, medians) are a noisier cross-check.",
    ]
    return "\n".join(lines)


def attention_rows(settings: Settings) -> list[Row | Unavailable]:
    """The attention-head analysis benchmark (`bench.attention`, tiny config): blocks of `log_every_n_steps` training
    steps with and without one analysis, alternating; the ratio is per block pair. Its amortised overhead (median
    analysis time / (interval x median step)) is in the details."""
    phases, pairs = ([2], 1) if settings.quick else ([1, 2, 3], 3)
    result = run_benchmark(phases=phases, pairs=pairs)
    budget = float(result["config"].get("budget", 0.10))
    out: list[Row | Unavailable] = []
    for r in result["phases"]:
        out.append(
            ratio_row(
                "attention",
                f"attention analysis every {r['interval']} steps, phase {r['phase']} (tiny, batch {r['batch_size']})",
                "training + analysis",
                "training",
                f"block time A / B (amortised overhead {100 * r['amortised_overhead']:.1f}%)",
                r["block_s"]["on"],
                r["block_s"]["off"],
                Goal("<=", 1.0 + budget, f"<= {1 + budget:.2f}x"),
                {k: v for k, v in r.items() if k not in ("block_s", "block_cpu_s")},
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitmar.bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="phase 2 only, 2 pairs of blocks (~1 min on 1 core)")
    parser.add_argument("--phases", type=int, nargs="+", choices=[1, 2, 3], default=None, help="default: 1 2 3")
    parser.add_argument("--pairs", type=positive_int, default=None, help="off/on block pairs per phase (default 3)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    phases = args.phases or ([2] if args.quick else [1, 2, 3])
    pairs = args.pairs or (2 if args.quick else 3)
    result = run_benchmark(phases, pairs)
    print(format_report(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel scaling on CPU: torchrun with 2 processes against 1, same global batch.

    python -m bitmar.bench --only distributed [--quick]
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m bitmar.bench.distributed --output r.json

Each launch runs `DistributedDataParallel(TrainingObjective)` (gloo, one torch thread per process, as the trainer
wraps it) on the tiny configuration for a few warm-up steps and then `--steps` timed steps on a fixed synthetic
phase-2 caption batch; every rank takes global_batch / world_size rows. Rank 0 writes tokens/s (global text tokens
per second, median step time) to `--output`. The suite alternates launches (1, 2, 2, 1, ...) and takes the ratio of
2-process to 1-process tokens/s per pair. Goal: >= 1.6x. Each rank also reports its CPU time / wall time over the
timed steps: about 1 when it had a core to itself; on a machine whose cores other processes share it drops, and the
second process brings no throughput (the row's name shows both shares).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bitmar.bench.rows import Goal, Row, Settings, Unavailable, ratio_row

SCALING_GOAL = Goal(">=", 1.6, ">= 1.6x tokens/s")


def worker(config: Path, global_batch: int, steps: int, warmup: int, phase: int, output: Path | None) -> dict[str, Any]:
    """One rank: DDP training steps on its shard of a fixed global batch; returns (rank 0 writes) the timings."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bitmar.bench.training import build_objective, make_step, synthetic_batch, text_tokens
    from bitmar.config import load_config
    from bitmar.training.distributed import cleanup, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    if global_batch % info.world_size:
        raise ValueError(f"--global-batch {global_batch} is not divisible by {info.world_size} processes")
    cfg = load_config(config)
    m = cfg.model
    length = cfg.data.text_block_length if phase == 1 else cfg.data.max_caption_length
    full = synthetic_batch(phase, global_batch, length, m.vocab_size, m.vision_encoder_dim)
    per_rank = global_batch // info.world_size
    shard = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    batch = {k: v[shard] if torch.is_tensor(v) else v for k, v in full.items()}
    objective = build_objective(cfg, quantize=True)  # same seed on every rank: identical replicas
    module = objective
    if info.distributed:
        # wrapped as the trainer wraps it
        module = DistributedDataParallel(objective, find_unused_parameters=True, gradient_as_bucket_view=True)
    step = make_step(module, objective.model, cfg, batch, phase)
    for _ in range(warmup):
        step()
    seconds, cpu_seconds = [], []
    for _ in range(steps):
        if info.distributed:
            dist.barrier()  # every timed step starts together
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    # CPU time / wall time of this rank's steps: ~1 when the rank had a core to itself, lower when it had to wait
    # (for other processes on the CPU, or for the other rank in the all-reduce).
    cpu_share = sum(cpu_seconds) / sum(seconds)
    shares = [cpu_share]
    if info.distributed:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, cpu_share)
        shares = [float(x) for x in gathered]
    result = {
        "world_size": info.world_size,
        "global_batch": global_batch,
        "tokens_per_step": text_tokens(full),
        "step_s": seconds,
        "tokens_per_s": text_tokens(full) / statistics.median(seconds),
        "cpu_share_per_rank": shares,
    }
    if info.is_main and output is not None:
        output.write_text(json.dumps(result), encoding="utf-8")
    cleanup(info, wait_for_all=True)
    return result


def launch(nproc: int, args: Sequence[str], tmp: Path, index: int) -> dict[str, Any]:
    """Run one torchrun job (a fresh set of processes) and read rank 0's result."""
    out = tmp / f"run{index}_n{nproc}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "bitmar.bench.distributed", "--output", str(out), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not out.exists():
        text = proc.stdout + proc.stderr
        # A rank's own error can sit far above torchrun's closing report: quote the error lines from the whole log.
        keys = ("error", "exception", "terminate", "what()", "abort", "signal")
        errors = [line for line in text.splitlines() if any(k in line.lower() for k in keys)][:25]
        raise RuntimeError(
            f"torchrun with {nproc} process(es) failed (exit {proc.returncode}). Error lines:\n"
            + "\n".join(errors)
            + f"\n--- last lines ---\n{text[-1500:]}"
        )
    return json.loads(out.read_text(encoding="utf-8"))


def _median_share(runs: list[dict[str, Any]]) -> float:
    return statistics.median(share for r in runs for share in r["cpu_share_per_rank"])


def distributed_rows(settings: Settings) -> list[Row | Unavailable]:
    from bitmar.bench.training import TINY_CONFIG
    from bitmar.config import load_config

    # Global batch = 2 x the tiny config's batch: under torchrun the trainer gives every rank the configured batch, so
    # the 2-process run is what `torchrun --nproc_per_node=2 train_bitmar.py` does; 1 process takes all 64 rows.
    pairs, steps, warmup = (1, 5, 1) if settings.quick else (3, 20, 3)
    global_batch = 2 * load_config(TINY_CONFIG).training.batch_size
    args = ["--config", str(TINY_CONFIG), "--global-batch", str(global_batch), "--steps", str(steps),
            "--warmup", str(warmup), "--phase", "2"]  # fmt: skip
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bitmar-bench-ddp-", dir=settings.tmp_dir) as tmp:
        for pair in range(pairs):
            for nproc in (1, 2) if pair % 2 == 0 else (2, 1):  # ABBA: drift hits both alike
                runs[nproc].append(launch(nproc, args, Path(tmp), len(runs[1]) + len(runs[2])))
    two = [r["tokens_per_s"] for r in runs[2]]
    one = [r["tokens_per_s"] for r in runs[1]]
    if pairs == 1:  # one pair: the spread comes from the steps inside each launch (step-time ratios)
        two = [runs[2][0]["tokens_per_step"] / s for s in runs[2][0]["step_s"]]
        one = [runs[1][0]["tokens_per_step"] / s for s in runs[1][0]["step_s"]]
    return [
        ratio_row(
            "distributed",
            f"torchrun DDP on CPU (gloo, 1 thread/process), tiny config phase 2, global batch {global_batch} "
            f"({statistics.median(two):,.0f} vs {statistics.median(one):,.0f} tokens/s; CPU time / wall time per "
            f"process {_median_share(runs[2]):.2f} with 2, {_median_share(runs[1]):.2f} with 1)",
            "2 processes",
            "1 process",
            "tokens/s A / tokens/s B",
            two,
            one,
            SCALING_GOAL,
            {
                "runs": runs,
                "cpu_count": os.cpu_count(),
                "cpu_share_per_rank": {n: [r["cpu_share_per_rank"] for r in runs[n]] for n in runs},
            },
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bitmar.bench.distributed", description="One torchrun worker of the DDP scaling benchmark."
    )
    parser.add_argument("--config", type=Path, required=True, help="BitMar YAML config")
    parser.add_argument("--global-batch", type=int, default=32, help="rows per step over all processes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--phase", type=int, choices=[1, 2, 3], default=2, help="batch kind / objective phase")
    parser.add_argument("--output", type=Path, default=None, help="rank 0 writes its timings here (JSON)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.global_batch < 1:
        parser.error("--steps and --global-batch must be >= 1, --warmup >= 0")
    if not args.config.is_file():
        parser.error(f"--config {args.config} does not exist")
    worker(args.config, args.global_batch, args.steps, args.warmup, args.phase, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

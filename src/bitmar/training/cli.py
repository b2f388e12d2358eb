"""Command line of train_bitmar.py: parse, resolve the config, build data, train, summarise.

User mistakes (bad config, missing data, unreadable checkpoint) print one clear message and exit with code 2;
an interrupted run (SIGTERM/SIGINT) saves checkpoints/last.pt and exits with 128 + signal.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bitmar.config import BitMarConfig, ConfigError, load_config
from bitmar.data.errors import DataError
from bitmar.training.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint
from bitmar.training.distributed import cleanup, init_distributed
from bitmar.training.run_logger import setup_text_logging

log = logging.getLogger("bitmar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_bitmar.py",
        description="Train BitMar in three phases (text, vision-text alignment, episodic memory).",
    )
    parser.add_argument("--config", default="configs/bitmar_config.yaml", help="YAML config (see configs/)")
    parser.add_argument("--max_epochs", type=int, help="total epochs over all phases (BabyLM: at most 10)")
    parser.add_argument("--batch_size", type=int, help="per-process batch size")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set training.learning_rate=1e-3 (repeatable)",
    )
    parser.add_argument("--phase", type=int, choices=(1, 2, 3), default=1, help="start at this phase")
    parser.add_argument("--resume", help="'auto' (checkpoints/last.pt of --output_dir if present) or a .pt path")
    parser.add_argument("--output_dir", default="outputs", help="run directory (checkpoints/, logs/, plots/, ...)")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "disabled"), help="overrides wandb.mode")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--stop_after_steps", type=int, help=argparse.SUPPRESS)  # test hook: save and stop
    return parser


def resolve_config(args: argparse.Namespace, output_dir: Path) -> tuple[BitMarConfig, str | None]:
    """A resumed run takes its config from the checkpoint (CLI overrides still apply on top)."""
    overrides = list(args.overrides)
    if args.max_epochs is not None:
        overrides.append(f"training.max_epochs={args.max_epochs}")
    if args.batch_size is not None:
        overrides.append(f"training.batch_size={args.batch_size}")
    resume_path = None
    if args.resume:
        found = find_resume_checkpoint(output_dir) if args.resume == "auto" else Path(args.resume)
        if found is not None:
            from bitmar.config import config_from_dict

            payload = load_checkpoint(found)
            return config_from_dict(payload["config"], overrides), str(found)
    return load_config(args.config, overrides), resume_path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        dist_info = init_distributed(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_text_logging(output_dir / "logs" / "training.log", dist_info.rank)
    from bitmar.training.trainer import Trainer, TrainingError, TrainingInterrupted

    try:
        cfg, resume_path = resolve_config(args, output_dir)
        if cfg.training.max_steps_per_epoch is not None:
            log.info("training.max_steps_per_epoch=%d: a capped smoke run", cfg.training.max_steps_per_epoch)
        from bitmar.data.datasets import build_data

        data = build_data(cfg, output_dir, rank=dist_info.rank, world_size=dist_info.world_size)
        trainer = Trainer(
            cfg,
            output_dir,
            dist_info,
            data,
            start_phase=args.phase,
            resume_from=resume_path,
            wandb_mode=args.wandb,
            stop_after_steps=args.stop_after_steps,
        )
        summary = trainer.train()
    except (ConfigError, DataError, CheckpointError) as err:
        log.error("%s", err)
        cleanup(dist_info)
        return 2
    except TrainingInterrupted as stop:
        log.warning(
            "stopped at step %d; checkpoints/last.pt saved. Continue with --resume auto --output_dir %s",
            trainer.progress.global_step,
            output_dir,
        )
        cleanup(dist_info)
        return 128 + stop.signum if stop.signum else 0
    except TrainingError as err:
        log.error("%s", err)
        cleanup(dist_info)
        return 1
    if dist_info.is_main:
        print_summary(summary, output_dir)
    cleanup(dist_info, wait_for_all=True)
    return 0


def print_summary(summary: dict, output_dir: Path) -> None:
    lines = ["", "BitMar training summary", "-" * 44]
    for key, value in summary.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<32} {text}")
    lines.append(f"{'run directory':<32} {output_dir}")
    print("\n".join(lines))

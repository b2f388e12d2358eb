"""Command line of train_bitmar.py: parse, resolve the config, build data, train, summarise.

`main(argv, make_hooks)` trains; what runs around the training (evaluation, export, attention analysis) comes from
`make_hooks`, which `bitmar.pipeline.main` (the entry point of train_bitmar.py) supplies. User mistakes (bad config,
missing data, unreadable checkpoint, a run directory another trainer is using) print one clear message and exit with
code 2; an interrupted run (SIGTERM/SIGINT) saves checkpoints/last.pt and exits with 128 + signal (also during the
post-training evaluation, when the checkpoint is already saved).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bitmar.config import BitMarConfig, ConfigError, load_config
from bitmar.data.errors import DataError
from bitmar.infra.checkpoint import CheckpointError, load_checkpoint
from bitmar.infra.run_logger import setup_text_logging
from bitmar.training.distributed import DistInfo, all_reduce_mean, cleanup, init_distributed
from bitmar.training.hooks import PostTrainingError, TrainingHook
from bitmar.training.progress import effective_phase_epochs
from bitmar.training.resume import (
    ResumePoint,
    adopt_checkpoint_tokenizer,
    check_resumable_model,
    find_resume_checkpoint,
)
from bitmar.training.rundir import RunDirectoryBusy, RunLock, remove_orphaned_temp_files
from bitmar.training.signals import TrainingInterrupted

log = logging.getLogger("bitmar")

# Builds the hooks of a run from its resolved config and run directory, before any data or model; raises ConfigError
# for a run whose hooks could not do their work (checked before hours of training, not after).
HookFactory = Callable[[BitMarConfig, Path], Sequence[TrainingHook]]


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
    parser.add_argument(
        "--phase",
        type=int,
        choices=(1, 2, 3),
        help="start at this phase (default 1); with --resume: start this phase from the checkpoint's weights, with a "
        "fresh optimizer and schedule (without --phase, --resume continues the run exactly)",
    )
    parser.add_argument("--resume", help="'auto' (checkpoints/last.pt of --output_dir if present) or a .pt path")
    parser.add_argument("--output_dir", default="outputs", help="run directory (checkpoints/, logs/, plots/, ...)")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "disabled"), help="overrides wandb.mode")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--stop_after_steps", type=int, help=argparse.SUPPRESS)  # test hook: save and stop
    return parser


def resolve_config(args: argparse.Namespace, output_dir: Path) -> tuple[BitMarConfig, ResumePoint | None]:
    """The run's config and the checkpoint it resumes (None for a new run). A resumed run takes its config from the
    checkpoint (CLI overrides still apply on top, but not ones that change the model's shape: those are refused,
    listing the differing keys). The checkpoint is loaded here, once."""
    overrides = list(args.overrides)
    if args.max_epochs is not None:
        overrides.append(f"training.max_epochs={args.max_epochs}")
    if args.batch_size is not None:
        overrides.append(f"training.batch_size={args.batch_size}")
    if args.resume:
        found = find_resume_checkpoint(output_dir) if args.resume == "auto" else Path(args.resume)
        if found is not None:
            from bitmar.config import config_from_dict

            payload = load_checkpoint(found)
            cfg = config_from_dict(payload["config"], overrides)
            check_resumable_model(payload, cfg)
            return cfg, ResumePoint(found, payload)
        log.info("--resume auto: no checkpoint in %s/checkpoints yet, starting a new run", output_dir)
    return load_config(args.config, overrides), None


def _all_ranks_ok(ok: bool, dist_info: DistInfo) -> bool:
    """Every rank learns whether the set-up (run lock on rank 0, config, tokenizer) succeeded everywhere."""
    if not dist_info.distributed:
        return ok
    flag = all_reduce_mean(torch.tensor(1.0 if ok else 0.0, device=dist_info.device), dist_info)
    return bool(flag.item() == 1.0)


def main(argv: list[str] | None = None, make_hooks: HookFactory | None = None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        dist_info = init_distributed(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_text_logging(output_dir / "logs" / "training.log", dist_info.rank)

    # Rank 0 alone holds the run lock (the ranks of one run share it) and cleans what a killed run left behind.
    lock = RunLock(output_dir) if dist_info.is_main else None
    try:
        ok = True
        try:
            if lock is not None:
                lock.acquire()
                remove_orphaned_temp_files(output_dir)
            cfg, resume = resolve_config(args, output_dir)
            if args.phase is not None and args.phase not in effective_phase_epochs(cfg, args.phase):
                raise ConfigError(
                    f"--phase {args.phase}: that phase has no epochs in this config; enable it (e.g. --set "
                    f"training.phase{args.phase}_{('text', 'alignment', 'memory')[args.phase - 1]}.epochs=1)"
                )
            if resume is not None and dist_info.is_main:
                adopt_checkpoint_tokenizer(resume.payload, cfg, output_dir)
        except (RunDirectoryBusy, ConfigError, DataError, CheckpointError) as err:
            log.error("%s", err)
            ok = False
        if not _all_ranks_ok(ok, dist_info):
            cleanup(dist_info)
            return 2
        return _train(args, cfg, resume, output_dir, dist_info, make_hooks)
    finally:
        if lock is not None:
            lock.release()


def _train(
    args: argparse.Namespace,
    cfg: BitMarConfig,
    resume: ResumePoint | None,
    output_dir: Path,
    dist_info: DistInfo,
    make_hooks: HookFactory | None,
) -> int:
    from bitmar.training.trainer import Trainer, TrainingError, settle_vocab_size

    trainer = None
    try:
        hooks = make_hooks(cfg, output_dir) if make_hooks is not None else ()
        if cfg.training.max_steps_per_epoch is not None:
            log.info("training.max_steps_per_epoch=%d: a capped smoke run", cfg.training.max_steps_per_epoch)
        from bitmar.data.datasets import build_data

        data = build_data(cfg, output_dir, rank=dist_info.rank, world_size=dist_info.world_size)
        settle_vocab_size(cfg, data.tokenizer)
        trainer = Trainer(
            cfg,
            output_dir,
            dist_info,
            data,
            start_phase=args.phase,
            resume=resume,
            wandb_mode=args.wandb,
            stop_after_steps=args.stop_after_steps,
            hooks=hooks,
        )
        if resume is not None:
            resume.payload.clear()  # the trainer holds the restored state: do not keep the loaded copy for the run
        summary = trainer.train()
    except (ConfigError, DataError, CheckpointError) as err:
        log.error("%s", err)
        cleanup(dist_info)
        return 2
    except TrainingInterrupted as stop:
        step = trainer.progress.global_step if trainer is not None else 0
        if stop.training_done:
            log.warning(
                "stopped by signal %d during the post-training evaluation/export at step %d. Training had finished: "
                "checkpoints/last.pt and summary.json are saved. Evaluate it with: python evaluate_bitmar.py "
                "--checkpoint %s",
                stop.signum,
                step,
                output_dir / "checkpoints" / "last.pt",
            )
        else:
            log.warning(
                "stopped at step %d; checkpoints/last.pt saved. Continue with --resume auto --output_dir %s",
                step,
                output_dir,
            )
        cleanup(dist_info)
        return 128 + stop.signum if stop.signum else 0
    except TrainingError as err:
        log.error("%s", err)
        cleanup(dist_info)
        return 1
    except PostTrainingError as err:  # the post-training step could not write (disk full, ...)
        log.error(
            "%s. Training itself finished: checkpoints/last.pt and summary.json are saved; evaluate or export "
            "it again with evaluate_bitmar.py / python -m bitmar.export once the problem is fixed",
            err,
        )
        cleanup(dist_info)
        return 2
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

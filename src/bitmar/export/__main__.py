"""Command line: python -m bitmar.export --checkpoint PATH --output_dir DIR [--packed] [--vision_backbone NAME]
[--dtype bfloat16|float32] [--no_store]."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitmar.export.hf_export import DTYPES, ExportError, export_checkpoint
from bitmar.infra.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitmar.export",
        description="Export a BitMar checkpoint as a Hugging Face model directory "
        "(AutoModelForCausalLM / AutoProcessor with trust_remote_code=True).",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint written by train_bitmar.py (e.g. run/checkpoints/best.pt)"
    )
    parser.add_argument(
        "--output_dir",
        required=True,
        help="export directory: created, or replaced atomically if it holds a previous BitMar export and nothing else",
    )
    parser.add_argument("--packed", action="store_true", help="store ternary layers at 2 bits per weight")
    parser.add_argument(
        "--vision_backbone",
        default=None,
        help="DINOv2 hub id or local directory (e.g. facebook/dinov2-base) stored with the model so pixel_values work",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the full-precision parts")
    parser.add_argument(
        "--no_store",
        action="store_true",
        help="leave the checkpoint's persistent episodic store out of the export (episodic_store.safetensors); "
        "the exported model then starts with an empty store",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_checkpoint(
            args.checkpoint, args.output_dir, args.packed, args.vision_backbone, args.dtype, store=not args.no_store
        )
    except (CheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"exported {args.checkpoint} -> {out} ({total / 2**20:.2f} MiB)")
    for file in sorted(Path(out).iterdir()):
        print(f"  {file.name:28s} {file.stat().st_size:>14,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

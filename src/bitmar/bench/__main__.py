"""python -m bitmar.bench [--quick] [--device cpu|cuda] [--output FILE] [--only NAME ...] [--threads N]

Runs every benchmark for the device and prints one table of side-by-side ratios (see bitmar.bench.suite).
`--output results.json` also writes the JSON and the Markdown table (results.md) next to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bitmar.bench import rows, suite
from bitmar.cli_args import positive_float, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitmar.bench",
        description="BitMar performance suite: one table of side-by-side ratios with goals.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (under 2 minutes on 2 cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    parser.add_argument("--output", type=Path, default=None, help="write JSON here and the Markdown table beside it")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", default=None, help=f"run only these: {', '.join(suite.benchmark_names())}"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--peak_tflops",
        "--peak-tflops",
        type=positive_float,
        default=rows.H200_BF16_PEAK_TFLOPS,
        help=f"GPU peak for MFU (default {rows.H200_BF16_PEAK_TFLOPS:g}: measured H200 bf16 dense ceiling)",
    )
    parser.add_argument("--tmp-dir", default=None, help="where temporary files go (default: system tmp)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is not None and args.output.exists() and args.output.is_dir():
        parser.error(f"--output {args.output} is a directory; give a file name such as {args.output / 'bench.json'}")
    try:
        suite.check_device(args.device)
        suite.select(args.only, args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = rows.Settings(
        quick=args.quick,
        device=args.device,
        threads=torch.get_num_threads(),
        peak_tflops=args.peak_tflops,
        tmp_dir=args.tmp_dir,
    )
    result = suite.run_suite(settings, args.only, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(suite.format_table(result))
    if args.output is not None:
        json_path, md_path = suite.write_outputs(result, args.output)
        print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Evaluate a BitMar checkpoint: `python evaluate_bitmar.py --checkpoint RUN_DIR/checkpoints/last.pt` (see README)."""

import sys

from bitmar.evaluation.runner import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train BitMar: `python train_bitmar.py --config configs/bitmar_tiny.yaml` (see README)."""

import sys

from bitmar.pipeline import main

if __name__ == "__main__":
    sys.exit(main())

"""Shared test settings."""

import torch

# Tiny matmuls on a loaded 2-core machine get far slower with 2 threads (contention); 1 thread keeps tests predictable.
torch.set_num_threads(1)

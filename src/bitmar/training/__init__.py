"""Training: losses, schedule, checkpoints, logging, plots, distributed helpers and the trainer."""
